//! A hostile row's headers, exchange or outcome is that row's fault alone.

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::QueueBindOptions;
use lapin::types::{AMQPValue, FieldTable};
use outbox_relay::Settings;
use outbox_tests::broker::{Topology, message_id};
use outbox_tests::relay::{RunningRelay, test_settings};
use outbox_tests::*;
use uuid::Uuid;

use super::{ARRIVAL, distinct_ids, enqueue, wait_for_count};

#[tokio::test]
async fn faults_undecodable_headers_fail_that_row_not_the_claim() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let client = db.connect().await;
    let ex = &topology.exchange;
    // Valid jsonb that serde_json cannot hold: a number beyond f64, and
    // nesting past its recursion limit; good rows on either side, so all
    // four come in one claim.
    enqueue(&client, ex, r#"{"n": 1}"#, None).await;
    client
        .batch_execute(&format!(
            "INSERT INTO outbox.messages (exchange, payload, headers) VALUES \
               ('{ex}', '\\x7b7d', '{{\"huge\": 1e400}}'), \
               ('{ex}', '\\x7b7d', ('{{\"deep\": ' || repeat('[', 200) || repeat(']', 200) || '}}')::jsonb)"
        ))
        .await
        .expect("insert undecodable headers");
    enqueue(&client, ex, r#"{"n": 2}"#, None).await;

    let relay = RunningRelay::start(Settings {
        max_attempts: Some(2),
        ..test_settings(&db)
    })
    .await;
    let deliveries = topology.receive(2, ARRIVAL).await;
    assert_eq!(deliveries.len(), 2, "the good rows are published");
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE dead_at IS NOT NULL \
         AND last_error LIKE 'headers cannot be decoded%' AND attempts = 2",
        2,
        ARRIVAL,
    )
    .await;
    relay.stop().await;
}

/// The relay owns the `x-outbox-*` headers: a writer's own, on a keyless
/// row or a keyed one, never reach the queue (a forged `x-outbox-seq` far
/// ahead would pin its key's watermark at the consumer).
#[tokio::test]
async fn faults_forged_outbox_headers_never_reach_the_queue() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let client = db.connect().await;
    let forged = serde_json::json!({
        "x-outbox-seq": 9_000_000_000_i64,
        "x-outbox-key": "forged-key",
        "tenant": "acme",
    });
    let enqueue_with = |key: Option<&'static str>| {
        let client = &client;
        let forged = &forged;
        let exchange = topology.exchange.clone();
        async move {
            client
                .query_one(
                    "SELECT outbox.enqueue($1, '', '{}'::jsonb, $2::jsonb, $3)",
                    &[&exchange, forged, &key],
                )
                .await
                .expect("enqueue")
                .get::<_, Uuid>(0)
        }
    };
    let keyless = enqueue_with(None).await;
    let keyed = enqueue_with(Some("k1")).await;

    let relay = RunningRelay::start(test_settings(&db)).await;
    let deliveries = topology.receive(2, ARRIVAL).await;
    assert_eq!(deliveries.len(), 2);
    // The relay numbers a key's rows as it claims them.
    let seq: i64 = client
        .query_one(
            "SELECT key_seq FROM outbox.messages WHERE message_id = $1",
            &[&keyed],
        )
        .await
        .expect("key_seq")
        .get(0);
    let headers_of = |id: Uuid| {
        let delivery = deliveries
            .iter()
            .find(|d| message_id(d) == id)
            .expect("delivered");
        delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default()
            .inner()
            .clone()
    };
    let plain = headers_of(keyless);
    assert_eq!(
        plain.get("tenant"),
        Some(&AMQPValue::LongString("acme".into()))
    );
    assert_eq!(plain.get("x-outbox-seq"), None, "{plain:?}");
    assert_eq!(plain.get("x-outbox-key"), None, "{plain:?}");
    let ordered = headers_of(keyed);
    assert_eq!(
        ordered.get("x-outbox-seq"),
        Some(&AMQPValue::LongLongInt(seq))
    );
    assert_eq!(
        ordered.get("x-outbox-key"),
        Some(&AMQPValue::LongString("k1".into()))
    );
    relay.stop().await;
}

#[tokio::test]
async fn faults_a_missing_amq_exchange_is_that_rows_fault_alone() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    // amq.* exchanges that exist keep working.
    let routing_key = unique_name("rk");
    topology
        .channel
        .queue_bind(
            topology.queue.as_str().into(),
            "amq.direct".into(),
            routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind to amq.direct");
    let client = db.connect().await;
    let missing = unique_name("amq.missing");
    let mut expected = HashSet::new();
    for n in 0..3 {
        expected.insert(
            enqueue(
                &client,
                &topology.exchange,
                &format!("{{\"n\": {n}}}"),
                None,
            )
            .await,
        );
    }
    client
        .execute("SELECT outbox.enqueue($1, '', '{}')", &[&missing])
        .await
        .expect("enqueue to a missing amq.* exchange");
    for n in 3..6 {
        expected.insert(
            enqueue(
                &client,
                &topology.exchange,
                &format!("{{\"n\": {n}}}"),
                None,
            )
            .await,
        );
    }
    let direct: Uuid = client
        .query_one(
            "SELECT outbox.enqueue('amq.direct', $1, '{}')",
            &[&routing_key],
        )
        .await
        .expect("enqueue to amq.direct")
        .get(0);
    expected.insert(direct);

    let relay = RunningRelay::start(Settings {
        max_attempts: Some(2),
        ..test_settings(&db)
    })
    .await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE dead_at IS NOT NULL \
         AND last_error LIKE '%does not exist%' AND attempts = 2",
        1,
        ARRIVAL,
    )
    .await;
    let mut deliveries = topology.receive(expected.len(), ARRIVAL).await;
    deliveries.extend(topology.receive(usize::MAX, Duration::from_secs(1)).await);
    assert_eq!(distinct_ids(&deliveries), expected);
    assert_eq!(
        deliveries.len(),
        expected.len(),
        "no row is published again because of another's exchange"
    );
    relay.stop().await;
}

#[tokio::test]
async fn faults_an_outcome_the_database_refuses_stalls_no_other_row() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let client = db.connect().await;
    // The app's own trigger on the outbox refuses to let one row be marked.
    client
        .batch_execute(
            "CREATE FUNCTION public.refuse_explode() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'audit refuses %', NEW.id; END $$; \
             CREATE TRIGGER refuse_explode BEFORE UPDATE ON outbox.messages FOR EACH ROW \
             WHEN (NEW.routing_key = 'explode' AND NEW.published_at IS NOT NULL) \
             EXECUTE FUNCTION public.refuse_explode()",
        )
        .await
        .expect("install the trigger");
    client
        .batch_execute(&format!(
            "BEGIN; \
             SELECT outbox.enqueue('{ex}', '', '{{}}') FROM generate_series(1, 25); \
             SELECT outbox.enqueue('{ex}', 'explode', '{{}}'); \
             SELECT outbox.enqueue('{ex}', '', '{{}}') FROM generate_series(1, 25); \
             COMMIT",
            ex = topology.exchange
        ))
        .await
        .expect("enqueue");
    let relay = RunningRelay::start(test_settings(&db)).await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL",
        50,
        Duration::from_secs(15),
    )
    .await;
    relay.stop().await;
}
