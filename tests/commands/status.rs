//! `status`: counts by state and exchange, and a held xmin horizon.

use lapin::ExchangeKind;
use outbox_tests::broker::Topology;
use outbox_tests::dispatch::{PATIENCE, wait_until};
use outbox_tests::relay::relay_command;
use outbox_tests::*;
use serde_json::{Value, json};

use super::{DEAD, PUBLISHED, enqueue, exchange, impatient_relay, wait_for_count};

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
