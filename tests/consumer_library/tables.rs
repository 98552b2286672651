//! The consumer's transaction and tables: a handler that swallows a failed
//! statement, inbox retention, and tables the consumer refuses to start on.

use std::time::Duration;

use outbox_consumer::{ConsumerConfig, Topology};
use outbox_tests::dispatch::{Publisher, count, ready, wait_until};
use outbox_tests::*;
use tokio_util::sync::CancellationToken;

use super::{Recording, create_inbox, database, start};

/// Without the consumer's check before COMMIT, the batch holding order 0
/// was acked with nothing written: 14 orders lost.
#[tokio::test]
async fn a_handler_that_swallows_a_failed_statement_costs_its_batch_nothing() {
    const ORDERS: i64 = 30;
    let db = database().await;
    let shutdown = CancellationToken::new();
    let adjust = |config: &mut ConsumerConfig| {
        config.lanes = 1;
        config.max_deliveries = 2;
        config.retry_base = Duration::from_millis(50);
        config.retry_max = Duration::from_millis(100);
    };
    let (topology, consumer) = start(&db, adjust, &shutdown).await;
    let publisher = Publisher::new(&topology.exchange).await;
    // The first order's transaction waits on the lock while the rest
    // arrive, so they form one batch with order 0 in the middle.
    let lock = db.connect().await;
    lock.batch_execute("BEGIN; LOCK TABLE effects IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    publisher.order(ORDERS + 1).await;
    let blocked = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND wait_event_type = 'Lock'",
        db.name
    );
    wait_until("the first order waits", || async {
        count(&db, &blocked).await == 1
    })
    .await;
    for order in 1..=ORDERS {
        if order == 15 {
            publisher.order(0).await;
        }
        publisher.order(order).await;
    }
    wait_until("everything is delivered", || async {
        ready(&topology.queue).await == 0
    })
    .await;
    lock.batch_execute("ROLLBACK").await.expect("unlock");
    wait_until("every good order has its effect", || async {
        count(&db, "SELECT count(*) FROM effects").await == ORDERS + 1
    })
    .await;
    wait_until("order 0 is dead-lettered", || async {
        ready(&topology.dead_letter_queue).await == 1
    })
    .await;
    shutdown.cancel();
    consumer.await.expect("join").expect("consumer");
    assert_eq!(count(&db, "SELECT count(*) FROM inbox").await, ORDERS + 1);
}

/// Inbox rows older than `inbox_retention` go, and so do the watermarks
/// of keys idle that long; the consumer goes on.
#[tokio::test]
async fn inbox_rows_past_their_retention_are_deleted() {
    let db = database().await;
    db.connect()
        .await
        .batch_execute(
            "INSERT INTO inbox_keys (ordering_key, last_seq, updated_at) VALUES \
             ('idle', 5, now() - interval '1 hour'), ('busy', 5, now() + interval '1 hour')",
        )
        .await
        .expect("watermarks");
    let shutdown = CancellationToken::new();
    let retention = |config: &mut ConsumerConfig| {
        config.inbox_retention = Some(Duration::from_millis(300));
    };
    let (topology, consumer) = start(&db, retention, &shutdown).await;
    let publisher = Publisher::new(&topology.exchange).await;
    for order in 1..=2 {
        publisher.order(order).await;
        wait_until("the order has its effect", || async {
            count(&db, "SELECT count(*) FROM effects").await == order
        })
        .await;
        wait_until("its inbox row is deleted", || async {
            count(&db, "SELECT count(*) FROM inbox").await == 0
        })
        .await;
    }
    let keys = db
        .connect()
        .await
        .query_one(
            "SELECT array_agg(convert_from(ordering_key, 'UTF8')) FROM inbox_keys",
            &[],
        )
        .await
        .expect("keys")
        .get::<_, Vec<String>>(0);
    assert_eq!(keys, ["busy"], "the idle key's watermark went");
    shutdown.cancel();
    consumer.await.expect("join").expect("consumer");
}

/// Inbox and key tables that cannot serve: the consumer refuses to start,
/// naming the table and the fix, instead of failing each batch. Before
/// the check ran each statement, the text key stalled every keyed lane
/// (its watermark read failed for ever), the integer watermark panicked
/// the session, the inbox without a unique `message_id` deduplicated
/// nothing, and a role without UPDATE on the key table passed the check.
#[tokio::test]
async fn a_consumer_whose_tables_cannot_serve_refuses_to_start_and_says_why() {
    let inbox = "CREATE TABLE inbox (message_id uuid PRIMARY KEY)";
    let keys = |key: &str, seq: &str| {
        format!(
            "CREATE TABLE inbox_keys (ordering_key {key} PRIMARY KEY, last_seq {seq} NOT NULL, updated_at timestamptz)"
        )
    };
    let cases = [
        (inbox.to_string(), "inbox_keys\" does not exist"),
        (
            format!("{inbox}; {}", keys("text", "bigint")),
            "operator does not exist",
        ),
        (
            format!("{inbox}; {}", keys("bytea", "integer")),
            "last_seq int4, not bytea and bigint",
        ),
        (
            format!(
                "CREATE TABLE inbox (message_id uuid); {}",
                keys("bytea", "bigint")
            ),
            "no unique or exclusion constraint",
        ),
    ];
    for (tables, reason) in cases {
        let db = TestDb::empty().await;
        db.connect()
            .await
            .batch_execute(&tables)
            .await
            .expect("tables");
        let line = refused_start(&db.url).await;
        assert!(line.contains(reason), "{tables}: {line}");
    }
    // A role that may insert into the key table but not update it: each
    // batch's upsert would fail, retrying keyed messages into the
    // dead-letter queue.
    let role = TestRole::create("lib_consumer").await;
    let db = TestDb::empty().await;
    create_inbox(&db).await;
    db.connect()
        .await
        .batch_execute(&format!(
            "GRANT SELECT, INSERT ON inbox, inbox_keys TO {}",
            role.name
        ))
        .await
        .expect("grants");
    let line = refused_start(&role.url(&db)).await;
    assert!(
        line.contains("permission denied for table inbox_keys"),
        "{line}"
    );
}

/// The one-line error of a consumer on `url` that must refuse to start.
async fn refused_start(url: &str) -> String {
    let topology = Topology::named(&unique_name("lib_ex"), &unique_name("lib_q"));
    let config = ConsumerConfig::new(&amqp_url(), topology, "inbox");
    let target = outbox_service::db::parse_url(url, None).expect("url");
    let pool = outbox_service::db::pool(&target, 1).await.expect("pool");
    let started = outbox_consumer::run(
        config,
        pool,
        Recording,
        outbox_consumer::health::new(),
        CancellationToken::new(),
    );
    let error = tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .expect("it does not wait")
        .expect_err("tables that cannot serve");
    let line = outbox::chain_line(error.as_ref());
    assert!(
        line.contains("`inbox_keys`") && line.contains("Inbox::create_table"),
        "{line}"
    );
    line
}
