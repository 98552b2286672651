//! Scenarios 4 and 5: PostgreSQL cuts the relay's and the consumer's
//! connections, and the dispatch database refuses connections for ten
//! seconds. Only this test's own databases are touched; the order writers
//! (application_name `fault-load`) are spared: the faults are aimed at the
//! relay and the consumer.

use std::time::Duration;

use outbox_tests::books::{Expected, LOAD_APP_NAME, settle_and_check, start_load};
use outbox_tests::dispatch::wait_until;
use outbox_tests::http::request;
use outbox_tests::pipeline::Pipeline;
use outbox_tests::{admin_url, connect};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_postgres_terminates_relay_and_consumer_connections() {
    let mut pipeline = Pipeline::start(1, &[], &[]).await;
    let admin = connect(&admin_url()).await;
    let load = start_load(&pipeline.app.url, &pipeline.names.exchange);
    let (mut rounds, mut terminated) = (0, 0_i64);
    while !load.is_finished() {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let row = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE pid <> pg_backend_pid() \
                   AND ((datname = $1 AND application_name <> $3) OR datname = $2)",
                &[
                    &pipeline.app.name,
                    &pipeline.dispatch_db.name,
                    &LOAD_APP_NAME,
                ],
            )
            .await
            .expect("terminate backends");
        terminated += row.get::<_, i64>(0);
        rounds += 1;
    }
    let load = load.await.expect("load");
    assert!(
        rounds >= 5 && terminated >= 10,
        "{rounds} rounds, {terminated} backends"
    );
    settle_and_check(
        &mut pipeline,
        &load,
        &Expected::default(),
        "4. relay's and consumer's PG connections terminated",
        &format!("{rounds} rounds, {terminated} backends terminated"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_dispatch_database_refuses_connections_for_ten_seconds() {
    let mut pipeline = Pipeline::start(1, &[], &[]).await;
    let load = start_load(&pipeline.app.url, &pipeline.names.exchange);
    // Late in the load, so the outage ends about when the load does and
    // the settle time shows the consumer's catch-up.
    tokio::time::sleep(Duration::from_secs(15)).await;
    pipeline.dispatch_db.refuse_connections().await;
    let refused = std::time::Instant::now();
    wait_until("the consumer says it is not ready", || async {
        request(&pipeline.consumer_http, "GET", "/readyz", None)
            .await
            .0
            == 503
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(refused.elapsed())).await;
    pipeline.dispatch_db.allow_connections().await;
    let outage_over = std::time::Instant::now();
    let mut load = load.await.expect("load");
    // Settling is timed from the end of the load or of the outage, whichever is later.
    load.finished_at = load.finished_at.max(Some(outage_over));
    settle_and_check(
        &mut pipeline,
        &load,
        &Expected::default(),
        "5. dispatch DB refuses connections for 10 s",
        "1 outage of 10 s",
    )
    .await;
}
