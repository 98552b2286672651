//! Scenario 6: the dispatch consumer SIGKILLed with deliveries unacked.

use std::time::Duration;

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
