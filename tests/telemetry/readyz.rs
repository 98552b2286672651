//! `/readyz`: it follows the broker and the database, including a database
//! that freezes without closing anything.

use outbox_tests::broker::Topology;
use outbox_tests::dispatch::{
    PATIENCE, count, dispatch_command, test_settings as dispatch_settings, wait_for_consumers,
    wait_until,
};
use outbox_tests::observe::{Logged, Scrape, logged_address, wait_for_metric};
use outbox_tests::proxy::Proxy;
use outbox_tests::relay::start_logged_relay;
use outbox_tests::*;
use serde_json::json;

use super::{enqueue, get};

#[tokio::test]
async fn relay_readyz_follows_the_broker_and_the_database() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let proxy = Proxy::start(&amqp_addr()).await;
    let amqp = amqp_url_through(&proxy.addr.to_string());
    let (relay, addr) = start_logged_relay(&db, &[("OUTBOX_AMQP_URL", &amqp)]).await;
    let addr = addr.as_str();
    let ready = || async { get(addr, "/readyz").await };
    wait_until("ready", || async { ready().await.0 == 200 }).await;

    proxy.cut();
    wait_until("not ready without RabbitMQ", || async {
        let (status, body) = ready().await;
        status == 503 && body.contains("RabbitMQ")
    })
    .await;
    let scrape = Scrape::of(addr).await;
    assert_eq!(scrape.value("outbox_broker_connected", &[]), 0.0);
    assert!(scrape.value("outbox_outages_total", &[("server", "rabbitmq")]) >= 1.0);
    assert_eq!(get(addr, "/healthz").await.0, 200, "alive all the same");
    proxy.restore();
    wait_until("ready again", || async { ready().await.0 == 200 }).await;
    wait_for_metric(addr, "outbox_broker_connected", &[], |v| v == 1.0).await;
    enqueue(&db.connect().await, &topology.exchange, "", &json!({})).await;
    assert_eq!(topology.receive(1, PATIENCE).await.len(), 1);

    // Only this test's database refuses connections; its backends go.
    db.refuse_connections().await;
    wait_until("not ready without PostgreSQL", || async {
        let (status, body) = ready().await;
        status == 503 && body.contains("PostgreSQL")
    })
    .await;
    // `/readyz` may say so first (its own `SELECT 1`), the drain soon after.
    wait_for_metric(addr, "outbox_database_connected", &[], |v| v == 0.0).await;
    let postgresql = [("server", "postgresql")];
    wait_for_metric(addr, "outbox_outages_total", &postgresql, |n| n >= 1.0).await;
    db.allow_connections().await;
    wait_until("ready again", || async { ready().await.0 == 200 }).await;
    assert_eq!(relay.terminate().await, Some(0));
}

/// Polls `/readyz` at `addr` until it answers `status`; fails after `limit`.
/// Returns how long that took.
async fn wait_for_readyz(
    addr: &str,
    status: u16,
    limit: std::time::Duration,
) -> std::time::Duration {
    let started = tokio::time::Instant::now();
    loop {
        // A probe that never answers would be a failure of its own.
        let answer = tokio::time::timeout(limit, get(addr, "/readyz"))
            .await
            .unwrap_or_else(|_| panic!("/readyz at {addr} did not answer within {limit:?}"));
        if answer.0 == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "/readyz at {addr} still {answer:?} after {limit:?}, not {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A database that stops answering without closing anything (a server
/// under SIGSTOP, a black-holed network): the relay's and the consumer's
/// `/readyz` turn 503 within seconds, and back to 200 once it answers
/// again, and rows flow again end to end.
#[tokio::test]
async fn readyz_turns_when_the_database_freezes_and_back_when_it_thaws() {
    let outbox_db = TestDb::with_outbox().await;
    let dispatch_db = TestDb::empty().await;
    let proxy = Proxy::start(&postgres_addr()).await;
    let through_proxy = |url: &str| url.replace(&postgres_addr(), &proxy.addr.to_string());
    // A claim sent while frozen still runs once the server answers, and
    // leases rows that nobody publishes until their lease runs out: a
    // short lease keeps that wait short.
    let (relay, relay_addr) = start_logged_relay(
        &outbox_db,
        &[
            ("OUTBOX_DATABASE_URL", &through_proxy(&outbox_db.url)),
            ("OUTBOX_LEASE_MS", "5000"),
        ],
    )
    .await;
    let mut settings = dispatch_settings(&dispatch_db);
    settings.database_url = Some(through_proxy(&dispatch_db.url));
    let names = outbox_tests::dispatch::topology(&settings);
    let consumer = Logged::spawn(dispatch_command(
        &settings,
        &[("DISPATCH_LOG_FORMAT", "json")],
    ));
    let http = logged_address(&consumer, "database ready, HTTP API listening", "http").await;
    wait_for_consumers(&names.queue, 1).await;
    let order =
        |id: i64| json!({"orderId": id, "userName": "zhang", "context": "noodles", "num": 1});
    let writer = outbox_db.connect().await;
    enqueue(&writer, &names.exchange, "", &order(1)).await;
    let deliveries = || count(&dispatch_db, "SELECT count(*) FROM dispatch.deliveries");
    wait_until("the first order lands", || async {
        deliveries().await == 1
    })
    .await;
    let bound = std::time::Duration::from_secs(15);
    wait_for_readyz(&relay_addr, 200, PATIENCE).await;
    wait_for_readyz(&http, 200, PATIENCE).await;

    proxy.freeze();
    let relay_took = wait_for_readyz(&relay_addr, 503, bound).await;
    let consumer_took = wait_for_readyz(&http, 503, bound).await;
    eprintln!("not ready after: relay {relay_took:?}, consumer {consumer_took:?}");
    assert_eq!(
        get(&relay_addr, "/healthz").await.0,
        200,
        "alive all the same"
    );
    // The relay's own statements (claims, gauges) give up too: an outage.
    wait_for_metric(&relay_addr, "outbox_database_connected", &[], |v| v == 0.0).await;
    let postgresql = [("server", "postgresql")];
    wait_for_metric(&relay_addr, "outbox_outages_total", &postgresql, |n| {
        n >= 1.0
    })
    .await;
    // Written while frozen (the writer does not go through the proxy).
    enqueue(&writer, &names.exchange, "", &order(2)).await;

    proxy.restore();
    let relay_took = wait_for_readyz(&relay_addr, 200, PATIENCE).await;
    let consumer_took = wait_for_readyz(&http, 200, PATIENCE).await;
    eprintln!("ready again after: relay {relay_took:?}, consumer {consumer_took:?}");
    enqueue(&writer, &names.exchange, "", &order(3)).await;
    let thawed = tokio::time::Instant::now();
    wait_until("every order lands", || async { deliveries().await == 3 }).await;
    eprintln!("every order landed after {:?}", thawed.elapsed());
    assert_eq!(relay.terminate().await, Some(0));
    assert_eq!(consumer.terminate().await, Some(0));
}
