//! `outbox-relay run` against the real PostgreSQL and RabbitMQ: delivery,
//! retries and escalation, outages, takeover, several relays, shutdown and
//! bad configuration.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use lapin::ExchangeKind;
use lapin::options::BasicPublishOptions;
use lapin::types::AMQPValue;
use outbox_relay::Settings;
use outbox_tests::broker::{Topology, message_id};
use outbox_tests::receivers::{http_receiver, smtp_receiver};
use outbox_tests::relay::{RunningRelay, spawn_relay_process, test_settings};
use outbox_tests::*;
use serde_json::json;
use tokio_postgres::Client;
use uuid::Uuid;

const ARRIVAL: Duration = Duration::from_secs(60);

/// Enqueues `count` JSON messages `{"seq": n}`, `per_tx` per transaction.
async fn enqueue(
    client: &mut Client,
    exchange: &str,
    routing_key: &str,
    count: usize,
    per_tx: usize,
) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(per_tx) {
        let tx = client.transaction().await.expect("begin");
        for seq in chunk {
            let id: Uuid = tx
                .query_one(
                    "SELECT outbox.enqueue($1, $2, $3::jsonb, $4::jsonb)",
                    &[
                        &exchange,
                        &routing_key,
                        &json!({"seq": seq}),
                        &json!({"seq": seq}),
                    ],
                )
                .await
                .expect("enqueue")
                .get(0);
            ids.push(id);
        }
        tx.commit().await.expect("commit");
    }
    ids
}

async fn pending(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NULL",
            &[],
        )
        .await
        .expect("count pending")
        .get(0)
}

/// Waits until no row is pending, or fails after `limit`.
async fn wait_all_published(client: &Client, limit: Duration) {
    let deadline = Instant::now() + limit;
    while pending(client).await > 0 {
        assert!(
            Instant::now() < deadline,
            "rows still pending after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fails with counts (not thousands of ids) when `received` is not `expected`.
fn assert_same_ids(received: &HashSet<Uuid>, expected: &HashSet<Uuid>) {
    let lost = expected.difference(received).count();
    let foreign = received.difference(expected).count();
    assert!(
        lost == 0 && foreign == 0,
        "{lost} of {} lost, {foreign} unexpected",
        expected.len()
    );
}

fn ids_of(deliveries: &[lapin::message::Delivery]) -> Vec<Uuid> {
    deliveries.iter().map(message_id).collect()
}

#[tokio::test]
async fn rows_from_many_transactions_arrive_once_with_their_properties() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(test_settings(&db)).await;

    let mut writers = Vec::new();
    for _ in 0..8 {
        let mut client = db.connect().await;
        let exchange = topology.exchange.clone();
        writers.push(tokio::spawn(async move {
            enqueue(&mut client, &exchange, "", 100, 5).await
        }));
    }
    let mut expected = HashSet::new();
    for writer in writers {
        expected.extend(writer.await.expect("writer"));
    }

    let mut deliveries = topology.receive(expected.len(), ARRIVAL).await;
    deliveries.extend(
        topology
            .receive(usize::MAX, Duration::from_millis(500))
            .await,
    );
    let received = ids_of(&deliveries);
    assert_eq!(received.len(), expected.len(), "each row exactly once");
    assert_same_ids(&received.iter().copied().collect(), &expected);

    let sample = &deliveries[0];
    assert_eq!(
        sample
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(*sample.properties.delivery_mode(), Some(2), "persistent");
    assert!(sample.properties.timestamp().is_some(), "timestamp set");
    let headers = sample.properties.headers().as_ref().expect("headers");
    assert!(matches!(
        headers.inner().get("seq"),
        Some(AMQPValue::LongLongInt(_))
    ));
    let body: serde_json::Value = serde_json::from_slice(&sample.data).expect("JSON body");
    assert!(body.get("seq").is_some());

    wait_all_published(&db.connect().await, Duration::from_secs(10)).await;
    relay.stop().await;
}

#[tokio::test]
async fn rows_committed_while_no_relay_runs_are_published_when_one_starts() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    let expected = enqueue(&mut client, &topology.exchange, "", 300, 50).await;

    let relay = RunningRelay::start(test_settings(&db)).await;
    let received = ids_of(&topology.receive(expected.len(), ARRIVAL).await);
    assert_same_ids(
        &received.into_iter().collect(),
        &expected.into_iter().collect(),
    );
    relay.stop().await;
}

#[tokio::test]
async fn unroutable_messages_retry_with_backoff_then_die_and_alert() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::new(ExchangeKind::Direct, "bound").await;
    let (webhook_url, mut webhooks) = http_receiver().await;
    let (smtp_url, mut emails) = smtp_receiver().await;
    let mut client = db.connect().await;
    let doomed = enqueue(&mut client, &topology.exchange, "nowhere", 1, 1).await[0];
    let good = enqueue(&mut client, &topology.exchange, "bound", 1, 1).await[0];

    let settings = Settings {
        max_attempts: Some(3),
        alert_webhook_url: Some(webhook_url),
        alert_smtp_url: Some(smtp_url),
        alert_email_to: Some("ops@example.com".into()),
        ..test_settings(&db)
    };
    let started = Instant::now();
    let relay = RunningRelay::start(settings).await;

    // The unroutable message never blocks the good one.
    assert_eq!(ids_of(&topology.receive(1, ARRIVAL).await), vec![good]);

    let alert = tokio::time::timeout(ARRIVAL, webhooks.recv())
        .await
        .expect("no webhook alert")
        .expect("receiver closed");
    assert_eq!(alert["message_id"], json!(doomed.to_string()), "{alert}");
    let email = tokio::time::timeout(ARRIVAL, emails.recv())
        .await
        .expect("no email alert")
        .expect("receiver closed");
    assert!(email.contains(&doomed.to_string()), "{email}");
    assert!(email.contains("ops@example.com"), "{email}");
    // Retries waited: 50 ms then 100 ms, each jittered down by at most half.
    assert!(started.elapsed() >= Duration::from_millis(75));

    let row = client
        .query_one(
            "SELECT attempts, dead_at IS NOT NULL, last_error FROM outbox.messages WHERE message_id = $1",
            &[&doomed],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, i32>(0), 3);
    assert!(row.get::<_, bool>(1), "dead");
    assert!(
        row.get::<_, String>(2).contains("unroutable"),
        "{}",
        row.get::<_, String>(2)
    );
    let listed: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox.dead_letters WHERE message_id = $1",
            &[&doomed],
        )
        .await
        .expect("view")
        .get(0);
    assert_eq!(listed, 1);
    relay.stop().await;
}

#[tokio::test]
async fn a_missing_exchange_fails_that_message_only() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    let missing = enqueue(&mut client, &unique_name("no_such_exchange"), "", 1, 1).await[0];
    let good = enqueue(&mut client, &topology.exchange, "", 20, 20).await;
    let relay = RunningRelay::start(Settings {
        max_attempts: Some(2),
        ..test_settings(&db)
    })
    .await;

    let received = ids_of(&topology.receive(good.len(), ARRIVAL).await);
    assert_same_ids(&received.into_iter().collect(), &good.into_iter().collect());
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let row = client
            .query_one("SELECT dead_at IS NOT NULL, coalesce(last_error, '') FROM outbox.messages WHERE message_id = $1", &[&missing])
            .await
            .expect("row");
        if row.get::<_, bool>(0) {
            assert!(row.get::<_, String>(1).contains("does not exist"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing-exchange message never died"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await;
}

/// Disturbs every connection on the broker: runs alone (`serial_`).
#[tokio::test]
async fn serial_broker_closing_all_connections_loses_nothing() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(test_settings(&db)).await;
    let mut client = db.connect().await;

    let mut expected = enqueue(&mut client, &topology.exchange, "", 500, 50).await;
    let writer = {
        let exchange = topology.exchange.clone();
        let mut client = db.connect().await;
        tokio::spawn(async move { enqueue(&mut client, &exchange, "", 1500, 10).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let closed = Command::new("rabbitmqctl")
        .args(["close_all_connections", "test: broker outage"])
        .output()
        .expect("run rabbitmqctl");
    assert!(closed.status.success(), "{closed:?}");
    expected.extend(writer.await.expect("writer"));

    wait_all_published(&client, ARRIVAL).await;
    let received: HashSet<Uuid> =
        ids_of(&topology.receive(usize::MAX, Duration::from_secs(3)).await)
            .into_iter()
            .collect();
    let expected: HashSet<Uuid> = expected.into_iter().collect();
    assert!(
        expected.is_subset(&received),
        "{} lost",
        expected.difference(&received).count()
    );
    let attempts: i64 = client
        .query_one(
            "SELECT coalesce(sum(attempts), 0) FROM outbox.messages",
            &[],
        )
        .await
        .expect("attempts")
        .get(0);
    assert_eq!(attempts, 0, "an outage must not count as attempts");
    relay.stop().await;
}

#[tokio::test]
async fn relay_recovers_when_its_database_connections_are_terminated() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(test_settings(&db)).await;

    let mut client = db.connect().await;
    let mut expected = enqueue(&mut client, &topology.exchange, "", 200, 20).await;
    wait_all_published(&client, ARRIVAL).await;
    drop(client);

    let admin = connect(&admin_url()).await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1",
            &[&db.name],
        )
        .await
        .expect("terminate")
        .get(0);
    assert!(
        killed >= 2,
        "expected the relay's pool and listener, killed {killed}"
    );

    let mut client = db.connect().await;
    expected.extend(enqueue(&mut client, &topology.exchange, "", 200, 20).await);
    let received: HashSet<Uuid> = ids_of(&topology.receive(expected.len(), ARRIVAL).await)
        .into_iter()
        .collect();
    assert_same_ids(&received, &expected.into_iter().collect());
    relay.stop().await;
}

/// A relay that published but died before marking: the row's lease expires
/// and the next relay publishes it again, with the same message_id.
#[tokio::test]
async fn a_row_published_but_not_marked_is_published_again_with_the_same_id() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    let id = enqueue(&mut client, &topology.exchange, "", 1, 1).await[0];

    // What the dead relay did: lease the row, publish it, never mark it.
    client
        .execute(
            "UPDATE outbox.messages SET locked_by = 'crashed', locked_until = now() + interval '1 second'",
            &[],
        )
        .await
        .expect("lease");
    topology
        .channel
        .basic_publish(
            topology.exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            b"{}",
            lapin::BasicProperties::default().with_message_id(id.to_string().into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");

    let relay = RunningRelay::start(test_settings(&db)).await;
    let received = ids_of(&topology.receive(2, ARRIVAL).await);
    assert_eq!(received, vec![id, id]);
    wait_all_published(&client, ARRIVAL).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_killed_relay_process_is_taken_over_and_nothing_is_lost() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    let lease = [("OUTBOX_LEASE_MS", "2000")];

    let mut first = spawn_relay_process(&db, &lease);
    let mut expected = enqueue(&mut client, &topology.exchange, "", 300, 30).await;
    let writer = {
        let exchange = topology.exchange.clone();
        let mut client = db.connect().await;
        tokio::spawn(async move { enqueue(&mut client, &exchange, "", 2000, 20).await })
    };
    let early = topology.receive(1, ARRIVAL).await;
    assert_eq!(early.len(), 1, "first relay published nothing");
    first.kill().expect("kill -9");
    let _ = first.wait();
    expected.extend(writer.await.expect("writer"));

    let mut second = spawn_relay_process(&db, &lease);
    wait_all_published(&client, ARRIVAL).await;
    // SIGTERM: a clean stop, exit code 0.
    let term = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let exit = second.wait().expect("wait for relay");
    assert!(exit.success(), "relay exited with {exit} on SIGTERM");

    let mut received: Vec<Uuid> = ids_of(&early);
    received.extend(ids_of(
        &topology.receive(usize::MAX, Duration::from_secs(3)).await,
    ));
    let unique: HashSet<Uuid> = received.iter().copied().collect();
    let expected: HashSet<Uuid> = expected.into_iter().collect();
    assert_same_ids(&unique, &expected);
    println!(
        "duplicates after kill -9: {}",
        received.len() - unique.len()
    );
}

/// Three relays; four ordering keys whose messages must arrive in order;
/// the head of key `a` is unroutable at first, so it is retried while the
/// rest of `a` waits behind it.
#[tokio::test]
async fn three_relays_publish_everything_and_keep_per_key_order() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::new(ExchangeKind::Direct, "go").await;
    let mut client = db.connect().await;
    let keys = ["a", "b", "c", "d"];
    let per_key = 60;

    let tx = client.transaction().await.expect("begin");
    for seq in 0..per_key {
        for key in keys {
            let routing_key = if key == "a" && seq == 0 {
                "later"
            } else {
                "go"
            };
            tx.execute(
                "SELECT outbox.enqueue($1, $2, $3::jsonb, '{}', $4)",
                &[
                    &topology.exchange,
                    &routing_key,
                    &json!({"key": key, "seq": seq}),
                    &key,
                ],
            )
            .await
            .expect("enqueue keyed");
        }
    }
    tx.commit().await.expect("commit");
    let keyless = enqueue(&mut client, &topology.exchange, "go", 200, 50).await;

    let settings = Settings {
        max_attempts: Some(100),
        ..test_settings(&db)
    };
    let relays = [
        RunningRelay::start(settings.clone()).await,
        RunningRelay::start(settings.clone()).await,
        RunningRelay::start(settings).await,
    ];

    // Let the head of `a` fail at least twice, then make it routable.
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let attempts: i32 = client
            .query_one(
                "SELECT attempts FROM outbox.messages WHERE ordering_key = 'a' ORDER BY id LIMIT 1",
                &[],
            )
            .await
            .expect("head")
            .get(0);
        if attempts >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "head of `a` never failed twice");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    topology.bind("later").await;

    let total = keys.len() * per_key + keyless.len();
    let deliveries = topology.receive(total, ARRIVAL).await;
    assert_eq!(deliveries.len(), total);
    let mut next_seq: HashMap<String, i64> = HashMap::new();
    for delivery in &deliveries {
        let body: serde_json::Value = serde_json::from_slice(&delivery.data).expect("JSON");
        if let Some(key) = body["key"].as_str() {
            let seq = body["seq"].as_i64().expect("seq");
            let expected = next_seq.entry(key.to_string()).or_insert(0);
            assert_eq!(seq, *expected, "key {key} out of order");
            *expected += 1;
        }
    }
    assert!(
        next_seq.values().all(|n| *n == per_key as i64),
        "{next_seq:?}"
    );
    for relay in relays {
        relay.stop().await;
    }
}

#[tokio::test]
async fn shutdown_with_messages_in_flight_loses_none() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    let expected = enqueue(&mut client, &topology.exchange, "", 3000, 500).await;

    let relay = RunningRelay::start(test_settings(&db)).await;
    let early = topology.receive(1, ARRIVAL).await;
    relay.stop().await;
    let leased: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NULL AND locked_by IS NOT NULL",
            &[],
        )
        .await
        .expect("leased")
        .get(0);
    assert_eq!(leased, 0, "leases must be given back at shutdown");

    let relay = RunningRelay::start(test_settings(&db)).await;
    wait_all_published(&client, ARRIVAL).await;
    relay.stop().await;
    let mut received: HashSet<Uuid> = ids_of(&early).into_iter().collect();
    received.extend(ids_of(
        &topology.receive(usize::MAX, Duration::from_secs(3)).await,
    ));
    assert_same_ids(&received, &expected.into_iter().collect());
}

fn relay_run(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(workspace_binary("outbox-relay"));
    command.arg("run").args(args);
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("OUTBOX_")) {
        command.env_remove(name);
    }
    command
        .env(
            "OUTBOX_DATABASE_URL",
            "postgres://app:s3cret@127.0.0.1:5432/x",
        )
        .env("OUTBOX_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("run outbox-relay");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Flags, environment, and what stderr must say.
type BadConfig<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);

#[test]
fn bad_configuration_exits_non_zero_with_one_clear_line() {
    let config_file = std::env::temp_dir().join(format!("{}.toml", unique_name("relay_config")));
    std::fs::write(&config_file, "batch_size = 10\nbatch_sise = 5\n").expect("write config");
    let config_arg = config_file.to_string_lossy().into_owned();
    let cases: Vec<BadConfig> = vec![
        (
            vec![],
            vec![("OUTBOX_BATCH_SIZ", "5")],
            "unknown setting OUTBOX_BATCH_SIZ",
        ),
        (
            vec!["--batch-size", "0"],
            vec![],
            "OUTBOX_BATCH_SIZE must be at least 1",
        ),
        (
            vec![],
            vec![("OUTBOX_AMQP_URL", "amqp://u:s3cret@host:port/")],
            "invalid AMQP URL",
        ),
        (
            vec![],
            vec![("OUTBOX_DATABASE_URL", "postgres://app:s3cret@h:port/x")],
            "PostgreSQL URL",
        ),
        // A password with `/`, `?` or `@` unescaped, or a URL without `//`
        // (which lapin's parser quotes whole).
        (
            vec![],
            vec![("OUTBOX_AMQP_URL", "amqp://guest:s3cret/x@host/%2f")],
            "invalid AMQP URL",
        ),
        (
            vec![],
            vec![("OUTBOX_AMQP_URL", "amqps://guest:s3cret?@host:99999/")],
            "invalid AMQP URL",
        ),
        (
            vec![],
            vec![("OUTBOX_AMQP_URL", "amqp:guest:s3cret@host")],
            "invalid AMQP URL",
        ),
        (vec![], vec![("OUTBOX_MODE", "push")], "OUTBOX_MODE must be"),
        // Upper bounds: refused at start, not by every claim afterwards.
        (
            vec![],
            vec![("OUTBOX_LEASE_MS", "18446744073709551615")],
            "OUTBOX_LEASE_MS must be at most 86400000",
        ),
        (
            vec!["--retry-max-ms", "99999999999"],
            vec![],
            "OUTBOX_RETRY_MAX_MS must be at most",
        ),
        (
            vec![],
            vec![("OUTBOX_RETENTION", "100000000y")],
            "OUTBOX_RETENTION must be at most",
        ),
        (
            vec![],
            vec![("OUTBOX_MAX_PAYLOAD_BYTES", "536870913")],
            "OUTBOX_MAX_PAYLOAD_BYTES must be at most 536870912",
        ),
        (
            vec![],
            vec![("OUTBOX_CONFIRM_TIMEOUT_MS", "30000")],
            "OUTBOX_CONFIRM_TIMEOUT_MS must be less than OUTBOX_LEASE_MS",
        ),
        (
            vec!["--config", &config_arg],
            vec![],
            "unknown field `batch_sise`",
        ),
    ];
    for (args, env, expected) in cases {
        let (ok, stderr) = relay_run(&args, &env);
        assert!(!ok, "{args:?} {env:?} must fail");
        assert!(stderr.contains(expected), "{args:?} {env:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(!stderr.contains("s3cret"), "password leaked: {stderr}");
    }
    let _ = std::fs::remove_file(config_file);
}

#[tokio::test]
async fn poll_mode_publishes_on_the_sweep_alone() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(Settings {
        mode: Some("poll".into()),
        ..test_settings(&db)
    })
    .await;
    let mut client = db.connect().await;
    let expected = enqueue(&mut client, &topology.exchange, "", 100, 10).await;
    let received = ids_of(&topology.receive(expected.len(), ARRIVAL).await);
    assert_same_ids(
        &received.into_iter().collect(),
        &expected.into_iter().collect(),
    );
    let listeners: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
            &[],
        )
        .await
        .expect("listeners")
        .get(0);
    assert_eq!(listeners, 0, "poll mode must not LISTEN");
    relay.stop().await;
}

#[tokio::test]
async fn zero_retention_deletes_rows_once_confirmed() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(Settings {
        retention: Some("0".into()),
        ..test_settings(&db)
    })
    .await;
    let mut client = db.connect().await;
    let expected = enqueue(&mut client, &topology.exchange, "", 50, 10).await;
    assert_eq!(
        topology.receive(expected.len(), ARRIVAL).await.len(),
        expected.len()
    );
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let left: i64 = client
            .query_one("SELECT count(*) FROM outbox.messages", &[])
            .await
            .expect("count")
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} confirmed rows not deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await;
}

/// Leases, marks and deletes leave dead row versions; with autovacuum off
/// for the table nothing reclaimed them, and a 30 s retention still grew
/// the table to 705 MiB over 2 million rows. The relay vacuums it then.
#[tokio::test]
async fn the_relay_vacuums_its_table_where_autovacuum_is_off() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    client
        .batch_execute("ALTER TABLE outbox.messages SET (autovacuum_enabled = false)")
        .await
        .expect("turn autovacuum off for the table");
    let relay = RunningRelay::start(Settings {
        retention: Some("0".into()),
        ..test_settings(&db)
    })
    .await;
    // More dead rows than the relay's threshold (10,000) once all are deleted.
    let expected = enqueue(&mut client, &topology.exchange, "", 12_000, 1_000).await;
    assert_eq!(
        topology.receive(expected.len(), ARRIVAL).await.len(),
        expected.len()
    );
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let vacuums: i64 = client
            .query_one(
                "SELECT vacuum_count FROM pg_stat_user_tables \
                 WHERE relid = 'outbox.messages'::regclass",
                &[],
            )
            .await
            .expect("vacuum count")
            .get(0);
        if vacuums > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "outbox.messages never vacuumed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    relay.stop().await;
}

#[tokio::test]
async fn retention_deletes_published_rows_older_than_the_setting() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    let old = enqueue(&mut client, &topology.exchange, "", 30, 10).await;
    let fresh = enqueue(&mut client, &topology.exchange, "", 30, 10).await;
    // Pretend the first batch was published two hours ago.
    client
        .execute(
            "UPDATE outbox.messages SET published_at = now() - interval '2 hours' WHERE message_id = ANY($1)",
            &[&old],
        )
        .await
        .expect("age rows");
    let relay = RunningRelay::start(Settings {
        retention: Some("1h".into()),
        ..test_settings(&db)
    })
    .await;
    assert_eq!(
        topology.receive(fresh.len(), ARRIVAL).await.len(),
        fresh.len()
    );
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE message_id = ANY($1)), count(*) FILTER (WHERE message_id = ANY($2)) FROM outbox.messages",
                &[&old, &fresh],
            )
            .await
            .expect("count");
        let (old_left, fresh_left): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(fresh_left, fresh.len() as i64, "recent rows must be kept");
        if old_left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{old_left} expired rows not deleted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    relay.stop().await;
}

/// With the sweep an hour away, only wake-ups can deliver: a row committed
/// to an idle relay arrives, and so does one committed after the relay's
/// listening connection was killed (it reconnects, LISTENs, drains).
#[tokio::test]
async fn wake_ups_deliver_without_the_sweep_also_after_the_listener_dies() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(Settings {
        sweep_interval_ms: Some(3_600_000),
        ..test_settings(&db)
    })
    .await;
    let prompt = Duration::from_secs(20);
    let mut client = db.connect().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let first = enqueue(&mut client, &topology.exchange, "", 1, 1).await;
    assert_eq!(
        ids_of(&topology.receive(1, prompt).await),
        first,
        "idle relay not woken"
    );

    let admin = connect(&admin_url()).await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'outbox-relay'",
            &[&db.name],
        )
        .await
        .expect("terminate the relay's connections")
        .get(0);
    assert!(killed >= 2, "listener and pool: killed {killed}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = enqueue(&mut client, &topology.exchange, "", 1, 1).await;
    assert_eq!(
        ids_of(&topology.receive(1, prompt).await),
        second,
        "listener not back"
    );
    relay.stop().await;
}

/// A keyed backlog (20,000 rows over 50 keys, analyzed while all were
/// pending, then some published) once made every claim walk the backlog
/// in id order, asking of each row whether an earlier one of its key was
/// pending: 11.2 s a claim with one plan, 0.11 s with the best, for 50
/// heads. Heads are now found key by key, so a claim touches a few pages
/// per key whatever the backlog and the statistics.
#[tokio::test]
async fn relay_keyed_claim_finds_heads_key_by_key_without_walking_the_backlog() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    client
        .batch_execute(
            "INSERT INTO outbox.messages (exchange, routing_key, payload, ordering_key) \
             SELECT 'ex', '', '{}', 'customer-' || g % 50 FROM generate_series(1, 20000) g; \
             ANALYZE outbox.messages; \
             UPDATE outbox.messages SET published_at = now() WHERE id <= 2800",
        )
        .await
        .expect("a keyed backlog");
    let explain = client
        .prepare_typed(
            &format!(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}",
                outbox_relay::store::CLAIM
            ),
            &outbox_relay::store::CLAIM_TYPES,
        )
        .await
        .expect("prepare");
    let claim = |followers: i64, lease: &'static str| {
        let (client, explain) = (&client, &explain);
        async move {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
                &500_i64,
                &lease,
                &true,
                &10_000_f64,
                &i64::MAX,
                &0_i64,
                &"",
                &followers,
                &Vec::<i64>::new(),
            ];
            let plan: serde_json::Value = client
                .query_one(explain, &params)
                .await
                .expect("explain")
                .get(0);
            let top = &plan[0]["Plan"];
            let pages = top["Shared Hit Blocks"].as_i64().unwrap_or(0)
                + top["Shared Read Blocks"].as_i64().unwrap_or(0);
            let rows = top["Actual Rows"].as_i64().unwrap_or(0);
            (rows, pages)
        }
    };
    let (heads, pages) = claim(0, "heads").await;
    println!("50 heads: {heads} rows claimed, {pages} pages touched");
    assert_eq!(heads, 50, "one head per key");
    // The walk touched every pending row's page and index entry: 17,200
    // rows, tens of thousands of pages.
    assert!(pages < 5_000, "{pages} pages touched for 50 heads");
    client
        .batch_execute("UPDATE outbox.messages SET locked_by = NULL, locked_until = NULL")
        .await
        .expect("release");
    let (pipelined, pages) = claim(9, "pipelined").await;
    println!("50 heads and their next 9 rows: {pipelined} rows claimed, {pages} pages touched");
    assert_eq!(pipelined, 500, "each head and its next 9 rows");
    let numbers: Vec<(String, i64, i64, i64)> = client
        .query(
            "SELECT ordering_key, count(*), min(key_seq), max(key_seq) FROM outbox.messages \
             WHERE locked_by = 'pipelined' GROUP BY 1",
            &[],
        )
        .await
        .expect("numbers")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    assert_eq!(numbers.len(), 50);
    // Each key's rows claimed in the first claim kept their numbers.
    for (key, count, first, last) in numbers {
        assert_eq!((count, first, last), (10, 1, 10), "{key}");
    }
}
