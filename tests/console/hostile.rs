//! What a hostile review of the console and the operator commands found,
//! each a test that failed before its fix: a change cut off part way
//! leaves an audit row saying how far it got, times no timestamp can hold,
//! filters that would widen a change to every row, a `Host` that is not
//! this machine, a token read from a file, and row text that would drive
//! the operator's terminal.

use std::time::Duration;

use outbox_tests::console::{RunningConsole, TOKEN};
use outbox_tests::dispatch::wait_until;
use outbox_tests::http::request_with;
use outbox_tests::relay::relay_command;
use outbox_tests::{TestDb, unique_name, workspace_binary};
use serde_json::json;

use super::{count, dead_letters};

const REQUEUE: &str = "/api/v1/dead-letters/requeue";
const DEAD: &str = "SELECT count(*) FROM outbox.dead_letters";
const LOGGED: &str = "SELECT count(*) FROM outbox.admin_log";

#[tokio::test]
async fn a_change_whose_connection_is_killed_part_way_is_logged_with_how_far_it_got() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    dead_letters(&client, &unique_name("x"), 6_000, "boom").await;
    let console = RunningConsole::start(
        &db.url,
        &[
            ("OUTBOX_CONSOLE_BULK_BATCH", "500"),
            ("OUTBOX_CONSOLE_BULK_RATE", "1000"),
        ],
    )
    .await;

    let change = {
        let console_addr = console.addr.clone();
        tokio::spawn(async move {
            let body = json!({"dry_run": false}).to_string();
            let bearer = format!("Bearer {TOKEN}");
            request_with(
                &console_addr,
                "POST",
                REQUEUE,
                &[("Authorization", &bearer)],
                Some(&body),
            )
            .await
        })
    };
    wait_until("the requeue under way", || async {
        count(&db, DEAD).await < 6_000
    })
    .await;
    // The change's own connection: it is the one running retry_dead.
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
               AND query LIKE '%retry_dead%'",
            &[],
        )
        .await
        .expect("terminate");
    let (status, body) = change.await.expect("the request");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("requeue stopped after"), "{body}");

    let changed = 6_000 - count(&db, DEAD).await;
    assert!(changed > 0 && changed < 6_000, "{changed}");
    let logged = count(
        &db,
        &format!(
            "SELECT count(*) FROM outbox.admin_log \
             WHERE action = 'requeue' AND changed = {changed} AND error LIKE 'requeue stopped after%'"
        ),
    )
    .await;
    assert_eq!(logged, 1, "one audit row with the rows changed so far");
}

#[tokio::test]
async fn a_command_line_change_stopped_by_ctrl_c_is_logged_and_fails() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    dead_letters(&client, &unique_name("x"), 4_000, "boom").await;
    let child = tokio::process::Command::new(workspace_binary("outbox-relay"))
        .args([
            "dead", "requeue", "--all", "--batch", "200", "--rate", "500",
        ])
        .env("OUTBOX_DATABASE_URL", &db.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_until("the requeue under way", || async {
        count(&db, DEAD).await < 4_000
    })
    .await;
    let pid = child.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill -INT");
    assert!(killed.success());
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("it stops between two batches")
        .expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let changed = 4_000 - count(&db, DEAD).await;
    assert!(changed > 0 && changed < 4_000, "{changed}");
    let logged = count(
        &db,
        &format!(
            "SELECT count(*) FROM outbox.admin_log \
             WHERE via = 'cli' AND changed = {changed} AND error LIKE '%interrupted'"
        ),
    )
    .await;
    assert_eq!(logged, 1);
}

#[tokio::test]
async fn times_no_timestamp_can_hold_are_400_and_such_rows_still_list() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let exchange = unique_name("x");
    dead_letters(&client, &exchange, 2, "boom").await;
    // A writer may set created_at to anything.
    client
        .batch_execute(
            "UPDATE outbox.messages SET created_at = '1969-12-31 23:00+00' WHERE id = (SELECT min(id) FROM outbox.messages); \
             UPDATE outbox.messages SET created_at = 'infinity' WHERE id = (SELECT max(id) FROM outbox.messages)",
        )
        .await
        .expect("odd times");
    let console = RunningConsole::start(&db.url, &[]).await;

    for query in [
        "since=-infinity",
        "since=infinity&until=1h",
        "since=1960-01-01&until=1950-01-01",
    ] {
        let (status, body) = console.get(&format!("/api/v1/dead-letters?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
    }
    let (status, page) = console.get("/api/v1/dead-letters").await;
    assert_eq!(status, 200, "{page}");
    let created: Vec<&str> = page["dead_letters"]
        .as_array()
        .expect("letters")
        .iter()
        .filter_map(|l| l["created_at"].as_str())
        .collect();
    assert!(created.contains(&"1969-12-31T23:00:00Z"), "{created:?}");
    assert!(created.contains(&"infinity"), "{created:?}");
    let out = relay_command(&db.url, &["dead", "list"]).await;
    out.expect_code(0);
    let out = relay_command(
        &db.url,
        &["dead", "requeue", "--since", "infinity", "--until", "1h"],
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(count(&db, DEAD).await, 2);
}

#[tokio::test]
async fn filters_that_would_reach_every_row_by_accident_are_refused() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    dead_letters(&client, &unique_name("x"), 3, "boom").await;
    let console = RunningConsole::start(&db.url, &[]).await;

    for body in [
        json!({"filter": [], "dry_run": false}),
        json!({"filter": null, "dry_run": false}),
        json!({"filter": {"exchange": null}, "dry_run": false}),
        json!({"filter": {"exchange": "x\u{0}"}, "dry_run": false}),
    ] {
        let (status, answer) = console.post(REQUEUE, Some(TOKEN), &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    // An empty variable on the command line is not --all.
    let out = relay_command(&db.url, &["dead", "discard", "--error", ""]).await;
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("--error needs a text"), "{out:#?}");
    assert_eq!(count(&db, DEAD).await, 3);
    assert_eq!(count(&db, LOGGED).await, 0);
}

#[tokio::test]
async fn a_console_on_loopback_answers_only_requests_naming_this_machine() {
    let db = TestDb::with_outbox().await;
    // As a secrets file gives it: with a newline.
    let console = RunningConsole::start(
        &db.url,
        &[("OUTBOX_CONSOLE_TOKEN", "test-token-0123456789\n")],
    )
    .await;

    let (status, body) = console
        .post(REQUEUE, Some(TOKEN), &json!({"dry_run": true}))
        .await;
    assert_eq!(status, 200, "the token's newline is not part of it: {body}");
    // DNS rebinding: a page elsewhere whose name now points at 127.0.0.1.
    let mut stream = tokio::net::TcpStream::connect(&console.addr)
        .await
        .expect("connect");
    let request =
        "GET /api/v1/overview HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .expect("send");
    let mut response = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response)
        .await
        .expect("read");
    assert!(response.starts_with("HTTP/1.1 421"), "{response}");
    assert!(
        response.contains("127.0.0.1 or localhost only"),
        "{response}"
    );
    // Errors below the routes are JSON too.
    let (status, body) = request_with(&console.addr, "DELETE", "/api/v1/overview", &[], None).await;
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("\"error\""), "{body}");
}

#[tokio::test]
async fn row_text_cannot_drive_the_operators_terminal() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    dead_letters(
        &client,
        &unique_name("x"),
        1,
        "clear\u{1b}[2Jscreen \u{202e}evil",
    )
    .await;
    let id: i64 = client
        .query_one("SELECT id FROM outbox.dead_letters", &[])
        .await
        .expect("id")
        .get(0);

    let id = id.to_string();
    for args in [vec!["dead", "list"], vec!["dead", "show", &id]] {
        let out = relay_command(&db.url, &args).await;
        let text = out.expect_code(0);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{202e}'),
            "{text}"
        );
        assert!(
            text.contains("clear\\u{001b}[2Jscreen \\u{202e}evil"),
            "{text}"
        );
    }
}
