//! Nothing lost and nothing falsely dead on the consumer's side (issue 24):
//! a retry due while its queue is missing or full, and graceful restarts
//! of a consumer on a quorum queue, which counts every return.

use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use outbox_tests::broker::rabbitmqctl;
use outbox_tests::dispatch::{
    Publisher, RunningDispatch, count, fail_order, queue_state, ready, test_settings, topology,
    wait_until,
};
use outbox_tests::*;

/// What keeps a retried message's queue from taking it back when it is due.
#[derive(Clone, Copy)]
enum Refusal {
    /// Deleted (to be declared again with other arguments, say).
    Missing,
    /// Full, with `overflow: reject-publish` (a length-limit policy).
    Full,
}

/// RabbitMQ dead-letters an expired message at most once: with the retry
/// copy's TTL running out while its queue was missing or full, order 7
/// was gone from every queue and never delivered.
#[tokio::test]
async fn a_retry_due_while_its_queue_is_missing_is_not_lost() {
    retry_due_while_refused(Refusal::Missing).await;
}

#[tokio::test]
async fn a_retry_due_while_its_queue_is_full_is_not_lost() {
    retry_due_while_refused(Refusal::Full).await;
}

async fn retry_due_while_refused(refusal: Refusal) {
    const BACKOFF: Duration = Duration::from_secs(3);
    let db = TestDb::empty().await;
    let mut settings = test_settings(&db);
    settings.retry_base_ms = Some(BACKOFF.as_millis() as u64);
    settings.retry_max_ms = settings.retry_base_ms;
    let names = topology(&settings);
    let dispatch = RunningDispatch::start(settings.clone()).await;
    fail_order(&db, 7, Some(1)).await;
    let publisher = Publisher::new(&names.exchange).await;
    publisher.order(7).await;
    wait_until("order 7 failed once", || async {
        count(
            &db,
            "SELECT count(*) FROM dispatch.flaky_count WHERE is_called",
        )
        .await
            == 1
    })
    .await;
    let failed_at = tokio::time::Instant::now();
    // The lane finishes its batch before it stops: the copy is in the
    // retry queue and the delivery acked.
    dispatch.stop().await;
    assert_eq!(ready(&names.queue).await, 0, "order 7 left its queue");

    let connection = outbox_tests::broker::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    match refusal {
        Refusal::Missing => {
            channel
                .queue_delete(names.queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .expect("delete the queue");
        }
        Refusal::Full => set_policy(
            &names.queue,
            r#"{"max-length":0,"overflow":"reject-publish"}"#,
        ),
    }
    // The copy's due time passes while its queue cannot take it (a TTL
    // would have expired it by then and dropped it).
    tokio::time::sleep_until(failed_at + BACKOFF + Duration::from_secs(1)).await;

    let dispatch = RunningDispatch::start(settings).await;
    if let Refusal::Full = refusal {
        wait_until("the full queue refused the retry", || async {
            refused(&dispatch).await >= 1.0
        })
        .await;
        clear_policy(&names.queue);
    }
    wait_until("order 7 is delivered after all", || async {
        count(
            &db,
            "SELECT count(*) FROM dispatch.deliveries WHERE order_id = 7",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(ready(&names.dead_letter_queue).await, 0, "nothing dead");
    dispatch.stop().await;
    let _ = connection.close(200, "done".into()).await;
}

/// `consumer_retries_refused_total` on the dispatch's `/metrics`.
async fn refused(dispatch: &RunningDispatch) -> f64 {
    let (_, metrics) = dispatch.get("/metrics").await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("consumer_retries_refused_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A policy on the test's own queue only (its name is unique).
fn set_policy(queue: &str, definition: &str) {
    rabbitmqctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        "--priority",
        "100",
        queue,
        &format!("^{queue}$"),
        definition,
    ]);
}

fn clear_policy(queue: &str) {
    rabbitmqctl(&["clear_policy", queue]);
}

/// A quorum queue counts a delivery given back by a graceful shutdown in
/// `x-delivery-count`: read as failures, four restarts with the orders in
/// hand dead-lettered all 20 as "delivered 4 times" (limit 3), none of
/// which had failed.
#[tokio::test]
async fn graceful_restarts_on_a_quorum_queue_dead_letter_nothing() {
    const ORDERS: i64 = 20;
    const RESTARTS: usize = 4;
    let db = TestDb::empty().await;
    let mut settings = test_settings(&db);
    settings.queue_type = Some("quorum".into());
    settings.prefetch = Some(64);
    settings.shutdown_timeout_ms = Some(200);
    let names = topology(&settings);
    let dispatch = RunningDispatch::start(settings.clone()).await;
    // Every batch waits on this lock, so the orders stay in hand until
    // the shutdown gives them back.
    let lock = db.connect().await;
    lock.batch_execute("BEGIN; LOCK TABLE dispatch.deliveries IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let publisher = Publisher::new(&names.exchange).await;
    for order in 1..=ORDERS {
        publisher.order(order).await;
    }
    let mut dispatch = Some(dispatch);
    for _ in 0..RESTARTS {
        let running = match dispatch.take() {
            Some(running) => running,
            None => RunningDispatch::start(settings.clone()).await,
        };
        wait_until("every order is in the consumer's hands", || async {
            ready(&names.queue).await == 0
        })
        .await;
        running.stop().await;
    }
    lock.batch_execute("ROLLBACK").await.expect("unlock");
    let running = RunningDispatch::start(settings).await;
    wait_until("every order is delivered", || async {
        count(
            &db,
            "SELECT count(DISTINCT order_id) FROM dispatch.deliveries",
        )
        .await
            == ORDERS
    })
    .await;
    assert_eq!(
        queue_state(&names.dead_letter_queue)
            .await
            .map(|(ready, _)| ready),
        Some(0),
        "graceful returns dead-lettered good orders"
    );
    running.stop().await;
}
