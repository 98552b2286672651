//! Scenario 3: RabbitMQ closes every connection, repeatedly; and,
//! separately, RabbitMQ is stopped and started again. Both disturb every
//! user of the shared broker, hence `serial_*`.

use std::time::Duration;

use outbox_tests::books::{Expected, settle_and_check, start_load};
use outbox_tests::broker::rabbitmqctl;
use outbox_tests::pipeline::{Pipeline, under_repeated_fault};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_faults_broker_closes_every_connection() {
    let mut pipeline = Pipeline::start(1, &[], &[]).await;
    under_repeated_fault(
        &mut pipeline,
        Duration::from_millis(1500),
        "3a. RabbitMQ closes every connection",
        "cuts of all connections",
        |_| rabbitmqctl(&["close_all_connections", "fault suite: every connection cut"]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_faults_broker_stopped_and_started() {
    let mut pipeline = Pipeline::start(1, &[], &[]).await;
    let load = start_load(&pipeline.app.url, &pipeline.names.exchange);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stopped = std::time::Instant::now();
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    let down = stopped.elapsed();
    let load = load.await.expect("load");
    settle_and_check(
        &mut pipeline,
        &load,
        &Expected::default(),
        "3b. RabbitMQ stopped and started",
        &format!("1 stop/start, {:.1} s down", down.as_secs_f64()),
    )
    .await;
}
