//! The small HTTP API: `GET /deliveries/{order_id}`, `/healthz` (the
//! process answers), `/readyz` (consuming, and the database answers) and
//! `/metrics` (Prometheus text format).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::deliveries;
use crate::health::Health;

/// How long `/readyz` waits for the database.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often histograms are compacted (the recorder does not do it itself).
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct ApiState {
    pub pool: Pool,
    pub health: Health,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/deliveries/{order_id}", get(delivery))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(outbox_relay::endpoint::metrics))
        .with_state(state)
}

/// Serves until `shutdown` is cancelled, then finishes requests in hand.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let upkeep = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let mut tick = tokio::time::interval(METRICS_UPKEEP);
            while shutdown.run_until_cancelled(tick.tick()).await.is_some() {
                outbox_relay::telemetry::upkeep();
            }
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    let _ = upkeep.await;
    Ok(())
}

fn error(status: StatusCode, reason: String) -> Response {
    (status, Json(json!({ "error": reason }))).into_response()
}

async fn delivery(State(state): State<ApiState>, Path(order_id): Path<String>) -> Response {
    let Ok(order_id) = order_id.parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("order id `{order_id}` is not an integer"),
        );
    };
    match deliveries::find(&state.pool, order_id).await {
        Ok(Some(view)) => Json(view).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no delivery for order {order_id}"),
        ),
        Err(reason) => {
            tracing::warn!(%reason, "delivery lookup failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "dispatch database unavailable".into(),
            )
        }
    }
}

async fn ready(State(state): State<ApiState>) -> Response {
    if !state.health.consuming() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not consuming: RabbitMQ is unreachable".into(),
        );
    }
    let probe = async {
        let client = state.pool.get().await.ok()?;
        client.simple_query("SELECT 1").await.ok()
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Some(_)) => (StatusCode::OK, "ready").into_response(),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the dispatch database does not answer".into(),
        ),
    }
}
