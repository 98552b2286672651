//! The wake-up trigger: NOTIFY when relays are idle, silence while one drains.

use std::time::Duration;

use outbox_tests::*;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::Notification;

const QUIET: Duration = Duration::from_millis(500);

async fn enqueue_rows(client: &mut tokio_postgres::Client, rows: usize) {
    let tx = client.transaction().await.expect("begin");
    for _ in 0..rows {
        tx.execute("SELECT outbox.enqueue('ex', '', '{}')", &[])
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
}

async fn next_wake(receiver: &mut UnboundedReceiver<Notification>) -> Notification {
    tokio::time::timeout(Duration::from_secs(10), receiver.recv())
        .await
        .expect("no wake-up within 10 s")
        .expect("listener closed")
}

async fn assert_silent(receiver: &mut UnboundedReceiver<Notification>) {
    if let Ok(Some(notification)) = tokio::time::timeout(QUIET, receiver.recv()).await {
        panic!("unexpected wake-up: {notification:?}");
    }
}

#[tokio::test]
async fn idle_relays_are_woken_once_per_transaction() {
    let db = TestDb::with_outbox().await;
    let (_listener, mut wakes) = listen(&db.url, outbox::WAKE_CHANNEL).await;
    let mut writer = db.connect().await;

    enqueue_rows(&mut writer, 50).await;
    assert_eq!(next_wake(&mut wakes).await.channel(), outbox::WAKE_CHANNEL);
    assert_silent(&mut wakes).await;
}

#[tokio::test]
async fn draining_relay_is_not_woken_and_idle_one_is_again() {
    let db = TestDb::with_outbox().await;
    let (relay, mut wakes) = listen(&db.url, outbox::WAKE_CHANNEL).await;
    let mut writer = db.connect().await;

    relay
        .batch_execute("SELECT outbox.begin_drain()")
        .await
        .expect("begin drain");
    enqueue_rows(&mut writer, 1).await;
    assert_silent(&mut wakes).await;

    relay
        .batch_execute("SELECT outbox.end_drain()")
        .await
        .expect("end drain");
    enqueue_rows(&mut writer, 1).await;
    next_wake(&mut wakes).await;
}

#[tokio::test]
async fn rolled_back_transaction_wakes_nobody() {
    let db = TestDb::with_outbox().await;
    let (_listener, mut wakes) = listen(&db.url, outbox::WAKE_CHANNEL).await;
    let mut writer = db.connect().await;
    let tx = writer.transaction().await.expect("begin");
    tx.execute("SELECT outbox.enqueue('ex', '', '{}')", &[])
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");
    assert_silent(&mut wakes).await;
}

#[tokio::test]
async fn nobody_is_woken_when_no_relay_listens() {
    let db = TestDb::with_outbox().await;
    // A bare LISTEN (no relay announced itself): writers skip NOTIFY.
    let (_bystander, mut wakes) = listen_silently(&db.url, outbox::WAKE_CHANNEL).await;
    let mut writer = db.connect().await;
    enqueue_rows(&mut writer, 1).await;
    assert_silent(&mut wakes).await;

    // Once a relay announces itself, the next commit wakes it.
    let (_relay, mut relay_wakes) = listen(&db.url, outbox::WAKE_CHANNEL).await;
    enqueue_rows(&mut writer, 1).await;
    next_wake(&mut relay_wakes).await;
}
