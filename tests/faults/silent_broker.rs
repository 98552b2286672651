//! A broker that stops answering without closing anything (issue 24): a
//! black-holed network, a stuck load balancer. Its missing confirms are an
//! outage, not the messages' faults: no row gains an attempt or dies,
//! `/readyz` says so while it lasts, and once the network heals every row
//! is published (copies allowed, nothing missing). Only the test's own
//! proxy is frozen; the shared broker is untouched.

use std::collections::HashSet;
use std::time::Duration;

use outbox_tests::broker::{Topology, connect_to, message_id, resume_queue, suspend_queue};
use outbox_tests::dispatch::{PATIENCE, count, wait_until};
use outbox_tests::observe::{Logged, Scrape, wait_for_metric};
use outbox_tests::proxy::Proxy;
use outbox_tests::relay::start_logged_relay;
use outbox_tests::*;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The relay's confirm timeout here.
const CONFIRM_TIMEOUT_MS: u64 = 1_000;
/// How long the network stays black-holed: several confirm timeouts. The
/// relay before the fix had every row in flight dead (3 attempts) in about
/// 3.5 s of it.
const FROZEN: Duration = Duration::from_secs(6);
const SILENT: &str = "RabbitMQ stopped answering; pausing";

/// A relay with `env` on `db`, logging JSON, once `/readyz` says ready;
/// and its ops address.
async fn start_relay(db: &TestDb, env: &[(&str, &str)]) -> (Logged, String) {
    let (relay, addr) = start_logged_relay(db, env).await;
    wait_until("the relay is ready", || async {
        get(&addr, "/readyz").await == 200
    })
    .await;
    (relay, addr)
}

async fn get(addr: &str, path: &str) -> u16 {
    http::request(addr, "GET", path, None).await.0
}

/// Enqueues a row every 20 ms until `stop`; returns their message ids.
fn steady_writer(
    db: &TestDb,
    exchange: &str,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<Uuid>> {
    let url = db.url.clone();
    let exchange = exchange.to_string();
    tokio::spawn(async move {
        let client = connect(&url).await;
        let mut ids = Vec::new();
        while !stop.is_cancelled() {
            let id: Uuid = client
                .query_one(
                    "SELECT outbox.enqueue($1, '', jsonb_build_object('n', $2::int))",
                    &[&exchange, &(ids.len() as i32)],
                )
                .await
                .expect("enqueue")
                .get(0);
            ids.push(id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ids
    })
}

#[tokio::test]
async fn faults_a_silent_broker_is_an_outage_not_dead_messages() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let proxy = Proxy::start(&amqp_addr()).await;
    let amqp = amqp_url_through(&proxy.addr.to_string());
    let confirm_timeout = CONFIRM_TIMEOUT_MS.to_string();
    let env = [
        ("OUTBOX_AMQP_URL", amqp.as_str()),
        ("OUTBOX_CONFIRM_TIMEOUT_MS", confirm_timeout.as_str()),
        ("OUTBOX_LEASE_MS", "5000"),
        ("OUTBOX_MAX_ATTEMPTS", "3"),
        ("OUTBOX_RETRY_BASE_MS", "50"),
        ("OUTBOX_RETRY_MAX_MS", "200"),
        ("OUTBOX_SWEEP_INTERVAL_MS", "100"),
    ];
    let (relay, addr) = start_relay(&db, &env).await;
    let addr = addr.as_str();

    // Rows flow before, during and after the freeze.
    let stop = CancellationToken::new();
    let writer = steady_writer(&db, &topology.exchange, stop.clone());
    wait_for_metric(addr, "outbox_published_total", &[], |n| n >= 10.0).await;

    proxy.freeze();
    let frozen_at = Instant::now();
    // Rows go out into the black hole and wait for their confirms.
    wait_for_metric(addr, "outbox_in_flight", &[], |n| n >= 1.0).await;
    wait_until("/readyz says RabbitMQ is gone", || async {
        let (status, body) = http::request(addr, "GET", "/readyz", None).await;
        status == 503 && body.contains("RabbitMQ")
    })
    .await;
    let detected = frozen_at.elapsed();
    let scrape = Scrape::of(addr).await;
    assert_eq!(scrape.value("outbox_broker_connected", &[]), 0.0);
    assert!(scrape.value("outbox_outages_total", &[("server", "rabbitmq")]) >= 1.0);
    // Hold the black hole for several confirm timeouts.
    tokio::time::sleep_until(frozen_at + FROZEN).await;
    let scrape = Scrape::of(addr).await;
    assert_eq!(scrape.value("outbox_in_flight", &[]), 0.0, "all given back");
    assert_eq!(
        scrape.value(
            "outbox_publish_failures_total",
            &[("reason", "confirm_timeout")]
        ),
        0.0
    );
    let charged = "SELECT count(*) FROM outbox.messages WHERE attempts > 0";
    assert_eq!(count(&db, charged).await, 0, "no row gained an attempt");
    let dead = "SELECT count(*) FROM outbox.dead_letters";
    assert_eq!(count(&db, dead).await, 0, "no row is dead");
    assert_eq!(get(addr, "/readyz").await, 503, "still not ready");

    proxy.restore();
    let restored_at = Instant::now();
    wait_until("ready again", || async {
        get(addr, "/readyz").await == 200
    })
    .await;
    let ready_again = restored_at.elapsed();
    stop.cancel();
    let written: HashSet<Uuid> = writer.await.expect("writer").into_iter().collect();
    let unpublished = "SELECT count(*) FROM outbox.messages WHERE published_at IS NULL";
    wait_until("every row is published", || async {
        count(&db, unpublished).await == 0
    })
    .await;
    assert_eq!(count(&db, charged).await, 0, "no attempt after the heal");
    assert_eq!(count(&db, dead).await, 0);
    let rows = "SELECT count(*) FROM outbox.messages";
    assert_eq!(count(&db, rows).await, written.len() as i64);

    // Every message reached the queue; copies are the consumer's to drop.
    let mut missing = written.clone();
    let mut copies = 0;
    let deadline = Instant::now() + PATIENCE;
    while !missing.is_empty() && Instant::now() < deadline {
        for delivery in topology
            .receive(missing.len(), Duration::from_secs(2))
            .await
        {
            copies += usize::from(!missing.remove(&message_id(&delivery)));
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} messages never reached the queue",
        missing.len(),
        written.len()
    );
    eprintln!(
        "silent broker: {} rows, outage reported {:.1} s into a {} s freeze, ready {:.1} s after the heal, \
         0 attempts, 0 dead, at least {copies} copies beyond one",
        written.len(),
        detected.as_secs_f64(),
        FROZEN.as_secs(),
        ready_again.as_secs_f64(),
    );

    // The outage was logged once as such, however many reconnects it took.
    let silent: Vec<_> = relay
        .json_lines()
        .into_iter()
        .filter(|line| line["message"] == SILENT)
        .collect();
    assert_eq!(silent.len(), 1, "{silent:?}");
    assert_eq!(silent[0]["level"], "WARN", "{:?}", silent[0]);
    assert_eq!(relay.terminate().await, Some(0));
}

/// Thaws a suspended queue however the test ends.
struct Suspended(String);

impl Drop for Suspended {
    fn drop(&mut self) {
        resume_queue(&self.0);
    }
}

/// The other side: a queue that stops confirming while the broker still
/// answers is its rows' fault (attempts), even when nothing published
/// after them is confirmed: the probe is answered. No outage.
#[tokio::test]
async fn faults_a_stuck_queue_alone_is_still_its_rows_fault() {
    let db = TestDb::with_outbox().await;
    let stuck = Topology::fanout().await;
    suspend_queue(&stuck.queue);
    let _thaw = Suspended(stuck.queue.clone());
    let confirm_timeout = CONFIRM_TIMEOUT_MS.to_string();
    let env = [
        ("OUTBOX_CONFIRM_TIMEOUT_MS", confirm_timeout.as_str()),
        ("OUTBOX_MAX_ATTEMPTS", "20"),
    ];
    let (relay, addr) = start_relay(&db, &env).await;
    let addr = addr.as_str();
    let client = db.connect().await;
    for n in 0..3 {
        client
            .execute(
                "SELECT outbox.enqueue($1, '', jsonb_build_object('n', $2::int))",
                &[&stuck.exchange, &n],
            )
            .await
            .expect("enqueue");
    }
    let charged = "SELECT count(*) FROM outbox.messages \
                   WHERE attempts >= 2 AND last_error LIKE 'no confirm%'";
    wait_until("each stuck row counted two attempts", || async {
        count(&db, charged).await == 3
    })
    .await;
    let scrape = Scrape::of(addr).await;
    assert_eq!(
        scrape.value("outbox_outages_total", &[("server", "rabbitmq")]),
        0.0
    );
    assert_eq!(scrape.value("outbox_broker_connected", &[]), 1.0);
    assert_eq!(get(addr, "/readyz").await, 200);
    assert_eq!(relay.terminate().await, Some(0));
}

/// A silent broker is found even with nothing in flight: connections ask
/// for short heartbeats unless the URL says otherwise.
#[tokio::test]
async fn faults_broker_connections_ask_for_short_heartbeats() {
    let connection = connect_to(&amqp_url()).await;
    assert_eq!(
        connection.configuration().heartbeat(),
        outbox_service::amqp::DEFAULT_HEARTBEAT_SECS
    );
    let _ = connection.close(200, "done".into()).await;
    let own = format!("{}?heartbeat=30", amqp_url());
    let connection = connect_to(&own).await;
    assert_eq!(connection.configuration().heartbeat(), 30);
    let _ = connection.close(200, "done".into()).await;
}

/// The fault suite's books under a black-holed broker: the relay's
/// connection goes silent for 4 s every 6 s while orders flow (a proxy
/// that holds every byte, closing nothing). Each silence is an outage: no
/// order is dead, lost or doubled, and each key's effects keep their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_relay_broker_black_holed_again_and_again() {
    let proxy = std::sync::Arc::new(Proxy::start(&amqp_addr()).await);
    let amqp_url = amqp_url_through(&proxy.addr.to_string());
    let relay = [
        ("OUTBOX_AMQP_URL", amqp_url.as_str()),
        ("OUTBOX_CONFIRM_TIMEOUT_MS", "500"),
    ];
    let mut pipeline = outbox_tests::pipeline::Pipeline::start(1, &relay, &[]).await;
    outbox_tests::pipeline::under_repeated_fault(
        &mut pipeline,
        Duration::from_secs(6),
        "6d. the relay's broker black-holed for 4 s, again and again",
        "silences",
        |_| {
            proxy.freeze();
            let proxy = proxy.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(4));
                proxy.restore();
            });
        },
    )
    .await;
}
