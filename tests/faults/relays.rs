//! Scenarios 1 and 2: relays SIGKILLed mid-batch and started again.

use std::time::Duration;

use outbox_tests::books::{Expected, settle_and_check, start_load};
use outbox_tests::pipeline::{Pipeline, repeat_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_relay_sigkilled_every_two_seconds() {
    let mut pipeline = Pipeline::start(1, &[], &[]).await;
    let load = start_load(&pipeline.app.url, &pipeline.names.exchange);
    let kills = repeat_until(Duration::from_secs(2), &load, || {
        pipeline.kill_and_restart_relay(0)
    })
    .await;
    let load = load.await.expect("load");
    assert!(kills >= 3, "only {kills} kills");
    settle_and_check(
        &mut pipeline,
        &load,
        &Expected::default(),
        "1. relay SIGKILLed and restarted",
        &format!("{kills} SIGKILLs"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_three_relays_one_sigkilled_repeatedly() {
    let mut pipeline = Pipeline::start(3, &[], &[]).await;
    let load = start_load(&pipeline.app.url, &pipeline.names.exchange);
    let kills = repeat_until(Duration::from_millis(1500), &load, || {
        pipeline.kill_and_restart_relay(0)
    })
    .await;
    let load = load.await.expect("load");
    assert!(kills >= 3, "only {kills} kills");
    settle_and_check(
        &mut pipeline,
        &load,
        &Expected::default(),
        "2. three relays, one SIGKILLed repeatedly",
        &format!("{kills} SIGKILLs of one of 3 relays"),
    )
    .await;
}
