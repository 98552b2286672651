//! `outbox-bench otlp-sink`: an OTLP/HTTP endpoint that accepts every
//! export and counts it, nothing more, to price span export without a
//! collector's own work on the same two cores. Run it beside a bench with
//! `OTEL_EXPORTER_OTLP_ENDPOINT=http://ADDR`: the relay in the bench and
//! the dispatch child then export to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;

use crate::cli::OtlpSinkArgs;

#[derive(Default)]
struct Counts {
    exports: AtomicU64,
    bytes: AtomicU64,
}

/// Serves until interrupted, printing the counts every `--every` seconds.
pub async fn run(args: &OtlpSinkArgs) -> anyhow::Result<()> {
    let counts = Arc::new(Counts::default());
    let app = Router::new()
        .route("/v1/traces", post(accept))
        .with_state(counts.clone());
    let listener = tokio::net::TcpListener::bind(&args.addr).await?;
    println!("OTLP sink on http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut tick = tokio::time::interval(Duration::from_secs(args.every));
    tick.tick().await;
    loop {
        let interrupted = tokio::select! {
            _ = tokio::signal::ctrl_c() => true,
            _ = tick.tick() => false,
        };
        println!(
            "{} exports, {} bytes",
            counts.exports.load(Ordering::Relaxed),
            counts.bytes.load(Ordering::Relaxed)
        );
        if interrupted {
            break;
        }
    }
    server.abort();
    Ok(())
}

async fn accept(State(counts): State<Arc<Counts>>, body: Bytes) {
    counts.exports.fetch_add(1, Ordering::Relaxed);
    counts.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
}
