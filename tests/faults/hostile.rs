//! A hostile user's rows, queues and roles (issue 13): each test here
//! failed on the relay before its fix. A row's own problem is that row's
//! attempt and then a dead letter; it never fails a claim, counts as an
//! outage or re-publishes other rows. A stuck queue holds one slot, not
//! the window. A frozen relay gives its rows and its locks back. No other
//! session can stall the relay or silence the writers' wake-ups.

use std::collections::{HashMap, HashSet};
use std::process::Child;
use std::time::{Duration, Instant};

use lapin::options::QueueBindOptions;
use lapin::types::{AMQPValue, FieldTable};
use outbox_relay::Settings;
use outbox_tests::broker::{
    Topology, bound_queue, fanout_exchange, message_id, resume_queue, suspend_queue,
};
use outbox_tests::dispatch::count;
use outbox_tests::relay::{RunningRelay, relay_run_command, test_settings};
use outbox_tests::*;
use tokio_postgres::Client;
use uuid::Uuid;

const ARRIVAL: Duration = Duration::from_secs(30);

/// Thaws a suspended queue however the test ends: a frozen queue process
/// would never expire on its own.
struct Suspended(String);

impl Suspended {
    fn queue(queue: &str) -> Suspended {
        suspend_queue(queue);
        Suspended(queue.to_string())
    }
}

impl Drop for Suspended {
    fn drop(&mut self) {
        resume_queue(&self.0);
    }
}

/// A database, a queue that does not confirm (suspended until `frozen`
/// drops) and a healthy one, each on its own fanout exchange.
struct OneQueueFrozen {
    db: TestDb,
    stuck: Topology,
    healthy: Topology,
    frozen: Suspended,
    client: Client,
}

async fn one_queue_frozen() -> OneQueueFrozen {
    let db = TestDb::with_outbox().await;
    let stuck = Topology::fanout().await;
    let healthy = Topology::fanout().await;
    let frozen = Suspended::queue(&stuck.queue);
    let client = db.connect().await;
    OneQueueFrozen {
        db,
        stuck,
        healthy,
        frozen,
        client,
    }
}

/// A relay process, killed (and continued first, if stopped) on drop.
struct RelayProcess(Child);

impl RelayProcess {
    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn enqueue(client: &Client, exchange: &str, payload: &str, key: Option<&str>) -> Uuid {
    client
        .query_one(
            "SELECT outbox.enqueue($1, '', $2::text::jsonb, '{}', $3)",
            &[&exchange, &payload, &key],
        )
        .await
        .expect("enqueue")
        .get(0)
}

/// Waits until `sql` counts `expected`, failing after `limit`.
async fn wait_for_count(db: &TestDb, sql: &str, expected: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let found = count(db, sql).await;
        if found == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: {found}, not {expected}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts the sessions of this test's database holding wake-up lock
/// `(1869968482, objid)`; other tests' relays hold it in theirs.
fn wake_lock_holders(objid: i32) -> String {
    format!(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
         AND classid = 1869968482 AND objid = {objid} AND objsubid = 2 AND granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
}

/// A relay whose sweep is a minute away, so that only wake-ups (or its
/// own fast polling) move rows, once it is the one listener and idle.
async fn start_idle_relay(db: &TestDb) -> RunningRelay {
    let relay = RunningRelay::start(Settings {
        sweep_interval_ms: Some(60_000),
        ..test_settings(db)
    })
    .await;
    wait_for_count(db, &wake_lock_holders(2), 1, ARRIVAL).await;
    // Let its first drain end: a row committed during a drain that found
    // nothing waits for the sweep (the race docs/guarantees.md describes), and no
    // outside sign tells when that drain is over.
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay
}

fn distinct_ids(deliveries: &[lapin::message::Delivery]) -> HashSet<Uuid> {
    deliveries.iter().map(message_id).collect()
}

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

/// A fanout exchange whose one queue keeps at most two messages: big
/// payloads are confirmed without the broker keeping them.
async fn short_queue() -> (lapin::Connection, String) {
    let connection = outbox_tests::broker::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let exchange = fanout_exchange(&channel, "test_big_ex").await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(2));
    bound_queue(&channel, &exchange, arguments).await;
    (connection, exchange)
}

/// The peak resident memory of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

// Serial: it pushes 800 MiB through the shared broker, which slows the
// tests beside it.
#[tokio::test]
async fn serial_faults_big_payloads_are_bounded_by_bytes_not_rows() {
    let db = TestDb::with_outbox().await;
    let (_connection, exchange) = short_queue().await;
    // 100 rows of 8 MiB (TOAST compresses them in the database, the relay
    // sees them whole), with the relay's default settings.
    db.connect()
        .await
        .execute(
            "INSERT INTO outbox.messages (exchange, payload, content_type) \
             SELECT $1, convert_to(repeat('x', 8388608), 'UTF8'), 'text/plain' \
             FROM generate_series(1, 100)",
            &[&exchange],
        )
        .await
        .expect("insert big rows");
    let relay = RelayProcess(
        relay_run_command(&db, &[])
            .spawn()
            .expect("spawn outbox-relay"),
    );
    let pid = relay.0.id();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut peak: f64 = 0.0;
    loop {
        peak = peak.max(peak_rss_mib(pid));
        let published = count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL",
        )
        .await;
        if published == 100 {
            break;
        }
        assert!(Instant::now() < deadline, "{published} of 100 published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak = peak.max(peak_rss_mib(pid));
    println!("peak RSS publishing 100 rows of 8 MiB: {peak:.0} MiB");
    assert!(peak < 256.0, "peak RSS {peak:.0} MiB");
}

// Serial: a 128 MiB message slows the shared broker for everyone.
#[tokio::test]
async fn serial_faults_a_payload_over_the_brokers_max_is_that_rows_fault() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let client = db.connect().await;
    let before = enqueue(&client, &topology.exchange, r#"{"n": 1}"#, None).await;
    // RabbitMQ's max_message_size is 128 MiB by default; ours allows more.
    client
        .execute(
            "INSERT INTO outbox.messages (exchange, payload, content_type) \
             VALUES ($1, convert_to(repeat('x', 134217728 + 4096), 'UTF8'), 'text/plain')",
            &[&topology.exchange],
        )
        .await
        .expect("insert a huge row");
    let after = enqueue(&client, &topology.exchange, r#"{"n": 2}"#, None).await;
    let relay = RunningRelay::start(Settings {
        max_attempts: Some(2),
        max_payload_bytes: Some(256 << 20),
        ..test_settings(&db)
    })
    .await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE dead_at IS NOT NULL \
         AND last_error LIKE '%max_message_size%'",
        1,
        Duration::from_secs(60),
    )
    .await;
    let deliveries = topology.receive(2, ARRIVAL).await;
    assert_eq!(distinct_ids(&deliveries), HashSet::from([before, after]));
    relay.stop().await;
}

#[tokio::test]
async fn faults_a_queue_that_stops_confirming_holds_only_its_own_rows() {
    let OneQueueFrozen {
        db,
        stuck,
        healthy,
        frozen,
        client,
    } = one_queue_frozen().await;
    for n in 0..5 {
        enqueue(&client, &stuck.exchange, &format!("{{\"n\": {n}}}"), None).await;
    }
    for n in 0..20 {
        enqueue(&client, &healthy.exchange, &format!("{{\"n\": {n}}}"), None).await;
    }
    let relay = RunningRelay::start(Settings {
        confirm_timeout_ms: Some(1_000),
        max_attempts: Some(20),
        ..test_settings(&db)
    })
    .await;
    let healthy_published = format!(
        "SELECT count(*) FROM outbox.messages WHERE exchange = '{}' AND published_at IS NOT NULL",
        healthy.exchange
    );
    wait_for_count(&db, &healthy_published, 20, Duration::from_secs(5)).await;
    wait_for_count(
        &db,
        &format!(
            "SELECT count(*) FROM outbox.messages WHERE exchange = '{}' \
             AND attempts >= 1 AND last_error LIKE 'no confirm%'",
            stuck.exchange
        ),
        5,
        Duration::from_secs(10),
    )
    .await;
    drop(frozen);
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL",
        25,
        ARRIVAL,
    )
    .await;
    assert_eq!(distinct_ids(&stuck.receive(5, ARRIVAL).await).len(), 5);
    relay.stop().await;
}

#[tokio::test]
async fn faults_a_frozen_relay_gives_the_drain_lock_back() {
    let OneQueueFrozen {
        db,
        stuck,
        healthy,
        frozen: _frozen,
        client,
    } = one_queue_frozen().await;
    // The first relay publishes to the frozen queue and waits for the
    // confirms, draining (holding the drain lock: its claim found three
    // rows, a busy outbox) when it is stopped.
    let first = RelayProcess(
        relay_run_command(
            &db,
            &[
                ("OUTBOX_SWEEP_INTERVAL_MS", "60000"),
                ("OUTBOX_CONFIRM_TIMEOUT_MS", "25000"),
            ],
        )
        .spawn()
        .expect("spawn outbox-relay"),
    );
    client
        .execute(
            "SELECT outbox.enqueue($1, '', '{}') FROM generate_series(1, 3)",
            &[&stuck.exchange],
        )
        .await
        .expect("enqueue three rows in one transaction");
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE locked_by IS NOT NULL",
        3,
        ARRIVAL,
    )
    .await;
    wait_for_count(&db, &wake_lock_holders(1), 1, ARRIVAL).await;
    first.signal("-STOP");
    // The server ends its silent drain transaction, and the lock with it.
    wait_for_count(&db, &wake_lock_holders(1), 0, Duration::from_secs(15)).await;
    // An idle second relay, which only a writer's wake-up moves (its sweep
    // is a minute away), is woken again.
    // (The frozen relay's listener went with its session.)
    let second = start_idle_relay(&db).await;
    let woken = enqueue(&client, &healthy.exchange, "{}", None).await;
    let deliveries = healthy.receive(1, Duration::from_secs(5)).await;
    assert_eq!(distinct_ids(&deliveries), HashSet::from([woken]));
    second.stop().await;
}

/// A relay with one row awaiting its confirm is not draining a busy
/// outbox: it leaves the drain lock free, so writers' commits wake it
/// (before, it held the lock until the confirm came and claimed every
/// millisecond meanwhile: 3.9 empty claims a message at 20 msg/s).
#[tokio::test]
async fn faults_a_relay_waiting_on_one_confirm_lets_writers_wake_it() {
    let OneQueueFrozen {
        db,
        stuck,
        healthy,
        frozen: _frozen,
        client,
    } = one_queue_frozen().await;
    let relay = start_idle_relay(&db).await;
    enqueue(&client, &stuck.exchange, "{}", None).await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE locked_by IS NOT NULL",
        1,
        ARRIVAL,
    )
    .await;
    for _ in 0..10 {
        let holders = count(&db, &wake_lock_holders(1)).await;
        assert_eq!(holders, 0, "the drain lock is held for one row in flight");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let woken = enqueue(&client, &healthy.exchange, "{}", None).await;
    let deliveries = healthy.receive(1, Duration::from_secs(5)).await;
    assert_eq!(distinct_ids(&deliveries), HashSet::from([woken]));
    relay.stop().await;
}

#[tokio::test]
async fn faults_a_relay_frozen_past_its_lease_keeps_key_order_and_publishes_at_most_twice() {
    frozen_relays_keep_key_order(&[]).await;
}

/// The same with keys pipelined: a frozen relay holds up to 64 rows of a
/// key behind its head, which the other relay takes over from the head.
#[tokio::test]
async fn faults_a_pipelining_relay_frozen_past_its_lease_keeps_key_order() {
    frozen_relays_keep_key_order(&[("OUTBOX_KEY_PIPELINE", "64")]).await;
}

async fn frozen_relays_keep_key_order(extra: &[(&str, &str)]) {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    // 200 keys of 10 messages of 32 KiB: publishing a claim's heads takes
    // long enough that a stop often lands between claim and publish.
    db.connect()
        .await
        .execute(
            "INSERT INTO outbox.messages (exchange, payload, content_type, headers, ordering_key) \
             SELECT $1, convert_to(repeat('x', 32768), 'UTF8'), 'text/plain', \
                    jsonb_build_object('key', key, 'seq', seq), 'k' || key \
             FROM generate_series(0, 9) seq, generate_series(0, 199) key ORDER BY seq, key",
            &[&topology.exchange],
        )
        .await
        .expect("enqueue keyed rows");
    let mut settings = vec![
        ("OUTBOX_LEASE_MS", "2000"),
        ("OUTBOX_CONFIRM_TIMEOUT_MS", "1000"),
        ("OUTBOX_SWEEP_INTERVAL_MS", "100"),
    ];
    settings.extend_from_slice(extra);
    let frozen = RelayProcess(relay_run_command(&db, &settings).spawn().expect("spawn"));
    wait_for_count(
        &db,
        "SELECT least(count(*), 1) FROM outbox.messages WHERE published_at IS NOT NULL",
        1,
        ARRIVAL,
    )
    .await;
    let mut healthy = None;
    // Each stop outlives the lease (2 s); five, so that one lands
    // mid-publish (the relay before the fix then broke key order in about
    // half the runs of three stops).
    for _ in 0..5 {
        frozen.signal("-STOP");
        healthy.get_or_insert_with(|| {
            RelayProcess(relay_run_command(&db, &settings).spawn().expect("spawn"))
        });
        tokio::time::sleep(Duration::from_millis(2_300)).await;
        frozen.signal("-CONT");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE published_at IS NULL",
        0,
        Duration::from_secs(60),
    )
    .await;
    let mut deliveries = topology.receive(2000, ARRIVAL).await;
    deliveries.extend(topology.receive(usize::MAX, Duration::from_secs(2)).await);

    let mut copies: HashMap<Uuid, usize> = HashMap::new();
    let mut latest: HashMap<String, i64> = HashMap::new();
    let mut inversions = Vec::new();
    let mut late_copies = 0;
    for delivery in &deliveries {
        let seen = copies.entry(message_id(delivery)).or_default();
        *seen += 1;
        let first = *seen == 1;
        let number = |name: &str| match delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name).cloned())
        {
            Some(AMQPValue::LongLongInt(n)) => n,
            other => panic!("header {name}: {other:?}"),
        };
        let (key, seq) = (number("key").to_string(), number("seq"));
        let latest = latest.entry(key.clone()).or_insert(seq);
        // A frozen relay's copy may leave its socket buffer only after the
        // stall, behind the successor another relay published: a late
        // duplicate, which the consumer's inbox drops. First copies must
        // come in key order.
        if seq < *latest && first {
            inversions.push((key, seq, *latest));
        } else if seq < *latest {
            late_copies += 1;
        }
        *latest = (*latest).max(seq);
    }
    assert_eq!(copies.len(), 2000, "every row arrived");
    let most = copies.values().max().copied().unwrap_or(0);
    println!(
        "{} deliveries of 2000 rows, at most {most} copies, {} inversions, \
         {late_copies} late duplicates",
        deliveries.len(),
        inversions.len()
    );
    assert!(most <= 2, "a row arrived {most} times");
    assert!(
        inversions.is_empty(),
        "key order broken {} times, e.g. {:?}",
        inversions.len(),
        &inversions[..inversions.len().min(5)]
    );
}

#[tokio::test]
async fn faults_another_session_holding_the_listener_lock_does_not_stall_the_relay() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let hostile = db.connect().await;
    hostile
        .batch_execute("SELECT pg_advisory_lock(1869968482, 2)")
        .await
        .expect("take the listener lock");
    let relay = RunningRelay::start(test_settings(&db)).await;
    let client = db.connect().await;
    let mut expected = HashSet::new();
    for _ in 0..3 {
        expected.insert(enqueue(&client, &topology.exchange, "{}", None).await);
    }
    let deliveries = topology.receive(3, Duration::from_secs(10)).await;
    assert_eq!(distinct_ids(&deliveries), expected);
    relay.stop().await;
}

/// Ten rows, each in its own transaction, must all arrive within `limit`.
async fn writers_are_heard(db: &TestDb, topology: &Topology, limit: Duration) {
    let client = db.connect().await;
    let mut expected = HashSet::new();
    for _ in 0..10 {
        expected.insert(enqueue(&client, &topology.exchange, "{}", None).await);
    }
    let deliveries = topology.receive(10, limit).await;
    assert_eq!(
        distinct_ids(&deliveries).len(),
        expected.len(),
        "rows published while another session holds a wake-up lock"
    );
}

#[tokio::test]
async fn faults_a_held_wake_up_lock_does_not_silence_other_writers() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    // The sweep is a minute away: only wake-ups (or the relay's own
    // fast polling) move rows within the test.
    let relay = start_idle_relay(&db).await;

    // A transaction that fired the wake-up trigger early and stays open
    // holds the drain lock exclusively.
    let mut early = db.connect().await;
    let transaction = early.transaction().await.expect("begin");
    transaction
        .batch_execute(&format!(
            "SET CONSTRAINTS ALL IMMEDIATE; SELECT outbox.enqueue('{}', '', '{{}}')",
            topology.exchange
        ))
        .await
        .expect("fire the wake-up early");
    // Time itself is the condition: the relay looks once a second and
    // acts on a holder seen twice in a row.
    tokio::time::sleep(Duration::from_secs(3)).await;
    writers_are_heard(&db, &topology, Duration::from_secs(3)).await;
    transaction.commit().await.expect("commit");
    assert_eq!(topology.receive(1, Duration::from_secs(5)).await.len(), 1);

    // Another role pretending to drain (the drain lock, shared).
    let pretender = db.connect().await;
    pretender
        .batch_execute("SELECT pg_advisory_lock_shared(1869968482, 1)")
        .await
        .expect("take the drain lock");
    tokio::time::sleep(Duration::from_secs(3)).await;
    writers_are_heard(&db, &topology, Duration::from_secs(3)).await;
    relay.stop().await;
}

/// A busy writer holds the drain lock for a moment in every transaction,
/// so the relay's once-a-second check often finds the same session holding
/// it. Two of its transactions must not look like one long hold: that made
/// the relay poll every 10 ms and claim from id 0 under a steady load.
#[tokio::test]
async fn faults_a_busy_writer_is_not_taken_for_a_lasting_wake_lock_holder() {
    use outbox_relay::store::Store;
    let db = TestDb::with_outbox().await;
    let target = outbox_service::db::parse_url(&db.url, None).expect("url");
    let store = Store::connect(&target, "watch").await.expect("store");
    let mut writer = db.connect().await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let transaction = writer.transaction().await.expect("begin");
        transaction
            .batch_execute("SELECT pg_advisory_xact_lock(1869968482, 1)")
            .await
            .expect("take the drain lock as the trigger does");
        let holders = store
            .wake_lock_holders("outbox-relay-listener")
            .await
            .expect("holders");
        assert_eq!(holders.len(), 1, "{holders:?}");
        seen.push(holders[0].clone());
        transaction.commit().await.expect("commit");
    }
    assert_eq!(seen[0].pid, seen[1].pid);
    assert_ne!(seen[0], seen[1], "two transactions seen as one holder");

    // A session-level hold outlives transactions: still the same holder.
    writer
        .batch_execute("SELECT pg_advisory_lock(1869968482, 1)")
        .await
        .expect("hold the drain lock");
    let first = store.wake_lock_holders("x").await.expect("holders");
    writer.batch_execute("SELECT 1").await.expect("a statement");
    let second = store.wake_lock_holders("x").await.expect("holders");
    assert_eq!(first, second);
    assert_eq!(first.len(), 1);
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

#[tokio::test]
async fn faults_a_relay_whose_lease_expired_cannot_settle_rows_taken_over() {
    use outbox_relay::store::{ClaimLimits, Retried, Store};
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    enqueue(&client, "anywhere", "{}", None).await;
    let target = outbox_service::db::parse_url(&db.url, None).expect("url");
    let late = Store::connect(&target, "late").await.expect("store");
    let current = Store::connect(&target, "current").await.expect("store");
    let lease = Duration::from_millis(200);
    let stale = late
        .claim(ClaimLimits::from_start(10, lease))
        .await
        .expect("claim")
        .rows;
    assert_eq!(stale.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let taken = current
        .claim(ClaimLimits::from_start(10, Duration::from_secs(30)))
        .await
        .expect("claim")
        .rows;
    assert_eq!(taken.len(), 1, "the expired lease is taken over");
    // The late relay's release, failure and mark change nothing now.
    let stale_row = &stale[0];
    let held = [(stale_row.id, stale_row.lease.clone())];
    late.release(&held).await.expect("release");
    let retried = late
        .retry(stale_row, "late failure", Duration::ZERO, 1)
        .await
        .expect("retry");
    assert_eq!(retried, Retried::Gone);
    late.mark_published(&held, false).await.expect("mark");
    let row = client
        .query_one(
            "SELECT locked_by, attempts, dead_at IS NULL, published_at IS NULL FROM outbox.messages",
            &[],
        )
        .await
        .expect("row");
    assert_eq!(
        row.get::<_, Option<String>>(0),
        Some(taken[0].lease.clone())
    );
    assert_eq!(
        row.get::<_, i32>(1),
        0,
        "no attempt counted by the late relay"
    );
    assert!(row.get::<_, bool>(2) && row.get::<_, bool>(3));
    // The current holder's mark applies.
    current
        .mark_published(&[(taken[0].id, taken[0].lease.clone())], false)
        .await
        .expect("mark");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL"
        )
        .await,
        1
    );
}
