//! Logs and the Prometheus recorder, shared by our binaries.
//!
//! Logs go to stderr, human-readable by default or one JSON object per line
//! with `--log-format json` (fields at the top level, the current span
//! under `span`, so a consumer's `trace_id` is on every line it logs for a
//! message). `RUST_LOG` filters; the default is `info` without the server
//! NOTICEs and library chatter. lapin is silenced by default: it logs
//! returned messages with their payload, and every outcome it reports
//! reaches our own log lines anyway.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

const DEFAULT_FILTER: &str = "info,tokio_postgres=warn,refinery_core=warn,lapin=off";

/// Histogram buckets of every `*_seconds` metric: 1 ms to 5 min, so the
/// sub-millisecond idle latency and a retry after an outage both land in one.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Buckets of `outbox_claim_batch_size` (rows per claim; 0 is an empty claim).
const BATCH_BUCKETS: &[f64] = &[
    0.0, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0,
];

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Human-readable logs.
pub fn init() {
    init_with(LogFormat::Text);
}

pub fn init_with(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests starting several relays) is harmless: keep the first.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// The process-wide Prometheus recorder, installed on first use. Handles
/// registered before it exists record nothing, so call this before
/// creating them. When another recorder was installed first (the bench
/// captures the relay's latency itself), the page stays empty rather than
/// failing.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        builder()
            .install_recorder()
            .unwrap_or_else(|_| builder().build_recorder().handle())
    })
}

fn builder() -> PrometheusBuilder {
    let with_buckets = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("outbox_claim_batch_size".into()),
                BATCH_BUCKETS,
            )
        });
    // Only an empty bucket list fails, and ours are constants.
    with_buckets.unwrap_or_else(|_| PrometheusBuilder::new())
}

/// The metrics in the Prometheus text format.
pub fn render() -> String {
    prometheus().render()
}

/// Drains histogram samples into their buckets; run it every few seconds
/// while a recorder is installed, or samples pile up between scrapes.
pub fn upkeep() {
    prometheus().run_upkeep();
}
