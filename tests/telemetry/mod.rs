//! What an operator sees, from outside the processes: each relay metric
//! moves when its event happens, `/readyz` follows the broker and the
//! database, log lines are JSON with `--log-format json`, and a W3C
//! `traceparent` in an outbox row reaches the AMQP headers and the
//! consumer's log. Relays and consumers run as child processes, so every
//! scrape shows one process's own numbers.
//!
//! Split by what is watched: `metrics` (relay metrics, nacked channels), `readyz`
//! (readiness), `logs` (what logs and dead letters show, trace context),
//! `traces` (spans exported over OTLP).

use outbox_tests::*;
use serde_json::Value;
use tokio_postgres::Client;
use uuid::Uuid;

mod logs;
mod metrics;
mod readyz;
mod traces;

async fn get(addr: &str, path: &str) -> (u16, String) {
    http::request(addr, "GET", path, None).await
}

async fn enqueue(client: &Client, exchange: &str, routing_key: &str, payload: &Value) -> Uuid {
    client
        .query_one(
            "SELECT outbox.enqueue($1, $2, $3::jsonb)",
            &[&exchange, &routing_key, payload],
        )
        .await
        .expect("enqueue")
        .get(0)
}
