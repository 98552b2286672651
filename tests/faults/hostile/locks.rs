//! Other sessions' locks (listener lock, wake-up lock, busy writers) cannot
//! stall the relay or silence the writers' wake-ups.

use std::collections::HashSet;
use std::time::Duration;

use outbox_tests::broker::Topology;
use outbox_tests::relay::{RunningRelay, test_settings};
use outbox_tests::*;

use super::{distinct_ids, enqueue, start_idle_relay};

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
