//! The dispatch center's API: `GET /deliveries/{order_id}`. It is served
//! beside the ops endpoint's `/metrics`, `/healthz` and `/readyz` (see
//! `outbox_service::endpoint`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use serde_json::json;

use crate::deliveries;

pub(crate) fn router(pool: Pool) -> Router {
    Router::new()
        .route("/deliveries/{order_id}", get(delivery))
        .with_state(pool)
}

fn error(status: StatusCode, reason: String) -> Response {
    (status, Json(json!({ "error": reason }))).into_response()
}

async fn delivery(State(pool): State<Pool>, Path(order_id): Path<String>) -> Response {
    let Ok(order_id) = order_id.parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("order id `{order_id}` is not an integer"),
        );
    };
    match deliveries::find(&pool, order_id).await {
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
