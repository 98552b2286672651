//! The relay's HTTP endpoint on `OUTBOX_METRICS_ADDR`: `/metrics`
//! (Prometheus text), `/healthz` (the process answers: restart it if not)
//! and `/readyz` (PostgreSQL and RabbitMQ connected: alert, or route no
//! traffic to it, if not).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::meters::Health;
use crate::telemetry;

/// How often histogram samples are folded into their buckets.
const UPKEEP: Duration = Duration::from_secs(5);

/// Binds `addr` (port 0 picks a free one) and serves until `shutdown`.
/// Installs the Prometheus recorder first: create the metric handles after.
pub async fn start(
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    telemetry::prometheus();
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let upkeep = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let mut tick = tokio::time::interval(UPKEEP);
                while shutdown.run_until_cancelled(tick.tick()).await.is_some() {
                    telemetry::upkeep();
                }
            }
        });
        let served = axum::serve(listener, router(health))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "metrics endpoint failed");
        }
        let _ = upkeep.await;
    });
    Ok((bound, task))
}

fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(health)
}

async fn ready(State(health): State<Health>) -> Response {
    match health.ready() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

/// Also used by the consumer's API.
pub async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::render(),
    )
        .into_response()
}
