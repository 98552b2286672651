//! The dispatch consumer against the real PostgreSQL and RabbitMQ: each
//! order lands once, duplicates and redeliveries change nothing, poison and
//! exhausted retries go to the dead-letter queue while good messages keep
//! flowing, an unavailable database or a cut broker connection pauses
//! without acking, a killed consumer's deliveries land once elsewhere.
//! (`::dispatch` is the crate; plain `dispatch` is the harness module.)

use std::process::Command;

use ::dispatch::Settings;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use outbox_consumer::Topology;
use outbox_tests::dispatch::*;
use outbox_tests::relay::{RunningRelay, test_settings as relay_settings};
use outbox_tests::*;
use serde_json::{Value, json};
use uuid::Uuid;

/// A running consumer on its own database, and a publisher to its exchange.
struct Fixture {
    db: TestDb,
    names: Topology,
    consumer: RunningDispatch,
    publisher: Publisher,
}

impl Fixture {
    async fn start() -> Fixture {
        let db = dispatch_db().await;
        let settings = test_settings(&db);
        Fixture::start_with(db, settings).await
    }

    async fn start_with(db: TestDb, settings: Settings) -> Fixture {
        let names = topology(&settings);
        let consumer = RunningDispatch::start(settings).await;
        let publisher = Publisher::new(&names.exchange).await;
        Fixture {
            db,
            names,
            consumer,
            publisher,
        }
    }

    async fn wait_for_deliveries(&self, expected: i64) {
        wait_until(&format!("{expected} deliveries"), || async {
            deliveries(&self.db).await == expected
        })
        .await;
    }

    /// Stops the consumer; then nothing may wait in its queues: every
    /// message was acked, none given back, and no retry is pending.
    async fn stop_with_queues_empty(self) -> TestDb {
        self.consumer.stop().await;
        for queue in [&self.names.queue, &self.names.retry_queue] {
            assert_eq!(ready(queue).await, 0, "{queue} is not empty");
        }
        self.db
    }
}

/// A database with the dispatch schema.
async fn dispatch_db() -> TestDb {
    let db = TestDb::empty().await;
    let mut client = db.connect().await;
    ::dispatch::migrate(&mut client)
        .await
        .expect("migrate dispatch");
    db
}

async fn deliveries(db: &TestDb) -> i64 {
    count(db, "SELECT count(*) FROM dispatch.deliveries").await
}

async fn inbox(db: &TestDb) -> i64 {
    count(db, "SELECT count(*) FROM dispatch.inbox").await
}

/// Blocks every insert into `dispatch.deliveries` until `ROLLBACK` on the
/// returned connection, so that handlers hold their deliveries unacked.
async fn lock_deliveries(db: &TestDb) -> tokio_postgres::Client {
    let client = db.connect().await;
    client
        .batch_execute("BEGIN; LOCK TABLE dispatch.deliveries IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    client
}

/// Waits until the consumer holds all it can (`queue` is down to `left`
/// ready messages) and its handlers wait on that lock. How many handlers
/// that is depends on how the deliveries fell into batches.
async fn wait_until_held(db: &TestDb, queue: &str, left: u32) {
    wait_until(&format!("{queue} is down to {left} ready"), || async {
        ready(queue).await == left
    })
    .await;
    wait_until("a handler waits on the lock", || async {
        blocked_handlers(db).await >= 1
    })
    .await;
}

/// Waits until `handlers` dispatch connections wait on that lock.
async fn wait_for_blocked_handlers(db: &TestDb, handlers: i64) {
    wait_until(&format!("{handlers} handlers wait on the lock"), || async {
        blocked_handlers(db).await == handlers
    })
    .await;
}

async fn blocked_handlers(db: &TestDb) -> i64 {
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
         AND application_name = 'dispatch' AND wait_event_type = 'Lock'",
        db.name
    );
    count(db, &waiting).await
}

#[tokio::test]
async fn dispatch_migrations_apply_twice() {
    let db = TestDb::empty().await;
    let mut client = db.connect().await;
    let first = ::dispatch::migrate(&mut client).await.expect("first");
    assert_eq!(first, ["V1__dispatch", "V3__roles", "V4__inbox_keys"]);
    let second = ::dispatch::migrate(&mut client).await.expect("second");
    assert!(second.is_empty(), "second run applied {second:?}");
    let tables: Vec<String> = client
        .query_one(
            "SELECT array_agg(table_name::text ORDER BY table_name) \
             FROM information_schema.tables WHERE table_schema = 'dispatch'",
            &[],
        )
        .await
        .expect("tables")
        .get(0);
    assert_eq!(
        tables,
        ["deliveries", "inbox", "inbox_keys", "schema_history"]
    );
    let bad_status = client
        .execute(
            "INSERT INTO dispatch.deliveries (order_id, rider, status, message_id) \
             VALUES (1, 'r', 7, gen_random_uuid())",
            &[],
        )
        .await;
    assert!(bad_status.is_err(), "status 7 must be rejected");
}

fn dispatch_command(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(workspace_binary("dispatch"));
    command.args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("run dispatch")
}

/// `dispatch migrate` is idempotent; bad settings fail in one line.
#[tokio::test]
async fn dispatch_binary_migrates_and_reports_bad_settings_in_one_line() {
    let db = TestDb::empty().await;
    let url = ("DISPATCH_DATABASE_URL", db.url.as_str());
    let first = dispatch_command(&["migrate"], &[url]);
    assert!(first.status.success(), "{first:?}");
    assert!(String::from_utf8_lossy(&first.stdout).contains("applied V1__dispatch"));
    let second = dispatch_command(&["migrate"], &[url]);
    assert!(String::from_utf8_lossy(&second.stdout).contains("up to date"));

    let unreachable = ("DISPATCH_DATABASE_URL", "postgres://u:s3cret@127.0.0.1:1/x");
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[], "DISPATCH_DATABASE_URL"),
        (
            &[url, ("DISPATCH_QUEUE_TYPE", "stream")],
            "DISPATCH_QUEUE_TYPE",
        ),
        (
            &[url, ("DISPATCH_PREFECH", "4")],
            "unknown setting DISPATCH_PREFECH",
        ),
        (&[unreachable], "cannot connect to PostgreSQL"),
    ];
    for (env, expected) in cases {
        let output = dispatch_command(&[], env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{env:?} must fail");
        assert!(stderr.contains(expected), "{env:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(!stderr.contains("s3cret"), "password leaked: {stderr}");
    }
}

/// Test 1, end to end: orders enqueued in the order database go through
/// the outbox relay and land as deliveries, each once; the HTTP API shows
/// them. (The service migrates its empty database itself.)
#[tokio::test]
async fn dispatch_consumes_each_outbox_order_once() {
    const ORDERS: i64 = 100;
    let orders_db = TestDb::with_outbox().await;
    let db = TestDb::empty().await;
    let settings = test_settings(&db);
    let fixture = Fixture::start_with(db, settings).await;
    let relay = RunningRelay::start(relay_settings(&orders_db)).await;

    let mut client = orders_db.connect().await;
    let tx = client.transaction().await.expect("begin");
    let mut sent = Vec::new();
    for order_id in 1..=ORDERS {
        let order =
            json!({"orderId": order_id, "userName": "zhang", "context": "noodles", "num": 1});
        let message = outbox::Message::json(&fixture.names.exchange, "", &order).expect("message");
        sent.push(outbox::enqueue(&tx, &message).await.expect("enqueue"));
    }
    tx.commit().await.expect("commit");

    fixture.wait_for_deliveries(ORDERS).await;
    let mut landed: Vec<Uuid> = fixture
        .db
        .connect()
        .await
        .query("SELECT message_id FROM dispatch.deliveries", &[])
        .await
        .expect("deliveries")
        .iter()
        .map(|row| row.get(0))
        .collect();
    landed.sort();
    sent.sort();
    assert_eq!(landed, sent, "each outbox message is one delivery");
    assert_eq!(inbox(&fixture.db).await, ORDERS);

    let api = &fixture.consumer;
    let (status, body) = api.get("/deliveries/42").await;
    assert_eq!(status, 200, "{body}");
    let delivery: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (
            &delivery["orderId"],
            &delivery["rider"],
            &delivery["status"]
        ),
        (&json!(42), &json!("Zhang Fei"), &json!(0))
    );
    assert_eq!(api.get("/deliveries/999999").await.0, 404);
    assert_eq!(api.get("/deliveries/abc").await.0, 400);
    assert_eq!(api.get("/healthz").await.0, 200);
    assert_eq!(api.get("/readyz").await.0, 200);
    let (status, metrics) = api.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("consumer_messages_total{outcome=\"processed\"}"),
        "{metrics}"
    );
    relay.stop().await;
    fixture.stop_with_queues_empty().await;
}

/// Test 2: the same message three times is one delivery; another message
/// for the same order changes nothing either.
#[tokio::test]
async fn dispatch_handles_a_repeated_message_once() {
    let fixture = Fixture::start().await;
    let id = Uuid::new_v4();
    for _ in 0..3 {
        fixture.publisher.order_as(7, id).await;
    }
    fixture.publisher.order(7).await;

    wait_until("both message ids are in the inbox", || async {
        inbox(&fixture.db).await == 2 && ready(&fixture.names.queue).await == 0
    })
    .await;
    let db = fixture.stop_with_queues_empty().await;
    let row = db
        .connect()
        .await
        .query_one(
            "SELECT count(*), min(message_id::text) FROM dispatch.deliveries",
            &[],
        )
        .await
        .expect("deliveries");
    assert_eq!(row.get::<_, i64>(0), 1);
    assert_eq!(row.get::<_, String>(1), id.to_string());
}

/// Test 3: poison between good messages. The good ones all land; each
/// poison one sits in the dead-letter queue with its reason.
/// A JSON message under a new id, with these headers.
fn order_with_headers<const N: usize>(headers: [(&str, AMQPValue); N]) -> BasicProperties {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert(name.into(), value);
    }
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(Uuid::new_v4().to_string().into())
        .with_headers(table)
}

/// A keyed order dead-lettered as poison still moves its key's watermark
/// (`dispatch.inbox_keys`): a consumer that starts later expects the number
/// after it, instead of waiting `key_gap_wait` for a message that is gone.
/// Without it the watermark stayed at 1.
#[tokio::test]
async fn dispatch_a_dead_lettered_keyed_order_moves_its_keys_watermark() {
    let fixture = Fixture::start().await;
    let keyed = |seq: i64| {
        order_with_headers([
            ("x-outbox-key", AMQPValue::LongString("c-7".into())),
            ("x-outbox-seq", AMQPValue::LongLongInt(seq)),
        ])
    };
    fixture.publisher.raw(br#"{"orderId": 1}"#, keyed(1)).await;
    fixture.publisher.raw(b"not json", keyed(2)).await;
    fixture.wait_for_deliveries(1).await;
    assert_eq!(take(&fixture.names.dead_letter_queue, 1).await.len(), 1);
    wait_until("the watermark passes the dead letter", || async {
        count(
            &fixture.db,
            "SELECT coalesce(max(last_seq), 0) FROM dispatch.inbox_keys \
             WHERE ordering_key = 'c-7'::bytea",
        )
        .await
            == 2
    })
    .await;
    fixture.stop_with_queues_empty().await;
}

/// A keyed order whose key is too large for the watermark table's index
/// (a hostile publisher's: the relay's keys fit an index already) is
/// poison on its first delivery, and the order beside it lands. As a
/// transient failure it was retried in its lane for 15 s first.
#[tokio::test]
async fn dispatch_dead_letters_a_key_too_large_to_index_at_once() {
    let fixture = Fixture::start().await;
    let huge: String = (0..600)
        .map(|_| Uuid::new_v4().simple().to_string())
        .collect();
    let properties = order_with_headers([
        ("x-outbox-key", AMQPValue::LongString(huge.as_str().into())),
        ("x-outbox-seq", AMQPValue::LongLongInt(1)),
    ]);
    fixture
        .publisher
        .raw(br#"{"orderId": 1}"#, properties)
        .await;
    fixture.publisher.order(2).await;
    let dead = take(&fixture.names.dead_letter_queue, 1).await;
    assert_eq!(dead.len(), 1);
    let error = header(&dead[0], "x-consumer-error").unwrap_or_default();
    assert!(error.contains("index row"), "{error}");
    assert_eq!(
        header(&dead[0], "x-consumer-deliveries").as_deref(),
        Some("1")
    );
    fixture.wait_for_deliveries(1).await;
    fixture.stop_with_queues_empty().await;
}

#[tokio::test]
async fn dispatch_dead_letters_poison_and_keeps_going() {
    let fixture = Fixture::start().await;
    let json = || BasicProperties::default().with_content_type("application/json".into());
    let with_id = || json().with_message_id(Uuid::new_v4().to_string().into());
    let poison: [(&[u8], BasicProperties, &str); 5] = [
        (br#"{"orderId": 90}"#, json(), "no message_id"),
        (b"not json", with_id(), "body is not an order"),
        (br#"{"id": 91}"#, with_id(), "missing field `orderId`"),
        (
            br#"{"orderId": 92}"#,
            json().with_message_id("order-92".into()),
            "not a UUID",
        ),
        (
            br#"{"orderId": 93}"#,
            with_id().with_content_type("text/plain".into()),
            "content type",
        ),
    ];
    let mut good = 0;
    for (body, properties, _) in &poison {
        good += 1;
        fixture.publisher.order(good).await;
        fixture.publisher.raw(body, properties.clone()).await;
    }
    good += 1;
    fixture.publisher.order(good).await;

    fixture.wait_for_deliveries(good).await;
    let dead = take(&fixture.names.dead_letter_queue, poison.len()).await;
    assert_eq!(dead.len(), poison.len());
    // Handlers run concurrently, so dead letters may arrive in any order.
    for (body, _, reason) in &poison {
        let delivery = dead.iter().find(|d| d.data == *body);
        let error = delivery.and_then(|d| header(d, "x-consumer-error"));
        assert!(
            error.as_deref().is_some_and(|e| e.contains(reason)),
            "{}: {error:?}",
            String::from_utf8_lossy(body)
        );
    }
    fixture.stop_with_queues_empty().await;
}

/// The seed's slow order (opt-in) takes its time in its own handler while
/// the others land; a shutdown that cannot wait for it gives it back.
#[tokio::test]
async fn dispatch_slow_order_holds_up_no_one_and_is_given_back_at_shutdown() {
    let db = dispatch_db().await;
    let settings = Settings {
        slow_order_id: Some(100001),
        slow_order_ms: Some(60_000),
        shutdown_timeout_ms: Some(200),
        ..test_settings(&db)
    };
    let fixture = Fixture::start_with(db, settings).await;
    fixture.publisher.order(100001).await;
    // Its batch is under way (its transaction open, its handler asleep)
    // before the others come: had they come first, they could share it.
    let open = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
         AND application_name = 'dispatch' AND state = 'idle in transaction'",
        fixture.db.name
    );
    wait_until("the slow order's batch is under way", || async {
        count(&fixture.db, &open).await == 1
    })
    .await;
    for order_id in 1..=5 {
        fixture.publisher.order(order_id).await;
    }
    fixture.wait_for_deliveries(5).await;
    let queue = fixture.names.queue.clone();
    fixture.consumer.stop().await;
    // The broker requeues a closed channel's deliveries asynchronously.
    wait_until("the slow order went back", || async {
        ready(&queue).await == 1
    })
    .await;
    let slow = "SELECT count(*) FROM dispatch.deliveries WHERE order_id = 100001";
    assert_eq!(count(&fixture.db, slow).await, 0);
    assert_eq!(inbox(&fixture.db).await, 5, "its inbox row rolled back");
}

/// Test 4: the dispatch database refuses connections for a while. Nothing
/// is acked meanwhile (the messages stay in the queue or in hand) and
/// nothing is retried or dead-lettered; everything lands once it is back.
#[tokio::test]
async fn dispatch_waits_out_an_unavailable_database() {
    const ORDERS: u32 = 12;
    let db = dispatch_db().await;
    let settings = test_settings(&db);
    let prefetch = u32::from(settings.prefetch.unwrap_or(8));
    let fixture = Fixture::start_with(db, settings).await;
    let names = &fixture.names;
    fixture.publisher.order(1).await;
    fixture.wait_for_deliveries(1).await;

    let admin = connect(&admin_url()).await;
    let name = &fixture.db.name;
    fixture.db.refuse_connections().await;
    let backends = format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}'");
    wait_until("its connections are gone", || async {
        let row = admin.query_one(&backends, &[]).await.expect("count");
        row.get::<_, i64>(0) == 0
    })
    .await;
    for order_id in 2..=i64::from(ORDERS) + 1 {
        fixture.publisher.order(order_id).await;
    }
    // The consumer takes a prefetch's worth and holds it, unacked.
    wait_until("the consumer holds a prefetch's worth", || async {
        ready(&names.queue).await == ORDERS - prefetch
    })
    .await;
    wait_until("readiness reports the database", || async {
        fixture.consumer.get("/readyz").await.0 == 503
    })
    .await;
    // Give a wrong ack, retry or dead letter a moment to show.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        ready(&names.queue).await,
        ORDERS - prefetch,
        "nothing acked"
    );
    assert_eq!(ready(&names.dead_letter_queue).await, 0);
    assert_eq!(ready(&names.retry_queue).await, 0, "an outage is no retry");

    fixture.db.allow_connections().await;
    fixture.wait_for_deliveries(i64::from(ORDERS) + 1).await;
    assert_eq!(fixture.consumer.get("/readyz").await.0, 200);
    let dead_letter_queue = fixture.names.dead_letter_queue.clone();
    fixture.stop_with_queues_empty().await;
    assert_eq!(ready(&dead_letter_queue).await, 0);
}

/// Test 5: a consumer process is SIGKILLed while its deliveries wait on a
/// lock, unacked. They are redelivered to the next consumer and land once;
/// that one stops on SIGTERM with exit code 0.
#[tokio::test]
async fn dispatch_killed_consumer_redelivers_and_lands_once() {
    const ORDERS: i64 = 10;
    let db = dispatch_db().await;
    let settings = test_settings(&db);
    let names = topology(&settings);
    let lock = lock_deliveries(&db).await;

    let env = [("DISPATCH_PREFETCH", "4")];
    let mut first = spawn_dispatch_process(&settings, &env);
    wait_for_consumers(&names.queue, 1).await;
    let publisher = Publisher::new(&names.exchange).await;
    for order_id in 1..=ORDERS {
        publisher.order(order_id).await;
    }
    // Prefetch 4: four orders in hand, unacked, the rest in the queue.
    wait_until_held(&db, &names.queue, (ORDERS - 4) as u32).await;
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");
    lock.batch_execute("ROLLBACK").await.expect("unlock");

    let mut second = spawn_dispatch_process(&settings, &env);
    wait_until("every order landed", || async {
        deliveries(&db).await == ORDERS && ready(&names.queue).await == 0
    })
    .await;
    assert_eq!(inbox(&db).await, ORDERS);
    let term = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let status = second.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
    assert_eq!(ready(&names.queue).await, 0, "nothing given back");
    assert_eq!(deliveries(&db).await, ORDERS);
}

/// The broker connection is cut while handlers hold deliveries: the
/// consumer reconnects by itself, the deliveries come again (the old tags
/// die with the old channel) and every order lands once.
#[tokio::test]
async fn dispatch_reconnects_when_its_broker_connection_is_cut() {
    const ORDERS: i64 = 10;
    let db = dispatch_db().await;
    let settings = test_settings(&db);
    let names = topology(&settings);
    let mut config = settings.validate().expect("valid settings");
    config.consumer.name = unique_name("dispatch");
    let connection = config.consumer.name.clone();
    let consumer = RunningDispatch::start_config(config).await;
    let fixture = Fixture {
        publisher: Publisher::new(&names.exchange).await,
        db,
        names,
        consumer,
    };
    let lock = lock_deliveries(&fixture.db).await;
    for order_id in 1..=ORDERS {
        fixture.publisher.order(order_id).await;
    }
    // The prefetch (8) in hand, their transactions waiting on the lock.
    wait_until_held(&fixture.db, &fixture.names.queue, (ORDERS - 8) as u32).await;

    tokio::task::spawn_blocking(move || close_broker_connection(&connection))
        .await
        .expect("close connection");
    lock.batch_execute("ROLLBACK").await.expect("unlock");
    fixture.wait_for_deliveries(ORDERS).await;
    wait_for_consumers(&fixture.names.queue, 1).await;
    assert_eq!(fixture.consumer.get("/readyz").await.0, 200);
    let db = fixture.stop_with_queues_empty().await;
    assert_eq!(inbox(&db).await, ORDERS);
}

/// A backlog is handled in batches, one transaction each (the inbox rows of
/// a batch share their transaction's `now()`), and a batch with a poison
/// message, a message that keeps failing and a repeated copy in it commits
/// everything else: the poison and the failing one are dead-lettered, the
/// copy changes nothing. Each order lands once.
#[tokio::test]
async fn dispatch_commits_a_backlog_in_batches_and_takes_a_failing_batch_apart() {
    const ORDERS: i64 = 200;
    let db = dispatch_db().await;
    fail_order_666(&db).await;
    let settings = Settings {
        lanes: Some(1),
        batch_size: Some(50),
        prefetch: Some(250),
        ..test_settings(&db)
    };
    let fixture = Fixture::start_with(db, settings).await;
    // The first delivery's transaction waits on the lock while the backlog
    // arrives behind it.
    let lock = lock_deliveries(&fixture.db).await;
    fixture.publisher.order(ORDERS + 1).await;
    wait_for_blocked_handlers(&fixture.db, 1).await;
    let repeated = Uuid::new_v4();
    for order_id in 1..=ORDERS {
        match order_id {
            50 => fixture.publisher.order(-50).await,
            100 => fixture.publisher.order(666).await,
            _ => fixture.publisher.order(order_id).await,
        };
        if order_id == 150 {
            fixture.publisher.order_as(150, repeated).await;
            fixture.publisher.order_as(150, repeated).await;
        }
    }
    wait_until("the backlog is delivered", || async {
        ready(&fixture.names.queue).await == 0
    })
    .await;
    lock.batch_execute("ROLLBACK").await.expect("unlock");
    // 1..=200 without 50 and 100, 150 twice (two message ids), and 201.
    let landed = ORDERS - 2 + 1;
    fixture.wait_for_deliveries(landed).await;
    wait_until(
        "the poison and the failing order are dead-lettered",
        || async { ready(&fixture.names.dead_letter_queue).await == 2 },
    )
    .await;
    let db = fixture.stop_with_queues_empty().await;
    assert_eq!(inbox(&db).await, landed + 1, "one inbox row per message id");
    let transactions = count(
        &db,
        "SELECT count(DISTINCT processed_at) FROM dispatch.inbox",
    )
    .await;
    println!(
        "{} messages committed in {transactions} transactions",
        landed + 1
    );
    assert!(
        transactions <= 20,
        "{} messages took {transactions} transactions",
        landed + 1
    );
}

/// A publisher cannot forge the counts that dead-letter a message: a fresh
/// order carrying `x-consumer-retries: 99` and `x-delivery-count: 99` is
/// its first delivery, and lands (it was dead-lettered at once before).
#[tokio::test]
async fn dispatch_a_fresh_message_cannot_forge_its_delivery_count() {
    let fixture = Fixture::start().await;
    let properties = order_with_headers([
        ("x-consumer-retries", AMQPValue::LongUInt(99)),
        ("x-delivery-count", AMQPValue::LongLongInt(99)),
    ]);
    fixture
        .publisher
        .raw(br#"{"orderId": 7}"#, properties)
        .await;
    fixture.wait_for_deliveries(1).await;
    let dead_letter_queue = fixture.names.dead_letter_queue.clone();
    fixture.stop_with_queues_empty().await;
    assert_eq!(ready(&dead_letter_queue).await, 0);
}

/// A keyed order that fails transiently is retried in its lane, so its
/// key's later orders commit after it: through the retry queue, as before,
/// they passed it (orders 6 to 10 landed before 5).
#[tokio::test]
async fn dispatch_retries_a_keyed_message_in_place_and_keeps_its_key_in_order() {
    let db = dispatch_db().await;
    // Order 5 fails twice, then lands.
    fail_order(&db, 5, Some(2)).await;
    let settings = test_settings(&db);
    let fixture = Fixture::start_with(db, settings).await;
    for order_id in 1..=10 {
        let mut headers = FieldTable::default();
        headers.insert(
            outbox_consumer::KEY_HEADER.into(),
            AMQPValue::LongString("customer-1".into()),
        );
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(Uuid::new_v4().to_string().into())
            .with_headers(headers);
        let body = json!({ "orderId": order_id }).to_string();
        fixture.publisher.raw(body.as_bytes(), properties).await;
    }
    fixture.wait_for_deliveries(10).await;
    let committed: Vec<i64> = fixture
        .db
        .connect()
        .await
        .query("SELECT order_id FROM dispatch.deliveries ORDER BY id", &[])
        .await
        .expect("deliveries")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(committed, (1..=10).collect::<Vec<i64>>());
    fixture.stop_with_queues_empty().await;
}

/// Test 6: an order whose insert always fails with a serialization failure
/// is retried, then dead-lettered after the configured deliveries, while
/// the others land.
async fn dead_letters_a_message_that_keeps_failing(queue_type: &str) {
    let db = dispatch_db().await;
    fail_order_666(&db).await;
    let mut settings = test_settings(&db);
    settings.queue_type = Some(queue_type.into());
    let fixture = Fixture::start_with(db, settings).await;
    let doomed = fixture.publisher.order(666).await;
    for order_id in 1..=5 {
        fixture.publisher.order(order_id).await;
    }
    fixture.wait_for_deliveries(5).await;
    let dead = take(&fixture.names.dead_letter_queue, 1).await;
    assert_eq!(dead.len(), 1);
    let message_id = dead[0].properties.message_id().as_ref();
    assert_eq!(message_id.map(|m| m.to_string()), Some(doomed.to_string()));
    let error = header(&dead[0], "x-consumer-error").unwrap_or_default();
    // The trigger's own text ("order 666 conflicts") may quote values:
    // its SQLSTATE is what the dead letter says.
    assert!(
        error.contains("delivery 3 of 3")
            && error.contains("40001 serialization_failure")
            && !error.contains("666"),
        "{error}"
    );
    assert_eq!(
        header(&dead[0], "x-consumer-deliveries").as_deref(),
        Some("3")
    );
    // The first two failures went through the retry queue.
    assert_eq!(header(&dead[0], "x-consumer-retries").as_deref(), Some("2"));
    let db = fixture.stop_with_queues_empty().await;
    assert_eq!(inbox(&db).await, 5, "the doomed message left no inbox row");
}

#[tokio::test]
async fn dispatch_dead_letters_a_message_that_keeps_failing() {
    dead_letters_a_message_that_keeps_failing("classic").await;
}

#[tokio::test]
async fn dispatch_dead_letters_a_message_that_keeps_failing_on_quorum_queues() {
    dead_letters_a_message_that_keeps_failing("quorum").await;
}
