//! The console's JSON API on a real PostgreSQL, no broker (dead letters are
//! seeded): who may change what (401 without the token, 403 with a wrong
//! one or on a read-only console), dry runs that change nothing, filters
//! from a query string and from a body (a misspelt field refused, never
//! widened to every row), discarding by ids, one dead letter with its
//! payload hidden or shown, blocked keys, the audit trail as written by the
//! API, the page and the command line, the page's own headers, and bad
//! settings refused in one line.

use outbox_tests::console::{RunningConsole, TOKEN, console_command};
use outbox_tests::http::request_with;
use outbox_tests::relay::relay_command;
use outbox_tests::{TestDb, unique_name};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::Client;
use uuid::Uuid;

use super::{count, dead_letters};

const REQUEUE: &str = "/api/v1/dead-letters/requeue";
const DISCARD: &str = "/api/v1/dead-letters/discard";
const DEAD: &str = "SELECT count(*) FROM outbox.messages WHERE dead_at IS NOT NULL";
const ROWS: &str = "SELECT count(*) FROM outbox.messages";
const LOGGED: &str = "SELECT count(*) FROM outbox.admin_log";

/// `id` and `message_id` of `exchange`'s rows, in id order.
async fn rows_of(client: &Client, exchange: &str) -> Vec<(i64, Uuid)> {
    client
        .query(
            "SELECT id, message_id FROM outbox.messages WHERE exchange = $1 ORDER BY id",
            &[&exchange],
        )
        .await
        .expect("read the seeded rows")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// One pending (not dead) row to `exchange`; its row id.
async fn pending(client: &Client, exchange: &str, ordering_key: Option<&str>) -> i64 {
    let message_id: Uuid = client
        .query_one(
            "SELECT outbox.enqueue($1, 'rk', '{}', '{}', $2)",
            &[&exchange, &ordering_key],
        )
        .await
        .expect("enqueue a pending row")
        .get(0);
    client
        .query_one(
            "SELECT id FROM outbox.messages WHERE message_id = $1",
            &[&message_id],
        )
        .await
        .expect("the pending row")
        .get(0)
}

/// The audit trail, oldest first, without its times and ids.
async fn audit_log(client: &Client) -> Vec<Value> {
    client
        .query(
            "SELECT jsonb_build_object('actor', actor, 'via', via, 'action', action, \
                    'dry_run', dry_run, 'filter', filter, 'matched', matched, 'changed', changed) \
             FROM outbox.admin_log ORDER BY id",
            &[],
        )
        .await
        .expect("read outbox.admin_log")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// A field of every dead letter on a page.
fn column(page: &Value, field: &str) -> Vec<Value> {
    page["dead_letters"]
        .as_array()
        .unwrap_or_else(|| panic!("no dead_letters in {page}"))
        .iter()
        .map(|letter| letter[field].clone())
        .collect()
}

/// `GET path` as it comes back: the head (lower-cased) and the body.
async fn raw_get(addr: &str, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the console");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .expect("read the response");
    let text = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text}"));
    (head.to_ascii_lowercase(), body.to_string())
}

// Who may change what.

#[tokio::test]
async fn a_change_without_a_token_is_401_and_changes_nothing() {
    let db = TestDb::with_outbox().await;
    dead_letters(&db.connect().await, &unique_name("x"), 3, "no route").await;
    let console = RunningConsole::start(&db.url, &[]).await;

    let (status, body) = console
        .post(REQUEUE, None, &json!({ "dry_run": false }))
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("Authorization")),
        "{body}"
    );
    assert_eq!(count(&db, DEAD).await, 3, "nothing requeued");
    assert_eq!(count(&db, LOGGED).await, 0, "a refusal is not logged");
}

#[tokio::test]
async fn a_change_with_a_wrong_token_is_403_and_changes_nothing() {
    let db = TestDb::with_outbox().await;
    dead_letters(&db.connect().await, &unique_name("x"), 3, "no route").await;
    let console = RunningConsole::start(&db.url, &[]).await;

    for path in [REQUEUE, DISCARD] {
        let (status, body) = console
            .post(
                path,
                Some("not-the-token-0123456789"),
                &json!({ "dry_run": false }),
            )
            .await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body["error"], "wrong token", "{path}");
    }
    assert_eq!(count(&db, DEAD).await, 3, "nothing requeued or discarded");
    assert_eq!(count(&db, LOGGED).await, 0, "a refusal is not logged");
    let (status, overview) = console.get("/api/v1/overview").await;
    assert_eq!((status, &overview["read_only"]), (200, &json!(false)));
}

#[tokio::test]
async fn a_console_without_a_token_reads_but_refuses_every_change() {
    let db = TestDb::with_outbox().await;
    dead_letters(&db.connect().await, &unique_name("x"), 3, "no route").await;
    let console = RunningConsole::start(&db.url, &[("OUTBOX_CONSOLE_TOKEN", "")]).await;

    for path in [REQUEUE, DISCARD, "/api/v1/replay"] {
        let (status, body) = console
            .post(path, Some(TOKEN), &json!({ "dry_run": true }))
            .await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("read-only")),
            "{path}: {body}"
        );
    }
    let (status, page) = console.get("/api/v1/dead-letters").await;
    assert_eq!((status, &page["total"]), (200, &json!(3)), "{page}");
    let (status, overview) = console.get("/api/v1/overview").await;
    assert_eq!(status, 200, "{overview}");
    assert_eq!(overview["read_only"], true, "{overview}");
    assert_eq!(overview["dead"], 3, "{overview}");
    assert_eq!(count(&db, DEAD).await, 3);
    assert_eq!(count(&db, LOGGED).await, 0, "not even a dry run is logged");
}

// Dry runs and the audit trail.

#[tokio::test]
async fn a_dry_run_counts_the_matching_rows_logs_it_and_changes_nothing() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let (a, b) = (unique_name("x"), unique_name("x"));
    dead_letters(&client, &a, 3, "no route").await;
    dead_letters(&client, &b, 2, "no route").await;
    let console = RunningConsole::start(&db.url, &[]).await;

    let filter = json!({ "exchange": a });
    let (status, outcome) = console
        .post(
            REQUEUE,
            Some(TOKEN),
            &json!({ "filter": filter, "dry_run": true }),
        )
        .await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["dry_run"], true, "{outcome}");
    assert_eq!(outcome["matched"], 3, "{outcome}");
    assert_eq!(outcome["changed"], Value::Null, "{outcome}");
    let sampled: Vec<Value> = rows_of(&client, &a)
        .await
        .iter()
        .map(|(id, _)| json!(id))
        .collect();
    let sample: Vec<Value> = outcome["sample"]
        .as_array()
        .expect("a sample")
        .iter()
        .map(|row| row["id"].clone())
        .collect();
    assert_eq!(sample, sampled, "the sample is the matching rows");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE dead_at IS NOT NULL AND attempts = 5"
        )
        .await,
        5,
        "every dead letter is as it was"
    );
    assert_eq!(
        audit_log(&client).await,
        [json!({
            "actor": "tester", "via": "api", "action": "requeue", "dry_run": true,
            "filter": filter, "matched": 3, "changed": null,
        })]
    );
}

#[tokio::test]
async fn a_requeue_by_filter_revives_only_the_matching_rows_and_logs_it() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let (a, b) = (unique_name("x"), unique_name("x"));
    dead_letters(&client, &a, 3, "Connection refused").await;
    dead_letters(&client, &a, 1, "NOT_FOUND - no exchange").await;
    dead_letters(&client, &b, 2, "Connection refused").await;
    let console = RunningConsole::start(&db.url, &[]).await;

    let filter = json!({ "exchange": a, "error": "refused" });
    let (status, outcome) = console
        .post(
            REQUEUE,
            Some(TOKEN),
            &json!({ "filter": filter, "dry_run": false }),
        )
        .await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(
        (&outcome["matched"], &outcome["changed"]),
        (&json!(3), &json!(3))
    );
    let revived = "SELECT count(*) FROM outbox.messages \
                   WHERE dead_at IS NULL AND attempts = 0 AND last_error = 'Connection refused'";
    assert_eq!(count(&db, revived).await, 3, "A's refused rows, fresh");
    assert_eq!(count(&db, DEAD).await, 3, "A's other row and B's stay dead");
    assert_eq!(
        audit_log(&client).await,
        [json!({
            "actor": "tester", "via": "api", "action": "requeue", "dry_run": false,
            "filter": filter, "matched": 3, "changed": 3,
        })]
    );
}

#[tokio::test]
async fn a_change_from_the_page_is_logged_as_via_console() {
    let db = TestDb::with_outbox().await;
    dead_letters(&db.connect().await, &unique_name("x"), 2, "no route").await;
    let console = RunningConsole::start(&db.url, &[]).await;

    let bearer = format!("Bearer {TOKEN}");
    let headers = [
        ("Authorization", bearer.as_str()),
        ("X-Outbox-Via", "console"),
    ];
    let body = json!({ "dry_run": true }).to_string();
    let (status, answer) =
        request_with(&console.addr, "POST", DISCARD, &headers, Some(&body)).await;
    assert_eq!(status, 200, "{answer}");
    let via: String = db
        .connect()
        .await
        .query_one("SELECT via FROM outbox.admin_log", &[])
        .await
        .expect("one audit row")
        .get(0);
    assert_eq!(via, "console");
}

#[tokio::test]
async fn each_holder_of_a_tokens_file_is_named_in_the_trail() {
    let db = TestDb::with_outbox().await;
    let file = std::env::temp_dir().join(unique_name("tokens"));
    std::fs::write(
        &file,
        "# one per person\nalice:alice-secret-0123456789\nbob:bob-secret-0123456789\n",
    )
    .expect("write the tokens file");
    let path = file.to_string_lossy().into_owned();
    let console = RunningConsole::start(&db.url, &[("OUTBOX_CONSOLE_TOKENS_FILE", &path)]).await;

    for token in ["alice-secret-0123456789", "bob-secret-0123456789", TOKEN] {
        let (status, body) = console
            .post(REQUEUE, Some(token), &json!({"dry_run": true}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, _) = console
        .post(
            REQUEUE,
            Some("carol-secret-0123456789"),
            &json!({"dry_run": true}),
        )
        .await;
    assert_eq!(status, 403);
    let client = db.connect().await;
    let actors: Vec<String> = audit_log(&client)
        .await
        .iter()
        .filter_map(|entry| entry["actor"].as_str().map(String::from))
        .collect();
    assert_eq!(
        actors,
        ["alice", "bob", "tester"],
        "in the order of the changes"
    );
    std::fs::remove_file(&file).ok();
}

#[tokio::test]
async fn the_audit_trail_lists_the_newest_change_first() {
    let db = TestDb::with_outbox().await;
    dead_letters(&db.connect().await, &unique_name("x"), 2, "no route").await;
    let console = RunningConsole::start(&db.url, &[]).await;
    for path in [REQUEUE, DISCARD] {
        let (status, body) = console
            .post(path, Some(TOKEN), &json!({ "dry_run": true }))
            .await;
        assert_eq!(status, 200, "{path}: {body}");
    }

    let (status, audit) = console.get("/api/v1/audit").await;
    assert_eq!(status, 200, "{audit}");
    let entries = audit["entries"].as_array().expect("entries");
    let actions: Vec<&Value> = entries.iter().map(|e| &e["action"]).collect();
    assert_eq!(actions, [&json!("discard"), &json!("requeue")], "{audit}");
    assert!(
        entries[0]["id"].as_i64() > entries[1]["id"].as_i64(),
        "{audit}"
    );
    let (status, latest) = console.get("/api/v1/audit?limit=1").await;
    assert_eq!(status, 200, "{latest}");
    assert_eq!(latest["entries"][0]["action"], "discard", "{latest}");
    assert_eq!(latest["entries"].as_array().map(Vec::len), Some(1));
}

// Filters.

#[tokio::test]
async fn dead_letters_are_filtered_by_exchange_and_by_error_text_in_any_case() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let (a, b) = (unique_name("x"), unique_name("x"));
    dead_letters(&client, &a, 3, "Connection refused").await;
    dead_letters(&client, &b, 2, "NOT_FOUND - no exchange").await;
    let console = RunningConsole::start(&db.url, &[]).await;

    let (status, page) = console
        .get(&format!("/api/v1/dead-letters?exchange={a}"))
        .await;
    assert_eq!((status, &page["total"]), (200, &json!(3)), "{page}");
    assert_eq!(column(&page, "exchange"), vec![json!(a); 3]);
    let (_, page) = console.get("/api/v1/dead-letters?error=not_found").await;
    assert_eq!(page["total"], 2, "{page}");
    assert_eq!(column(&page, "exchange"), vec![json!(b); 2]);
    let (_, page) = console
        .get(&format!(
            "/api/v1/dead-letters?exchange={a}&error=NOT_FOUND"
        ))
        .await;
    assert_eq!(page["total"], 0, "the conditions are ANDed: {page}");
}

#[tokio::test]
async fn dead_letters_are_filtered_by_row_ids_and_by_message_ids() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let exchange = unique_name("x");
    dead_letters(&client, &exchange, 4, "no route").await;
    let rows = rows_of(&client, &exchange).await;
    let console = RunningConsole::start(&db.url, &[]).await;

    let (status, page) = console
        .get(&format!(
            "/api/v1/dead-letters?ids={},{}",
            rows[0].0, rows[1].0
        ))
        .await;
    assert_eq!((status, &page["total"]), (200, &json!(2)), "{page}");
    assert_eq!(column(&page, "id"), [json!(rows[0].0), json!(rows[1].0)]);
    let (_, page) = console
        .get(&format!("/api/v1/dead-letters?ids={}", rows[2].1))
        .await;
    assert_eq!(column(&page, "id"), [json!(rows[2].0)], "{page}");
    let (_, page) = console
        .get(&format!(
            "/api/v1/dead-letters?ids={},{}",
            rows[0].0, rows[3].1
        ))
        .await;
    assert_eq!(
        column(&page, "id"),
        [json!(rows[0].0), json!(rows[3].0)],
        "{page}"
    );
    let (status, page) = console.get("/api/v1/dead-letters?ids=first").await;
    assert_eq!(status, 400, "{page}");
}

#[tokio::test]
async fn dead_letters_are_filtered_by_when_they_died() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let exchange = unique_name("x");
    dead_letters(&client, &exchange, 4, "no route").await;
    let rows = rows_of(&client, &exchange).await;
    let old = [rows[0].0, rows[1].0];
    client
        .execute(
            "UPDATE outbox.messages SET dead_at = now() - interval '2 hours' WHERE id = ANY($1)",
            &[&&old[..]],
        )
        .await
        .expect("age two dead letters");
    let console = RunningConsole::start(&db.url, &[]).await;
    let ids = |page: &Value| column(page, "id");

    let (status, page) = console.get("/api/v1/dead-letters?since=1h").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page), [json!(rows[2].0), json!(rows[3].0)], "{page}");
    let (_, page) = console.get("/api/v1/dead-letters?until=1h").await;
    assert_eq!(ids(&page), [json!(old[0]), json!(old[1])], "{page}");
    let (_, page) = console.get("/api/v1/dead-letters?until=0").await;
    assert_eq!(page["total"], 4, "until now: every one, {page}");
    let (status, page) = console.get("/api/v1/dead-letters?since=0&until=1h").await;
    assert_eq!(status, 400, "an empty window: {page}");
    let (status, page) = console.get("/api/v1/dead-letters?since=whenever").await;
    assert_eq!(status, 400, "not a time: {page}");
}

#[tokio::test]
async fn a_limit_caps_the_page_but_not_the_total() {
    let db = TestDb::with_outbox().await;
    dead_letters(&db.connect().await, &unique_name("x"), 5, "no route").await;
    let console = RunningConsole::start(&db.url, &[]).await;

    let (status, page) = console.get("/api/v1/dead-letters?limit=2").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 5, "{page}");
    assert_eq!(column(&page, "id").len(), 2, "{page}");
    let (status, page) = console.get("/api/v1/dead-letters?limit=0").await;
    assert_eq!(status, 400, "{page}");
}

#[tokio::test]
async fn an_unknown_query_parameter_is_400_naming_it() {
    let db = TestDb::with_outbox().await;
    let console = RunningConsole::start(&db.url, &[]).await;

    for path in [
        "/api/v1/dead-letters?exchnage=orders",
        "/api/v1/blocked-keys?exchnage=orders",
        "/api/v1/audit?exchnage=orders",
    ] {
        let (status, body) = console.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("exchnage")),
            "{path}: {body}"
        );
    }
}

/// The guard against a typo widening a bulk change to every row: a
/// misspelt field must not read as "no filter".
#[tokio::test]
async fn a_misspelt_filter_field_is_400_and_changes_nothing() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let (a, b) = (unique_name("x"), unique_name("x"));
    dead_letters(&client, &a, 2, "no route").await;
    dead_letters(&client, &b, 3, "no route").await;
    let console = RunningConsole::start(&db.url, &[]).await;

    for path in [REQUEUE, DISCARD] {
        let body = json!({ "filter": { "exchnage": a }, "dry_run": false });
        let (status, answer) = console.post(path, Some(TOKEN), &body).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("exchnage")),
            "{path}: {answer}"
        );
    }
    assert_eq!(count(&db, DEAD).await, 5, "nothing requeued");
    assert_eq!(count(&db, ROWS).await, 5, "nothing discarded");
    assert_eq!(count(&db, LOGGED).await, 0);
}

#[tokio::test]
async fn a_change_that_does_not_say_whether_it_is_a_dry_run_is_400() {
    let db = TestDb::with_outbox().await;
    let exchange = unique_name("x");
    dead_letters(&db.connect().await, &exchange, 2, "no route").await;
    let console = RunningConsole::start(&db.url, &[]).await;

    let body = json!({ "filter": { "exchange": exchange } });
    let (status, answer) = console.post(DISCARD, Some(TOKEN), &body).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("dry_run")),
        "{answer}"
    );
    assert_eq!(count(&db, ROWS).await, 2, "nothing discarded");
    assert_eq!(count(&db, LOGGED).await, 0);
}

#[tokio::test]
async fn a_change_without_a_filter_matches_every_dead_letter_and_no_other_row() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    dead_letters(&client, &unique_name("x"), 3, "no route").await;
    dead_letters(&client, &unique_name("x"), 2, "no route").await;
    pending(&client, &unique_name("x"), None).await;
    let console = RunningConsole::start(&db.url, &[]).await;

    let (status, outcome) = console
        .post(REQUEUE, Some(TOKEN), &json!({ "dry_run": true }))
        .await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["matched"], 5, "{outcome}");
    assert_eq!(
        audit_log(&client).await[0]["filter"],
        json!({}),
        "logged as no filter"
    );
}

// Discarding and showing one dead letter.

#[tokio::test]
async fn discarding_by_ids_deletes_only_those_and_names_the_ids_that_are_not_dead() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let exchange = unique_name("x");
    dead_letters(&client, &exchange, 3, "no route").await;
    let rows = rows_of(&client, &exchange).await;
    let alive = pending(&client, &unique_name("x"), None).await;
    let console = RunningConsole::start(&db.url, &[]).await;

    let ids = json!([rows[0].0, rows[2].1, alive]);
    let (status, outcome) = console
        .post(
            DISCARD,
            Some(TOKEN),
            &json!({ "filter": { "ids": ids }, "dry_run": false }),
        )
        .await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(
        (&outcome["matched"], &outcome["changed"]),
        (&json!(2), &json!(2))
    );
    assert_eq!(
        outcome["unmatched"],
        json!([alive.to_string()]),
        "{outcome}"
    );
    let left: Vec<i64> = client
        .query("SELECT id FROM outbox.messages ORDER BY id", &[])
        .await
        .expect("read what is left")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(left, [rows[1].0, alive]);
}

#[tokio::test]
async fn a_row_that_is_not_dead_is_not_shown_as_a_dead_letter() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let alive = pending(&client, &unique_name("x"), None).await;
    let console = RunningConsole::start(&db.url, &[]).await;

    let (status, body) = console.get(&format!("/api/v1/dead-letters/{alive}")).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = console
        .get(&format!("/api/v1/dead-letters/{}", Uuid::new_v4()))
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = console.get("/api/v1/dead-letters/first").await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn a_dead_letter_is_shown_without_its_payload_or_header_values_by_default() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let exchange = unique_name("x");
    dead_letters(&client, &exchange, 1, "no route").await;
    let (id, message_id) = rows_of(&client, &exchange).await[0];
    let console = RunningConsole::start(&db.url, &[]).await;

    for which in [id.to_string(), message_id.to_string()] {
        let (status, letter) = console.get(&format!("/api/v1/dead-letters/{which}")).await;
        assert_eq!(status, 200, "{letter}");
        assert_eq!(letter["id"], id, "{letter}");
        assert_eq!(letter["message_id"], message_id.to_string(), "{letter}");
        assert_eq!(letter["payload_shown"], false, "{letter}");
        assert_eq!(letter["payload_text"], Value::Null, "{letter}");
        assert_eq!(letter["headers"], json!({ "x-tenant": "…" }), "{letter}");
        assert!(letter["payload_bytes"].as_u64() > Some(0), "{letter}");
    }
}

#[tokio::test]
async fn a_console_allowed_to_show_payloads_shows_them() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let exchange = unique_name("x");
    dead_letters(&client, &exchange, 1, "no route").await;
    let (id, payload): (i64, String) = client
        .query_one(
            "SELECT id, convert_from(payload, 'UTF8') FROM outbox.messages WHERE exchange = $1",
            &[&exchange],
        )
        .await
        .map(|row| (row.get(0), row.get(1)))
        .expect("the seeded row");
    let console = RunningConsole::start(&db.url, &[("OUTBOX_CONSOLE_SHOW_PAYLOADS", "true")]).await;

    let (status, letter) = console.get(&format!("/api/v1/dead-letters/{id}")).await;
    assert_eq!(status, 200, "{letter}");
    assert_eq!(letter["payload_shown"], true, "{letter}");
    assert_eq!(letter["payload_text"], payload, "{letter}");
    assert_eq!(letter["headers"], json!({ "x-tenant": "acme" }), "{letter}");
}

// Blocked keys, the API's description and the page.

#[tokio::test]
async fn blocked_keys_name_a_dead_head_and_count_the_rows_waiting_behind_it() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let exchange = unique_name("x");
    // Rows 1 to 3, all dead; the third keyed `key-3`.
    dead_letters(&client, &exchange, 3, "no route").await;
    let head = rows_of(&client, &exchange).await[2].0;
    let other = unique_name("x");
    pending(&client, &other, Some("key-3")).await;
    pending(&client, &other, Some("key-3")).await;
    // A dead row behind a pending one of its key blocks nothing yet.
    pending(&client, &other, Some("free")).await;
    let behind = pending(&client, &other, Some("free")).await;
    client
        .execute(
            "UPDATE outbox.messages SET dead_at = now(), attempts = 5 WHERE id = $1",
            &[&behind],
        )
        .await
        .expect("kill the second row of `free`");
    let console = RunningConsole::start(&db.url, &[]).await;

    let (status, body) = console.get("/api/v1/blocked-keys").await;
    assert_eq!(status, 200, "{body}");
    let keys = body["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1, "{body}");
    assert_eq!(keys[0]["ordering_key"], "key-3", "{body}");
    assert_eq!(keys[0]["dead_id"], head, "{body}");
    assert_eq!(keys[0]["waiting"], 2, "{body}");
}

#[tokio::test]
async fn the_api_describes_itself_in_openapi_json() {
    let db = TestDb::with_outbox().await;
    let console = RunningConsole::start(&db.url, &[]).await;

    let (status, description) = console.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200, "{description}");
    assert!(description["openapi"].is_string(), "{description}");
    // Every route it describes answers as described.
    let paths = description["paths"].as_object().expect("paths");
    assert!(paths.len() >= 12, "{paths:?}");
    for (path, operations) in paths {
        let path = path.replace("{id}", "1");
        if operations.get("get").is_some() {
            let (status, body) = console.get(&path).await;
            let expected = if path.ends_with("/1") { 404 } else { 200 };
            assert_eq!(status, expected, "GET {path}: {body}");
        }
        if operations.get("post").is_some() {
            // A replay must say what: `since` or `ids`.
            let (status, body) = console
                .post(
                    &path,
                    Some(TOKEN),
                    &json!({"filter": {"since": "1h"}, "dry_run": true}),
                )
                .await;
            assert_eq!(status, 200, "POST {path}: {body}");
            assert_eq!(body["changed"], Value::Null, "POST {path}: {body}");
        }
    }
}

#[tokio::test]
async fn a_replay_without_since_or_ids_is_400() {
    let db = TestDb::with_outbox().await;
    let console = RunningConsole::start(&db.url, &[]).await;
    let (status, body) = console
        .post(
            "/api/v1/replay",
            Some(TOKEN),
            &json!({"filter": {"exchange": "x"}, "dry_run": true}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("`since` or `ids`")),
        "{body}"
    );
    assert_eq!(count(&db, LOGGED).await, 0);
}

#[tokio::test]
async fn an_empty_id_list_is_400_and_changes_nothing() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    dead_letters(&client, &unique_name("x"), 3, "boom").await;
    let console = RunningConsole::start(&db.url, &[]).await;

    // Emptied by mistake, it must not mean "every dead letter".
    for path in [REQUEUE, DISCARD] {
        let (status, body) = console
            .post(
                path,
                Some(TOKEN),
                &json!({"filter": {"ids": []}, "dry_run": false}),
            )
            .await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("ids is empty")),
            "{body}"
        );
    }
    let (status, body) = console.get("/api/v1/dead-letters?ids=,").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(count(&db, DEAD).await, 3);
    assert_eq!(count(&db, LOGGED).await, 0);
}

#[tokio::test]
async fn a_bad_query_string_is_a_json_400_on_every_endpoint() {
    let db = TestDb::with_outbox().await;
    let console = RunningConsole::start(&db.url, &[]).await;

    for path in [
        "/api/v1/dead-letters?exchnage=",
        "/api/v1/lag?minuts=5",
        "/api/v1/lag?minutes=abc",
        "/api/v1/lag?minutes=1441",
        "/api/v1/reconcile?exchnage=x",
        "/api/v1/scheduled?limit=-1",
    ] {
        let (status, body) = console.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }
}

#[tokio::test]
async fn the_page_is_html_under_a_content_security_policy() {
    let db = TestDb::with_outbox().await;
    let console = RunningConsole::start(&db.url, &[]).await;

    let (head, body) = raw_get(&console.addr, "/").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'self'"),
        "{head}"
    );
    assert!(body.contains("<html"), "{body}");
    let (status, body) = console.get("/no-such-page").await;
    assert_eq!(status, 404, "{body}");
}

// The command line and the console's settings.

#[tokio::test]
async fn the_command_line_writes_the_audit_trail_too() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    dead_letters(&client, &unique_name("x"), 3, "no route").await;

    let out = relay_command(&db.url, &["dead", "requeue", "--all"]).await;
    assert!(out.expect_code(0).contains("3 dead letter(s)"), "{out:#?}");
    assert_eq!(count(&db, DEAD).await, 0);
    let log = audit_log(&client).await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["via"], "cli", "{log:?}");
    assert_eq!(log[0]["action"], "requeue", "{log:?}");
    assert_eq!(
        (&log[0]["dry_run"], &log[0]["changed"]),
        (&json!(false), &json!(3))
    );
    assert!(
        log[0]["actor"].as_str().is_some_and(|a| !a.is_empty()),
        "{log:?}"
    );
}

#[tokio::test]
async fn a_command_line_dry_run_says_what_it_would_requeue_and_changes_nothing() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let (a, b) = (unique_name("x"), unique_name("x"));
    dead_letters(&client, &a, 2, "no route").await;
    dead_letters(&client, &b, 1, "no route").await;

    let out = relay_command(&db.url, &["dead", "requeue", "--exchange", &a, "--dry-run"]).await;
    assert!(out.expect_code(0).contains("would requeue 2"), "{out:#?}");
    assert_eq!(count(&db, DEAD).await, 3, "nothing requeued");
    let log = audit_log(&client).await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["via"], "cli", "{log:?}");
    assert_eq!(log[0]["dry_run"], true, "{log:?}");
    assert_eq!(log[0]["filter"], json!({ "exchange": a }), "{log:?}");
}

/// Checked before anything connects: the database here refuses
/// connections, so a console that got past its settings would fail on
/// that instead.
#[tokio::test]
async fn bad_console_settings_fail_in_one_line_with_exit_code_1() {
    let nowhere = "postgres://postgres@127.0.0.1:1/nowhere";
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("OUTBOX_CONSOLE_TOKEN", "too-short")],
            "at least 16 characters",
        ),
        (
            &[("OUTBOX_CONSOLE_TOKENS_FILE", "/nonexistent/tokens")],
            "cannot read OUTBOX_CONSOLE_TOKENS_FILE /nonexistent/tokens",
        ),
        // Misspelt, it would leave the console read-only without a word.
        (
            &[("OUTBOX_CONSOLE_TOKN", TOKEN)],
            "unknown setting OUTBOX_CONSOLE_TOKN",
        ),
        (
            &[
                ("OUTBOX_CONSOLE_TOKEN", TOKEN),
                ("OUTBOX_CONSOLE_TOKEN_NAME", " "),
            ],
            "OUTBOX_CONSOLE_TOKEN_NAME must not be empty",
        ),
    ];
    for (env, why) in cases {
        let output = console_command(nowhere, env).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{env:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{env:?}: {stderr}");
        assert!(lines[0].starts_with("outbox-relay: error:"), "{stderr}");
        assert!(lines[0].contains(why), "{env:?}: {stderr}");
    }
}
