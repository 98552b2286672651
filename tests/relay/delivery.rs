//! Delivery: rows arrive once with their properties, unroutable messages
//! retry then die, a missing exchange fails one message, shutdown loses none.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use lapin::ExchangeKind;
use lapin::types::AMQPValue;
use outbox_relay::Settings;
use outbox_tests::broker::Topology;
use outbox_tests::receivers::{http_receiver, smtp_receiver};
use outbox_tests::relay::{RunningRelay, test_settings};
use outbox_tests::*;
use serde_json::json;
use uuid::Uuid;

use super::{ARRIVAL, assert_same_ids, enqueue, ids_of, wait_all_published};

#[tokio::test]
async fn rows_from_many_transactions_arrive_once_with_their_properties() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(test_settings(&db)).await;

    let mut writers = Vec::new();
    for _ in 0..8 {
        let mut client = db.connect().await;
        let exchange = topology.exchange.clone();
        writers.push(tokio::spawn(async move {
            enqueue(&mut client, &exchange, "", 100, 5).await
        }));
    }
    let mut expected = HashSet::new();
    for writer in writers {
        expected.extend(writer.await.expect("writer"));
    }

    let mut deliveries = topology.receive(expected.len(), ARRIVAL).await;
    deliveries.extend(
        topology
            .receive(usize::MAX, Duration::from_millis(500))
            .await,
    );
    let received = ids_of(&deliveries);
    assert_eq!(received.len(), expected.len(), "each row exactly once");
    assert_same_ids(&received.iter().copied().collect(), &expected);

    let sample = &deliveries[0];
    assert_eq!(
        sample
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(*sample.properties.delivery_mode(), Some(2), "persistent");
    assert!(sample.properties.timestamp().is_some(), "timestamp set");
    let headers = sample.properties.headers().as_ref().expect("headers");
    assert!(matches!(
        headers.inner().get("seq"),
        Some(AMQPValue::LongLongInt(_))
    ));
    let body: serde_json::Value = serde_json::from_slice(&sample.data).expect("JSON body");
    assert!(body.get("seq").is_some());

    wait_all_published(&db.connect().await, Duration::from_secs(10)).await;
    relay.stop().await;
}

#[tokio::test]
async fn rows_committed_while_no_relay_runs_are_published_when_one_starts() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    let expected = enqueue(&mut client, &topology.exchange, "", 300, 50).await;

    let relay = RunningRelay::start(test_settings(&db)).await;
    let received = ids_of(&topology.receive(expected.len(), ARRIVAL).await);
    assert_same_ids(
        &received.into_iter().collect(),
        &expected.into_iter().collect(),
    );
    relay.stop().await;
}

#[tokio::test]
async fn unroutable_messages_retry_with_backoff_then_die_and_alert() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::new(ExchangeKind::Direct, "bound").await;
    let (webhook_url, mut webhooks) = http_receiver().await;
    let (smtp_url, mut emails) = smtp_receiver().await;
    let mut client = db.connect().await;
    let doomed = enqueue(&mut client, &topology.exchange, "nowhere", 1, 1).await[0];
    let good = enqueue(&mut client, &topology.exchange, "bound", 1, 1).await[0];

    let settings = Settings {
        max_attempts: Some(3),
        alert_webhook_url: Some(webhook_url),
        alert_smtp_url: Some(smtp_url),
        alert_email_to: Some("ops@example.com".into()),
        ..test_settings(&db)
    };
    let started = Instant::now();
    let relay = RunningRelay::start(settings).await;

    // The unroutable message never blocks the good one.
    assert_eq!(ids_of(&topology.receive(1, ARRIVAL).await), vec![good]);

    let alert = tokio::time::timeout(ARRIVAL, webhooks.recv())
        .await
        .expect("no webhook alert")
        .expect("receiver closed");
    assert_eq!(alert["message_id"], json!(doomed.to_string()), "{alert}");
    let email = tokio::time::timeout(ARRIVAL, emails.recv())
        .await
        .expect("no email alert")
        .expect("receiver closed");
    assert!(email.contains(&doomed.to_string()), "{email}");
    assert!(email.contains("ops@example.com"), "{email}");
    // Retries waited: 50 ms then 100 ms, each jittered down by at most half.
    assert!(started.elapsed() >= Duration::from_millis(75));

    let row = client
        .query_one(
            "SELECT attempts, dead_at IS NOT NULL, last_error FROM outbox.messages WHERE message_id = $1",
            &[&doomed],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, i32>(0), 3);
    assert!(row.get::<_, bool>(1), "dead");
    assert!(
        row.get::<_, String>(2).contains("unroutable"),
        "{}",
        row.get::<_, String>(2)
    );
    let listed: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox.dead_letters WHERE message_id = $1",
            &[&doomed],
        )
        .await
        .expect("view")
        .get(0);
    assert_eq!(listed, 1);
    relay.stop().await;
}

#[tokio::test]
async fn a_missing_exchange_fails_that_message_only() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    let missing = enqueue(&mut client, &unique_name("no_such_exchange"), "", 1, 1).await[0];
    let good = enqueue(&mut client, &topology.exchange, "", 20, 20).await;
    let relay = RunningRelay::start(Settings {
        max_attempts: Some(2),
        ..test_settings(&db)
    })
    .await;

    let received = ids_of(&topology.receive(good.len(), ARRIVAL).await);
    assert_same_ids(&received.into_iter().collect(), &good.into_iter().collect());
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let row = client
            .query_one("SELECT dead_at IS NOT NULL, coalesce(last_error, '') FROM outbox.messages WHERE message_id = $1", &[&missing])
            .await
            .expect("row");
        if row.get::<_, bool>(0) {
            assert!(row.get::<_, String>(1).contains("does not exist"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing-exchange message never died"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await;
}

#[tokio::test]
async fn shutdown_with_messages_in_flight_loses_none() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    let expected = enqueue(&mut client, &topology.exchange, "", 3000, 500).await;

    let relay = RunningRelay::start(test_settings(&db)).await;
    let early = topology.receive(1, ARRIVAL).await;
    relay.stop().await;
    let leased: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NULL AND locked_by IS NOT NULL",
            &[],
        )
        .await
        .expect("leased")
        .get(0);
    assert_eq!(leased, 0, "leases must be given back at shutdown");

    let relay = RunningRelay::start(test_settings(&db)).await;
    wait_all_published(&client, ARRIVAL).await;
    relay.stop().await;
    let mut received: HashSet<Uuid> = ids_of(&early).into_iter().collect();
    received.extend(ids_of(
        &topology.receive(usize::MAX, Duration::from_secs(3)).await,
    ));
    assert_same_ids(&received, &expected.into_iter().collect());
}
