//! Logging (`RUST_LOG` filters; default `info` without the server NOTICEs
//! and library chatter, to stderr) and the optional Prometheus endpoint.
//! lapin is silenced by default: it logs returned messages with their
//! payload, and every outcome it reports reaches our own log lines anyway.

use std::net::SocketAddr;

use tracing_subscriber::EnvFilter;

const DEFAULT_FILTER: &str = "info,tokio_postgres=warn,refinery_core=warn,lapin=off";

pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // A second init (tests starting several relays) is harmless: keep the first.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Serves `/metrics` in the Prometheus text format on `addr`.
pub fn serve_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()?;
    Ok(())
}
