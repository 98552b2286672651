//! Scheduled delivery (V9): nothing goes out before its `deliver_at`,
//! cancelled rows never, rescheduled rows at their new time; a restarted
//! relay and two relays publish each due row once and on time; a
//! scheduled row joins its key when it falls due; writers get exactly the
//! rights they need.
//!
//! Times are compared on the database's clock: a released row keeps its
//! `deliver_at` in `outbox.messages` as `scheduled_for`, and its mark sets `published_at`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_relay::Settings;
use outbox_tests::broker::{Topology, message_id};
use outbox_tests::dispatch::{PATIENCE, count, wait_until};
use outbox_tests::observe::{Scrape, wait_for_metric};
use outbox_tests::relay::{RunningRelay, relay_command, start_logged_relay, test_settings};
use outbox_tests::*;
use tokio_postgres::{Client, GenericClient};
use uuid::Uuid;

/// A sweep that never comes within a test: due rows must be found by the
/// schedule's own timer.
fn no_sweep(db: &TestDb) -> Settings {
    Settings {
        sweep_interval_ms: Some(600_000),
        ..test_settings(db)
    }
}

/// Enqueues one JSON message due `delay_ms` from the database's now.
async fn schedule(
    client: &impl GenericClient,
    exchange: &str,
    key: Option<&str>,
    delay_ms: f64,
) -> Uuid {
    client
        .query_one(
            "SELECT outbox.enqueue($1, '', '{}', '{}', $2, \
             now() + $3 * interval '1 millisecond')",
            &[&exchange, &key, &delay_ms],
        )
        .await
        .expect("enqueue scheduled")
        .get(0)
}

async fn enqueue_now(client: &impl GenericClient, exchange: &str, key: Option<&str>) -> Uuid {
    client
        .query_one(
            "SELECT outbox.enqueue($1, '', '{}', '{}', $2)",
            &[&exchange, &key],
        )
        .await
        .expect("enqueue")
        .get(0)
}

/// Every published row's lateness (published_at - scheduled_for), seconds.
async fn lateness(client: &Client) -> Vec<f64> {
    client
        .query(
            "SELECT extract(epoch FROM published_at - scheduled_for)::float8 \
             FROM outbox.messages WHERE scheduled_for IS NOT NULL AND published_at IS NOT NULL",
            &[],
        )
        .await
        .expect("lateness")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn wait_published(db: &TestDb, rows: i64) {
    wait_until(&format!("{rows} rows published"), || async {
        count(
            db,
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL",
        )
        .await
            >= rows
    })
    .await;
}

fn ids(deliveries: &[lapin::message::Delivery]) -> Vec<Uuid> {
    deliveries.iter().map(message_id).collect()
}

#[tokio::test]
async fn scheduled_rows_go_out_at_their_time_and_not_before() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(no_sweep(&db)).await;
    let client = db.connect().await;

    let now = enqueue_now(&client, &topology.exchange, None).await;
    let mut later = HashSet::new();
    for i in 0..20 {
        later.insert(
            schedule(
                &client,
                &topology.exchange,
                None,
                1_500.0 + 50.0 * f64::from(i),
            )
            .await,
        );
    }
    // Due in the past: simply now.
    let past = schedule(&client, &topology.exchange, None, -3_600_000.0).await;

    let first = ids(&topology.receive(2, PATIENCE).await);
    assert_eq!(
        first.iter().copied().collect::<HashSet<_>>(),
        HashSet::from([now, past]),
        "the unscheduled rows first, alone"
    );
    let scheduled = ids(&topology.receive(20, PATIENCE).await);
    assert_eq!(scheduled.iter().copied().collect::<HashSet<_>>(), later);
    assert!(
        topology
            .receive(1, Duration::from_millis(300))
            .await
            .is_empty()
    );

    wait_published(&db, 22).await;
    let late = lateness(&client).await;
    assert_eq!(late.len(), 20, "the past row is no scheduled row");
    assert!(late.iter().all(|&s| s >= 0.0), "published early: {late:?}");
    // The sweep never ran: the schedule's timer woke the relay.
    assert!(late.iter().all(|&s| s < 2.0), "published late: {late:?}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.scheduled").await,
        0,
        "every row released"
    );
    relay.stop().await;
}

#[tokio::test]
async fn cancelled_rows_never_go_out_and_rescheduled_ones_go_at_their_new_time() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    let cancelled = schedule(&client, &topology.exchange, None, 800.0).await;
    let kept = schedule(&client, &topology.exchange, None, 800.0).await;
    let brought_forward = schedule(&client, &topology.exchange, None, 3_600_000.0).await;
    let put_off = schedule(&client, &topology.exchange, None, 500.0).await;
    let immediate = enqueue_now(&client, &topology.exchange, None).await;

    let cancel = |id: Uuid| {
        let client = &client;
        async move {
            client
                .query_one("SELECT outbox.cancel($1)", &[&id])
                .await
                .expect("cancel")
                .get::<_, bool>(0)
        }
    };
    assert!(cancel(cancelled).await, "a waiting row is cancelled");
    assert!(!cancel(cancelled).await, "only once");
    assert!(!cancel(immediate).await, "an unscheduled row is not");
    assert!(!cancel(Uuid::new_v4()).await, "nor an unknown one");
    // A cancel rolled back with the app's transaction leaves the row be.
    let tx = client.transaction().await.expect("begin");
    assert!(outbox::cancel(&tx, kept).await.expect("cancel"));
    tx.rollback().await.expect("rollback");

    let reschedule = "SELECT outbox.reschedule($1, now() + $2 * interval '1 millisecond')";
    let moved: bool = client
        .query_one(reschedule, &[&brought_forward, &0.0f64])
        .await
        .expect("reschedule")
        .get(0);
    assert!(moved);
    let moved: bool = client
        .query_one(reschedule, &[&put_off, &1_500.0f64])
        .await
        .expect("reschedule")
        .get(0);
    assert!(moved);
    let moved: bool = client
        .query_one(reschedule, &[&cancelled, &0.0f64])
        .await
        .expect("reschedule")
        .get(0);
    assert!(!moved, "a cancelled row stays cancelled");

    let relay = RunningRelay::start(no_sweep(&db)).await;
    let received = ids(&topology.receive(4, PATIENCE).await);
    assert_eq!(
        received.iter().copied().collect::<HashSet<_>>(),
        HashSet::from([kept, brought_forward, put_off, immediate])
    );
    assert_eq!(
        received.last(),
        Some(&put_off),
        "put off past the others: {received:?}"
    );
    assert!(
        topology.receive(1, Duration::from_secs(1)).await.is_empty(),
        "the cancelled row went out"
    );
    wait_published(&db, 4).await;
    let put_off_late: f64 = client
        .query_one(
            "SELECT extract(epoch FROM published_at - scheduled_for)::float8 \
             FROM outbox.messages WHERE message_id = $1",
            &[&put_off],
        )
        .await
        .expect("put off row")
        .get(0);
    assert!(put_off_late >= 0.0, "published before its new time");
    let state: String = client
        .query_one(
            "SELECT state FROM outbox.scheduled_messages WHERE message_id = $1",
            &[&cancelled],
        )
        .await
        .expect("the cancelled row is visible")
        .get(0);
    assert_eq!(state, "cancelled");
    relay.stop().await;
}

#[tokio::test]
async fn a_relay_restarted_while_rows_wait_publishes_each_once_on_time() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let client = db.connect().await;
    let relay = RunningRelay::start(no_sweep(&db)).await;
    let mut expected = HashSet::new();
    for i in 0..50 {
        expected.insert(
            schedule(
                &client,
                &topology.exchange,
                None,
                1_000.0 + 40.0 * f64::from(i),
            )
            .await,
        );
    }
    // Gone before any is due; the next one starts while they fall due.
    relay.stop().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let relay = RunningRelay::start(no_sweep(&db)).await;
    let received = ids(&topology.receive(50, PATIENCE).await);
    assert_eq!(received.iter().copied().collect::<HashSet<_>>(), expected);
    assert!(
        topology
            .receive(1, Duration::from_millis(300))
            .await
            .is_empty()
    );
    wait_published(&db, 50).await;
    assert!(lateness(&client).await.iter().all(|&s| s >= 0.0));
    relay.stop().await;
}

/// Two relays: each due row is released once and published once, and a
/// key's rows keep their order, the scheduled one joining its key when due:
/// rows of the key written meanwhile do not wait for it.
#[tokio::test]
async fn two_relays_publish_each_due_row_once_and_keys_keep_their_order() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let client = db.connect().await;
    let relays = [
        RunningRelay::start(no_sweep(&db)).await,
        RunningRelay::start(no_sweep(&db)).await,
    ];
    let mut expected = HashSet::new();
    for i in 0..300 {
        expected.insert(
            schedule(
                &client,
                &topology.exchange,
                None,
                1_000.0 + 3.0 * f64::from(i),
            )
            .await,
        );
    }
    // Per key: a row now, one due in 1.5 s, one now again; after the
    // scheduled one is due, one more.
    let keys = ["k1", "k2", "k3"];
    let mut before = HashMap::new();
    for key in keys {
        let first = enqueue_now(&client, &topology.exchange, Some(key)).await;
        let due = schedule(&client, &topology.exchange, Some(key), 1_500.0).await;
        let second = enqueue_now(&client, &topology.exchange, Some(key)).await;
        before.insert(key, (first, due, second));
    }
    let received = ids(&topology.receive(306, PATIENCE).await);
    let mut after = HashMap::new();
    for key in keys {
        after.insert(
            key,
            enqueue_now(&client, &topology.exchange, Some(key)).await,
        );
    }
    let mut received = received;
    received.extend(ids(&topology.receive(3, PATIENCE).await));
    received.extend(ids(&topology
        .receive(usize::MAX, Duration::from_millis(500))
        .await));

    let unique: HashSet<_> = received.iter().copied().collect();
    assert_eq!(unique.len(), received.len(), "a row went out twice");
    assert_eq!(received.len(), 300 + 12);
    assert!(expected.is_subset(&unique));
    let position = |id: &Uuid| received.iter().position(|r| r == id).expect("received");
    for key in keys {
        let (first, due, second) = before[key];
        let order: Vec<usize> = [first, second, due, after[key]]
            .iter()
            .map(position)
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "key {key}: now, now, due, later expected; positions {order:?}"
        );
    }
    // Its number among its key's follows the order it went out in.
    let seqs: Vec<(String, i64)> = client
        .query(
            "SELECT ordering_key, key_seq FROM outbox.messages \
             WHERE ordering_key IS NOT NULL ORDER BY ordering_key, id",
            &[],
        )
        .await
        .expect("key numbers")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    for key in keys {
        let numbers: Vec<i64> = seqs
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(numbers, vec![1, 2, 3, 4], "key {key}");
    }
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn a_time_beyond_the_horizon_is_refused_and_the_horizon_is_a_setting() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let error = client
        .query_one(
            "SELECT outbox.enqueue('x', '', '{}', deliver_at => now() + interval '13 months')",
            &[],
        )
        .await
        .expect_err("13 months ahead is refused");
    let message = outbox::error_line(&error);
    assert!(
        message.contains("more than 1 year ahead") && message.contains("outbox.schedule_horizon"),
        "{message}"
    );
    assert_eq!(error.code().map(|c| c.code()), Some("22023"));
    let error = client
        .query_one(
            "SELECT outbox.enqueue('x', '', '{}', deliver_at => 'infinity')",
            &[],
        )
        .await
        .expect_err("infinity is no time");
    assert_eq!(error.code().map(|c| c.code()), Some("22023"));
    client
        .query_one(
            "SELECT outbox.enqueue('x', '', '{}', deliver_at => '-infinity')",
            &[],
        )
        .await
        .expect("-infinity is the past: now");
    client
        .batch_execute("SET outbox.schedule_horizon = '2 years'")
        .await
        .expect("set");
    client
        .query_one(
            "SELECT outbox.enqueue('x', '', '{}', deliver_at => now() + interval '13 months')",
            &[],
        )
        .await
        .expect("within the new horizon");
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.scheduled").await, 1);
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.messages").await, 1);
}

/// The Rust API schedules by the database's clock and cancels in the
/// app's transaction; a writer role may schedule, cancel and reschedule,
/// but not touch `outbox.scheduled` or release rows itself.
#[tokio::test]
async fn a_writer_schedules_and_cancels_with_its_own_rights_only() {
    let writer_role = TestRole::create("writer").await;
    let db = TestDb::with_outbox().await;
    db.connect()
        .await
        .batch_execute(&format!(
            "SELECT outbox.grant_writer('{}')",
            writer_role.name
        ))
        .await
        .expect("grant");
    let mut writer = connect(&writer_role.url(&db)).await;

    let tx = writer.transaction().await.expect("begin");
    let message = outbox::Message::json("x", "rk", &serde_json::json!({"a": 1}))
        .expect("message")
        .ordering_key("k")
        .deliver_in(Duration::from_secs(3600));
    let id = outbox::enqueue(&tx, &message)
        .await
        .expect("enqueue scheduled");
    let at = std::time::SystemTime::now() + Duration::from_secs(7200);
    let other = outbox::enqueue(&tx, &message.clone().deliver_at(at))
        .await
        .expect("enqueue at");
    tx.commit().await.expect("commit");
    let due_in: f64 = db
        .connect()
        .await
        .query_one(
            "SELECT extract(epoch FROM deliver_at - now())::float8 FROM outbox.scheduled \
             WHERE message_id = $1",
            &[&id],
        )
        .await
        .expect("scheduled row")
        .get(0);
    assert!((3500.0..=3600.0).contains(&due_in), "{due_in}");

    assert!(outbox::cancel(&writer, id).await.expect("cancel"));
    let moved: bool = writer
        .query_one(
            "SELECT outbox.reschedule($1, now() + interval '1 day')",
            &[&other],
        )
        .await
        .expect("reschedule as writer")
        .get(0);
    assert!(moved);
    for sql in [
        "SELECT * FROM outbox.scheduled",
        "UPDATE outbox.scheduled SET deliver_at = now()",
        "DELETE FROM outbox.scheduled",
        "INSERT INTO outbox.scheduled (message_id, exchange, routing_key, payload, content_type, headers, deliver_at) \
         VALUES (gen_random_uuid(), 'x', '', '', 'a', '{}', now())",
        "SELECT outbox.release_due(10)",
    ] {
        let error = writer.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            error.code().map(|c| c.code()),
            Some("42501"),
            "{sql}: {error}"
        );
    }
}

/// The schedule in `/metrics` and `status`; retention deletes cancelled
/// rows as it deletes published ones.
#[tokio::test]
async fn the_schedule_shows_in_metrics_and_status_and_retention_clears_cancelled_rows() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let client = db.connect().await;
    let waiting = schedule(&client, &topology.exchange, None, 3_600_000.0).await;
    let cancelled = schedule(&client, &topology.exchange, None, 3_600_000.0).await;
    schedule(&client, &topology.exchange, None, 500.0).await;
    let out = relay_command(&db.url, &["status"]).await;
    let text = out.expect_code(0);
    assert!(
        text.contains("scheduled  3 (next due in"),
        "status shows the schedule:\n{text}"
    );

    let (relay, addr) = start_logged_relay(&db, &[("OUTBOX_RETENTION", "1s")]).await;
    let addr = addr.as_str();
    assert_eq!(topology.receive(1, PATIENCE).await.len(), 1);
    wait_for_metric(addr, "outbox_schedule_lateness_seconds_count", &[], |n| {
        n == 1.0
    })
    .await;
    wait_for_metric(addr, "outbox_scheduled_released_total", &[], |n| n == 1.0).await;
    wait_for_metric(addr, "outbox_scheduled_messages", &[], |n| n == 2.0).await;
    let next_due = Scrape::of(addr)
        .await
        .value("outbox_scheduled_next_due_seconds", &[]);
    assert!((3_500.0..3_600.0).contains(&next_due), "{next_due}");

    assert!(outbox::cancel(&client, cancelled).await.expect("cancel"));
    wait_for_metric(addr, "outbox_scheduled_cancelled_deleted_total", &[], |n| {
        n == 1.0
    })
    .await;
    let left: Vec<Uuid> = client
        .query("SELECT message_id FROM outbox.scheduled", &[])
        .await
        .expect("left")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        left,
        vec![waiting],
        "retention deleted the cancelled row only"
    );
    relay.terminate().await;
}

/// A relay newer than its schema (V9 not applied: psql installed V1..V8)
/// refuses to start in one line, instead of pausing on every claim.
#[tokio::test]
async fn a_relay_refuses_a_schema_older_than_itself_in_one_line() {
    let db = TestDb::empty().await;
    let client = db.connect().await;
    let mut files: Vec<_> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/outbox"))
            .expect("sql/outbox")
            .map(|entry| entry.expect("entry").path())
            .filter(|path| {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                (1..=8).any(|v| name.starts_with(&format!("V{v}__")))
            })
            .collect();
    files.sort();
    assert_eq!(files.len(), 8);
    for file in files {
        let sql = std::fs::read_to_string(&file).expect("read");
        client.batch_execute(&sql).await.expect("install V1..V8");
    }
    let out = relay_command(&db.url, &["run"]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains("older than this relay") && out.stderr.contains("outbox-relay migrate"),
        "{}",
        out.stderr
    );
}

/// A writer holding a key's lock (an open transaction that enqueued on the
/// key) while a scheduled row of that key falls due: the release skips
/// that row instead of waiting on the lock, so the relay neither stalls
/// nor reports PostgreSQL down, and the row goes out after the commit,
/// behind the writer's.
#[tokio::test]
async fn a_writer_holding_a_key_stalls_neither_the_relay_nor_other_due_rows() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let client = db.connect().await;
    let (relay, addr) = start_logged_relay(&db, &[]).await;
    let addr = addr.as_str();

    let mut writer = db.connect().await;
    let tx = writer.transaction().await.expect("begin");
    let held = enqueue_now(&tx, &topology.exchange, Some("k")).await;
    let keyed = schedule(&client, &topology.exchange, Some("k"), 200.0).await;
    let keyless = schedule(&client, &topology.exchange, None, 200.0).await;
    // Well past the relay's 2 s lock timeout, with the keyed row due.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut later = HashSet::new();
    for _ in 0..10 {
        later.insert(enqueue_now(&client, &topology.exchange, None).await);
    }
    let received = ids(&topology.receive(11, PATIENCE).await);
    later.insert(keyless);
    assert_eq!(received.iter().copied().collect::<HashSet<_>>(), later);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.scheduled WHERE ordering_key = 'k'"
        )
        .await,
        1,
        "the held key's row waits"
    );
    let outages = Scrape::of(addr)
        .await
        .sum("outbox_outages_total", &[("server", "postgresql")]);
    assert_eq!(outages, Some(0.0), "a held key is no outage");

    tx.commit().await.expect("commit");
    let received = ids(&topology.receive(2, PATIENCE).await);
    assert_eq!(
        received,
        vec![held, keyed],
        "the writer's row first, then the due one"
    );
    relay.terminate().await;
}

/// A scheduled message whose message_id an app used again for a message
/// sent at once cannot be released: it is kept as refused, counted, and
/// the other due rows go out; nothing is dropped without a trace.
#[tokio::test]
async fn a_due_row_whose_id_was_taken_is_kept_as_refused_and_blocks_nothing() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let client = db.connect().await;
    let taken = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO outbox.messages (message_id, exchange, payload, deliver_at) \
             VALUES ($1, $2, '{}', now() + interval '500 milliseconds')",
            &[&taken, &topology.exchange],
        )
        .await
        .expect("scheduled with the app's own id");
    let other = schedule(&client, &topology.exchange, None, 500.0).await;
    client
        .execute(
            "INSERT INTO outbox.messages (message_id, exchange, payload) VALUES ($1, $2, '{}')",
            &[&taken, &topology.exchange],
        )
        .await
        .expect("the same id, sent now");

    let (relay, addr) = start_logged_relay(&db, &[]).await;
    let addr = addr.as_str();
    let received = ids(&topology.receive(2, PATIENCE).await);
    assert_eq!(
        received.iter().copied().collect::<HashSet<_>>(),
        HashSet::from([taken, other])
    );
    wait_for_metric(addr, "outbox_scheduled_refused_total", &[], |n| n == 1.0).await;
    let row = client
        .query_one(
            "SELECT state, refused FROM outbox.scheduled_messages WHERE message_id = $1",
            &[&taken],
        )
        .await
        .expect("the refused row is kept");
    assert_eq!(row.get::<_, String>(0), "refused");
    assert!(row.get::<_, Option<String>>(1).is_some());
    assert!(
        topology
            .receive(1, Duration::from_millis(300))
            .await
            .is_empty()
    );
    relay.terminate().await;
}

/// A relay whose role may not release scheduled rows (granted by hand,
/// without `outbox.release_due`) logs it and publishes everything else.
#[tokio::test]
async fn a_relay_that_may_not_release_publishes_everything_else() {
    let relay_role = TestRole::create("relay").await;
    let db = TestDb::with_outbox().await;
    db.connect()
        .await
        .batch_execute(&format!(
            "SELECT outbox.grant_relay('{0}'); \
             REVOKE EXECUTE ON FUNCTION outbox.release_due(integer) FROM {0}",
            relay_role.name
        ))
        .await
        .expect("grant, then revoke the release");
    let topology = Topology::fanout().await;
    let client = db.connect().await;
    let waiting = schedule(&client, &topology.exchange, None, 200.0).await;
    let relay = RunningRelay::start(Settings {
        database_url: Some(relay_role.url(&db)),
        ..no_sweep(&db)
    })
    .await;
    wait_until("the scheduled row is due", || async {
        count(
            &db,
            "SELECT count(*) FROM outbox.scheduled WHERE deliver_at <= now()",
        )
        .await
            == 1
    })
    .await;
    let now = enqueue_now(&client, &topology.exchange, None).await;
    assert_eq!(ids(&topology.receive(1, PATIENCE).await), vec![now]);
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.scheduled").await,
        1,
        "the due row waits for a relay that may release it"
    );
    // Given the right, the next look releases it.
    db.connect()
        .await
        .batch_execute(&format!(
            "GRANT EXECUTE ON FUNCTION outbox.release_due(integer) TO {}",
            relay_role.name
        ))
        .await
        .expect("grant the release");
    assert_eq!(ids(&topology.receive(1, PATIENCE).await), vec![waiting]);
    relay.stop().await;
}

/// The relay's sessions run without sequential scans (and so a statement
/// no index serves is costed past JIT's threshold: 180 ms of compiling a
/// read of an empty table, every 5 s): the schedule's gauges go by index.
#[tokio::test]
async fn the_schedules_gauges_are_read_by_index() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    client
        .batch_execute("SET enable_seqscan = off")
        .await
        .expect("the relay's setting");
    let statement = outbox_relay::store::SCHEDULE_STATS.replace("$1", "1000000");
    let plan: Vec<String> = client
        .query(&format!("EXPLAIN {statement}"), &[])
        .await
        .expect("explain")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        !plan.iter().any(|line| line.contains("Seq Scan")),
        "{}",
        plan.join("\n")
    );
}
