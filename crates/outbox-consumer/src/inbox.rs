//! The effectively-once step. In one transaction: record the message id in
//! the inbox table, run the handler, commit. A message whose id is in the
//! inbox already was handled before, so it changes nothing; two copies in
//! flight at once serialize on the inbox row's primary key.

use deadpool_postgres::{Object, Pool};
use futures::FutureExt;
use tokio_postgres::types::Type;

use crate::handler::{Handler, HandlerError, Incoming, classify};

/// What became of a message that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handled {
    /// Its writes and its inbox row committed.
    Committed,
    /// Its id was in the inbox already: nothing was written.
    Duplicate,
}

/// The inbox table: any table with a `message_id uuid` primary key.
#[derive(Debug, Clone)]
pub struct Inbox {
    table: String,
    insert: String,
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
                "INSERT INTO {table} (message_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING 1"
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

    /// Handles `message` once. A failure on a connection that is gone is
    /// `Unavailable`, whatever the query said: the server, not the message,
    /// is at fault.
    pub(crate) async fn handle<H: Handler>(
        &self,
        pool: &Pool,
        handler: &H,
        message: &Incoming,
    ) -> Result<Handled, HandlerError> {
        let mut client = pool
            .get()
            .await
            .map_err(|e| HandlerError::Unavailable(outbox_service::db::pool_error(&e)))?;
        match self.transaction(&mut client, handler, message).await {
            Err(HandlerError::Transient(reason)) if client.is_closed() => {
                Err(HandlerError::Unavailable(reason))
            }
            other => other,
        }
    }

    async fn transaction<H: Handler>(
        &self,
        client: &mut Object,
        handler: &H,
        message: &Incoming,
    ) -> Result<Handled, HandlerError> {
        let tx = client.transaction().await.map_err(|e| classify(&e))?;
        let recorded = tx
            .query_typed(&self.insert, &[(&message.message_id, Type::UUID)])
            .await
            .map_err(|e| classify(&e))?;
        if recorded.is_empty() {
            // Dropping `tx` rolls back: there was nothing to write anyway.
            return Ok(Handled::Duplicate);
        }
        // A panicking handler must not leave its delivery unacked forever:
        // it counts as a transient failure, so it ends in the dead-letter
        // queue if it keeps panicking.
        std::panic::AssertUnwindSafe(handler.handle(&tx, message))
            .catch_unwind()
            .await
            .map_err(|panic| {
                HandlerError::Transient(format!("handler panicked: {}", panic_text(&panic)))
            })??;
        // A commit that fails on a lost connection may still have happened;
        // the redelivery then finds the inbox row.
        tx.commit().await.map_err(|e| classify(&e))?;
        Ok(Handled::Committed)
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
