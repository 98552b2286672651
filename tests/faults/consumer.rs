//! Scenario 6: the dispatch consumer SIGKILLed with deliveries unacked.

use std::time::Duration;

use outbox_tests::books::{Expected, settle_and_check, start_load};
use outbox_tests::pipeline::{Pipeline, repeat_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_consumer_sigkilled_with_deliveries_unacked() {
    // A large prefetch (each kill drops many deliveries in hand), within
    // PostgreSQL's 100 connections: the pool has prefetch + 2.
    let mut pipeline = Pipeline::start(1, &[], &[("DISPATCH_PREFETCH", "40")]).await;
    let load = start_load(&pipeline.app.url, &pipeline.names.exchange);
    let kills = repeat_until(Duration::from_secs(2), &load, || {
        pipeline.kill_and_restart_consumer()
    })
    .await;
    let load = load.await.expect("load");
    assert!(kills >= 3, "only {kills} kills");
    settle_and_check(
        &mut pipeline,
        &load,
        &Expected::default(),
        "6. consumer SIGKILLed, deliveries unacked",
        &format!("{kills} SIGKILLs"),
    )
    .await;
}
