//! The seed's original design, replayed for contrast: the order service
//! calls dispatch over HTTP inside its own transaction, with a 2 s read
//! timeout; dispatch takes 3 s for order 100001. The call times out, the
//! order rolls back, and the delivery dispatch wrote stays: two databases
//! disagree. Its tables live in schema `seed_replay` of each database.

use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::routing::get;
use serde_json::Value;
use tokio_postgres::Client;

use crate::http;

pub const SLOW_ORDER: i64 = 100_001;

/// What each database says about the slow order afterwards.
#[derive(Debug)]
pub struct Outcome {
    pub order_exists: bool,
    pub deliveries: i64,
    pub call: String,
}

pub async fn run(
    orders_db: &Client,
    dispatch_db: &Client,
    dispatch_url: String,
) -> anyhow::Result<Outcome> {
    for db in [orders_db, dispatch_db] {
        db.batch_execute(
            "CREATE SCHEMA IF NOT EXISTS seed_replay;
             DROP TABLE IF EXISTS seed_replay.orders, seed_replay.deliveries;
             CREATE TABLE seed_replay.orders (id bigint PRIMARY KEY, context text);
             CREATE TABLE seed_replay.deliveries (order_id bigint, rider text);",
        )
        .await?;
    }
    let dispatch = serve_legacy_dispatch(dispatch_url).await?;

    // OrderService.createOrder: @Transactional { insert; call dispatch }.
    orders_db.batch_execute("BEGIN").await?;
    orders_db
        .execute(
            "INSERT INTO seed_replay.orders VALUES ($1, 'noodles')",
            &[&SLOW_ORDER],
        )
        .await?;
    let path = format!("/dispatch/order?orderId={SLOW_ORDER}");
    let call = match http::request(&dispatch, "GET", &path, None, Duration::from_secs(2)).await {
        Ok((status, _)) => {
            orders_db.batch_execute("COMMIT").await?;
            format!("answered {status}; order committed")
        }
        Err(error) => {
            orders_db.batch_execute("ROLLBACK").await?;
            format!("{error}; order rolled back")
        }
    };
    // Dispatch finishes its 3 s of work after the caller gave up.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let order_exists = orders_db
        .query_one(
            "SELECT count(*) > 0 FROM seed_replay.orders WHERE id = $1",
            &[&SLOW_ORDER],
        )
        .await?
        .get(0);
    let deliveries = dispatch_db
        .query_one(
            "SELECT count(*) FROM seed_replay.deliveries WHERE order_id = $1",
            &[&SLOW_ORDER],
        )
        .await?
        .get(0);
    Ok(Outcome {
        order_exists,
        deliveries,
        call,
    })
}

/// The seed's DispatchController: `GET /dispatch/order?orderId=`, 3 s for
/// order 100001, then a delivery row in its own transaction.
async fn serve_legacy_dispatch(database_url: String) -> anyhow::Result<String> {
    let target = outbox_service::db::parse_url(&database_url, None)?.named("demo seed dispatch");
    let pool = outbox_service::db::pool(&target, 2).await?;
    let app = Router::new()
        .route("/dispatch/order", get(legacy_dispatch))
        .with_state(pool);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn legacy_dispatch(
    State(pool): State<deadpool_postgres::Pool>,
    Query(query): Query<serde_json::Map<String, Value>>,
) -> &'static str {
    let order_id = query
        .get("orderId")
        .and_then(|v| v.as_str())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or_default();
    // A servlet keeps working after its caller hung up; axum would drop the
    // handler with the connection, so the work runs in a task of its own.
    let work = tokio::spawn(async move {
        if order_id == SLOW_ORDER {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        if let Ok(client) = pool.get().await {
            let _ = client
                .execute(
                    "INSERT INTO seed_replay.deliveries VALUES ($1, 'rider Zhang Fei')",
                    &[&order_id],
                )
                .await;
        }
    });
    let _ = work.await;
    "success"
}
