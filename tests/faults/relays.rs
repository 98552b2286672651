//! Scenarios 1 and 2: relays SIGKILLed mid-batch and started again (1b:
//! with keys pipelined).

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

/// As scenario 1, with the relay publishing up to 64 rows of a key behind
/// its head without waiting for their confirms: a kill leaves a key's
/// rows in flight, and the next relay publishes them again from the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_pipelining_relay_sigkilled_every_two_seconds() {
    let mut pipeline = Pipeline::start(1, &[("OUTBOX_KEY_PIPELINE", "64")], &[]).await;
    under_repeated_fault(
        &mut pipeline,
        Duration::from_secs(2),
        "1b. pipelining relay SIGKILLed and restarted",
        "SIGKILLs",
        |pipeline| pipeline.kill_and_restart_relay(0),
    )
    .await;
}
