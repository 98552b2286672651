//! What logs and dead letters show: no row values from a database error,
//! and a `traceparent` carried from the outbox row to the consumer's log.

use lapin::types::{AMQPValue, FieldTable};
use outbox_tests::broker::{Topology, bound_queue, connect as connect_broker};
use outbox_tests::dispatch::{
    PATIENCE, Publisher, count, dispatch_command, fail_order_666,
    test_settings as dispatch_settings, wait_for_consumers, wait_until,
};
use outbox_tests::observe::{Logged, Scrape, documented_metrics, logged_address, wait_for_metric};
use outbox_tests::relay::{RunningRelay, test_settings as relay_settings};
use outbox_tests::*;
use serde_json::{Value, json};
use uuid::Uuid;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

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
