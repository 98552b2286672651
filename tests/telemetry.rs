//! What an operator sees, from outside the processes: each relay metric
//! moves when its event happens, `/readyz` follows the broker and the
//! database, log lines are JSON with `--log-format json`, and a W3C
//! `traceparent` in an outbox row reaches the AMQP headers and the
//! consumer's log. Relays and consumers run as child processes, so every
//! scrape shows one process's own numbers.

use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use outbox_tests::broker::{Topology, bound_queue, connect as connect_broker, fanout_exchange};
use outbox_tests::dispatch::{
    PATIENCE, Publisher, count, dispatch_command, fail_order_666,
    test_settings as dispatch_settings, wait_for_consumers, wait_until,
};
use outbox_tests::observe::{Logged, Scrape, documented_metrics, logged_address, wait_for_metric};
use outbox_tests::proxy::Proxy;
use outbox_tests::relay::{RunningRelay, start_logged_relay, test_settings as relay_settings};
use outbox_tests::*;
use serde_json::{Value, json};
use tokio_postgres::Client;
use uuid::Uuid;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

async fn get(addr: &str, path: &str) -> (u16, String) {
    http::request(addr, "GET", path, None).await
}

async fn enqueue(client: &Client, exchange: &str, routing_key: &str, payload: &Value) -> Uuid {
    client
        .query_one(
            "SELECT outbox.enqueue($1, $2, $3::jsonb)",
            &[&exchange, &routing_key, payload],
        )
        .await
        .expect("enqueue")
        .get(0)
}

/// An exchange whose only queue is full and rejects publishes: the broker
/// nacks every message sent to it.
async fn nacking_exchange(channel: &Channel) -> String {
    let exchange = fanout_exchange(channel, "test_nack_ex").await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(0));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    bound_queue(channel, &exchange, arguments).await;
    exchange
}

#[tokio::test]
async fn relay_metrics_move_with_their_events_and_logs_are_json() {
    let db = TestDb::with_outbox().await;
    let good = Topology::fanout().await;
    let routed = Topology::new(ExchangeKind::Direct, "bound").await;
    let nacking = nacking_exchange(&good.channel).await;
    let client = db.connect().await;
    let env = [
        ("OUTBOX_MAX_ATTEMPTS", "1"),
        ("OUTBOX_MAX_PAYLOAD_BYTES", "100"),
        ("OUTBOX_SWEEP_INTERVAL_MS", "500"),
        ("OUTBOX_RETENTION", "1s"),
    ];
    let (relay, addr) = start_logged_relay(&db, &env).await;
    let addr = addr.as_str();

    assert_eq!(get(addr, "/healthz").await.0, 200);
    wait_until("the relay is ready", || async {
        get(addr, "/readyz").await.0 == 200
    })
    .await;
    wait_for_metric(addr, "outbox_listener_connected", &[], |v| v == 1.0).await;
    let scrape = Scrape::of(addr).await;
    assert_eq!(scrape.value("outbox_database_connected", &[]), 1.0);
    assert_eq!(scrape.value("outbox_broker_connected", &[]), 1.0);
    assert_eq!(scrape.value("outbox_published_total", &[]), 0.0);

    // A wake-up by NOTIFY. (A writer's commit sends one only while no
    // relay drains, and a sweep may be draining right then: send it here.)
    client
        .batch_execute(&format!("NOTIFY {}", outbox::WAKE_CHANNEL))
        .await
        .expect("notify");
    let notified = [("cause", "notify")];
    wait_for_metric(addr, "outbox_wakeups_total", &notified, |n| n >= 1.0).await;

    // Published: five messages in one transaction.
    let tx_client = db.connect().await;
    tx_client.batch_execute("BEGIN").await.expect("begin");
    for seq in 0..5 {
        enqueue(&tx_client, &good.exchange, "", &json!({ "seq": seq })).await;
    }
    tx_client.batch_execute("COMMIT").await.expect("commit");
    wait_for_metric(addr, "outbox_published_total", &[], |n| n == 5.0).await;
    let scrape = Scrape::of(addr).await;
    assert_eq!(
        scrape.value("outbox_enqueue_to_confirm_seconds_count", &[]),
        5.0
    );
    assert!(
        scrape.value(
            "outbox_enqueue_to_confirm_seconds_bucket",
            &[("le", "+Inf")]
        ) >= 5.0
    );
    assert_eq!(good.receive(5, PATIENCE).await.len(), 5);

    // One failure of each kind; with one attempt allowed, each dies.
    enqueue(&client, &routed.exchange, "nowhere", &json!({})).await;
    enqueue(&client, &unique_name("missing_ex"), "", &json!({})).await;
    enqueue(
        &client,
        &good.exchange,
        "",
        &json!({ "pad": "x".repeat(200) }),
    )
    .await;
    enqueue(&client, &nacking, "", &json!({})).await;
    for reason in ["returned", "no_exchange", "oversized", "nack"] {
        let labels = [("reason", reason)];
        wait_for_metric(addr, "outbox_publish_failures_total", &labels, |n| n == 1.0).await;
    }
    wait_for_metric(addr, "outbox_dead_letters_total", &[], |n| n == 4.0).await;
    wait_for_metric(addr, "outbox_dead_messages", &[], |n| n == 4.0).await;
    let connection_lost = [("reason", "connection_lost")];
    assert_eq!(
        Scrape::of(addr)
            .await
            .value("outbox_publish_failures_total", &connection_lost),
        0.0
    );

    // A row due in a second: no wake-up covers it, the sweep finds it.
    client
        .execute(
            "INSERT INTO outbox.messages (exchange, routing_key, payload, next_attempt_at) \
             VALUES ($1, '', '{}', now() + interval '1 second')",
            &[&good.exchange],
        )
        .await
        .expect("insert a row due later");
    let swept = [("cause", "sweep"), ("found_work", "true")];
    wait_for_metric(addr, "outbox_wakeups_total", &swept, |n| n >= 1.0).await;
    wait_for_metric(addr, "outbox_published_total", &[], |n| n == 6.0).await;

    // Backlog and lag: a row enqueued an hour ago, not due for another.
    client
        .execute(
            "INSERT INTO outbox.messages (exchange, routing_key, payload, created_at, next_attempt_at) \
             VALUES ($1, '', '{}', now() - interval '1 hour', now() + interval '1 hour')",
            &[&good.exchange],
        )
        .await
        .expect("insert a waiting row");
    wait_for_metric(addr, "outbox_pending_messages", &[], |n| n == 1.0).await;
    wait_for_metric(addr, "outbox_oldest_pending_seconds", &[], |s| s >= 3600.0).await;
    // Retention (1 s here) deletes the six published rows.
    wait_for_metric(addr, "outbox_retention_deleted_total", &[], |n| n == 6.0).await;

    let scrape = Scrape::of(addr).await;
    // Every row claimed once: 5 + 4 + 1; claims that found nothing count too.
    assert_eq!(scrape.value("outbox_claim_batch_size_sum", &[]), 10.0);
    assert!(scrape.value("outbox_claim_batch_size_count", &[]) >= 3.0);
    assert_eq!(scrape.value("outbox_in_flight", &[]), 0.0);
    let usage = scrape.value("outbox_notification_queue_usage", &[]);
    assert!((0.0..1.0).contains(&usage), "{usage}");
    assert_eq!(scrape.value("outbox_outages_total", &[]), 0.0);
    let documented = documented_metrics("outbox_");
    assert!(documented.len() >= 15, "{documented:?}");
    let (_, page) = get(addr, "/metrics").await;
    for name in &documented {
        assert!(scrape.has(name), "{name} is documented but not served");
        assert!(
            page.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }

    let lines = relay.json_lines();
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string())
    );
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "ERROR"
                && l["message"].as_str().is_some_and(|m| m.contains("dead"))),
        "dead letters are logged as errors"
    );
    assert_eq!(relay.terminate().await, Some(0));
}

/// A channel on which every publish to an exchange is nacked is replaced
/// (RabbitMQ 3.10 quorum queues can nack a channel opened during their
/// election for good: see `nack_runs`), without an outage; the nacks still
/// count as attempts, and another exchange's rows flow throughout.
#[tokio::test]
async fn relay_renews_a_channel_whose_publishes_to_an_exchange_are_all_nacked() {
    let db = TestDb::with_outbox().await;
    let good = Topology::fanout().await;
    let nacking = nacking_exchange(&good.channel).await;
    let client = db.connect().await;
    let env = [
        ("OUTBOX_MAX_ATTEMPTS", "2"),
        ("OUTBOX_RETRY_BASE_MS", "200"),
    ];
    let (relay, addr) = start_logged_relay(&db, &env).await;
    let addr = addr.as_str();
    wait_for_metric(addr, "outbox_listener_connected", &[], |v| v == 1.0).await;
    assert_eq!(
        Scrape::of(addr)
            .await
            .value("outbox_channel_renewals_total", &[]),
        0.0
    );
    client
        .batch_execute(&format!(
            "INSERT INTO outbox.messages (exchange, routing_key, payload) \
             SELECT '{nacking}', '', '{{}}' FROM generate_series(1, 20)"
        ))
        .await
        .expect("rows for the nacking exchange");
    wait_for_metric(addr, "outbox_channel_renewals_total", &[], |n| n >= 1.0).await;
    enqueue(&client, &good.exchange, "", &json!({ "after": "renewal" })).await;
    assert_eq!(good.receive(1, PATIENCE).await.len(), 1);
    // Both attempts of each nacked row counted; none was an outage.
    wait_for_metric(addr, "outbox_dead_messages", &[], |n| n == 20.0).await;
    let scrape = Scrape::of(addr).await;
    assert_eq!(
        scrape.value("outbox_publish_failures_total", &[("reason", "nack")]),
        40.0
    );
    assert_eq!(scrape.value("outbox_outages_total", &[]), 0.0);
    assert_eq!(relay.terminate().await, Some(0));
}

#[tokio::test]
async fn relay_readyz_follows_the_broker_and_the_database() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let amqp = format!("amqp://guest:guest@{}/%2f", proxy.addr);
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
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let through_proxy = |url: &str| url.replace("127.0.0.1:5432", &proxy.addr.to_string());
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

/// A database error that quotes a row (a trigger's message, a check
/// violation's failing row) reaches neither the dead letter's
/// `x-consumer-error` nor the log: the SQLSTATE and the constraint, table
/// and column names do.
#[tokio::test]
async fn dispatch_keeps_row_values_out_of_logs_and_dead_letters() {
    let dispatch_db = TestDb::empty().await;
    let mut client = dispatch_db.connect().await;
    ::dispatch::migrate(&mut client)
        .await
        .expect("migrate dispatch");
    // Orders 7770000001 (a CHECK constraint) and 7770000002 (a trigger
    // that names the order and its rider) are refused.
    client
        .batch_execute(
            "ALTER TABLE dispatch.deliveries ADD CONSTRAINT deliveries_order_allowed \
                 CHECK (order_id <> 7770000001); \
             CREATE FUNCTION dispatch.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.order_id = 7770000002 THEN \
                 RAISE EXCEPTION 'order % of rider % refused', NEW.order_id, NEW.rider \
                 USING ERRCODE = 'check_violation', CONSTRAINT = 'deliveries_order_refused', \
                       SCHEMA = 'dispatch', TABLE = 'deliveries', COLUMN = 'order_id', \
                       DETAIL = 'Failing row contains (' || NEW.order_id || ').'; \
             END IF; RETURN NEW; END $$; \
             CREATE TRIGGER refuse BEFORE INSERT ON dispatch.deliveries \
             FOR EACH ROW EXECUTE FUNCTION dispatch.refuse()",
        )
        .await
        .expect("constraint and trigger");
    let settings = dispatch_settings(&dispatch_db);
    let names = outbox_tests::dispatch::topology(&settings);
    let env = [
        ("DISPATCH_LOG_FORMAT", "json"),
        ("RUST_LOG", "debug,lapin=error,tokio_postgres=info"),
    ];
    let consumer = Logged::spawn(dispatch_command(&settings, &env));
    logged_address(&consumer, "database ready, HTTP API listening", "http").await;
    wait_for_consumers(&names.queue, 1).await;
    let publisher = Publisher::new(&names.exchange).await;
    for order in [1, 7770000001, 7770000002, 2] {
        publisher.order(order).await;
    }
    let dead = outbox_tests::dispatch::take(&names.dead_letter_queue, 2).await;
    assert_eq!(dead.len(), 2);
    wait_until("the good orders land", || async {
        count(&dispatch_db, "SELECT count(*) FROM dispatch.deliveries").await == 2
    })
    .await;
    let mut errors = Vec::new();
    for delivery in &dead {
        let order: Value = serde_json::from_slice(&delivery.data).expect("JSON");
        let error =
            outbox_tests::dispatch::header(delivery, "x-consumer-error").expect("x-consumer-error");
        let constraint = match order["orderId"].as_i64() {
            Some(7770000001) => "deliveries_order_allowed",
            _ => "deliveries_order_refused",
        };
        assert!(error.contains("23514"), "{error}");
        assert!(error.contains(constraint), "{error}");
        assert!(error.contains("deliveries"), "{error}");
        errors.push(error);
    }
    // The consumer logs each dead letter's reason.
    consumer
        .wait_for_line("a dead letter's reason", |line| {
            line.to_string().contains("deliveries_order_refused")
        })
        .await;
    let logs = consumer.lines().join("\n");
    assert!(logs.contains("23514"), "{logs}");
    assert_eq!(consumer.terminate().await, Some(0));
    for value in ["7770000001", "7770000002", "Failing row"] {
        for error in &errors {
            assert!(!error.contains(value), "{value} in {error}");
        }
        assert!(!logs.contains(value), "{value} in the log");
    }
}

/// Outbox row headers ─► AMQP headers ─► the consumer's log span, and the
/// consumer's counters for each way a message can end.
#[tokio::test]
async fn traceparent_reaches_the_consumer_log_and_its_counters_move() {
    let outbox_db = TestDb::with_outbox().await;
    let dispatch_db = TestDb::empty().await;
    let settings = dispatch_settings(&dispatch_db);
    let names = outbox_tests::dispatch::topology(&settings);
    let env = [
        ("DISPATCH_LOG_FORMAT", "json"),
        ("RUST_LOG", "info,outbox_consumer=debug"),
        ("DISPATCH_MAX_DELIVERIES", "3"),
        ("DISPATCH_RETRY_BASE_MS", "50"),
    ];
    let consumer = Logged::spawn(dispatch_command(&settings, &env));
    let http = logged_address(&consumer, "database ready, HTTP API listening", "http").await;
    let http = http.as_str();
    wait_for_consumers(&names.queue, 1).await;
    // A copy of what the relay publishes, to read its headers.
    let broker = connect_broker().await;
    let channel = broker.create_channel().await.expect("channel");
    let tap = bound_queue(&channel, &names.exchange, FieldTable::default()).await;
    let relay = RunningRelay::start(relay_settings(&outbox_db)).await;

    let order = json!({"orderId": 7, "userName": "zhang", "context": "noodles", "num": 1});
    let message_id: Uuid = outbox_db
        .connect()
        .await
        .query_one(
            "SELECT outbox.enqueue($1, '', $2::jsonb, $3::jsonb)",
            &[
                &names.exchange,
                &order,
                &json!({ "traceparent": TRACEPARENT }),
            ],
        )
        .await
        .expect("enqueue")
        .get(0);
    let reader = Topology {
        exchange: names.exchange.clone(),
        queue: tap,
        connection: broker,
        channel,
    };
    let copy = reader.receive(1, PATIENCE).await;
    let headers = copy[0].properties.headers().as_ref().expect("headers");
    assert_eq!(
        headers.inner().get("traceparent"),
        Some(&AMQPValue::LongString(TRACEPARENT.into()))
    );
    let line = consumer
        .wait_for_line("the trace id", |line| {
            line["span"]["trace_id"] == TRACE_ID && line["outcome"] == "processed"
        })
        .await;
    assert_eq!(line["span"]["message_id"], json!(message_id.to_string()));
    assert_eq!(line["span"]["traceparent"], TRACEPARENT);
    relay.stop().await;

    // The same message again, a poison one, and one that keeps failing.
    fail_order_666(&dispatch_db).await;
    let publisher = Publisher::new(&names.exchange).await;
    publisher.order_as(7, message_id).await;
    publisher
        .raw(b"not an order", lapin::BasicProperties::default())
        .await;
    publisher.order(666).await;
    let outcomes = [
        ("processed", 1.0),
        ("duplicate", 1.0),
        ("retried", 2.0),
        ("dead_lettered", 2.0),
    ];
    for (outcome, expected) in outcomes {
        let labels = [("outcome", outcome)];
        wait_for_metric(http, "consumer_messages_total", &labels, |n| n == expected).await;
    }
    // Received: 4 messages, two of them redelivered from the retry queue.
    let scrape = Scrape::of(http).await;
    assert_eq!(scrape.value("consumer_received_total", &[]), 6.0);
    // One transaction each at least (more when two arrive in one batch and
    // it is taken apart).
    assert!(scrape.value("consumer_handle_seconds_count", &[]) >= 5.0);
    assert_eq!(scrape.value("consumer_consuming", &[]), 1.0);
    assert_eq!(scrape.value("consumer_database_available", &[]), 1.0);
    for name in documented_metrics("dispatch_") {
        assert!(scrape.has(&name), "{name} is documented but not served");
    }
    assert_eq!(
        count(&dispatch_db, "SELECT count(*) FROM dispatch.deliveries").await,
        1
    );
    assert!(consumer.json_lines().iter().all(|l| l["level"].is_string()));
    assert_eq!(consumer.terminate().await, Some(0));
}
