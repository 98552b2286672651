//! Scenarios 1 and 2: relays SIGKILLed mid-batch and started again.

use std::time::Duration;

use outbox_tests::pipeline::{Pipeline, under_repeated_fault};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_relay_sigkilled_every_two_seconds() {
    let mut pipeline = Pipeline::start(1, &[], &[]).await;
    under_repeated_fault(
        &mut pipeline,
        Duration::from_secs(2),
        "1. relay SIGKILLed and restarted",
        "SIGKILLs",
        |pipeline| pipeline.kill_and_restart_relay(0),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_three_relays_one_sigkilled_repeatedly() {
    let mut pipeline = Pipeline::start(3, &[], &[]).await;
    under_repeated_fault(
        &mut pipeline,
        Duration::from_millis(1500),
        "2. three relays, one SIGKILLed repeatedly",
        "SIGKILLs of one of 3 relays",
        |pipeline| pipeline.kill_and_restart_relay(0),
    )
    .await;
}
