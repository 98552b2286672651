//! The consumer library run in this process with a handler of the test's
//! own: what a careless handler cannot do to the messages batched with it.
//!
//! Split by theme: `tables` (batches, retention, tables that cannot serve),
//! `returned_rows` (a key's missing row), `keys` (slow keys, several consumers),
//! `quorum` (quorum queues and the delivery limit).

use std::collections::HashMap;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use outbox_consumer::{ConsumerConfig, Handler, HandlerError, Inbox, Incoming, Topology};
use outbox_tests::dispatch::{Publisher, queue_state, wait_for_consumers};
use outbox_tests::*;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

mod keys;
mod quorum;
mod returned_rows;
mod tables;

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
    database_with("CREATE TABLE effects (order_id bigint PRIMARY KEY)").await
}

/// A fresh database with the inbox and the table `create` makes.
async fn database_with(create: &str) -> TestDb {
    let db = TestDb::empty().await;
    db.connect()
        .await
        .batch_execute(create)
        .await
        .expect("tables");
    create_inbox(&db).await;
    db
}

/// The inbox `inbox` and its key table, as the library creates them.
async fn create_inbox(db: &TestDb) {
    Inbox::new("inbox")
        .expect("name")
        .create_table(&db.connect().await)
        .await
        .expect("inbox tables");
}

/// A consumer of fresh names on `db`, with `adjust` applied to its config;
/// its topology, and the task that stops when `shutdown` is cancelled.
async fn start(
    db: &TestDb,
    adjust: impl FnOnce(&mut ConsumerConfig),
    shutdown: &CancellationToken,
) -> (Topology, tokio::task::JoinHandle<anyhow::Result<()>>) {
    start_with(db, Swallowing, adjust, shutdown).await
}

/// [`start`] with a handler of the caller's.
async fn start_with<H: Handler>(
    db: &TestDb,
    handler: H,
    adjust: impl FnOnce(&mut ConsumerConfig),
    shutdown: &CancellationToken,
) -> (Topology, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let mut topology = Topology::named(&unique_name("lib_ex"), &unique_name("lib_q"));
    topology.expires = Some(Duration::from_secs(300));
    let consumer = consume(db, &topology, handler, adjust, shutdown).await;
    (topology, consumer)
}

/// A consumer of `topology` on `db`, once it is subscribed (beside any
/// already there).
async fn consume<H: Handler>(
    db: &TestDb,
    topology: &Topology,
    handler: H,
    adjust: impl FnOnce(&mut ConsumerConfig),
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let mut config = ConsumerConfig::new(&amqp_url(), topology.clone(), "inbox");
    adjust(&mut config);
    let target = outbox_service::db::parse_url(&db.url, None).expect("url");
    let pool = outbox_service::db::pool(&target, 3).await.expect("pool");
    // Others may consume the queue already (it may not exist yet).
    let before = queue_state(&topology.queue).await.map_or(0, |(_, c)| c);
    let consumer = tokio::spawn(outbox_consumer::run(
        config,
        pool,
        handler,
        outbox_consumer::health::new(),
        shutdown.clone(),
    ));
    wait_for_consumers(&topology.queue, before + 1).await;
    consumer
}

/// Records each message's `{"key", "n"}` in `effects_log`, in the order
/// the consumer handles them.
struct Recording;

impl Handler for Recording {
    async fn handle(&self, tx: &Transaction<'_>, message: &Incoming) -> Result<(), HandlerError> {
        let body: serde_json::Value = serde_json::from_slice(&message.body)
            .map_err(|e| HandlerError::Poison(e.to_string()))?;
        let key = body["key"].as_str().unwrap_or_default();
        let n = body["n"].as_i64().unwrap_or_default();
        tx.execute(
            "INSERT INTO effects_log (key, n) VALUES ($1, $2)",
            &[&key, &n],
        )
        .await?;
        Ok(())
    }
}

/// A keyed (or keyless, `key` "") message `{"key", "n"}` numbered `n`
/// among its key's, as the relay publishes it.
async fn publish_numbered(publisher: &Publisher, key: &str, n: i64) {
    let body = serde_json::json!({ "key": key, "n": n }).to_string();
    let mut headers = FieldTable::default();
    if !key.is_empty() {
        headers.insert(
            outbox_consumer::KEY_HEADER.into(),
            AMQPValue::LongString(key.into()),
        );
        headers.insert(
            outbox_consumer::SEQ_HEADER.into(),
            AMQPValue::LongLongInt(n),
        );
    }
    let properties = BasicProperties::default()
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_headers(headers);
    publisher.raw(body.as_bytes(), properties).await;
}

/// The test's database for [`Recording`]-like handlers: `effects_log`
/// and the inbox.
async fn logging_database() -> TestDb {
    database_with("CREATE TABLE effects_log (id bigserial PRIMARY KEY, key text, n bigint)").await
}

/// Each key's numbers in `effects_log`, in commit order.
async fn logged(db: &TestDb) -> HashMap<String, Vec<i64>> {
    let log = db
        .connect()
        .await
        .query("SELECT key, n FROM effects_log ORDER BY id", &[])
        .await
        .expect("log");
    let mut seen: HashMap<String, Vec<i64>> = HashMap::new();
    for row in log {
        seen.entry(row.get(0)).or_default().push(row.get(1));
    }
    seen
}
