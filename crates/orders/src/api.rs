//! HTTP API: `POST /orders`, `GET /orders/{id}`, `GET /healthz`.

use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::Pool;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use outbox::PgError;

use crate::order::{NewOrder, Order};

#[derive(Clone)]
pub struct AppState {
    pub pool: Pool,
    /// Where order messages are published.
    pub exchange: String,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// Serves until `shutdown` is cancelled, then finishes requests in hand.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "order service listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

/// An error answer: status plus `{"error": reason}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

/// Logs the database's error (in one line, with its causes) and answers
/// 503 without it: the client cannot act on our database's words.
fn unavailable(error: impl Into<anyhow::Error>) -> ApiError {
    let error = error.into();
    tracing::warn!(
        error = outbox::chain_line(error.as_ref()),
        "order database unavailable"
    );
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "order database unavailable".into(),
    )
}

/// Writes the order and its outbox message in one transaction: 201 with the
/// order and the message id, 409 for a duplicate id, 400 with a reason for
/// bad JSON or fields.
async fn create_order(
    State(state): State<AppState>,
    body: Result<Json<NewOrder>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let Json(new) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    new.validate()
        .map_err(|reason| ApiError(StatusCode::BAD_REQUEST, reason.to_string()))?;

    let mut client = state.pool.get().await.map_err(unavailable)?;
    let tx = client
        .transaction()
        .await
        .map_err(PgError)
        .map_err(unavailable)?;
    let inserted = tx
        .query_opt(
            "INSERT INTO orders (id, user_name, context, num) \
             VALUES (coalesce($1, nextval('order_ids')), $2, $3, $4) \
             ON CONFLICT (id) DO NOTHING RETURNING id",
            &[&new.order_id, &new.user_name, &new.context, &new.num],
        )
        .await
        .map_err(PgError)
        .map_err(unavailable)?;
    let Some(row) = inserted else {
        let id = new.order_id.unwrap_or_default();
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("order {id} already exists"),
        ));
    };
    let order = Order {
        order_id: row.get(0),
        user_name: new.user_name,
        context: new.context,
        num: new.num,
    };
    let message = outbox::Message::json(&state.exchange, "", &order)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, outbox::chain_line(&e)))?;
    // deadpool wraps the transaction; enqueue takes the tokio-postgres one.
    let message_id = outbox::enqueue(&*tx, &message).await.map_err(unavailable)?;
    tx.commit().await.map_err(|e| match e.code() {
        // Two racing requests for one id: the loser's commit fails.
        Some(code) if code == &SqlState::UNIQUE_VIOLATION => ApiError(
            StatusCode::CONFLICT,
            format!("order {} already exists", order.order_id),
        ),
        _ => unavailable(PgError(e)),
    })?;
    let body = json!({ "order": order, "messageId": message_id });
    Ok((StatusCode::CREATED, Json(body)))
}

async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Json<Order>, ApiError> {
    let client = state.pool.get().await.map_err(unavailable)?;
    let row = client
        .query_opt(
            "SELECT id, user_name, context, num FROM orders WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(PgError)
        .map_err(unavailable)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("order {id} not found")))?;
    Ok(Json(Order {
        order_id: row.get(0),
        user_name: row.get(1),
        context: row.get(2),
        num: row.get(3),
    }))
}
