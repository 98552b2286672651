//! Secrets and payloads stay out of the logs: a relay logging at `trace`
//! (what a user debugging a problem turns on) shows neither the bodies of
//! the messages it publishes, nor the broker's returns of them, nor the
//! password of its database URL.

use std::time::Duration;

use lapin::ExchangeKind;
use outbox_tests::broker::Topology;
use outbox_tests::dispatch::wait_until;
use outbox_tests::observe::Logged;
use outbox_tests::relay::relay_run_command;
use outbox_tests::*;
use serde_json::json;
use uuid::Uuid;

/// In the payload only: any log line holding it leaked the payload.
const PAYLOAD_MARK: &str = "PAYLOAD-Zq9-4111";
/// In the database URL only (the test server trusts local connections, so
/// any password connects and the server never asks for it).
const PASSWORD: &str = "Pw-Zq9-s3cret";

/// Whether `line` shows `secret` as text, or as the byte list a `{:?}` of
/// a `Vec<u8>` (a message body, a frame) prints.
fn leaks(line: &str, secret: &str) -> bool {
    let bytes = format!("{:?}", secret.as_bytes());
    let bytes = bytes.trim_start_matches('[').trim_end_matches(']');
    line.contains(secret) || line.contains(bytes)
}

#[tokio::test]
async fn trace_logs_show_no_payload_and_no_password() {
    let db = TestDb::with_outbox().await;
    // A direct exchange whose one queue is bound to another key: a
    // mandatory publish to `nowhere` comes back as a return, body and all.
    let topology = Topology::new(ExchangeKind::Direct, "bound").await;
    let client = db.connect().await;
    let id: Uuid = client
        .query_one(
            "SELECT outbox.enqueue($1, 'nowhere', $2::jsonb)",
            &[&topology.exchange, &json!({ "card": PAYLOAD_MARK })],
        )
        .await
        .expect("enqueue")
        .get(0);
    let url = db
        .url
        .replacen("://postgres@", &format!("://postgres:{PASSWORD}@"), 1);
    assert!(url.contains(PASSWORD), "{url}");

    for (run, filter) in ["trace", "debug,lapin=trace,tokio_postgres=trace"]
        .into_iter()
        .enumerate()
    {
        if run > 0 {
            client
                .execute("SELECT outbox.retry_dead($1)", &[&id])
                .await
                .expect("requeue the dead message");
        }
        let command = relay_run_command(
            &db,
            &[
                ("OUTBOX_DATABASE_URL", &url),
                ("OUTBOX_MAX_ATTEMPTS", "1"),
                ("RUST_LOG", filter),
            ],
        );
        let relay = Logged::spawn(command);
        wait_until("the unroutable message is dead", || async {
            client
                .query_one(
                    "SELECT dead_at IS NOT NULL FROM outbox.messages WHERE message_id = $1",
                    &[&id],
                )
                .await
                .expect("row")
                .get::<_, bool>(0)
        })
        .await;
        // The return's warning comes before the row dies; a moment more
        // for anything logged after.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let lines = relay.lines();
        assert_eq!(relay.terminate().await, Some(0), "{filter}: clean stop");
        let all = lines.join("\n");
        assert!(all.contains("relay started"), "{filter}: logs are on");
        for line in &lines {
            for (what, secret) in [
                ("payload", PAYLOAD_MARK),
                ("database password", PASSWORD),
                // The broker login (SASL PLAIN: NUL user NUL password).
                ("broker password", "\0guest\0guest"),
            ] {
                assert!(!leaks(line, secret), "{filter}: {what} leaked: {line}");
            }
        }
    }
}
