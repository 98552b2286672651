//! The books' order checks: per key, the order in which the broker routed
//! the messages to the audit queue and the order in which the consumer
//! committed their effects both follow the outbox rows' ids.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::broker::connect_to;
use crate::pipeline::Pipeline;

use super::{Expected, Load};

/// Per-key order as the consumer's queue saw it: for each key, the first
/// copy of each message arrives in outbox id order. Returns the copies
/// beyond one per message.
pub(super) async fn check_broker_order(
    pipeline: &Pipeline,
    app: &Client,
    load: &Load,
    expected: &Expected,
    scenario: &str,
) -> usize {
    let keyed = keyed_rows(app).await;
    let routed = drain_queue(
        &pipeline.servers.amqp_url,
        &pipeline.audit_queue,
        load.orders.len() + expected.not_orders,
    )
    .await;
    let mut seen = HashSet::new();
    let mut last_per_key: HashMap<&str, i64> = HashMap::new();
    let mut copies = 0;
    for id in routed.iter().flatten() {
        if !seen.insert(*id) {
            copies += 1;
            continue;
        }
        if let Some((key, row)) = keyed.get(id) {
            let last = last_per_key.entry(key.as_str()).or_insert(0);
            assert!(
                *row > *last,
                "{scenario}: key {key}: row {row} arrived after row {last}"
            );
            *last = *row;
        }
    }
    let missing = load.orders.values().filter(|id| !seen.contains(id)).count();
    assert_eq!(missing, 0, "{scenario}: orders never routed by the broker");
    copies
}

/// Each keyed message's key and outbox row id.
async fn keyed_rows(app: &Client) -> HashMap<Uuid, (String, i64)> {
    app.query(
        "SELECT message_id, ordering_key, id FROM outbox.messages WHERE ordering_key IS NOT NULL",
        &[],
    )
    .await
    .expect("keyed rows")
    .iter()
    .map(|row| (row.get(0), (row.get(1), row.get(2))))
    .collect()
}

/// Per-key order as the consumer committed it: `dispatch.deliveries.id`
/// is taken at the insert, inside the consumer's transaction, and a key's
/// messages are handled one after another in its lane, so for each key
/// the deliveries' ids follow the outbox rows' ids.
pub(super) async fn check_effect_order(app: &Client, dispatch: &Client, scenario: &str) {
    let keyed = keyed_rows(app).await;
    let effects: Vec<Uuid> = dispatch
        .query(
            "SELECT message_id FROM dispatch.deliveries ORDER BY id",
            &[],
        )
        .await
        .expect("deliveries")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut last_per_key: HashMap<&str, i64> = HashMap::new();
    let mut inversions = Vec::new();
    for id in &effects {
        if let Some((key, row)) = keyed.get(id) {
            let last = last_per_key.entry(key.as_str()).or_insert(0);
            if *row < *last {
                inversions.push((key.clone(), *row, *last));
            }
            *last = (*last).max(*row);
        }
    }
    assert!(
        inversions.is_empty(),
        "{scenario}: {} keyed deliveries committed before an earlier one of their key, e.g. {:?}",
        inversions.len(),
        &inversions[..inversions.len().min(5)]
    );
}

/// Reads the audit queue until it has `at_least` messages and stays quiet;
/// the message ids, `None` where a peer sent none or not a UUID. Another
/// test may cut every broker connection meanwhile: then it reads on over a
/// new one (unacked copies come again and count as copies).
async fn drain_queue(amqp_url: &str, queue: &str, at_least: usize) -> Vec<Option<Uuid>> {
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if read_queue(amqp_url, queue, at_least, deadline, &mut ids)
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ids
}

async fn read_queue(
    amqp_url: &str,
    queue: &str,
    at_least: usize,
    deadline: Instant,
    ids: &mut Vec<Option<Uuid>>,
) -> Result<(), lapin::Error> {
    let connection = connect_to(amqp_url).await;
    let channel = connection.create_channel().await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            crate::unique_name("audit").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let quiet = if ids.len() >= at_least {
            Duration::from_millis(500)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match tokio::time::timeout(quiet, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                let id = delivery.properties.message_id().as_ref();
                ids.push(id.and_then(|id| Uuid::parse_str(id.as_str()).ok()));
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Ok(Some(Err(error))) => return Err(error),
            Ok(None) | Err(_) => break,
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}
