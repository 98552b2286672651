//! A pipelined key whose row was returned to the outbox keeps its order at
//! the consumer, also across a consumer restart.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::FieldTable;
use outbox_consumer::ConsumerConfig;
use outbox_tests::dispatch::{count, ready, wait_until};
use outbox_tests::*;
use tokio_util::sync::CancellationToken;

use super::{Recording, consume, create_inbox, logged, start_with};

/// A relay pipelining keys publishes a key's rows without waiting for each
/// confirm, so when one row is returned (its exchange routes it nowhere
/// yet), the rows behind it reach the queue first and the returned one
/// comes after its retry. The consumer holds the early ones by their
/// `x-outbox-seq` until it comes: the effects of each key are in order.
/// Without the sequencer, rows 6.. of each key were handled before row 5.
#[tokio::test]
async fn a_pipelined_key_whose_row_was_returned_keeps_its_order_at_the_consumer() {
    returned_row_keeps_its_order(false).await;
}

/// The same with the consumer restarted while row 5 is missing: the new
/// one learns from each key's watermark in `inbox_keys` that 5 comes next.
/// With the expected numbers in memory only, it took row 6 (redelivered)
/// as the first of each key.
#[tokio::test]
async fn a_consumer_restarted_while_a_key_waits_for_its_missing_row_keeps_its_order() {
    returned_row_keeps_its_order(true).await;
}

async fn returned_row_keeps_its_order(restart: bool) {
    const KEYS: i64 = 4;
    const ROWS: i64 = 30;
    let db = TestDb::with_outbox().await;
    db.connect()
        .await
        .batch_execute("CREATE TABLE effects_log (id bigserial PRIMARY KEY, key text, n bigint)")
        .await
        .expect("tables");
    create_inbox(&db).await;
    let mut shutdown = CancellationToken::new();
    let adjust = |config: &mut ConsumerConfig| {
        config.lanes = 2;
        config.key_gap_wait = Duration::from_secs(120);
    };
    let (topology, mut consumer) = start_with(&db, Recording, adjust, &shutdown).await;
    // Row 5 of each key goes through a gate that routes nowhere until the
    // test binds it to the consumer's queue.
    let gate = unique_name("gate");
    let channel = outbox_tests::broker::connect()
        .await
        .create_channel()
        .await
        .expect("channel");
    channel
        .exchange_declare(
            gate.as_str().into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the gate");
    db.connect()
        .await
        .execute(
            "INSERT INTO outbox.messages (exchange, routing_key, payload, ordering_key) \
             SELECT CASE WHEN n = 5 THEN $1 ELSE $2 END, 'open', \
                    convert_to(json_build_object('key', 'k' || key, 'n', n)::text, 'UTF8'), \
                    'k' || key \
             FROM generate_series(1, $3::int) n, generate_series(1, $4::int) key ORDER BY n, key",
            &[&gate, &topology.exchange, &(ROWS as i32), &(KEYS as i32)],
        )
        .await
        .expect("keyed rows");
    let mut settings = outbox_tests::relay::test_settings(&db);
    settings.key_pipeline = Some(64);
    settings.max_attempts = Some(1_000);
    let relay = outbox_tests::relay::RunningRelay::start(settings).await;
    wait_until("rows behind each returned row 5 are published", || async {
        count(
            &db,
            "SELECT count(DISTINCT ordering_key) FROM outbox.messages \
             WHERE published_at IS NOT NULL AND convert_from(payload, 'UTF8')::jsonb->>'n' = '6'",
        )
        .await
            == KEYS
    })
    .await;
    // The marks land on their own: row 6's publish may be marked before
    // row 5's return is.
    wait_until("each row 5 was returned, and only those", || async {
        count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NULL AND attempts > 0",
        )
        .await
            == KEYS
    })
    .await;
    // Every published row is in the consumer's hands (none left in the
    // queue) and rows 1 to 4 have their effects: what is left, it holds.
    let held_in_hand = || async {
        wait_until("the consumer holds every row behind row 5", || async {
            count(
                &db,
                "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL",
            )
            .await
                == KEYS * (ROWS - 1)
                && ready(&topology.queue).await == 0
                && count(&db, "SELECT count(*) FROM effects_log").await == KEYS * 4
        })
        .await;
    };
    held_in_hand().await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM effects_log WHERE n > 5").await,
        0,
        "rows behind a missing one wait"
    );
    if restart {
        shutdown.cancel();
        consumer.await.expect("join").expect("consumer");
        shutdown = CancellationToken::new();
        consumer = consume(&db, &topology, Recording, adjust, &shutdown).await;
        held_in_hand().await;
        assert_eq!(
            count(&db, "SELECT count(*) FROM effects_log WHERE n > 5").await,
            0,
            "the new consumer waits for row 5 too"
        );
        assert_eq!(
            count(&db, "SELECT min(last_seq) FROM inbox_keys").await,
            4,
            "each key's watermark"
        );
    }
    channel
        .queue_bind(
            topology.queue.as_str().into(),
            gate.as_str().into(),
            "open".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("open the gate");
    wait_until("every row has its effect", || async {
        count(&db, "SELECT count(*) FROM effects_log").await == KEYS * ROWS
    })
    .await;
    relay.stop().await;
    shutdown.cancel();
    consumer.await.expect("join").expect("consumer");
    let in_order: Vec<i64> = (1..=ROWS).collect();
    for (key, ns) in logged(&db).await {
        assert_eq!(ns, in_order, "key {key}");
    }
}
