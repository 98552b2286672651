//! The consumer library run in this process with a handler of the test's
//! own: what a careless handler cannot do to the messages batched with it.

use std::collections::HashMap;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions};
use lapin::types::FieldTable;
use outbox_consumer::{ConsumerConfig, Handler, HandlerError, Inbox, Incoming, Topology};
use outbox_tests::dispatch::{Publisher, count, ready, wait_for_consumers, wait_until};
use outbox_tests::*;
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
    let db = TestDb::empty().await;
    db.connect()
        .await
        .batch_execute("CREATE TABLE effects (order_id bigint PRIMARY KEY)")
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

/// A consumer of `topology` on `db`, once it is subscribed.
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
    let consumer = tokio::spawn(outbox_consumer::run(
        config,
        pool,
        handler,
        outbox_consumer::health::new(),
        shutdown.clone(),
    ));
    wait_for_consumers(&topology.queue, 1).await;
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
    let in_order: Vec<i64> = (1..=ROWS).collect();
    for (key, ns) in seen {
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
