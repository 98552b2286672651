//! An effectively-once RabbitMQ consumer into PostgreSQL, as a library.
//! Bring a [`Handler`] (the business write of one message, inside a
//! transaction the consumer opens) and an inbox table (any table with a
//! `message_id uuid` primary key); the consumer records each message id in
//! the inbox in the same transaction as the handler's writes and acks after
//! the commit, so a redelivered copy changes nothing. Transient failures are
//! retried with backoff through a retry queue, poison and exhausted
//! messages go to a dead-letter queue with the reason, an outage of either
//! server holds deliveries instead of burning their retries, and
//! [`health`] and the `consumer_*` metrics feed the ops endpoint of
//! `outbox_service::endpoint`.
//!
//! The modules import one way, none one that imports it back: a
//! delivery's path reads from the session down to the broker.
//!
//! - `consumer`: the life cycle (connect, declare, consume, reconnect,
//!   stop); `config`: what it is told;
//! - `lanes`: the tasks that handle batches; `work`: what they take (the
//!   oldest first, a key in one lane at a time); `sequencer`: a key's
//!   numbers back in order;
//! - `batch`: a lane's batch in one transaction, taken apart on a failure;
//! - `inbox`: the effectively-once transaction; `keys`: each key's
//!   watermark beside it; `retention`: their old rows;
//! - `worker`: how one delivery ends (admit, ack, retry or dead-letter);
//! - `retrier`: brings retried messages back when they are due;
//! - `broker`, `topology`: the RabbitMQ side;
//! - `shared`: the state every stage reads, and how a session's task ends;
//! - `message`: every read of a delivery's properties and headers;
//! - `handler`: what a user implements; `meters`, `health`: observability.

mod batch;
mod broker;
mod config;
mod consumer;
mod handler;
pub mod health;
mod inbox;
mod keys;
mod lanes;
mod message;
mod meters;
mod retention;
mod retrier;
mod sequencer;
mod shared;
mod spans;
mod topology;
mod work;
mod worker;

// The whole public API: what a user brings (a handler, an inbox table, the
// names), what runs it, and the headers its dead letters carry.
pub use config::ConsumerConfig;
pub use consumer::run;
pub use handler::{BatchError, Handler, HandlerError, Incoming, classify};
pub use inbox::{BadTableName, Inbox, plain_table_name};
pub use message::{DELIVERIES_HEADER, ERROR_HEADER, KEY_HEADER, RETRIES_HEADER, SEQ_HEADER};
pub use topology::{QueueType, Topology};

use deadpool_postgres::Pool;
use outbox_service::endpoint::{PROBE_DEADLINE, Probe, Readiness};
use outbox_service::health::{Health, NotReady};

/// What the ops endpoint's `/readyz` checks for a consumer: subscribed to
/// its queue, and its database answers `SELECT 1` now, within
/// [`PROBE_DEADLINE`] (a database that stopped answering without closing
/// anything makes it 503, not a hung probe). A connection whose `SELECT 1`
/// did not answer is not given back to the pool as it is: every idle one
/// is let go, so that no handler queues behind it.
pub fn readiness(health: Health, pool: Pool) -> Readiness {
    let probe: Probe = std::sync::Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            let silent = |source: Box<dyn std::error::Error + Send + Sync>| NotReady::Probe {
                what: "the database does not answer",
                source: Some(source),
            };
            let ping = async {
                let client = pool.get().await.map_err(|e| silent(e.into()))?;
                client
                    .simple_query("SELECT 1")
                    .await
                    .map(drop)
                    .map_err(|e| silent(Box::new(outbox::PgError(e))))
            };
            match tokio::time::timeout(PROBE_DEADLINE, ping).await {
                Ok(answer) => answer,
                Err(_) => {
                    pool.retain(|_, _| false);
                    Err(NotReady::Timeout(PROBE_DEADLINE))
                }
            }
        })
    });
    Readiness {
        health,
        probe: Some(probe),
    }
}
