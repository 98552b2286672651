//! `replay` and `reconcile`: published messages sent again with their ids,
//! a message missing from the inbox found and repaired, windows refused.

use std::collections::HashSet;

use ::dispatch::Settings as DispatchSettings;
use outbox_tests::broker::{Topology, message_id};
use outbox_tests::dispatch::{PATIENCE, RunningDispatch, count, topology};
use outbox_tests::relay::{RunningRelay, relay_command, test_settings};
use outbox_tests::*;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{PUBLISHED, enqueue, wait_for_count};

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
    assert!(out.stderr.contains("must be before until"), "{out:#?}");

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
