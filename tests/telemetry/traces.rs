//! OpenTelemetry export: the relay and dispatch, run as child processes
//! with the standard `OTEL_*` variables, send their spans to an OTLP/HTTP
//! receiver in the test. One trace runs from the app's span (named by the
//! row's `traceparent`) through the relay's publish span to the
//! consumer's process span and its steps; a redelivery shows as such;
//! spans still buffered leave on SIGTERM; a protocol not built in is
//! refused in one line.

use std::process::Stdio;

use outbox_tests::dispatch::{
    count, dispatch_command, fail_order, test_settings as dispatch_settings, topology,
    wait_for_consumers, wait_until,
};
use outbox_tests::observe::{Logged, logged_address};
use outbox_tests::otlp::{ReceivedSpan, Receiver};
use outbox_tests::relay::relay_run_command;
use outbox_tests::*;
use serde_json::{Value, json};
use uuid::Uuid;

/// The app's span: its trace and span ids.
const APP_TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const APP_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const APP_SPAN: &str = "b7ad6b7169203331";
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;
const ERROR: i32 = 2;

fn export_to(otlp: &Receiver) -> [(&'static str, String); 2] {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint.clone()),
        // Batches leave every 100 ms instead of every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
    ]
}

fn as_env<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect()
}

async fn enqueue(db: &TestDb, exchange: &str, order: i64, headers: Option<Value>) -> Uuid {
    let payload = json!({"orderId": order, "userName": "zhang", "context": "noodles", "num": 1});
    db.connect()
        .await
        .query_one(
            "SELECT outbox.enqueue($1, '', $2::jsonb, $3::jsonb)",
            &[&exchange, &payload, &headers.unwrap_or_else(|| json!({}))],
        )
        .await
        .expect("enqueue")
        .get(0)
}

fn attr<'a>(span: &'a ReceivedSpan, name: &str) -> &'a str {
    span.attributes.get(name).map_or("", String::as_str)
}

fn find(spans: &[ReceivedSpan], matches: impl Fn(&ReceivedSpan) -> bool) -> Option<ReceivedSpan> {
    spans.iter().find(|span| matches(span)).cloned()
}

#[tokio::test]
async fn one_trace_runs_from_the_apps_span_to_the_consumers_commit() {
    let otlp = Receiver::start().await;
    let env = export_to(&otlp);
    let outbox_db = TestDb::with_outbox().await;
    let dispatch_db = TestDb::empty().await;
    let settings = dispatch_settings(&dispatch_db);
    let names = topology(&settings);
    let mut consumer_env = as_env(&env);
    consumer_env.push(("DISPATCH_RETRY_BASE_MS", "50"));
    consumer_env.push(("DISPATCH_LOG_FORMAT", "json"));
    let consumer = Logged::spawn(dispatch_command(&settings, &consumer_env));
    logged_address(&consumer, "database ready, HTTP API listening", "http").await;
    wait_for_consumers(&names.queue, 1).await;
    // Order 8's first insert fails: its message comes back from the retry queue.
    fail_order(&dispatch_db, 8, Some(1)).await;
    let relay = Logged::spawn(relay_run_command(&outbox_db, &as_env(&env)));

    let traced = json!({ "traceparent": APP_TRACEPARENT, "tracestate": "app=1" });
    let seven = enqueue(&outbox_db, &names.exchange, 7, Some(traced)).await;

    // The relay's span continues the app's trace, under the app's span.
    let publish = otlp
        .wait_for("publish span of order 7", |spans| {
            find(spans, |s| {
                attr(s, "messaging.message.id") == seven.to_string() && s.kind == PRODUCER
            })
        })
        .await;
    assert_eq!(publish.service, "outbox-relay");
    assert_eq!(publish.name, format!("publish {}", names.exchange));
    assert_eq!(
        (publish.trace_id.as_str(), publish.parent.as_str()),
        (APP_TRACE, APP_SPAN)
    );
    assert_eq!(attr(&publish, "messaging.system"), "rabbitmq");
    assert_eq!(attr(&publish, "messaging.destination.name"), names.exchange);
    assert_eq!(attr(&publish, "outbox.outcome"), "published");
    assert_eq!(attr(&publish, "outbox.attempt"), "1");
    let wait: f64 = attr(&publish, "outbox.wait_ms")
        .parse()
        .expect("the outbox wait");
    assert!(wait >= 0.0, "{wait}");

    // The consumer's span sits below the relay's, its steps below it.
    let process = otlp
        .wait_for("process span of order 7", |spans| {
            find(spans, |s| {
                s.parent == publish.span_id && s.outcome() == "processed"
            })
        })
        .await;
    assert_eq!(process.service, "dispatch");
    assert_eq!(process.trace_id, APP_TRACE);
    assert_eq!(process.kind, CONSUMER);
    assert_eq!(process.name, format!("process {}", names.queue));
    assert_eq!(attr(&process, "messaging.message.id"), seven.to_string());
    assert_eq!(attr(&process, "messaging.destination.name"), names.exchange);
    assert_eq!(attr(&process, "outbox.delivery"), "1");
    let steps = otlp
        .wait_for("the batch's steps", |spans| {
            let mut names: Vec<String> = spans
                .iter()
                .filter(|s| s.parent == process.span_id)
                .map(|s| s.name.clone())
                .collect();
            names.sort();
            (names.len() == 3).then_some(names)
        })
        .await;
    assert_eq!(steps, ["commit", "handle", "inbox insert"]);
    assert!(process.start_ns >= publish.start_ns && process.end_ns >= process.start_ns);

    // No traceparent: the relay starts the trace, and the retry shows.
    // Alone in its batch, the failure is its own (with another message
    // it would be tried alone first, and pass).
    let eight = enqueue(&outbox_db, &names.exchange, 8, None).await;
    let publish = otlp
        .wait_for("publish span of order 8", |spans| {
            find(spans, |s| {
                attr(s, "messaging.message.id") == eight.to_string() && s.kind == PRODUCER
            })
        })
        .await;
    assert_eq!(publish.parent, "", "a root span");
    let deliveries = otlp
        .wait_for("both deliveries of order 8", |spans| {
            let mut below: Vec<ReceivedSpan> = spans
                .iter()
                .filter(|s| s.parent == publish.span_id)
                .cloned()
                .collect();
            below.sort_by_key(|s| attr(s, "outbox.delivery").to_string());
            (below.len() == 2 && below[1].outcome() == "processed").then_some(below)
        })
        .await;
    assert_eq!(deliveries[0].outcome(), "retried");
    assert_eq!(deliveries[0].status, ERROR);
    assert_eq!(attr(&deliveries[0], "outbox.delivery"), "1");
    assert_eq!(attr(&deliveries[1], "outbox.delivery"), "2");
    assert!(deliveries.iter().all(|s| s.trace_id == publish.trace_id));

    wait_until("both orders delivered", || async {
        count(&dispatch_db, "SELECT count(*) FROM dispatch.deliveries").await == 2
    })
    .await;
    assert_eq!(relay.terminate().await, Some(0));
    assert_eq!(consumer.terminate().await, Some(0));
}

/// Spans still waiting for their batch's timer leave when the relay is
/// told to stop. A keyed row's span names its key by a hash, as the logs
/// do: a key is a row's value.
#[tokio::test]
async fn spans_still_buffered_are_sent_on_sigterm() {
    let otlp = Receiver::start().await;
    let db = TestDb::with_outbox().await;
    let topology = outbox_tests::broker::Topology::fanout().await;
    let exchange = topology.exchange.clone();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ("OTEL_SERVICE_NAME", "relay-under-test"),
    ];
    let relay = Logged::spawn(relay_run_command(&db, &env));
    let id: Uuid = db
        .connect()
        .await
        .query_one(
            "SELECT outbox.enqueue($1, '', '{}'::jsonb, ordering_key => 'customer-42')",
            &[&exchange],
        )
        .await
        .expect("enqueue a keyed row")
        .get(0);
    wait_until("the row published", || async {
        count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL",
        )
        .await
            == 1
    })
    .await;
    assert!(otlp.spans().is_empty(), "sent before the batch's timer");
    assert_eq!(relay.terminate().await, Some(0));
    let spans = otlp.spans();
    let publish = find(&spans, |s| {
        attr(s, "messaging.message.id") == id.to_string()
    });
    let publish = publish.expect("the publish span, flushed on the way out");
    assert_eq!(
        publish.service, "relay-under-test",
        "OTEL_SERVICE_NAME wins"
    );
    let key = attr(&publish, "outbox.ordering_key");
    assert!(key.starts_with("hash:") && !key.contains("42"), "{key}");
    assert_eq!(attr(&publish, "outbox.key_seq"), "1");
}

/// The relay's stderr and its last line, once it exited 1 at start.
fn refused(db: &TestDb, env: &[(&str, &str)]) -> (String, String) {
    let output = relay_run_command(db, env)
        .stderr(Stdio::piped())
        .output()
        .expect("run outbox-relay");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let last = stderr.lines().last().unwrap_or("").to_string();
    (stderr, last)
}

/// Bad export settings stop the relay in one line, and a password in
/// the endpoint stays out of it.
#[tokio::test]
async fn a_protocol_not_built_in_is_refused_in_one_line() {
    let db = TestDb::with_outbox().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ];
    let (_, last) = refused(&db, &env);
    assert_eq!(
        last,
        "outbox-relay: error: OTEL_EXPORTER_OTLP_PROTOCOL=grpc: \
         only http/protobuf and http/json are built in"
    );
    let env = [(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "http://collector:s3cret-pw@[bad:4318",
    )];
    let (stderr, last) = refused(&db, &env);
    assert!(
        last.starts_with("outbox-relay: error: OTLP exporter: ") && last.contains("***"),
        "{last}"
    );
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");
}

/// The relay's trace context replaces the row's only where the frame still
/// holds it: a row whose headers fill the frame publishes as it would with
/// export off (before, it failed every attempt as `bad_headers`).
#[tokio::test]
async fn headers_that_fill_the_frame_publish_with_export_on() {
    let otlp = Receiver::start().await;
    let env = export_to(&otlp);
    let db = TestDb::with_outbox().await;
    let topology = outbox_tests::broker::Topology::fanout().await;
    let relay = Logged::spawn(relay_run_command(&db, &as_env(&env)));
    // 130,014 bytes of header: within the frame's room, but not with 72
    // more for a traceparent.
    let full = json!({ "pad": "x".repeat(130_014) });
    let id = enqueue(&db, &topology.exchange, 1, Some(full)).await;
    let received = topology
        .receive(1, std::time::Duration::from_secs(30))
        .await;
    assert_eq!(received.len(), 1);
    let sql =
        "SELECT count(*) FROM outbox.messages WHERE attempts = 0 AND published_at IS NOT NULL";
    wait_until("the row published at its first attempt", || async {
        count(&db, sql).await == 1
    })
    .await;
    let publish = otlp
        .wait_for("its publish span", |spans| {
            find(spans, |s| attr(s, "messaging.message.id") == id.to_string())
        })
        .await;
    assert_eq!(attr(&publish, "outbox.outcome"), "published");
    assert_eq!(relay.terminate().await, Some(0));
}

trait Outcome {
    fn outcome(&self) -> &str;
}

impl Outcome for ReceivedSpan {
    fn outcome(&self) -> &str {
        attr(self, "outbox.outcome")
    }
}
