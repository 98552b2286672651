//! The operator commands (`status`, `dead`, `replay`, `reconcile`) run as
//! the binary against real databases, with dead letters a real relay made
//! (unroutable messages) and a real dispatch consumer's inbox.
//!
//! Split by command: `status`, `dead_letters` (`dead list|show|requeue|
//! discard`), `replay` (`replay` and `reconcile`).

use outbox_relay::Settings;
use outbox_tests::dispatch::{count, wait_until};
use outbox_tests::relay::{RunningRelay, test_settings};
use outbox_tests::*;
use serde_json::{Value, json};
use tokio_postgres::Client;
use uuid::Uuid;

mod dead_letters;
mod replay;
mod status;

/// Enqueues `n` messages `{"seq": i}` (with `ordering_key` when given).
async fn enqueue(
    client: &Client,
    exchange: &str,
    routing_key: &str,
    n: usize,
    ordering_key: Option<&str>,
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for seq in 0..n {
        let id = client
            .query_one(
                "SELECT outbox.enqueue($1, $2, $3::jsonb, '{}', $4)",
                &[&exchange, &routing_key, &json!({"seq": seq}), &ordering_key],
            )
            .await
            .expect("enqueue")
            .get(0);
        ids.push(id);
    }
    ids
}

async fn wait_for_count(db: &TestDb, sql: &str, expected: i64) {
    wait_until(&format!("{sql} = {expected}"), || async {
        count(db, sql).await == expected
    })
    .await;
}

const DEAD: &str = "SELECT count(*) FROM outbox.dead_letters";
const PUBLISHED: &str = "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL";

/// A relay that gives up after one attempt, so unroutable messages die at once.
async fn impatient_relay(db: &TestDb) -> RunningRelay {
    RunningRelay::start(Settings {
        max_attempts: Some(1),
        ..test_settings(db)
    })
    .await
}

fn exchange<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["exchanges"]
        .as_array()
        .and_then(|all| all.iter().find(|e| e["exchange"] == name))
        .unwrap_or_else(|| panic!("no exchange {name} in {status:#}"))
}
