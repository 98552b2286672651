//! Scenario 6: the dispatch consumer SIGKILLed with deliveries unacked.

use std::time::Duration;

use outbox_tests::dispatch::fail_order;
use outbox_tests::pipeline::{Pipeline, under_repeated_fault};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_consumer_sigkilled_with_deliveries_unacked() {
    // A large prefetch (each kill drops many deliveries in hand), within
    // PostgreSQL's 100 connections: the pool has prefetch + 2.
    let mut pipeline = Pipeline::start(1, &[], &[("DISPATCH_PREFETCH", "40")]).await;
    under_repeated_fault(
        &mut pipeline,
        Duration::from_secs(2),
        "6. consumer SIGKILLed, deliveries unacked",
        "SIGKILLs",
        Pipeline::kill_and_restart_consumer,
    )
    .await;
}

/// Scenario 6b: two dispatch processes on a single-active-consumer queue,
/// the relay pipelining keys, one consumer or the other SIGKILLed in turn.
/// RabbitMQ delivers to one of them at a time and hands the queue over with
/// the unacked deliveries back in their places: each key's effects still
/// commit in order (the books check it), none lost, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_single_active_consumers_sigkilled_in_turn() {
    let consumers = [("DISPATCH_SINGLE_ACTIVE_CONSUMER", "true")];
    let mut pipeline = Pipeline::start(1, &[("OUTBOX_KEY_PIPELINE", "64")], &consumers).await;
    let mut second = KilledOnDrop(pipeline.spawn_second_consumer());
    let mut strikes = 0;
    under_repeated_fault(
        &mut pipeline,
        Duration::from_secs(2),
        "6b. two single-active consumers, one SIGKILLed in turn",
        "SIGKILLs",
        |pipeline| {
            strikes += 1;
            if strikes % 2 == 1 {
                pipeline.kill_and_restart_consumer();
            } else {
                second = KilledOnDrop(pipeline.spawn_second_consumer());
            }
        },
    )
    .await;
}

/// Scenario 6c: rolling restarts (SIGTERM) of a consumer on a quorum
/// queue with a slow database, orders in hand given back at each one, and
/// an order that fails transiently twice (a keyless one: through the retry
/// queue). The queue counts every return in `x-delivery-count`; only real
/// failures may count towards the dead-letter queue, so nothing is dead.
/// It gives a stopped consumer's deliveries back in no set order, so a
/// key's later message can reach the next consumer first: that one waits
/// for the earlier one (with nothing waiting, 4 to 10 inversions a run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_consumer_restarted_gracefully_on_a_quorum_queue() {
    let consumer = [
        ("DISPATCH_QUEUE_TYPE", "quorum"),
        ("DISPATCH_PREFETCH", "40"),
        ("DISPATCH_SHUTDOWN_TIMEOUT_MS", "200"),
        ("DISPATCH_RETRY_BASE_MS", "300"),
        ("DISPATCH_RETRY_MAX_MS", "600"),
    ];
    let mut pipeline = Pipeline::start(1, &[], &consumer).await;
    // A slow database keeps batches in hand when the SIGTERM comes.
    pipeline
        .dispatch_db
        .connect()
        .await
        .batch_execute(
            "CREATE FUNCTION dispatch.slow() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END $$; \
             CREATE TRIGGER slow BEFORE INSERT ON dispatch.deliveries \
             FOR EACH ROW EXECUTE FUNCTION dispatch.slow()",
        )
        .await
        .expect("slow trigger");
    fail_order(&pipeline.dispatch_db, 1001, Some(2)).await;
    under_repeated_fault(
        &mut pipeline,
        Duration::from_secs(2),
        "6c. consumer on a quorum queue, SIGTERMed and restarted",
        "graceful restarts",
        Pipeline::terminate_and_restart_consumer,
    )
    .await;
}

/// A child process SIGKILLed when dropped, a failed assertion included.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
