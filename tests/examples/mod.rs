//! The examples in other languages (`examples/`), run as a user would run
//! them: each producer's `run.sh` against its own database with the outbox
//! schema, and the Python consumer behind a real relay and RabbitMQ.
//!
//! `run.sh` installs what it lacks (scripts/test.sh installs everything
//! first with `examples/install.sh`, so here that is a quick check).

mod python_consumer;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use outbox_tests::*;
use tokio::process::Command;
use uuid::Uuid;

/// Long enough for a first run that installs (apt, pip, npm) on a new machine.
const RUN_LIMIT: Duration = Duration::from_secs(300);

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
        .join("run.sh")
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `examples/<lang>/run.sh ARGS` with `DATABASE_URL` set to `url` (or unset),
/// and no trace context but what `env` gives (not the test runner's own).
async fn run(lang: &str, url: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(example(lang));
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("TRACEPARENT")
        .env_remove("TRACESTATE");
    if let Some(url) = url {
        command.env("DATABASE_URL", url);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let output = tokio::time::timeout(RUN_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("examples/{lang}/run.sh ran over {RUN_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("run examples/{lang}/run.sh: {e}"));
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The `order_id=N message_id=UUID` line a producer prints after its commit.
fn enqueued(lang: &str, run: &Run) -> (i64, Uuid) {
    assert_eq!(
        run.code,
        Some(0),
        "examples/{lang} failed:\n{}{}",
        run.stdout,
        run.stderr
    );
    let fields: BTreeMap<&str, &str> = run
        .stdout
        .split_whitespace()
        .filter_map(|field| field.split_once('='))
        .collect();
    let order_id = fields.get("order_id").and_then(|id| id.parse().ok());
    let message_id = fields.get("message_id").and_then(|id| id.parse().ok());
    match (order_id, message_id) {
        (Some(order_id), Some(message_id)) => (order_id, message_id),
        _ => panic!(
            "examples/{lang} printed no order_id=N message_id=UUID: {:?}",
            run.stdout
        ),
    }
}

async fn scalar(client: &tokio_postgres::Client, sql: &str, id: Uuid) -> i64 {
    client
        .query_one(sql, &[&id])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// What every producer must do: refuse without a database or a schema, in
/// one line; commit the order and exactly one message together; leave
/// neither when the transaction fails (a taken order id, or a failure
/// after the enqueue).
async fn producer_commits_order_and_message_together(lang: &str) {
    let missing = run(lang, None, &[], &[]).await;
    assert_ne!(missing.code, Some(0), "ran without DATABASE_URL");
    assert!(
        missing.stderr.contains("DATABASE_URL is not set"),
        "{}",
        missing.stderr
    );

    let bare = TestDb::empty().await;
    let no_schema = run(lang, Some(&bare.url), &[], &[]).await;
    assert_ne!(no_schema.code, Some(0), "ran without the outbox schema");
    assert!(
        no_schema
            .stderr
            .contains("the outbox schema is not installed"),
        "{}",
        no_schema.stderr
    );
    // One line of its own (a first run also shows what it installed).
    let prefix = format!("examples/{lang}:");
    assert_eq!(
        no_schema
            .stderr
            .lines()
            .filter(|line| line.starts_with(&prefix))
            .count(),
        1,
        "{}",
        no_schema.stderr
    );

    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    // A generated order id, then the seed's.
    let (generated, first) = enqueued(lang, &run(lang, Some(&db.url), &[], &[]).await);
    let (seed, second) = enqueued(lang, &run(lang, Some(&db.url), &["100001"], &[]).await);
    assert_eq!(seed, 100001);
    for (order_id, message_id) in [(generated, first), (seed, second)] {
        let row = client
            .query_one(
                "SELECT exchange, routing_key, convert_from(payload, 'UTF8')::jsonb, headers
                 FROM outbox.messages WHERE message_id = $1",
                &[&message_id],
            )
            .await
            .unwrap_or_else(|e| panic!("examples/{lang}: message {message_id}: {e}"));
        assert_eq!(row.get::<_, String>(0), "order_confirm_fanoutExchange");
        assert_eq!(row.get::<_, String>(1), "");
        let payload: serde_json::Value = row.get(2);
        assert_eq!(
            payload,
            serde_json::json!({"orderId": order_id, "userName": "张三", "context": "方便面", "num": 1})
        );
        let headers: serde_json::Value = row.get(3);
        assert_eq!(headers["producer"], format!("examples/{lang}"));
        let order = client
            .query_one(
                "SELECT user_name, context, num FROM orders WHERE id = $1",
                &[&order_id],
            )
            .await
            .unwrap_or_else(|e| panic!("examples/{lang}: order {order_id}: {e}"));
        assert_eq!(order.get::<_, String>(0), "张三");
        assert_eq!(order.get::<_, i32>(2), 1);
    }

    // The seed's id again: the INSERT fails, nothing is enqueued.
    let taken = run(lang, Some(&db.url), &["100001"], &[]).await;
    assert_eq!(taken.code, Some(1), "{}", taken.stderr);
    assert!(taken.stderr.contains("already exists"), "{}", taken.stderr);

    // Fails after the enqueue: the message it had written is rolled back.
    let failed = run(
        lang,
        Some(&db.url),
        &["100002", "--fail-after-enqueue"],
        &[],
    )
    .await;
    assert_eq!(failed.code, Some(3), "{}", failed.stderr);
    let rolled_back: Uuid = failed
        .stderr
        .split_whitespace()
        .find_map(|word| word.parse().ok())
        .unwrap_or_else(|| panic!("no message id in {:?}", failed.stderr));
    let sql = "SELECT count(*) FROM outbox.messages WHERE message_id = $1";
    assert_eq!(scalar(&client, sql, rolled_back).await, 0);
    assert_eq!(
        count(&client, "SELECT count(*) FROM orders WHERE id = 100002").await,
        0
    );

    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox.messages").await,
        2
    );
    assert_eq!(count(&client, "SELECT count(*) FROM orders").await, 2);
}

#[tokio::test]
async fn java_example_commits_order_and_message_together() {
    producer_commits_order_and_message_together("java").await;
}

#[tokio::test]
async fn python_example_commits_order_and_message_together() {
    producer_commits_order_and_message_together("python").await;
}

/// An order with a scheduled auto-cancel: the order's message goes out
/// now, the cancel waits in `outbox.scheduled` for its time, keyed by order.
#[tokio::test]
async fn python_example_schedules_an_order_cancellation() {
    let db = TestDb::with_outbox().await;
    let out = run(
        "python",
        Some(&db.url),
        &["100004", "--cancel-unpaid-after", "1800"],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let cancel: Uuid = out
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix("cancel_message_id="))
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no cancel_message_id in {:?}", out.stdout));
    let row = db
        .connect()
        .await
        .query_one(
            "SELECT routing_key, ordering_key, extract(epoch FROM deliver_at - now())::float8 \
             FROM outbox.scheduled WHERE message_id = $1",
            &[&cancel],
        )
        .await
        .expect("the cancellation waits in outbox.scheduled");
    assert_eq!(row.get::<_, String>(0), "order.cancel_unpaid");
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("order-100004")
    );
    let due_in: f64 = row.get(2);
    assert!((1700.0..=1800.0).contains(&due_in), "{due_in}");
    assert_eq!(
        count(&db.connect().await, "SELECT count(*) FROM outbox.messages").await,
        1,
        "the order's own message goes out now"
    );
}

#[tokio::test]
async fn node_example_commits_order_and_message_together() {
    producer_commits_order_and_message_together("node").await;
}

/// The parent span a traced process hands the producer in `TRACEPARENT`.
const PARENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

/// The (trace id, span id, flags) of a valid version-00 `traceparent`.
fn traceparent_fields(lang: &str, headers: &serde_json::Value) -> (String, String, String) {
    let header = headers["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("examples/{lang}: no traceparent in {headers}"));
    let hex = |field: &str, len: usize| {
        field.len() == len
            && field
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && (len == 2 || field.bytes().any(|b| b != b'0'))
    };
    match header.split('-').collect::<Vec<_>>()[..] {
        ["00", trace, span, flags] if hex(trace, 32) && hex(span, 16) && hex(flags, 2) => {
            (trace.to_owned(), span.to_owned(), flags.to_owned())
        }
        _ => panic!("examples/{lang}: not a valid version-00 traceparent: {header:?}"),
    }
}

/// The headers of the message one run of the producer enqueued in `db`,
/// with `env`; its `producer` header checked.
async fn enqueued_headers(lang: &str, db: &TestDb, env: &[(&str, &str)]) -> serde_json::Value {
    let (_, message_id) = enqueued(lang, &run(lang, Some(&db.url), &[], env).await);
    let headers: serde_json::Value = db
        .connect()
        .await
        .query_one(
            "SELECT headers FROM outbox.messages WHERE message_id = $1",
            &[&message_id],
        )
        .await
        .unwrap_or_else(|e| panic!("examples/{lang}: message {message_id}: {e}"))
        .get(0);
    assert_eq!(headers["producer"], format!("examples/{lang}"), "{headers}");
    headers
}

/// A producer's message carries the app's own span in its headers: a child
/// of the span `TRACEPARENT` names (its `TRACESTATE` kept), a new root
/// without it or with an invalid one; `producer` stays.
async fn producer_headers_carry_the_apps_span(lang: &str) {
    let db = TestDb::with_outbox().await;
    let parent = format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01");
    let env = [("TRACEPARENT", parent.as_str()), ("TRACESTATE", "app=1")];
    let child = enqueued_headers(lang, &db, &env).await;
    let (trace, span, flags) = traceparent_fields(lang, &child);
    assert_eq!(trace, PARENT_TRACE, "the parent's trace: {child}");
    assert_ne!(
        span, PARENT_SPAN,
        "the app's own span, not its parent's: {child}"
    );
    assert_eq!(flags, "01", "sampled, as the parent: {child}");
    assert_eq!(child["tracestate"], "app=1", "{child}");

    // Without TRACEPARENT, and with an invalid one (an all-zero trace id).
    let zero_trace = format!("00-{}-{PARENT_SPAN}-01", "0".repeat(32));
    let roots = [
        enqueued_headers(lang, &db, &[]).await,
        enqueued_headers(lang, &db, &[("TRACEPARENT", &zero_trace)]).await,
    ];
    for root in &roots {
        let (trace, _, flags) = traceparent_fields(lang, root);
        assert_ne!(trace, PARENT_TRACE, "a new root: {root}");
        // Sampled; Python's SDK also sets 02, W3C level 2's random trace id.
        let flags = u8::from_str_radix(&flags, 16).expect("two hex digits");
        assert_eq!(flags & 1, 1, "sampled: {root}");
        assert!(root.get("tracestate").is_none(), "{root}");
    }
    let (first, _, _) = traceparent_fields(lang, &roots[0]);
    let (second, _, _) = traceparent_fields(lang, &roots[1]);
    assert_ne!(first, second, "each root its own trace");
}

#[tokio::test]
async fn java_example_headers_carry_the_apps_span() {
    producer_headers_carry_the_apps_span("java").await;
}

#[tokio::test]
async fn node_example_headers_carry_the_apps_span() {
    producer_headers_carry_the_apps_span("node").await;
}

#[tokio::test]
async fn python_example_headers_carry_the_apps_span() {
    producer_headers_carry_the_apps_span("python").await;
}
