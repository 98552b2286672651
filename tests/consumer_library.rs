//! The consumer library run in this process with a handler of the test's
//! own: what a careless handler cannot do to the messages batched with it.

use std::time::Duration;

use outbox_consumer::{ConsumerConfig, Handler, HandlerError, Incoming, Topology};
use outbox_tests::dispatch::{Publisher, count, ready, wait_for_consumers, wait_until};
use outbox_tests::*;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

/// Writes each order into `effects`, except order 0: that one runs a
/// statement that fails, ignores the error and returns `Ok`, which leaves
/// the transaction aborted (COMMIT then rolls back without an error).
struct Swallowing;

impl Handler for Swallowing {
    async fn handle(&self, tx: &Transaction<'_>, message: &Incoming) -> Result<(), HandlerError> {
        let body: serde_json::Value = serde_json::from_slice(&message.body)
            .map_err(|e| HandlerError::Poison(e.to_string()))?;
        let order = body["orderId"].as_i64().unwrap_or(0);
        if order == 0 {
            let _ignored = tx.batch_execute("SELECT 1/0").await;
            return Ok(());
        }
        tx.execute("INSERT INTO effects (order_id) VALUES ($1)", &[&order])
            .await?;
        Ok(())
    }
}

/// The test's inbox and effects tables in a fresh database.
async fn database() -> TestDb {
    let db = TestDb::empty().await;
    db.connect()
        .await
        .batch_execute(
            "CREATE TABLE inbox (message_id uuid PRIMARY KEY, \
                 processed_at timestamptz NOT NULL DEFAULT now()); \
             CREATE TABLE effects (order_id bigint PRIMARY KEY)",
        )
        .await
        .expect("tables");
    db
}

/// A consumer of fresh names on `db`, with `adjust` applied to its config;
/// its topology, and the task that stops when `shutdown` is cancelled.
async fn start(
    db: &TestDb,
    adjust: impl FnOnce(&mut ConsumerConfig),
    shutdown: &CancellationToken,
) -> (Topology, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let mut topology = Topology::named(&unique_name("lib_ex"), &unique_name("lib_q"));
    topology.expires = Some(Duration::from_secs(300));
    let mut config = ConsumerConfig::new(&amqp_url(), topology.clone(), "inbox");
    adjust(&mut config);
    let target = outbox_service::db::parse_url(&db.url, None).expect("url");
    let pool = outbox_service::db::pool(&target, 3).await.expect("pool");
    let consumer = tokio::spawn(outbox_consumer::run(
        config,
        pool,
        Swallowing,
        outbox_consumer::health::new(),
        shutdown.clone(),
    ));
    wait_for_consumers(&topology.queue, 1).await;
    (topology, consumer)
}

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

/// Inbox rows older than `inbox_retention` go; the consumer goes on.
#[tokio::test]
async fn inbox_rows_past_their_retention_are_deleted() {
    let db = database().await;
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
    shutdown.cancel();
    consumer.await.expect("join").expect("consumer");
}
