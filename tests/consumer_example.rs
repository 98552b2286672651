//! The consumer library's example (`crates/outbox-consumer/examples/
//! into_my_table.rs`) run as a user would, against the real servers: a
//! message lands in the table named on the command line exactly once, a
//! republished copy changes nothing, a body that is not JSON goes to the
//! dead-letter queue with the reason, and `/readyz` and the `consumer_*`
//! metrics say so.

use std::path::PathBuf;
use std::process::Command;

use lapin::BasicProperties;
use outbox_tests::dispatch::{Publisher, count, header, take, wait_for_consumers, wait_until};
use outbox_tests::observe::{Logged, Scrape, logged_address, wait_for_metric};
use outbox_tests::*;
use uuid::Uuid;

/// The example's executable, built when missing (`scripts/test.sh` builds
/// it with the binaries; a plain `cargo nextest run` does not).
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let path = profile_dir.join("examples").join("into_my_table");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let built = Command::new(cargo)
            .args([
                "build",
                "-p",
                "outbox-consumer",
                "--example",
                "into_my_table",
            ])
            .status()
            .expect("run cargo build");
        assert!(
            built.success(),
            "cargo build --example into_my_table failed"
        );
    }
    path
}

fn json_message(message_id: Uuid) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(message_id.to_string().into())
        .with_content_type("application/json".into())
}

#[tokio::test]
async fn example_consumes_into_the_chosen_table_once() {
    let db = TestDb::empty().await;
    let exchange = unique_name("example_ex");
    let queue = unique_name("example_q");
    let table = format!("public.{}", unique_name("my_rows"));
    let mut command = Command::new(example_binary());
    command
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", amqp_url())
        .args([
            "--exchange",
            &exchange,
            "--queue",
            &queue,
            "--table",
            &table,
        ])
        .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
        .args(["--queue-expires-ms", "300000"]);
    let example = Logged::spawn(command);
    let addr = logged_address(&example, "serving /metrics, /healthz and /readyz", "addr").await;
    wait_for_consumers(&queue, 1).await;

    let publisher = Publisher::new(&exchange).await;
    let good = Uuid::new_v4();
    let body = br#"{"orderId": 100001, "num": 1}"#;
    publisher.raw(body, json_message(good)).await;
    // The same message again, as a relay republishes after a crash.
    publisher.raw(body, json_message(good)).await;
    let poison = Uuid::new_v4();
    publisher.raw(b"not json", json_message(poison)).await;

    let processed = [("outcome", "processed")];
    wait_for_metric(&addr, "consumer_messages_total", &processed, |n| n >= 1.0).await;
    let duplicates = [("outcome", "duplicate")];
    wait_for_metric(&addr, "consumer_messages_total", &duplicates, |n| n >= 1.0).await;
    let dead = take(&format!("{queue}.dlq"), 1).await;
    assert_eq!(dead.len(), 1, "the poison message is dead-lettered");
    assert_eq!(
        outbox_tests::broker::message_id(&dead[0]),
        poison,
        "the dead letter is the poison message"
    );
    let reason = header(&dead[0], "x-consumer-error").unwrap_or_default();
    // Invalid JSON for the jsonb column: its SQLSTATE, not the server's
    // message (which may quote the value).
    assert!(reason.contains("22P02"), "reason: {reason}");

    let rows = format!("SELECT count(*) FROM {table} WHERE message_id = '{good}'");
    wait_until("the message is in the table", || async {
        count(&db, &rows).await == 1
    })
    .await;
    assert_eq!(
        count(&db, &format!("SELECT count(*) FROM {table}")).await,
        1
    );
    let order: i64 = count(
        &db,
        &format!("SELECT (body->>'orderId')::int8 FROM {table}"),
    )
    .await;
    assert_eq!(order, 100001);
    let inbox = format!("SELECT count(*) FROM {table}_inbox WHERE message_id = '{good}'");
    assert_eq!(count(&db, &inbox).await, 1);

    let scrape = Scrape::of(&addr).await;
    assert_eq!(scrape.value("consumer_messages_total", &processed), 1.0);
    assert_eq!(scrape.value("consumer_consuming", &[]), 1.0);
    let (status, body) = http::request(&addr, "GET", "/readyz", None).await;
    assert_eq!(status, 200, "{body}");

    assert_eq!(
        example.terminate().await,
        Some(0),
        "SIGTERM stops it cleanly"
    );
}
