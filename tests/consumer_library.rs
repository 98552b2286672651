//! The consumer library run in this process with a handler of the test's
//! own: what a careless handler cannot do to the messages batched with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable};
use outbox_consumer::{ConsumerConfig, Handler, HandlerError, Inbox, Incoming, Topology};
use outbox_tests::dispatch::{
    PATIENCE, Publisher, count, queue_state, ready, wait_for_consumers, wait_until,
};
use outbox_tests::*;
use tokio::sync::{Notify, Semaphore};
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

/// Writes each order into `effects`, except order 0: that one runs a
/// statement that fails, ignores the error and returns `Ok`, which leaves
/// the transaction aborted (COMMIT then rolls back without an error).
struct Swallowing;

impl Handler for Swallowing {
    async fn handle(&self, tx: &Transaction<'_>, message: &Incoming) -> Result<(), HandlerError> {
        let body: serde_json::Value = serde_json::from_slice(&message.body)
            .map_err(|e| HandlerError::Poison(e.to_string()))?;
        let order = body["orderId"].as_i64().unwrap_or(0);
        if order == 0 {
            let _ignored = tx.batch_execute("SELECT 1/0").await;
            return Ok(());
        }
        tx.execute("INSERT INTO effects (order_id) VALUES ($1)", &[&order])
            .await?;
        Ok(())
    }
}

/// The test's inbox and effects tables in a fresh database.
async fn database() -> TestDb {
    database_with("CREATE TABLE effects (order_id bigint PRIMARY KEY)").await
}

/// A fresh database with the inbox and the table `create` makes.
async fn database_with(create: &str) -> TestDb {
    let db = TestDb::empty().await;
    db.connect()
        .await
        .batch_execute(create)
        .await
        .expect("tables");
    create_inbox(&db).await;
    db
}

/// The inbox `inbox` and its key table, as the library creates them.
async fn create_inbox(db: &TestDb) {
    Inbox::new("inbox")
        .expect("name")
        .create_table(&db.connect().await)
        .await
        .expect("inbox tables");
}

/// A consumer of fresh names on `db`, with `adjust` applied to its config;
/// its topology, and the task that stops when `shutdown` is cancelled.
async fn start(
    db: &TestDb,
    adjust: impl FnOnce(&mut ConsumerConfig),
    shutdown: &CancellationToken,
) -> (Topology, tokio::task::JoinHandle<anyhow::Result<()>>) {
    start_with(db, Swallowing, adjust, shutdown).await
}

/// [`start`] with a handler of the caller's.
async fn start_with<H: Handler>(
    db: &TestDb,
    handler: H,
    adjust: impl FnOnce(&mut ConsumerConfig),
    shutdown: &CancellationToken,
) -> (Topology, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let mut topology = Topology::named(&unique_name("lib_ex"), &unique_name("lib_q"));
    topology.expires = Some(Duration::from_secs(300));
    let consumer = consume(db, &topology, handler, adjust, shutdown).await;
    (topology, consumer)
}

/// A consumer of `topology` on `db`, once it is subscribed (beside any
/// already there).
async fn consume<H: Handler>(
    db: &TestDb,
    topology: &Topology,
    handler: H,
    adjust: impl FnOnce(&mut ConsumerConfig),
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let mut config = ConsumerConfig::new(&amqp_url(), topology.clone(), "inbox");
    adjust(&mut config);
    let target = outbox_service::db::parse_url(&db.url, None).expect("url");
    let pool = outbox_service::db::pool(&target, 3).await.expect("pool");
    // Others may consume the queue already (it may not exist yet).
    let before = queue_state(&topology.queue).await.map_or(0, |(_, c)| c);
    let consumer = tokio::spawn(outbox_consumer::run(
        config,
        pool,
        handler,
        outbox_consumer::health::new(),
        shutdown.clone(),
    ));
    wait_for_consumers(&topology.queue, before + 1).await;
    consumer
}

/// Without the consumer's check before COMMIT, the batch holding order 0
/// was acked with nothing written: 14 orders lost.
#[tokio::test]
async fn a_handler_that_swallows_a_failed_statement_costs_its_batch_nothing() {
    const ORDERS: i64 = 30;
    let db = database().await;
    let shutdown = CancellationToken::new();
    let adjust = |config: &mut ConsumerConfig| {
        config.lanes = 1;
        config.max_deliveries = 2;
        config.retry_base = Duration::from_millis(50);
        config.retry_max = Duration::from_millis(100);
    };
    let (topology, consumer) = start(&db, adjust, &shutdown).await;
    let publisher = Publisher::new(&topology.exchange).await;
    // The first order's transaction waits on the lock while the rest
    // arrive, so they form one batch with order 0 in the middle.
    let lock = db.connect().await;
    lock.batch_execute("BEGIN; LOCK TABLE effects IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    publisher.order(ORDERS + 1).await;
    let blocked = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND wait_event_type = 'Lock'",
        db.name
    );
    wait_until("the first order waits", || async {
        count(&db, &blocked).await == 1
    })
    .await;
    for order in 1..=ORDERS {
        if order == 15 {
            publisher.order(0).await;
        }
        publisher.order(order).await;
    }
    wait_until("everything is delivered", || async {
        ready(&topology.queue).await == 0
    })
    .await;
    lock.batch_execute("ROLLBACK").await.expect("unlock");
    wait_until("every good order has its effect", || async {
        count(&db, "SELECT count(*) FROM effects").await == ORDERS + 1
    })
    .await;
    wait_until("order 0 is dead-lettered", || async {
        ready(&topology.dead_letter_queue).await == 1
    })
    .await;
    shutdown.cancel();
    consumer.await.expect("join").expect("consumer");
    assert_eq!(count(&db, "SELECT count(*) FROM inbox").await, ORDERS + 1);
}

/// Inbox rows older than `inbox_retention` go, and so do the watermarks
/// of keys idle that long; the consumer goes on.
#[tokio::test]
async fn inbox_rows_past_their_retention_are_deleted() {
    let db = database().await;
    db.connect()
        .await
        .batch_execute(
            "INSERT INTO inbox_keys (ordering_key, last_seq, updated_at) VALUES \
             ('idle', 5, now() - interval '1 hour'), ('busy', 5, now() + interval '1 hour')",
        )
        .await
        .expect("watermarks");
    let shutdown = CancellationToken::new();
    let retention = |config: &mut ConsumerConfig| {
        config.inbox_retention = Some(Duration::from_millis(300));
    };
    let (topology, consumer) = start(&db, retention, &shutdown).await;
    let publisher = Publisher::new(&topology.exchange).await;
    for order in 1..=2 {
        publisher.order(order).await;
        wait_until("the order has its effect", || async {
            count(&db, "SELECT count(*) FROM effects").await == order
        })
        .await;
        wait_until("its inbox row is deleted", || async {
            count(&db, "SELECT count(*) FROM inbox").await == 0
        })
        .await;
    }
    let keys = db
        .connect()
        .await
        .query_one(
            "SELECT array_agg(convert_from(ordering_key, 'UTF8')) FROM inbox_keys",
            &[],
        )
        .await
        .expect("keys")
        .get::<_, Vec<String>>(0);
    assert_eq!(keys, ["busy"], "the idle key's watermark went");
    shutdown.cancel();
    consumer.await.expect("join").expect("consumer");
}

/// Records each message's `{"key", "n"}` in `effects_log`, in the order
/// the consumer handles them.
struct Recording;

impl Handler for Recording {
    async fn handle(&self, tx: &Transaction<'_>, message: &Incoming) -> Result<(), HandlerError> {
        let body: serde_json::Value = serde_json::from_slice(&message.body)
            .map_err(|e| HandlerError::Poison(e.to_string()))?;
        let key = body["key"].as_str().unwrap_or_default();
        let n = body["n"].as_i64().unwrap_or_default();
        tx.execute(
            "INSERT INTO effects_log (key, n) VALUES ($1, $2)",
            &[&key, &n],
        )
        .await?;
        Ok(())
    }
}

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
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NULL AND attempts > 0"
        )
        .await,
        KEYS,
        "each row 5 was returned, and only those"
    );
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

/// Inbox and key tables that cannot serve: the consumer refuses to start,
/// naming the table and the fix, instead of failing each batch. Before
/// the check ran each statement, the text key stalled every keyed lane
/// (its watermark read failed for ever), the integer watermark panicked
/// the session, the inbox without a unique `message_id` deduplicated
/// nothing, and a role without UPDATE on the key table passed the check.
#[tokio::test]
async fn a_consumer_whose_tables_cannot_serve_refuses_to_start_and_says_why() {
    let inbox = "CREATE TABLE inbox (message_id uuid PRIMARY KEY)";
    let keys = |key: &str, seq: &str| {
        format!(
            "CREATE TABLE inbox_keys (ordering_key {key} PRIMARY KEY, last_seq {seq} NOT NULL, updated_at timestamptz)"
        )
    };
    let cases = [
        (inbox.to_string(), "inbox_keys\" does not exist"),
        (
            format!("{inbox}; {}", keys("text", "bigint")),
            "operator does not exist",
        ),
        (
            format!("{inbox}; {}", keys("bytea", "integer")),
            "last_seq int4, not bytea and bigint",
        ),
        (
            format!(
                "CREATE TABLE inbox (message_id uuid); {}",
                keys("bytea", "bigint")
            ),
            "no unique or exclusion constraint",
        ),
    ];
    for (tables, reason) in cases {
        let db = TestDb::empty().await;
        db.connect()
            .await
            .batch_execute(&tables)
            .await
            .expect("tables");
        let line = refused_start(&db.url).await;
        assert!(line.contains(reason), "{tables}: {line}");
    }
    // A role that may insert into the key table but not update it: each
    // batch's upsert would fail, retrying keyed messages into the
    // dead-letter queue.
    let role = TestRole::create("lib_consumer").await;
    let db = TestDb::empty().await;
    create_inbox(&db).await;
    db.connect()
        .await
        .batch_execute(&format!(
            "GRANT SELECT, INSERT ON inbox, inbox_keys TO {}",
            role.name
        ))
        .await
        .expect("grants");
    let line = refused_start(&role.url(&db)).await;
    assert!(
        line.contains("permission denied for table inbox_keys"),
        "{line}"
    );
}

/// The one-line error of a consumer on `url` that must refuse to start.
async fn refused_start(url: &str) -> String {
    let topology = Topology::named(&unique_name("lib_ex"), &unique_name("lib_q"));
    let config = ConsumerConfig::new(&amqp_url(), topology, "inbox");
    let target = outbox_service::db::parse_url(url, None).expect("url");
    let pool = outbox_service::db::pool(&target, 1).await.expect("pool");
    let started = outbox_consumer::run(
        config,
        pool,
        Recording,
        outbox_consumer::health::new(),
        CancellationToken::new(),
    );
    let error = tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .expect("it does not wait")
        .expect_err("tables that cannot serve");
    let line = outbox::chain_line(error.as_ref());
    assert!(
        line.contains("`inbox_keys`") && line.contains("Inbox::create_table"),
        "{line}"
    );
    line
}

/// A keyed (or keyless, `key` "") message `{"key", "n"}` numbered `n`
/// among its key's, as the relay publishes it.
async fn publish_numbered(publisher: &Publisher, key: &str, n: i64) {
    let body = serde_json::json!({ "key": key, "n": n }).to_string();
    let mut headers = FieldTable::default();
    if !key.is_empty() {
        headers.insert(
            outbox_consumer::KEY_HEADER.into(),
            AMQPValue::LongString(key.into()),
        );
        headers.insert(
            outbox_consumer::SEQ_HEADER.into(),
            AMQPValue::LongLongInt(n),
        );
    }
    let properties = BasicProperties::default()
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_headers(headers);
    publisher.raw(body.as_bytes(), properties).await;
}

/// The test's database for [`Recording`]-like handlers: `effects_log`
/// and the inbox.
async fn logging_database() -> TestDb {
    database_with("CREATE TABLE effects_log (id bigserial PRIMARY KEY, key text, n bigint)").await
}

/// Each key's numbers in `effects_log`, in commit order.
async fn logged(db: &TestDb) -> HashMap<String, Vec<i64>> {
    let log = db
        .connect()
        .await
        .query("SELECT key, n FROM effects_log ORDER BY id", &[])
        .await
        .expect("log");
    let mut seen: HashMap<String, Vec<i64>> = HashMap::new();
    for row in log {
        seen.entry(row.get(0)).or_default().push(row.get(1));
    }
    seen
}

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
