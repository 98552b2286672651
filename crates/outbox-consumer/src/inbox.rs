//! The effectively-once step. In one transaction: record the message ids
//! of a batch in the inbox table, run the handler for each new one in
//! delivery order, commit. A message whose id is in the inbox already was
//! handled before, so it changes nothing; two copies in flight at once
//! serialize on the inbox row's primary key.

use std::collections::HashSet;
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use futures::FutureExt;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::handler::{Handler, HandlerError, Incoming, classify};

/// What became of a message that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handled {
    /// Its writes and its inbox row committed.
    Committed,
    /// Its id was in the inbox already: nothing was written.
    Duplicate,
}

/// Why a batch did not commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BatchFailure {
    /// The handler of the message at this index failed; nothing committed.
    Message(usize, HandlerError),
    /// The batch's own statements (connection, inbox insert, commit)
    /// failed: no one message is to blame.
    Batch(HandlerError),
}

/// The inbox table: any table with a `message_id uuid` primary key.
#[derive(Debug, Clone)]
pub struct Inbox {
    table: String,
    insert: String,
    delete_expired: String,
}

/// A table name that cannot be put into SQL as it is.
#[derive(Debug, thiserror::Error)]
#[error("{what} `{name}` must be `name` or `schema.name` made of letters, digits and _")]
pub struct BadTableName {
    what: &'static str,
    name: String,
}

/// `table` when it is `name` or `schema.name` of plain identifiers, which
/// can go into SQL as they are: the inbox's, and a handler's own tables.
pub fn plain_table_name(table: &str) -> Result<&str, BadTableName> {
    let plain = |part: &str| {
        part.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if table.split('.').count() > 2 || !table.split('.').all(plain) {
        return Err(BadTableName {
            what: "table",
            name: table.into(),
        });
    }
    Ok(table)
}

impl Inbox {
    /// `table` is `name` or `schema.name`, plain identifiers only (it is
    /// put into SQL as it is).
    pub fn new(table: &str) -> Result<Inbox, BadTableName> {
        plain_table_name(table).map_err(|bad| BadTableName {
            what: "inbox table",
            ..bad
        })?;
        Ok(Inbox {
            table: table.into(),
            insert: format!(
                "INSERT INTO {table} (message_id) SELECT unnest($1::uuid[]) \
                 ON CONFLICT DO NOTHING RETURNING message_id"
            ),
            delete_expired: format!(
                "DELETE FROM {table} WHERE message_id IN (SELECT message_id FROM {table} \
                 WHERE processed_at < now() - $1 * interval '1 millisecond' \
                 LIMIT $2 FOR UPDATE SKIP LOCKED)"
            ),
        })
    }

    /// Creates the table if it is missing (its schema must exist): for
    /// users without a migration of their own; `message_id` is all the
    /// consumer needs, `processed_at` serves a retention job.
    pub async fn create_table(
        &self,
        client: &impl tokio_postgres::GenericClient,
    ) -> Result<(), tokio_postgres::Error> {
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {} (message_id uuid PRIMARY KEY, \
             processed_at timestamptz NOT NULL DEFAULT now())",
            self.table
        );
        client.batch_execute(&create).await
    }

    /// Deletes up to `limit` rows processed more than `retention` ago (see
    /// `retention`); how many.
    pub(crate) async fn delete_expired(
        &self,
        client: &impl tokio_postgres::GenericClient,
        retention: Duration,
        limit: i64,
    ) -> Result<u64, tokio_postgres::Error> {
        let millis = retention.as_secs_f64() * 1000.0;
        client
            .execute_typed(
                &self.delete_expired,
                &[(&millis, Type::FLOAT8), (&limit, Type::INT8)],
            )
            .await
    }

    /// Handles each of `messages` once, in one transaction. A failure on a
    /// connection that is gone is `Unavailable`, whatever the query said:
    /// the server, not the message, is at fault.
    pub(crate) async fn handle<H: Handler>(
        &self,
        pool: &Pool,
        handler: &H,
        messages: &[&Incoming],
    ) -> Result<Vec<Handled>, BatchFailure> {
        let mut client = pool.get().await.map_err(|e| {
            BatchFailure::Batch(HandlerError::Unavailable(outbox_service::db::pool_error(
                &e,
            )))
        })?;
        let result = self.transaction(&mut client, handler, messages).await;
        let closed = client.is_closed();
        let unavailable = |error| match error {
            HandlerError::Transient(reason) if closed => HandlerError::Unavailable(reason),
            other => other,
        };
        result.map_err(|failure| match failure {
            BatchFailure::Message(at, error) => BatchFailure::Message(at, unavailable(error)),
            BatchFailure::Batch(error) => BatchFailure::Batch(unavailable(error)),
        })
    }

    async fn transaction<H: Handler>(
        &self,
        client: &mut Object,
        handler: &H,
        messages: &[&Incoming],
    ) -> Result<Vec<Handled>, BatchFailure> {
        let batch = |e: tokio_postgres::Error| BatchFailure::Batch(classify(&e));
        // tokio-postgres' own transaction (not deadpool's wrapper): the
        // commit below is sent by hand, and only this type can then be
        // forgotten without leaking anything.
        let client: &mut tokio_postgres::Client = client;
        let tx = client.transaction().await.map_err(batch)?;
        let ids: Vec<Uuid> = messages.iter().map(|m| m.message_id).collect();
        let mut new: HashSet<Uuid> = tx
            .query_typed(&self.insert, &[(&ids, Type::UUID_ARRAY)])
            .await
            .map_err(batch)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut handled = Vec::with_capacity(messages.len());
        for (at, message) in messages.iter().enumerate() {
            // A second copy in the same batch is a duplicate too.
            if !new.remove(&message.message_id) {
                handled.push(Handled::Duplicate);
                continue;
            }
            // A panicking handler must not leave its delivery unacked
            // forever: it counts as a transient failure, so it ends in the
            // dead-letter queue if it keeps panicking.
            std::panic::AssertUnwindSafe(handler.handle(&tx, message))
                .catch_unwind()
                .await
                .map_err(|panic| {
                    HandlerError::Transient(format!("handler panicked: {}", panic_text(&panic)))
                })
                .and_then(|result| result)
                .map_err(|error| BatchFailure::Message(at, error))?;
            handled.push(Handled::Committed);
        }
        if handled.iter().all(|h| *h == Handled::Duplicate) {
            // Dropping `tx` rolls back: there was nothing to write anyway.
            return Ok(handled);
        }
        // A handler that caught a failed statement and returned `Ok` leaves
        // the transaction aborted, and COMMIT then rolls back without an
        // error: the batch would be acked with nothing written. The
        // `SELECT 1` fails instead, the COMMIT after it in the same query
        // is skipped, and one transaction each then finds the culprit. One
        // round trip for both: a separate check cost the consumer a tenth
        // of its drain rate.
        // A commit that fails on a lost connection may still have happened;
        // the redelivery then finds the inbox rows.
        tx.batch_execute("SELECT 1; COMMIT").await.map_err(batch)?;
        // Committed by hand: dropping `tx` would send a ROLLBACK (a server
        // warning, and a statement wasted). Its fields are a borrow and two
        // plain values, so forgetting it leaks nothing.
        std::mem::forget(tx);
        Ok(handled)
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbox_table_names_are_plain_identifiers() {
        assert!(Inbox::new("shop.inbox").is_ok());
        assert!(Inbox::new("inbox_2").is_ok());
        for bad in ["", "a.b.c", "x; DROP TABLE y", "1abc", "a."] {
            assert!(Inbox::new(bad).is_err(), "{bad}");
        }
    }
}
