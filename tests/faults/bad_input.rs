//! Bad input wherever a user or a peer can put it. Configuration and URLs:
//! a clear error and exit code 1, never a panic or a hang. Messages: a
//! clear error at enqueue, or a dead letter with a reason (in the outbox,
//! or in the consumer's dead-letter queue); never a crash, and the rows
//! behind keep flowing.

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use outbox_tests::books::{Expected, Load, settle_and_check, write_order};
use outbox_tests::dispatch::{Publisher, header, take};
use outbox_tests::pipeline::Pipeline;
use outbox_tests::{unique_name, workspace_binary};
use serde_json::json;
use uuid::Uuid;

/// Environment variables (values as raw bytes) and what is wrong with them.
type Case<'a> = (&'a [(&'a str, &'a [u8])], &'a str);

/// Runs `binary args` with `env`; it must fail with exit code 1 (not a
/// panic's 101, not clap's usage error for a value we meant to validate
/// ourselves) and say why in its first stderr line.
fn must_refuse(binary: &str, args: &[&str], env: &[(&str, &[u8])], why: &str) {
    use std::os::unix::ffi::OsStrExt;
    let mut command = Command::new(workspace_binary(binary));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, std::ffi::OsStr::from_bytes(value));
    }
    let mut child = command.spawn().expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{binary} {args:?} {why}: still running after 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{binary} {why}: {stderr}");
    assert!(
        matches!(status.code(), Some(1 | 2)),
        "{binary} {why}: exit {status}: {stderr}"
    );
    let first = stderr.lines().next().unwrap_or("");
    assert!(first.contains("error"), "{binary} {why}: {stderr}");
    assert!(
        !stderr.contains("s3cret"),
        "{binary} {why} leaks a password: {stderr}"
    );
}

#[test]
fn faults_bad_configuration_is_refused_in_one_line() {
    let db = "postgres://postgres@127.0.0.1:5432/postgres".as_bytes();
    let relay: &[Case] = &[
        (
            &[("OUTBOX_DATABASE_URL", b"not a url")],
            "garbage database URL",
        ),
        (
            &[("OUTBOX_DATABASE_URL", b"postgres://u:s3cret@host:99999/db")],
            "bad port",
        ),
        (
            &[("OUTBOX_DATABASE_URL", b"\xff\xfe")],
            "database URL not UTF-8",
        ),
        (
            &[
                ("OUTBOX_DATABASE_URL", db),
                ("OUTBOX_AMQP_URL", b"amqp://u:s3cret@h:nope/"),
            ],
            "garbage AMQP URL",
        ),
        (
            &[
                ("OUTBOX_DATABASE_URL", db),
                ("OUTBOX_AMQP_URL", b"http://example/"),
            ],
            "AMQP URL of another scheme",
        ),
        (
            &[("OUTBOX_DATABASE_URL", db), ("OUTBOX_BATCH_SIZE", b"0")],
            "zero batch",
        ),
        (
            &[("OUTBOX_DATABASE_URL", db), ("OUTBOX_BATCH_SIZE", b"-3")],
            "negative batch",
        ),
        (
            &[
                ("OUTBOX_DATABASE_URL", db),
                ("OUTBOX_MAX_IN_FLIGHT", b"99999999999"),
            ],
            "overflowing number",
        ),
        (
            &[
                ("OUTBOX_DATABASE_URL", db),
                ("OUTBOX_RETENTION", b"forever"),
            ],
            "bad duration",
        ),
        (
            &[("OUTBOX_DATABASE_URL", db), ("OUTBOX_MODE", b"push")],
            "unknown mode",
        ),
        (
            &[
                ("OUTBOX_DATABASE_URL", db),
                ("OUTBOX_METRICS_ADDR", b"nowhere"),
            ],
            "bad metrics address",
        ),
        (
            &[
                ("OUTBOX_DATABASE_URL", db),
                ("OUTBOX_ALERT_WEBHOOK_URL", b"::"),
            ],
            "bad webhook URL",
        ),
        (
            &[("OUTBOX_DATABASE_URL", db), ("OUTBOX_BATCH_SIZ", b"5")],
            "misspelt variable",
        ),
        (
            &[
                ("OUTBOX_DATABASE_URL", db),
                ("OUTBOX_DATABASE_CA_FILE", b"/nonexistent.pem"),
            ],
            "missing CA file",
        ),
    ];
    for (env, why) in relay {
        must_refuse("outbox-relay", &["run"], env, why);
    }

    let dir = std::env::temp_dir().join(unique_name("bad_config"));
    std::fs::create_dir_all(&dir).expect("dir");
    let files: &[(&[u8], &str)] = &[
        (b"\xff\xfe\x00binary", "config file not UTF-8"),
        (b"batch_size = [", "config file not TOML"),
        (b"no_such_key = 1\n", "unknown config key"),
        (b"batch_size = \"many\"\n", "config value of the wrong type"),
    ];
    for (i, (content, why)) in files.iter().enumerate() {
        let path = dir.join(format!("relay{i}.toml"));
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(content))
            .expect("write config");
        let path = path.to_string_lossy().into_owned();
        must_refuse(
            "outbox-relay",
            &["run", "--config", &path],
            &[("OUTBOX_DATABASE_URL", db)],
            why,
        );
    }
    let missing = dir.join("missing.toml").to_string_lossy().into_owned();
    must_refuse(
        "outbox-relay",
        &["run", "--config", &missing],
        &[("OUTBOX_DATABASE_URL", db)],
        "missing config file",
    );
    let _ = std::fs::remove_dir_all(&dir);

    let long_queue = "q".repeat(300);
    let dispatch: &[Case] = &[
        (
            &[("DISPATCH_DATABASE_URL", b"not a url")],
            "garbage database URL",
        ),
        (
            &[("DISPATCH_DATABASE_URL", b"\xff")],
            "database URL not UTF-8",
        ),
        (
            &[
                ("DISPATCH_DATABASE_URL", db),
                ("DISPATCH_AMQP_URL", b"amqp://u:s3cret@h:nope/"),
            ],
            "garbage AMQP URL",
        ),
        (
            &[("DISPATCH_DATABASE_URL", db), ("DISPATCH_PREFETCH", b"0")],
            "zero prefetch",
        ),
        (
            &[
                ("DISPATCH_DATABASE_URL", db),
                ("DISPATCH_RETRY_MAX_MS", b"18446744073709551615"),
            ],
            "retry delay beyond any queue TTL",
        ),
        (
            &[
                ("DISPATCH_DATABASE_URL", db),
                ("DISPATCH_PREFETCH", b"70000"),
            ],
            "prefetch over u16",
        ),
        (
            &[
                ("DISPATCH_DATABASE_URL", db),
                ("DISPATCH_HTTP_ADDR", b"nowhere"),
            ],
            "bad HTTP address",
        ),
        (
            &[
                ("DISPATCH_DATABASE_URL", db),
                ("DISPATCH_QUEUE_TYPE", b"stream"),
            ],
            "unknown queue type",
        ),
        (
            &[("DISPATCH_DATABASE_URL", db), ("DISPATCH_QUEUE", b"")],
            "empty queue name",
        ),
        (
            &[
                ("DISPATCH_DATABASE_URL", db),
                ("DISPATCH_QUEUE", long_queue.as_bytes()),
            ],
            "queue name over 255 bytes",
        ),
        (
            &[("DISPATCH_DATABASE_URL", db), ("DISPATCH_RIDERS", b" , ")],
            "no riders",
        ),
        (
            &[("DISPATCH_DATABASE_URL", db), ("DISPATCH_PREFTECH", b"5")],
            "misspelt variable",
        ),
    ];
    for (env, why) in dispatch {
        must_refuse("dispatch", &[], env, why);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_bad_messages_get_an_error_or_a_dead_letter_and_block_nothing() {
    let mut pipeline = Pipeline::start(1, &[], &[]).await;
    let exchange = pipeline.names.exchange.clone();
    let mut app = pipeline.app.connect().await;

    // Refused at enqueue, in one clear line.
    let refused = [
        (
            "SELECT outbox.enqueue('ex', repeat('k', 256), '{}')",
            "routing_key",
        ),
        (
            "SELECT outbox.enqueue(repeat('e', 256), '', '{}')",
            "exchange",
        ),
        (
            "SELECT outbox.enqueue('ex', '', '{}', headers => '[1, 2]')",
            "headers",
        ),
        (
            "SELECT outbox.enqueue('ex', '', '{}', headers => '\"text\"')",
            "headers",
        ),
        (
            "SELECT outbox.enqueue('ex', convert_from('\\xff'::bytea, 'UTF8'), '{}')",
            // The server's text quotes the bad byte: the SQLSTATE says it.
            "22021 character_not_in_repertoire",
        ),
        (
            "SELECT outbox.enqueue_bytes('ex', '', '\\x00'::bytea, repeat('c', 300))",
            "content_type",
        ),
        (
            "SELECT outbox.enqueue('ex', '', 'not json')",
            "22P02 invalid_text_representation",
        ),
    ];
    for (sql, mentions) in refused {
        let error = app.batch_execute(sql).await.expect_err(sql);
        let line = outbox::error_line(&error);
        assert!(line.contains(mentions), "{sql}: {line}");
        assert!(!line.contains('\n'), "{sql}: {line}");
    }
    assert!(outbox::Message::bytes("ex", "k".repeat(256), vec![], "application/json").is_err());

    // Accepted at enqueue, but the relay cannot publish them: dead, with a reason.
    let mut dead = HashSet::new();
    let mut expect_dead = Vec::new();
    let bad_rows: Vec<(serde_json::Value, Vec<u8>, &str)> = vec![
        (json!({"n".repeat(300): 1}), b"{}".to_vec(), "header name"),
        (
            json!({"nested": {"x".repeat(256): true}}),
            b"{}".to_vec(),
            "header name",
        ),
        (
            json!({"blob": "x".repeat(200_000)}),
            b"{}".to_vec(),
            "headers take",
        ),
        (
            json!({}),
            vec![b' '; 17 * 1024 * 1024],
            "OUTBOX_MAX_PAYLOAD_BYTES",
        ),
    ];
    let mut good = Load::default();
    for (headers, payload, reason) in &bad_rows {
        let id: Uuid = app
            .query_one(
                "SELECT outbox.enqueue_bytes($1, '', $2, 'application/json', headers => $3)",
                &[&exchange, payload, headers],
            )
            .await
            .expect("enqueue")
            .get(0);
        dead.insert(id);
        expect_dead.push((id, *reason));
        add_good(&mut app, &exchange, &mut good).await;
    }

    // Published, then dead-lettered by the consumer with a reason.
    let mut poison = HashSet::new();
    let order = |id: i64, context: String| {
        json!({"orderId": id, "userName": "zhang", "context": context, "num": 1}).to_string()
    };
    let published_poison: Vec<(Vec<u8>, &str)> = vec![
        (Vec::new(), "application/json"),
        (vec![0xc3, 0x28, 0xff], "application/json"),
        (b"[1, 2, 3]".to_vec(), "application/json"),
        (order(800_001, "x".into()).into_bytes(), "text/plain"),
        (
            order(800_002, "x".into()).into_bytes(),
            "application/xml; charset=utf-8",
        ),
        (vec![b'{'; 3 * 1024 * 1024], "application/json"),
        (order(-5, "x".into()).into_bytes(), "application/json"),
    ];
    for (payload, content_type) in &published_poison {
        let message =
            outbox::Message::bytes(&exchange, "", payload.clone(), *content_type).expect("message");
        poison.insert(outbox::enqueue(&app, &message).await.expect("enqueue"));
        add_good(&mut app, &exchange, &mut good).await;
    }
    // Several MiB that are a real order: delivered like any other.
    let next_order = next_id(&good);
    let big = outbox::Message::bytes(
        &exchange,
        "",
        order(next_order, "y".repeat(5 * 1024 * 1024)).into_bytes(),
        "application/json",
    )
    .expect("message");
    good.orders.insert(
        next_order,
        outbox::enqueue(&app, &big).await.expect("enqueue"),
    );
    app.execute(
        "INSERT INTO orders (id, user_name, context, num) VALUES ($1, 'zhang', 'big', 1)",
        &[&next_order],
    )
    .await
    .expect("big order row");

    // Peers publishing straight to the consumer's exchange.
    let publisher = Publisher::new(&exchange).await;
    let mut no_id = 0;
    let peer: Vec<(Vec<u8>, BasicProperties)> = vec![
        (
            order(800_003, "x".into()).into_bytes(),
            BasicProperties::default().with_content_type("application/json".into()),
        ),
        (
            order(800_004, "x".into()).into_bytes(),
            BasicProperties::default().with_message_id("42".into()),
        ),
        (
            order(800_005, "x".into()).into_bytes(),
            BasicProperties::default().with_message_id("".into()),
        ),
        (
            vec![0xff; 10],
            BasicProperties::default().with_message_id(Uuid::new_v4().to_string().into()),
        ),
        (
            order(800_006, "x".into()).into_bytes(),
            BasicProperties::default()
                .with_message_id(Uuid::new_v4().to_string().into())
                .with_content_type("image/png".into()),
        ),
        (order(800_007, "x".into()).into_bytes(), {
            let mut odd = FieldTable::default();
            odd.insert("x-weird".into(), AMQPValue::ByteArray(vec![0, 255].into()));
            BasicProperties::default()
                .with_message_id("not-a-uuid-\u{1F4A5}".into())
                .with_headers(odd)
        }),
    ];
    for (body, properties) in peer {
        match properties
            .message_id()
            .as_ref()
            .and_then(|m| Uuid::parse_str(m.as_str()).ok())
        {
            Some(id) => {
                poison.insert(id);
            }
            None => no_id += 1,
        }
        publisher.raw(&body, properties).await;
        add_good(&mut app, &exchange, &mut good).await;
    }
    good.finished_at = Some(std::time::Instant::now());

    settle_and_check(
        &mut pipeline,
        &good,
        &Expected {
            dead: dead.clone(),
            not_orders: published_poison.len() + 6,
        },
        "bad input",
        &format!(
            "{} refused at enqueue, {} dead in the outbox, {} dead-lettered by the consumer",
            refused.len(),
            bad_rows.len(),
            published_poison.len() + 6
        ),
    )
    .await;
    for (id, reason) in expect_dead {
        let error: String = app
            .query_one(
                "SELECT last_error FROM outbox.messages WHERE message_id = $1",
                &[&id],
            )
            .await
            .expect("dead row")
            .get(0);
        assert!(error.contains(reason), "{reason}: {error}");
    }
    let dead_lettered = take(&pipeline.names.dead_letter_queue, poison.len() + no_id).await;
    assert_eq!(dead_lettered.len(), poison.len() + no_id);
    let mut with_id = HashSet::new();
    for delivery in &dead_lettered {
        let reason = header(delivery, "x-consumer-error").expect("a reason");
        assert!(!reason.is_empty());
        if let Some(id) = delivery.properties.message_id().as_ref()
            && let Ok(id) = Uuid::parse_str(id.as_str())
        {
            with_id.insert(id);
        }
    }
    assert_eq!(with_id, poison);
}

fn next_id(load: &Load) -> i64 {
    load.orders.keys().max().copied().unwrap_or(0) + 1
}

/// A good order behind each bad message: it must get through.
async fn add_good(app: &mut tokio_postgres::Client, exchange: &str, good: &mut Load) {
    let order = next_id(good);
    good.orders
        .insert(order, write_order(app, exchange, order).await);
}
