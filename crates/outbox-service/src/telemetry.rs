//! Logs and the Prometheus recorder, shared by our binaries.
//!
//! Logs go to stderr, human-readable by default or one JSON object per line
//! with `--log-format json` (fields at the top level, the current span
//! under `span`, so a consumer's `trace_id` is on every line it logs for a
//! message). `RUST_LOG` filters; the default is `info` without the server
//! NOTICEs and library chatter.
//!
//! Whatever `RUST_LOG` asks for, [`guard`] caps the libraries whose more
//! verbose lines print message bodies or credentials (see [`CAPPED`]): a
//! user turning on `trace` to chase a problem must not spill payloads or
//! the broker login into a log shipper. Every outcome lapin reports reaches
//! our own log lines anyway.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{FilterFn, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

// The OpenTelemetry SDK's own lines (its targets start `opentelemetry`)
// from warn: a failed export, dropped spans; not its start-up notices.
const DEFAULT_FILTER: &str =
    "info,tokio_postgres=warn,refinery_core=warn,lapin=off,opentelemetry=warn";

/// Targets (a crate or module and everything below it) and the most
/// verbose level each may log at, `None` for nothing; the first match
/// counts. Checked against lapin 4.12, tokio-postgres 0.7 and lettre 0.11.
pub(crate) const CAPPED: &[(&str, Option<Level>)] = &[
    // WARN "Server returned us a message" with the whole message, body too.
    ("lapin::returned_messages", None),
    // DEBUG and TRACE print whole frames (bodies, the login's SASL
    // response with the password) and deliveries; its ERROR lines name
    // states, server replies and flume's body-less `SendError(..)`.
    ("lapin", Some(Level::ERROR)),
    // DEBUG prints every statement's bound parameters: payloads of
    // `outbox.enqueue`, the rows dispatch writes. INFO is the server's NOTICEs.
    ("tokio_postgres", Some(Level::INFO)),
    // DEBUG (with lettre's `tracing` feature) is the SMTP dialogue, AUTH included.
    ("lettre", Some(Level::INFO)),
];

/// Whether an event of `target` at `level` may be logged at all.
pub fn allowed(target: &str, level: Level) -> bool {
    let capped = CAPPED.iter().find(|(prefix, _)| {
        target
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    });
    match capped {
        // A more verbose level compares greater in tracing.
        Some((_, cap)) => cap.is_some_and(|cap| level <= cap),
        None => true,
    }
}

/// A global filter applying [`CAPPED`], on top of any `EnvFilter`: it only
/// ever takes lines away, so the user's other directives keep working.
pub fn guard() -> FilterFn<impl Fn(&Metadata<'_>) -> bool + Clone> {
    filter_fn(|metadata| allowed(metadata.target(), *metadata.level()))
}

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
            .finish()
            .with(guard())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .finish()
            .with(guard())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_printing_targets_are_capped_at_every_level() {
        let all = [
            Level::ERROR,
            Level::WARN,
            Level::INFO,
            Level::DEBUG,
            Level::TRACE,
        ];
        for level in all {
            assert!(!allowed("lapin::returned_messages", level), "{level}");
        }
        for target in [
            "lapin",
            "lapin::io_loop",
            "lapin::channels",
            "lapin::consumer",
        ] {
            assert!(allowed(target, Level::ERROR), "{target}");
            for level in &all[1..] {
                assert!(!allowed(target, *level), "{target} {level}");
            }
        }
        assert!(allowed("tokio_postgres::connection", Level::INFO));
        assert!(!allowed("tokio_postgres::query", Level::DEBUG));
        assert!(!allowed("lettre::transport::smtp", Level::DEBUG));
    }

    #[test]
    fn other_targets_keep_every_level() {
        for target in [
            "outbox_relay::relay",
            "dispatch",
            "lapinx",
            "tokio_postgres_rustls",
        ] {
            assert!(allowed(target, Level::TRACE), "{target}");
        }
    }
}
