//! Least privilege: the relay, an enqueuing app and the dispatch consumer
//! run as ordinary roles given their rights by `outbox.grant_relay`,
//! `outbox.grant_writer` and `dispatch.grant_consumer` (sql/*/V3__roles.sql),
//! work, and are refused anything outside their own schema.

use outbox_relay::Settings;
use outbox_tests::broker::Topology;
use outbox_tests::dispatch::{PATIENCE, Publisher, RunningDispatch, count, topology, wait_until};
use outbox_tests::relay::{RunningRelay, relay_command, test_settings};
use outbox_tests::*;

#[tokio::test]
async fn relay_works_under_its_role_and_is_refused_outside_outbox() {
    let relay_role = TestRole::create("relay").await;
    let writer_role = TestRole::create("writer").await;
    let db = TestDb::with_outbox().await;
    let owner = db.connect().await;
    owner
        .batch_execute(&format!(
            "CREATE TABLE public.orders (id bigint PRIMARY KEY); \
             SELECT outbox.grant_relay('{}'); SELECT outbox.grant_writer('{}'); \
             SELECT outbox.grant_relay('{}')",
            relay_role.name, writer_role.name, relay_role.name
        ))
        .await
        .expect("grant (twice: idempotent)");

    // The app enqueues as the writer, keyless and keyed.
    let topology = Topology::fanout().await;
    let writer = connect(&writer_role.url(&db)).await;
    for key in [None, Some("k"), Some("k")] {
        writer
            .query_one(
                "SELECT outbox.enqueue($1, '', '{\"a\": 1}', '{}', $2)",
                &[&topology.exchange, &key],
            )
            .await
            .expect("enqueue as writer");
    }
    refused(&writer, "SELECT payload FROM outbox.messages").await;
    refused(&writer, "UPDATE outbox.messages SET attempts = 0").await;
    refused(&writer, "SELECT * FROM public.orders").await;

    let relay = RunningRelay::start(Settings {
        database_url: Some(relay_role.url(&db)),
        ..test_settings(&db)
    })
    .await;
    assert_eq!(topology.receive(3, PATIENCE).await.len(), 3);
    wait_until("all 3 are marked published", || async {
        count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL",
        )
        .await
            == 3
    })
    .await;
    relay.stop().await;
    for command in [
        &["status"][..],
        &["dead", "list"],
        &["replay", "--since", "1h", "--dry-run"],
    ] {
        relay_command(&relay_role.url(&db), command)
            .await
            .expect_code(0);
    }

    let as_relay = connect(&relay_role.url(&db)).await;
    for sql in [
        "SELECT * FROM public.orders",
        "CREATE TABLE public.mine (id int)",
        "CREATE SCHEMA mine",
        "CREATE TABLE outbox.mine (id int)",
        "INSERT INTO outbox.messages (exchange, payload) VALUES ('x', '')",
        "DROP TABLE outbox.messages",
        "TRUNCATE outbox.messages",
        "DELETE FROM outbox.schema_history",
    ] {
        refused(&as_relay, sql).await;
    }
    let out = relay_command(&relay_role.url(&db), &["migrate"]).await;
    out.expect_code(1);
    assert!(out.stderr.contains("permission denied"), "{out:#?}");
}

#[tokio::test]
async fn dispatch_consumes_under_its_role_and_is_refused_anything_else() {
    let consumer_role = TestRole::create("consumer").await;
    let db = TestDb::empty().await;
    let mut owner = db.connect().await;
    ::dispatch::migrate(&mut owner)
        .await
        .expect("migrate as owner");
    owner
        .batch_execute(&format!(
            "CREATE TABLE public.secrets (id int); SELECT dispatch.grant_consumer('{}')",
            consumer_role.name
        ))
        .await
        .expect("grant");

    // Its start-up migration finds the schema current and changes nothing.
    let mut settings = outbox_tests::dispatch::test_settings(&db);
    settings.database_url = Some(consumer_role.url(&db));
    let names = topology(&settings);
    let consumer = RunningDispatch::start(settings).await;
    let publisher = Publisher::new(&names.exchange).await;
    publisher.order(7).await;
    wait_until("the order is delivered", || async {
        count(&db, "SELECT count(*) FROM dispatch.deliveries").await == 1
    })
    .await;
    consumer.stop().await;

    let as_consumer = connect(&consumer_role.url(&db)).await;
    for sql in [
        "SELECT * FROM public.secrets",
        "CREATE TABLE dispatch.mine (id int)",
        "CREATE SCHEMA mine",
        "DROP TABLE dispatch.inbox",
        "DELETE FROM dispatch.schema_history",
    ] {
        refused(&as_consumer, sql).await;
    }
}

/// Delivery state belongs to the relay: a role under `grant_writer` may
/// enqueue, but may not insert a row already published, dead, leased,
/// retried or dated (a keyed row leased forever or dead blocks the app's
/// later messages of that key), whether by INSERT, COPY or the functions.
#[tokio::test]
async fn a_writer_cannot_set_delivery_state_on_any_path() {
    let writer_role = TestRole::create("writer").await;
    let db = TestDb::with_outbox().await;
    db.connect()
        .await
        .batch_execute(&format!(
            "SELECT outbox.grant_writer('{}')",
            writer_role.name
        ))
        .await
        .expect("grant");
    let writer = connect(&writer_role.url(&db)).await;

    for (column, value) in [
        ("published_at", "now()"),
        ("dead_at", "now()"),
        ("locked_by", "'me'"),
        ("locked_until", "'infinity'"),
        ("attempts", "99"),
        ("next_attempt_at", "'infinity'"),
        ("last_error", "'x'"),
        ("replayed_at", "now()"),
        ("created_at", "'2000-01-01'"),
    ] {
        refused(
            &writer,
            &format!(
                "INSERT INTO outbox.messages (exchange, payload, ordering_key, {column}) \
                 VALUES ('x', '', 'k', {value})"
            ),
        )
        .await;
    }
    refused(
        &writer,
        "INSERT INTO outbox.messages (id, exchange, payload) OVERRIDING SYSTEM VALUE \
         VALUES (1, 'x', '')",
    )
    .await;
    for copy in [
        "COPY outbox.messages FROM STDIN",
        "COPY outbox.messages (exchange, payload, dead_at) FROM STDIN",
    ] {
        // A connection each: a refused COPY leaves tokio-postgres out of step.
        let error = connect(&writer_role.url(&db))
            .await
            .copy_in::<_, &[u8]>(copy)
            .await
            .err()
            .unwrap_or_else(|| panic!("`{copy}` was allowed"));
        assert_eq!(
            error.code().map(|c| c.code()),
            Some("42501"),
            "{copy}: {error}"
        );
    }

    // What an app sets is still its own, on every path: the enqueue
    // functions, INSERT (with an idempotency message_id) and COPY.
    writer
        .batch_execute(
            "SELECT outbox.enqueue('x', 'rk', '{\"a\": 1}', ordering_key => 'k'); \
             SELECT outbox.enqueue_bytes('x', 'rk', '\\xff'::bytea, 'application/octet-stream'); \
             INSERT INTO outbox.messages \
                 (message_id, exchange, routing_key, payload, content_type, headers, ordering_key) \
             VALUES ('6d3c7a4e-0d7f-4c55-9f43-8b0f0a6c1e01', 'x', 'rk', '', 'text/plain', \
                     '{\"h\": 1}', 'k') \
             ON CONFLICT (message_id) DO NOTHING",
        )
        .await
        .expect("enqueue as writer");
    let sink = writer
        .copy_in::<_, &[u8]>("COPY outbox.messages (exchange, payload, ordering_key) FROM STDIN")
        .await
        .expect("COPY the app's columns");
    futures::pin_mut!(sink);
    futures::SinkExt::send(&mut sink, &b"x\t\\\\x00\tk\n"[..])
        .await
        .expect("copy row");
    assert_eq!(sink.finish().await.expect("copy done"), 1);
    let fresh: i64 = db
        .connect()
        .await
        .query_one(
            "SELECT count(*) FROM outbox.messages WHERE attempts = 0 AND published_at IS NULL \
             AND dead_at IS NULL AND locked_until IS NULL AND replayed_at IS NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(fresh, 4, "every row the writer made is fresh and pending");
}
