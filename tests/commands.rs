//! The operator commands (`status`, `dead`, `replay`, `reconcile`) run as
//! the binary against real databases, with dead letters a real relay made
//! (unroutable messages) and a real dispatch consumer's inbox.

use std::collections::HashSet;

use ::dispatch::Settings as DispatchSettings;
use lapin::ExchangeKind;
use lapin::types::AMQPValue;
use outbox_relay::Settings;
use outbox_tests::broker::{Topology, message_id};
use outbox_tests::dispatch::{PATIENCE, RunningDispatch, count, topology, wait_until};
use outbox_tests::relay::{RunningRelay, relay_command, test_settings};
use outbox_tests::*;
use serde_json::{Value, json};
use tokio_postgres::Client;
use uuid::Uuid;

/// Enqueues `n` messages `{"seq": i}` (with `ordering_key` when given).
async fn enqueue(
    client: &Client,
    exchange: &str,
    routing_key: &str,
    n: usize,
    ordering_key: Option<&str>,
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for seq in 0..n {
        let id = client
            .query_one(
                "SELECT outbox.enqueue($1, $2, $3::jsonb, '{}', $4)",
                &[&exchange, &routing_key, &json!({"seq": seq}), &ordering_key],
            )
            .await
            .expect("enqueue")
            .get(0);
        ids.push(id);
    }
    ids
}

async fn wait_for_count(db: &TestDb, sql: &str, expected: i64) {
    wait_until(&format!("{sql} = {expected}"), || async {
        count(db, sql).await == expected
    })
    .await;
}

const DEAD: &str = "SELECT count(*) FROM outbox.dead_letters";
const PUBLISHED: &str = "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL";

/// A relay that gives up after one attempt, so unroutable messages die at once.
async fn impatient_relay(db: &TestDb) -> RunningRelay {
    RunningRelay::start(Settings {
        max_attempts: Some(1),
        ..test_settings(db)
    })
    .await
}

fn exchange<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["exchanges"]
        .as_array()
        .and_then(|all| all.iter().find(|e| e["exchange"] == name))
        .unwrap_or_else(|| panic!("no exchange {name} in {status:#}"))
}

#[tokio::test]
async fn status_counts_by_state_and_exchange_with_real_dead_letters() {
    let db = TestDb::with_outbox().await;
    let good = Topology::fanout().await;
    let unroutable = Topology::new(ExchangeKind::Direct, "bound").await;
    let relay = impatient_relay(&db).await;
    let client = db.connect().await;
    enqueue(&client, &good.exchange, "", 3, None).await;
    enqueue(&client, &unroutable.exchange, "nobody", 2, None).await;
    assert_eq!(good.receive(3, PATIENCE).await.len(), 3);
    wait_for_count(&db, DEAD, 2).await;
    wait_for_count(&db, PUBLISHED, 3).await;
    wait_until("status sees the listening relay", || async {
        let out = relay_command(&db.url, &["status", "--json"]).await;
        serde_json::from_str::<Value>(out.expect_code(0)).expect("json")["relays_listening"] == 1
    })
    .await;
    relay.stop().await;

    // Waiting while no relay runs; one of them already failed once.
    let waiting = enqueue(&client, &good.exchange, "", 2, None).await;
    client
        .execute(
            "UPDATE outbox.messages SET attempts = 1, last_error = 'nack' WHERE message_id = $1",
            &[&waiting[0]],
        )
        .await
        .expect("fail once");

    let out = relay_command(&db.url, &["status", "--json"]).await;
    let status: Value = serde_json::from_str(out.expect_code(0)).expect("status json");
    let totals =
        ["pending", "in_flight", "retrying", "published", "dead"].map(|k| status[k].clone());
    assert_eq!(totals, [2, 0, 1, 3, 2].map(|n| json!(n)), "{status:#}");
    assert_eq!(status["relays_listening"], 0);
    assert!(status["oldest_pending_seconds"].as_f64() > Some(0.0));
    let g = exchange(&status, &good.exchange);
    assert_eq!(
        (&g["pending"], &g["published"], &g["dead"]),
        (&json!(2), &json!(3), &json!(0))
    );
    let u = exchange(&status, &unroutable.exchange);
    assert_eq!((&u["pending"], &u["dead"]), (&json!(0), &json!(2)));
    assert_eq!(u["oldest_pending_seconds"], 0.0);

    let out = relay_command(&db.url, &["status"]).await;
    let text = out.expect_code(0);
    assert!(
        text.contains("dead       2  -> outbox-relay dead list"),
        "{text}"
    );
    assert!(text.contains(&unroutable.exchange), "{text}");
}

#[tokio::test]
async fn dead_letters_are_listed_shown_requeued_and_discarded() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::new(ExchangeKind::Direct, "bound").await;
    let relay = impatient_relay(&db).await;
    let client = db.connect().await;
    let ids = enqueue(&client, &topology.exchange, "later", 3, None).await;
    wait_for_count(&db, DEAD, 3).await;

    let out = relay_command(&db.url, &["dead", "list", "--json"]).await;
    let letters: Vec<Value> = out
        .expect_code(0)
        .lines()
        .map(|line| serde_json::from_str(line).expect("json line"))
        .collect();
    assert_eq!(letters.len(), 3);
    for letter in &letters {
        assert_eq!(letter["attempts"], 1);
        assert!(letter["last_error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let first = ids[0].to_string();
    let out = relay_command(&db.url, &["dead", "show", &first]).await;
    let text = out.expect_code(0);
    assert!(
        text.contains(&first) && text.contains("\"seq\": 0"),
        "{text}"
    );
    let row_id: i64 = client
        .query_one(
            "SELECT id FROM outbox.messages WHERE message_id = $1",
            &[&ids[0]],
        )
        .await
        .expect("row id")
        .get(0);
    let out = relay_command(&db.url, &["dead", "show", &row_id.to_string(), "--json"]).await;
    let shown: Value = serde_json::from_str(out.expect_code(0)).expect("show json");
    assert_eq!(shown["message_id"], first);
    assert_eq!(shown["payload_text"], "{\"seq\": 0}");

    // The cause is fixed: the routing key now reaches a queue.
    topology.bind("later").await;
    let out = relay_command(&db.url, &["dead", "requeue", &row_id.to_string()]).await;
    assert!(
        out.expect_code(0).contains("1 dead letter(s) requeued"),
        "{out:#?}"
    );
    let out = relay_command(&db.url, &["dead", "discard", &ids[2].to_string()]).await;
    assert!(
        out.expect_code(0).contains("1 dead letter(s) deleted"),
        "{out:#?}"
    );
    let out = relay_command(&db.url, &["dead", "requeue", "--all"]).await;
    assert!(out.expect_code(0).contains(&ids[1].to_string()), "{out:#?}");

    let arrived: HashSet<Uuid> = topology
        .receive(2, PATIENCE)
        .await
        .iter()
        .map(message_id)
        .collect();
    assert_eq!(arrived, HashSet::from([ids[0], ids[1]]));
    wait_for_count(&db, PUBLISHED, 2).await;
    let fresh = count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE attempts = 0 AND published_at IS NOT NULL",
    )
    .await;
    assert_eq!(fresh, 2, "requeue resets attempts");
    let restamped = count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE replayed_at IS NOT NULL",
    )
    .await;
    assert_eq!(restamped, 2, "requeue restarts the lag clock");
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.messages").await,
        2,
        "discarded row is gone"
    );

    // Anything that is not a dead letter is left alone, and said so.
    let out = relay_command(&db.url, &["dead", "requeue", &first]).await;
    out.expect_code(1);
    assert!(
        out.stderr.contains("not dead letters, left alone"),
        "{out:#?}"
    );
    relay_command(&db.url, &["dead", "discard", &ids[2].to_string()])
        .await
        .expect_code(1);
    relay_command(&db.url, &["dead", "show", &first])
        .await
        .expect_code(1);
    let out = relay_command(&db.url, &["dead", "list"]).await;
    assert!(out.expect_code(0).contains("no dead letters"));
    relay.stop().await;
}

/// A key's dead head discarded gives its number back: the key's next row
/// goes out as `x-outbox-seq: 1`, so a consumer expecting 1 takes it at
/// once instead of waiting `key_gap_wait` for a number that never comes.
/// Without it the next row went out as 2.
#[tokio::test]
async fn a_discarded_dead_head_gives_its_number_back_to_its_key() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::new(ExchangeKind::Direct, "now").await;
    let relay = impatient_relay(&db).await;
    let client = db.connect().await;
    let dead = enqueue(&client, &topology.exchange, "nowhere", 1, Some("k")).await;
    wait_for_count(&db, DEAD, 1).await;
    enqueue(&client, &topology.exchange, "now", 1, Some("k")).await;
    let out = relay_command(&db.url, &["dead", "discard", &dead[0].to_string()]).await;
    assert!(
        out.expect_code(0).contains("1 dead letter(s) deleted"),
        "{out:#?}"
    );
    let arrived = topology.receive(1, PATIENCE).await;
    let seq = arrived[0]
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-outbox-seq").cloned());
    assert_eq!(seq, Some(AMQPValue::LongLongInt(1)), "the key's next row");
    relay.stop().await;
}

/// Only a number no consumer can have seen is given back: a dead row
/// whose last confirm timed out (the broker may have taken it) or that was
/// replayed (published before) keeps its number out of reach, and its
/// key's next row gets the number after it. Giving those back would send
/// a second message under a number a consumer already applied.
#[tokio::test]
async fn a_discarded_dead_row_that_may_have_been_delivered_keeps_its_number() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let cases = [
        ("refused", "returned: NO_ROUTE", false, 0),
        (
            "timed-out",
            "no confirm from the broker within 10000 ms",
            false,
            1,
        ),
        ("replayed", "returned: NO_ROUTE", true, 1),
    ];
    for (key, error, replayed, last) in cases {
        let id = enqueue(&client, "nowhere", "", 1, Some(key)).await[0];
        client
            .batch_execute(&format!(
                "INSERT INTO outbox.key_sequences (ordering_key, last) VALUES ('{key}', 1); \
                 UPDATE outbox.messages SET key_seq = 1, dead_at = now(), attempts = 5, \
                     last_error = '{error}', replayed_at = CASE WHEN {replayed} THEN now() END \
                 WHERE message_id = '{id}'"
            ))
            .await
            .expect("a dead row");
        relay_command(&db.url, &["dead", "discard", &id.to_string()])
            .await
            .expect_code(0);
        let kept = count(
            &db,
            &format!("SELECT last FROM outbox.key_sequences WHERE ordering_key = '{key}'"),
        )
        .await;
        assert_eq!(kept, last, "{key}");
    }
}

#[tokio::test]
async fn replay_publishes_published_messages_again_with_the_same_id() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(test_settings(&db)).await;
    let client = db.connect().await;
    let mut ids = enqueue(&client, &topology.exchange, "", 3, None).await;
    let keyed = enqueue(&client, &topology.exchange, "", 2, Some("order-7")).await;
    ids.extend(&keyed);
    assert_eq!(topology.receive(5, PATIENCE).await.len(), 5);
    wait_for_count(&db, PUBLISHED, 5).await;

    let one = ids[1].to_string();
    let out = relay_command(&db.url, &["replay", "--id", &one, "--dry-run"]).await;
    assert!(out.expect_code(0).contains("would replay 1"), "{out:#?}");
    assert_eq!(count(&db, PUBLISHED).await, 5, "a dry run changes nothing");

    relay_command(&db.url, &["replay", "--id", &one])
        .await
        .expect_code(0);
    let again = topology.receive(1, PATIENCE).await;
    assert_eq!(again.iter().map(message_id).collect::<Vec<_>>(), [ids[1]]);
    wait_for_count(&db, PUBLISHED, 5).await;

    let out = relay_command(&db.url, &["replay", "--since", "1h"]).await;
    assert!(
        out.expect_code(0).contains("5 message(s) published since"),
        "{out:#?}"
    );
    let replayed: Vec<Uuid> = topology
        .receive(5, PATIENCE)
        .await
        .iter()
        .map(message_id)
        .collect();
    assert_eq!(
        replayed.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );
    let position = |id: &Uuid| replayed.iter().position(|r| r == id);
    assert!(
        position(&keyed[0]) < position(&keyed[1]),
        "per-key order kept"
    );
    wait_for_count(&db, PUBLISHED, 5).await;

    let unknown = Uuid::new_v4().to_string();
    let out = relay_command(&db.url, &["replay", "--id", &unknown]).await;
    out.expect_code(1);
    assert!(out.stderr.contains("no longer kept"), "{out:#?}");
    relay.stop().await;
}

#[tokio::test]
async fn reconcile_finds_a_message_deleted_from_the_inbox_and_replay_repairs_it() {
    let orders_db = TestDb::with_outbox().await;
    let dispatch_db = TestDb::empty().await;
    ::dispatch::migrate(&mut dispatch_db.connect().await)
        .await
        .expect("migrate dispatch");
    let settings: DispatchSettings = outbox_tests::dispatch::test_settings(&dispatch_db);
    let names = topology(&settings);
    let consumer = RunningDispatch::start(settings).await;
    let relay = RunningRelay::start(test_settings(&orders_db)).await;
    let client = orders_db.connect().await;
    let mut ids = Vec::new();
    for order_id in 1..=5 {
        let order =
            json!({"orderId": order_id, "userName": "zhang", "context": "noodles", "num": 1});
        let message = outbox::Message::json(&names.exchange, "", &order).expect("message");
        ids.push(outbox::enqueue(&client, &message).await.expect("enqueue"));
    }
    const INBOX: &str = "SELECT count(*) FROM dispatch.inbox";
    wait_for_count(&dispatch_db, INBOX, 5).await;
    wait_for_count(&orders_db, PUBLISHED, 5).await;

    let reconcile = async |extra: &[&str]| {
        let mut args = vec![
            "reconcile",
            "--dispatch-database-url",
            &dispatch_db.url,
            "--until",
            "0",
        ];
        args.extend(extra);
        relay_command(&orders_db.url, &args).await
    };
    let out = reconcile(&[]).await;
    assert!(out.expect_code(0).contains("0 of 5 message(s)"), "{out:#?}");

    // Lost downstream, on purpose.
    dispatch_db
        .connect()
        .await
        .execute(
            "DELETE FROM dispatch.inbox WHERE message_id = $1",
            &[&ids[2]],
        )
        .await
        .expect("delete from inbox");
    let out = reconcile(&[]).await;
    assert!(out.expect_code(1).contains(&ids[2].to_string()), "{out:#?}");
    assert!(
        out.stderr
            .contains("1 of 5 published message(s) were never processed"),
        "{out:#?}"
    );
    let out = reconcile(&["--json"]).await;
    let report: Value = serde_json::from_str(out.expect_code(1)).expect("json");
    assert_eq!(report["checked"], 5);
    assert_eq!(report["unprocessed"][0]["message_id"], ids[2].to_string());
    let out = reconcile(&["--exchange", "some_other_exchange"]).await;
    assert!(out.expect_code(0).contains("0 of 0"), "{out:#?}");

    // What reconcile suggests repairs it: the consumer processes it again.
    relay_command(&orders_db.url, &["replay", "--id", &ids[2].to_string()])
        .await
        .expect_code(0);
    wait_for_count(&dispatch_db, INBOX, 5).await;
    wait_for_count(&orders_db, PUBLISHED, 5).await;
    reconcile(&[]).await.expect_code(0);
    assert_eq!(
        count(&dispatch_db, "SELECT count(*) FROM dispatch.deliveries").await,
        5
    );
    relay.stop().await;
    consumer.stop().await;
}

/// An empty window is refused; a window that retention may have cut is
/// still checked, with a warning on stderr and in the output.
#[tokio::test]
async fn reconcile_refuses_an_empty_window_and_warns_when_retention_cut_it() {
    let orders_db = TestDb::with_outbox().await;
    let dispatch_db = TestDb::empty().await;
    ::dispatch::migrate(&mut dispatch_db.connect().await)
        .await
        .expect("migrate dispatch");
    let reconcile = async |window: &[&str]| {
        let mut args = vec!["reconcile", "--dispatch-database-url", &dispatch_db.url];
        args.extend(window);
        relay_command(&orders_db.url, &args).await
    };

    let out = reconcile(&["--since", "1m", "--until", "2m"]).await;
    out.expect_code(1);
    assert!(out.stderr.contains("must be before --until"), "{out:#?}");

    let out = reconcile(&["--until", "0"]).await;
    assert!(out.expect_code(0).contains("0 of 0"), "{out:#?}");
    for text in [&out.stderr, &out.stdout] {
        assert!(text.contains("no published message is kept"), "{out:#?}");
    }

    // One message published 10 minutes ago, kept; the consumer has it.
    let client = orders_db.connect().await;
    let id = enqueue(&client, "shop", "", 1, None).await[0];
    client
        .execute(
            "UPDATE outbox.messages SET published_at = now() - interval '10 minutes'",
            &[],
        )
        .await
        .expect("published");
    dispatch_db
        .connect()
        .await
        .execute(
            "INSERT INTO dispatch.inbox (message_id) VALUES ($1)",
            &[&id],
        )
        .await
        .expect("processed");
    let out = reconcile(&["--since", "1h", "--until", "0"]).await;
    assert!(out.expect_code(0).contains("0 of 1"), "{out:#?}");
    for text in [&out.stderr, &out.stdout] {
        assert!(
            text.contains("the oldest published message still kept is from"),
            "{out:#?}"
        );
    }
    let out = reconcile(&["--since", "20m", "--until", "0", "--json"]).await;
    let report: Value = serde_json::from_str(out.expect_code(0)).expect("json");
    assert!(report["warning"].is_string(), "{report}");
    let out = reconcile(&["--since", "5m", "--until", "0"]).await;
    assert!(out.expect_code(0).contains("0 of 0"), "{out:#?}");
    assert!(!out.stderr.contains("warning"), "{out:#?}");
}

/// A replayed row's lag counts from the replay, not from its first
/// enqueue hours ago (or the lag alert would page); created_at and the id
/// stay as they were.
#[tokio::test]
async fn replayed_rows_count_their_lag_from_the_replay() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let id = enqueue(&client, "shop", "", 1, Some("order-7")).await[0];
    client
        .batch_execute(
            "UPDATE outbox.messages SET created_at = now() - interval '2 hours', \
             published_at = now() - interval '2 hours'",
        )
        .await
        .expect("published two hours ago");
    relay_command(&db.url, &["replay", "--id", &id.to_string()])
        .await
        .expect_code(0);

    let out = relay_command(&db.url, &["status", "--json"]).await;
    let status: Value = serde_json::from_str(out.expect_code(0)).expect("json");
    let lag = status["oldest_pending_seconds"].as_f64().expect("lag");
    assert!(lag < 3600.0, "lag {lag}s counts from the first enqueue");
    let row = client
        .query_one(
            "SELECT now() - created_at > interval '1 hour', \
                    extract(epoch FROM age)::float8 < 3600 \
             FROM outbox.pending WHERE message_id = $1",
            &[&id],
        )
        .await
        .expect("pending again");
    assert!(row.get::<_, bool>(0), "created_at keeps the first enqueue");
    assert!(
        row.get::<_, bool>(1),
        "outbox.pending's age counts from the replay"
    );
}

/// `enqueue_bytes` takes any bytes with any content type, so a dead letter
/// may claim to be JSON and not be UTF-8 at all: the view, `dead list` and
/// `dead show` must still show it (the payload as text only when it is
/// text), and `status` and `outbox.pending` keep working beside it.
#[tokio::test]
async fn a_dead_letter_that_is_not_utf8_is_listed_and_shown() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let ids: Vec<Uuid> = client
        .query(
            "SELECT outbox.enqueue_bytes('shop', 'rk', p, 'application/json') \
             FROM unnest(ARRAY['\\xff00fe'::bytea, convert_to('{\"ok\": 1}', 'UTF8')]) AS p",
            &[],
        )
        .await
        .expect("enqueue")
        .iter()
        .map(|row| row.get(0))
        .collect();
    client
        .batch_execute(
            "UPDATE outbox.messages SET dead_at = now(), attempts = 5, last_error = 'nack'; \
             SELECT outbox.enqueue('shop', 'rk', '{}')",
        )
        .await
        .expect("dead, and one pending");

    let rows = client
        .query(
            "SELECT message_id, payload_text FROM outbox.dead_letters ORDER BY id",
            &[],
        )
        .await
        .expect("SELECT * FROM outbox.dead_letters");
    let texts: Vec<(Uuid, Option<String>)> =
        rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    assert_eq!(
        texts,
        vec![(ids[0], None), (ids[1], Some("{\"ok\": 1}".into()))]
    );
    client
        .batch_execute("SELECT * FROM outbox.dead_letters; SELECT * FROM outbox.pending")
        .await
        .expect("both views, every column");

    let out = relay_command(&db.url, &["dead", "list", "--json"]).await;
    assert_eq!(out.expect_code(0).lines().count(), 2, "{out:#?}");
    let out = relay_command(&db.url, &["dead", "show", &ids[0].to_string(), "--json"]).await;
    let shown: Value = serde_json::from_str(out.expect_code(0)).expect("show json");
    assert_eq!(shown["payload_bytes"], 3);
    assert_eq!(shown["payload_text"], Value::Null);
    let out = relay_command(&db.url, &["dead", "show", &ids[0].to_string()]).await;
    assert!(
        out.expect_code(0).contains("3 bytes, not UTF-8"),
        "{out:#?}"
    );
    let out = relay_command(&db.url, &["status", "--json"]).await;
    let status: Value = serde_json::from_str(out.expect_code(0)).expect("json");
    assert_eq!(status["dead"], 2, "{status}");
    assert_eq!(status["pending"], 1, "{status}");
}

#[tokio::test]
async fn status_shows_a_held_xmin_horizon() {
    let db = TestDb::with_outbox().await;
    let mut holder = db.connect().await;
    let snapshot = holder
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .expect("begin");
    snapshot
        .batch_execute("SELECT 1")
        .await
        .expect("take the snapshot");
    let client = db.connect().await;
    enqueue(&client, "x", "", 3, None).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;

    let out = relay_command(&db.url, &["status", "--json"]).await;
    let status: Value = serde_json::from_str(out.expect_code(0)).expect("status json");
    // The cluster's horizon: other tests' snapshots may be older still.
    let seconds = status["xmin_horizon_age_seconds"]
        .as_f64()
        .expect("seconds");
    assert!(seconds >= 2.0, "{status:#}");
    assert!(
        status["xmin_horizon_age_xids"].as_i64() >= Some(3),
        "{status:#}"
    );
    let ratio = status["dead_tuple_ratio"].as_f64().expect("ratio");
    assert!((0.0..=1.0).contains(&ratio), "{status:#}");
    let out = relay_command(&db.url, &["status"]).await;
    assert!(
        out.expect_code(0).contains("vacuum     xmin horizon "),
        "{out:?}"
    );
    snapshot.rollback().await.expect("rollback");
}
