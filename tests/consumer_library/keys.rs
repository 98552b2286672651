//! Keys across handlers and consumers: a slow key holds up only itself,
//! and consumers sharing a queue or taking over keep each key's order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::types::FieldTable;
use outbox_consumer::{Handler, HandlerError, Incoming};
use outbox_tests::dispatch::{PATIENCE, Publisher, count, ready, wait_for_consumers, wait_until};
use outbox_tests::*;
use tokio::sync::{Notify, Semaphore};
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

use super::{Recording, consume, logged, logging_database, publish_numbered, start_with};

/// [`Recording`], except that the first message of key `slow` says it
/// started and then waits until the test opens `gate`.
struct SlowKey {
    started: Arc<Notify>,
    gate: Arc<Semaphore>,
}

impl Handler for SlowKey {
    async fn handle(&self, tx: &Transaction<'_>, message: &Incoming) -> Result<(), HandlerError> {
        let body: serde_json::Value = serde_json::from_slice(&message.body)
            .map_err(|e| HandlerError::Poison(e.to_string()))?;
        if body["key"] == "slow" && body["n"] == 1 {
            self.started.notify_one();
            let _open = self.gate.acquire().await;
        }
        Recording.handle(tx, message).await
    }
}

/// One key whose handler is stuck holds up its own key, not the consumer:
/// with default prefetch and lanes, 3,000 other messages (2,000 on 100
/// keys, 1,000 keyless) commit while its first message is in its handler,
/// and its later ones commit after it, in order. When keys were pinned
/// to a lane by hash, the stuck lane's queue filled with the other keys
/// that hash there until the prefetch window was full of them, and the
/// broker delivered nothing more.
#[tokio::test]
async fn a_slow_key_holds_up_only_its_own_messages() {
    const KEYS: i64 = 100;
    const PER_KEY: i64 = 20;
    const KEYLESS: i64 = 1_000;
    const SLOW: i64 = 5;
    let db = logging_database().await;
    let shutdown = CancellationToken::new();
    let started = Arc::new(Notify::new());
    let gate = Arc::new(Semaphore::new(0));
    let handler = SlowKey {
        started: started.clone(),
        gate: gate.clone(),
    };
    let (topology, consumer) = start_with(&db, handler, |_| {}, &shutdown).await;
    let publisher = Publisher::new(&topology.exchange).await;
    publish_numbered(&publisher, "slow", 1).await;
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .expect("the slow key's first message is in its handler");
    let began = Instant::now();
    let mut keyless = 0;
    for n in 1..=PER_KEY {
        if n <= SLOW && n > 1 {
            publish_numbered(&publisher, "slow", n).await;
        }
        for key in 0..KEYS {
            publish_numbered(&publisher, &format!("k{key}"), n).await;
            if key % 2 == 0 {
                keyless += 1;
                publish_numbered(&publisher, "", keyless).await;
            }
        }
    }
    assert_eq!(keyless, KEYLESS);
    let others = KEYS * PER_KEY + KEYLESS;
    wait_until("every other message has its effect", || async {
        count(&db, "SELECT count(*) FROM effects_log WHERE key <> 'slow'").await == others
    })
    .await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM effects_log WHERE key = 'slow'").await,
        0,
        "the slow key waits for its first message"
    );
    eprintln!(
        "{others} other messages committed in {:?} with one key stuck",
        began.elapsed()
    );
    gate.add_permits(1);
    wait_until("the slow key's messages have their effects", || async {
        count(&db, "SELECT count(*) FROM effects_log WHERE key = 'slow'").await == SLOW
    })
    .await;
    shutdown.cancel();
    consumer.await.expect("join").expect("consumer");
    let seen = logged(&db).await;
    assert_eq!(seen["slow"], (1..=SLOW).collect::<Vec<_>>(), "the slow key");
    for key in 0..KEYS {
        let key = format!("k{key}");
        assert_eq!(seen[&key], (1..=PER_KEY).collect::<Vec<_>>(), "key {key}");
    }
}

/// Two consumers on one queue, default settings: RabbitMQ hands each a
/// share of every key's numbers, so each sees gaps that the other one
/// fills. Neither waits for them once two counts of the queue's consumers
/// in a row (1 s apart) found the other: a number missing here went
/// elsewhere and never comes. Before, 44 of 66 keyed messages waited the
/// default 15 s.
#[tokio::test]
async fn two_consumers_on_one_queue_do_not_wait_for_each_others_numbers() {
    // An odd number of keys: RabbitMQ hands out deliveries in turn, and
    // with an even one each key would go to one consumer only.
    const KEYS: i64 = 11;
    const PER_KEY: i64 = 6;
    let db = logging_database().await;
    let shutdown = CancellationToken::new();
    let (topology, first) = start_with(&db, Recording, |_| {}, &shutdown).await;
    let second = consume(&db, &topology, Recording, |_| {}, &shutdown).await;
    let publisher = Publisher::new(&topology.exchange).await;
    let began = Instant::now();
    for n in 1..=PER_KEY {
        for key in 0..KEYS {
            publish_numbered(&publisher, &format!("k{key}"), n).await;
        }
    }
    let all = KEYS * PER_KEY;
    // Well below the 15 s a consumer used to wait for a gap.
    tokio::time::timeout(Duration::from_secs(8), async {
        wait_until("every message has its effect", || async {
            count(&db, "SELECT count(*) FROM effects_log").await == all
        })
        .await;
    })
    .await
    .unwrap_or_else(|_| panic!("not every message committed within 8 s: some waited for a gap"));
    let took = began.elapsed();
    shutdown.cancel();
    first.await.expect("join").expect("consumer");
    second.await.expect("join").expect("consumer");
    assert_eq!(count(&db, "SELECT count(*) FROM inbox").await, all);
    eprintln!("{all} keyed messages over two consumers committed in {took:?}");
}

/// A consumer that stopped just before this one started can still be
/// counted on the queue for a moment, holding deliveries the broker gives
/// back once it notices. Taking that count for a consumer sharing the
/// queue, the new one handled a key's later numbers at once and the
/// earlier ones after them, when they came back (the rolling-restart
/// fault on a quorum queue: 6 inversions). Here the departing consumer
/// holds numbers 1 to 3 of a key while the new one is given 4 to 6.
#[tokio::test]
async fn a_consumer_started_beside_a_departing_one_keeps_its_keys_order() {
    let db = logging_database().await;
    let shutdown = CancellationToken::new();
    // The first consumer declares the queue and goes.
    let (topology, first) = start_with(&db, Recording, |_| {}, &shutdown).await;
    shutdown.cancel();
    first.await.expect("join").expect("consumer");
    wait_for_consumers(&topology.queue, 0).await;
    let departing = outbox_tests::broker::connect_to(&amqp_url()).await;
    let channel = departing.create_channel().await.expect("channel");
    channel.basic_qos(3, Default::default()).await.expect("qos");
    let _held = channel
        .basic_consume(
            topology.queue.as_str().into(),
            "departing".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // 4 to 6 wait in the queue: the departing consumer's prefetch is full.
    let publisher = Publisher::new(&topology.exchange).await;
    for n in 1..=6 {
        publish_numbered(&publisher, "k", n).await;
    }
    wait_until("the departing consumer holds 1 to 3", || async {
        ready(&topology.queue).await == 3
    })
    .await;
    let shutdown = CancellationToken::new();
    let second = consume(&db, &topology, Recording, |_| {}, &shutdown).await;
    // Within a second of its first count: it would confirm a sharer then.
    wait_until("the new consumer holds 4 to 6", || async {
        ready(&topology.queue).await == 0
    })
    .await;
    let _ = departing.close(200, "departing".into()).await;
    wait_until("every message has its effect", || async {
        count(&db, "SELECT count(*) FROM effects_log").await == 6
    })
    .await;
    shutdown.cancel();
    second.await.expect("join").expect("consumer");
    assert_eq!(logged(&db).await["k"], (1..=6).collect::<Vec<_>>());
}
