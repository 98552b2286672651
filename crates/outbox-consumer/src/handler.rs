//! What a consumer plugs in: a [`Handler`] that writes one message's effect
//! inside the transaction the consumer opened (which also records the
//! message in the inbox), and a [`HandlerError`] that says whose fault a
//! failure is, because each kind is handled differently:
//!
//! | error         | meaning                                  | consumer does                          |
//! |---------------|------------------------------------------|----------------------------------------|
//! | `Poison`      | this message can never succeed           | dead-letters it now, with the reason   |
//! | `Transient`   | this attempt failed, a later one may not | retries it later, counting a delivery  |
//! | `Unavailable` | a dependency is down, not the message    | holds it and waits, counting nothing   |

use std::future::Future;

use futures::FutureExt;
use lapin::BasicProperties;
use tokio_postgres::Transaction;
use uuid::Uuid;

/// One delivery, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The AMQP `message_id` (for outbox messages, the outbox row's UUID);
    /// the inbox records it so a redelivery changes nothing.
    pub message_id: Uuid,
    pub body: Vec<u8>,
    pub exchange: String,
    pub routing_key: String,
    /// Which delivery of the message this is, from 1. Counts earlier
    /// transient failures and, on quorum queues, the broker's redeliveries
    /// (a classic queue cannot tell how often a crashed consumer saw it).
    pub delivery: u32,
    /// Everything else the publisher set (content type, headers, timestamp).
    pub properties: BasicProperties,
}

impl Incoming {
    /// The content type without parameters (`application/json`), if set.
    pub fn content_type(&self) -> Option<&str> {
        self.properties
            .content_type()
            .as_ref()
            .map(|t| t.as_str().split(';').next().unwrap_or("").trim())
    }
}

/// Why a handler (or the consumer's own inbox write) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// The message is malformed or breaks a rule: retrying cannot help.
    #[error("{0}")]
    Poison(String),
    /// This attempt failed (serialization failure, deadlock, timeout):
    /// retry later; counts towards the delivery limit.
    #[error("{0}")]
    Transient(String),
    /// The database (or another dependency) is down: wait and try the same
    /// delivery again; never counts against the message.
    #[error("{0}")]
    Unavailable(String),
}

/// Handles one message inside the consumer's transaction. The consumer has
/// already recorded `message.message_id` in the inbox in `tx`, and commits
/// `tx` only when every message of the batch returned `Ok`; an error rolls
/// the batch back (the others are then committed without this one). `tx`
/// holds the batch's other messages too: do not leave session state behind
/// (`SET` without `LOCAL`).
///
/// Implement it with a plain `async fn`; the future must be `Send` because
/// lanes run concurrently on the runtime's threads.
///
/// `handle_batch` writes several messages at once (one statement for all,
/// instead of a round trip each); by default it calls `handle` for each.
/// Implement it when one statement can do the batch's writes: it must have
/// the same effect as `handle` for each message in turn.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        tx: &Transaction<'_>,
        message: &Incoming,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// The effects of `messages` (new ones, in delivery order), in `tx`.
    /// An error names the message at fault when it can (`BatchError::at`);
    /// one that cannot (`BatchError::somewhere`: one statement for all
    /// failed) has the consumer redo the batch with `handle`, one message
    /// after another in one transaction, to find the one at fault.
    fn handle_batch(
        &self,
        tx: &Transaction<'_>,
        messages: &[&Incoming],
    ) -> impl Future<Output = Result<(), BatchError>> + Send {
        async move {
            for (at, message) in messages.iter().enumerate() {
                caught(self.handle(tx, message))
                    .await
                    .and_then(|handled| handled)
                    .map_err(|error| BatchError::at(at, error))?;
            }
            Ok(())
        }
    }
}

/// Why `handle_batch` failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// The index in `messages` of the one at fault, if known.
    pub index: Option<usize>,
    pub error: HandlerError,
}

impl BatchError {
    /// The message at `index` failed.
    pub fn at(index: usize, error: HandlerError) -> BatchError {
        BatchError {
            index: Some(index),
            error,
        }
    }

    /// One of the messages failed, which one is not known.
    pub fn somewhere(error: HandlerError) -> BatchError {
        BatchError { index: None, error }
    }
}

/// A handler's future, with a panic made a transient failure: a panicking
/// handler must not leave its delivery unacked forever, and it ends in the
/// dead-letter queue if it keeps panicking.
pub(crate) async fn caught<F: Future>(handled: F) -> Result<F::Output, HandlerError> {
    std::panic::AssertUnwindSafe(handled)
        .catch_unwind()
        .await
        .map_err(|panic| {
            HandlerError::Transient(format!("handler panicked: {}", panic_text(&panic)))
        })
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

impl From<tokio_postgres::Error> for HandlerError {
    /// Sorts a database error by SQLSTATE; see [`classify`].
    fn from(error: tokio_postgres::Error) -> HandlerError {
        classify(&error)
    }
}

/// Default sorting of database errors: a lost connection or a server that
/// cannot serve is `Unavailable`; bad data (class 22, NOT NULL and CHECK
/// violations) is `Poison`; everything else, notably serialization failures
/// and deadlocks (class 40), lock and statement timeouts, and unique
/// violations (a concurrent writer won; a retry sees its row), is
/// `Transient`. A handler that knows better maps errors itself.
///
/// The text (logged, and the dead letter's `x-consumer-error`) is
/// [`outbox::error_line`]'s: the SQLSTATE and the constraint, table and
/// column names, never row values, unless `outbox::show_row_values(true)`.
pub fn classify(error: &tokio_postgres::Error) -> HandlerError {
    let line = outbox::error_line(error);
    let io = std::error::Error::source(error).is_some_and(|s| s.is::<std::io::Error>());
    let Some(code) = error.code().map(|c| c.code()) else {
        return if error.is_closed() || io {
            HandlerError::Unavailable(line)
        } else {
            HandlerError::Transient(line)
        };
    };
    let unavailable = ["08", "53", "58"].iter().any(|class| code.starts_with(class))
        // admin_shutdown, crash_shutdown, cannot_connect_now; a read-only
        // standby after a failover.
        || ["57P01", "57P02", "57P03", "25006"].contains(&code);
    // Class 54, a program limit (an index row too large for a key the
    // publisher made huge): the same message hits it every time.
    let poison =
        code.starts_with("22") || code.starts_with("54") || ["23502", "23514"].contains(&code);
    if unavailable {
        HandlerError::Unavailable(line)
    } else if poison {
        HandlerError::Poison(line)
    } else {
        HandlerError::Transient(line)
    }
}
