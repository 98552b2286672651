//! `outbox-relay run` against the real PostgreSQL and RabbitMQ: delivery,
//! retries and escalation, outages, takeover, several relays, shutdown and
//! bad configuration.
//!
//! Split by theme: `delivery`, `failures` (outages, takeover, several
//! relays), `config`, `retention`, `finding` (sweep, wake-ups, keyed claims).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox_tests::broker::message_id;
use serde_json::json;
use tokio_postgres::Client;
use uuid::Uuid;

mod config;
mod delivery;
mod failures;
mod finding;
mod retention;

const ARRIVAL: Duration = Duration::from_secs(60);

/// Enqueues `count` JSON messages `{"seq": n}`, `per_tx` per transaction.
async fn enqueue(
    client: &mut Client,
    exchange: &str,
    routing_key: &str,
    count: usize,
    per_tx: usize,
) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(per_tx) {
        let tx = client.transaction().await.expect("begin");
        for seq in chunk {
            let id: Uuid = tx
                .query_one(
                    "SELECT outbox.enqueue($1, $2, $3::jsonb, $4::jsonb)",
                    &[
                        &exchange,
                        &routing_key,
                        &json!({"seq": seq}),
                        &json!({"seq": seq}),
                    ],
                )
                .await
                .expect("enqueue")
                .get(0);
            ids.push(id);
        }
        tx.commit().await.expect("commit");
    }
    ids
}

async fn pending(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NULL",
            &[],
        )
        .await
        .expect("count pending")
        .get(0)
}

/// Waits until no row is pending, or fails after `limit`.
async fn wait_all_published(client: &Client, limit: Duration) {
    let deadline = Instant::now() + limit;
    while pending(client).await > 0 {
        assert!(
            Instant::now() < deadline,
            "rows still pending after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fails with counts (not thousands of ids) when `received` is not `expected`.
fn assert_same_ids(received: &HashSet<Uuid>, expected: &HashSet<Uuid>) {
    let lost = expected.difference(received).count();
    let foreign = received.difference(expected).count();
    assert!(
        lost == 0 && foreign == 0,
        "{lost} of {} lost, {foreign} unexpected",
        expected.len()
    );
}

fn ids_of(deliveries: &[lapin::message::Delivery]) -> Vec<Uuid> {
    deliveries.iter().map(message_id).collect()
}
