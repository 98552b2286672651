//! The ops endpoint every service serves: `/metrics` (Prometheus text),
//! `/healthz` (the process answers: restart it if not) and `/readyz` (the
//! servers it needs are connected: route no traffic to it, or alert, if
//! not). A service may add routes of its own (the consumer's API).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::health::{Health, NotReady};
use crate::telemetry;

/// How often histogram samples are folded into their buckets (the
/// recorder does not do it itself).
const UPKEEP: Duration = Duration::from_secs(5);
/// How long `/readyz` waits for a probe. A probe that holds something it
/// must give back (a pooled connection whose statement hangs) sets its own
/// deadline a little shorter (see [`PROBE_DEADLINE`]).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The deadline a probe gives its own work, inside [`PROBE_TIMEOUT`].
pub const PROBE_DEADLINE: Duration = Duration::from_millis(1_500);

/// An active check `/readyz` runs besides [`Health`] (say, `SELECT 1`);
/// `Err` says what does not answer.
pub type Probe = Arc<dyn Fn() -> BoxFuture<'static, Result<(), NotReady>> + Send + Sync>;

/// What `/readyz` looks at.
#[derive(Clone)]
pub struct Readiness {
    pub health: Health,
    pub probe: Option<Probe>,
}

/// Binds `addr` (port 0 picks a free one) and serves until `shutdown`.
/// Installs the Prometheus recorder first: create the metric handles after.
pub async fn start(
    addr: SocketAddr,
    readiness: Readiness,
    routes: Router,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), std::io::Error> {
    telemetry::prometheus();
    let listener = TcpListener::bind(addr).await.map_err(|error| {
        std::io::Error::new(error.kind(), format!("cannot serve on {addr}: {error}"))
    })?;
    let bound = listener.local_addr()?;
    Ok((
        bound,
        tokio::spawn(serve(listener, readiness, routes, shutdown)),
    ))
}

/// Serves on a bound listener until `shutdown`, then finishes the requests
/// in hand.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    routes: Router,
    shutdown: CancellationToken,
) {
    telemetry::prometheus();
    let upkeep = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let mut tick = tokio::time::interval(UPKEEP);
            while shutdown.run_until_cancelled(tick.tick()).await.is_some() {
                telemetry::upkeep();
            }
        }
    });
    let served = axum::serve(listener, router(readiness).merge(routes))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = served {
        tracing::warn!(%error, "ops endpoint failed");
    }
    let _ = upkeep.await;
}

fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(readiness)
}

async fn ready(State(readiness): State<Readiness>) -> Response {
    let mut verdict = readiness.health.ready();
    if let (Ok(()), Some(probe)) = (&verdict, &readiness.probe) {
        verdict = tokio::time::timeout(PROBE_TIMEOUT, probe())
            .await
            .unwrap_or(Err(NotReady::Timeout(PROBE_TIMEOUT)));
    }
    match verdict {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::render(),
    )
        .into_response()
}
