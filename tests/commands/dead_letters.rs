//! `dead`: dead letters listed, shown, requeued and discarded, and the key
//! numbers a discarded dead row gives back or keeps.

use std::collections::HashSet;

use lapin::ExchangeKind;
use lapin::types::AMQPValue;
use outbox_tests::broker::{Topology, message_id};
use outbox_tests::dispatch::{PATIENCE, count};
use outbox_tests::relay::relay_command;
use outbox_tests::*;
use serde_json::Value;
use uuid::Uuid;

use super::{DEAD, PUBLISHED, enqueue, impatient_relay, wait_for_count};

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
