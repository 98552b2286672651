//! The effectively-once step. In one transaction: record the message ids
//! of a batch in the inbox table, run the handler for each new one in
//! delivery order, commit. A message whose id is in the inbox already was
//! handled before, so it changes nothing; two copies in flight at once
//! serialize on the inbox row's primary key.
//!
//! The same transaction moves each key's watermark (`<inbox>_keys`: the
//! highest `x-outbox-seq` of the key whose effect committed), so a
//! consumer that starts, or takes over a queue, knows which number each
//! key expects next (see `sequencer`). Dedup stays with the inbox: a
//! message below the watermark may be one that came late, past a gap the
//! consumer gave up waiting for, and it is handled, not dropped.

use std::collections::HashSet;
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::handler::{BatchError, Handler, HandlerError, Incoming, caught, classify};
use crate::keys::{Keys, highest_per_key};
use crate::spans::Timeline;

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
    /// `handle_batch` failed without naming the message at fault.
    Somewhere(HandlerError),
}

/// The inbox table: any table with a `message_id uuid` primary key.
#[derive(Debug, Clone)]
pub struct Inbox {
    table: String,
    /// Its key table.
    pub(crate) keys: Keys,
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
            keys: Keys::new(table),
            // Sorted, so two batches holding copies of the same messages
            // lock them in the same order; the conflict target makes an
            // inbox without a unique `message_id` (which would dedup
            // nothing) an error.
            insert: format!(
                "INSERT INTO {table} (message_id) SELECT id FROM unnest($1::uuid[]) AS id \
                 ORDER BY id ON CONFLICT (message_id) DO NOTHING RETURNING message_id"
            ),
            delete_expired: format!(
                "DELETE FROM {table} WHERE message_id IN (SELECT message_id FROM {table} \
                 WHERE processed_at < now() - $1 * interval '1 millisecond' \
                 LIMIT $2 FOR UPDATE SKIP LOCKED)"
            ),
        })
    }

    /// The key watermark table: the inbox table's name with `_keys`.
    pub fn keys_table(&self) -> &str {
        self.keys.table()
    }

    /// Creates the inbox and key watermark tables if they are missing (the
    /// schema must exist): for users without a migration of their own.
    /// `message_id` is all the inbox needs, `processed_at` serves a
    /// retention job; the key table holds one row per ordering key.
    pub async fn create_table(
        &self,
        client: &impl tokio_postgres::GenericClient,
    ) -> Result<(), tokio_postgres::Error> {
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {} (message_id uuid PRIMARY KEY, \
             processed_at timestamptz NOT NULL DEFAULT now()); {}",
            self.table,
            self.keys.create()
        );
        client.batch_execute(&create).await
    }

    /// Fails when the inbox or the key table cannot serve: missing, out of
    /// the role's reach, a column of another type, an inbox without a
    /// unique `message_id`. Each statement the consumer runs on them is
    /// run once with nothing to write, in a transaction rolled back, and
    /// an error of SQLSTATE class 42 is fatal, with the fix in the message.
    /// A database that does not answer is not checked: the lanes wait it
    /// out.
    pub(crate) async fn check(&self, pool: &Pool) -> anyhow::Result<()> {
        let Ok(mut client) = pool.get().await else {
            return Ok(());
        };
        let client: &mut tokio_postgres::Client = &mut client;
        let Ok(tx) = client.transaction().await else {
            return Ok(());
        };
        let ids = Vec::<Uuid>::new();
        let probed = async {
            tx.query_typed(&self.insert, &[(&ids, Type::UUID_ARRAY)])
                .await?;
            self.keys.probe(&tx).await
        }
        .await;
        let fix = format!(
            "create them with Inbox::create_table, or see the consumer's README for \
             `{}` and `{}`",
            self.table,
            self.keys.table()
        );
        match probed {
            Ok(types) if types == [Type::BYTEA, Type::INT8] => Ok(()),
            Ok(types) => anyhow::bail!(
                "table `{}` has ordering_key {} and last_seq {}, not bytea and bigint ({fix})",
                self.keys.table(),
                types.first().map_or("?", |t| t.name()),
                types.get(1).map_or("?", |t| t.name()),
            ),
            Err(error) if error.code().is_some_and(|c| c.code().starts_with("42")) => {
                anyhow::bail!(
                    "cannot use the inbox `{}` or its key table `{}`: {} ({fix})",
                    self.table,
                    self.keys.table(),
                    outbox::error_line(&error)
                )
            }
            Err(_) => Ok(()),
        }
    }

    /// Deletes up to `limit` rows processed more than `retention` ago (see
    /// `retention`), of the inbox or, with `keys`, of the keys idle that
    /// long; how many.
    pub(crate) async fn delete_expired(
        &self,
        client: &impl tokio_postgres::GenericClient,
        keys: bool,
        retention: Duration,
        limit: i64,
    ) -> Result<u64, tokio_postgres::Error> {
        let millis = retention.as_secs_f64() * 1000.0;
        let delete = if keys {
            self.keys.delete_idle()
        } else {
            &self.delete_expired
        };
        client
            .execute_typed(delete, &[(&millis, Type::FLOAT8), (&limit, Type::INT8)])
            .await
    }

    /// Handles each of `messages` once, in one transaction. A failure on a
    /// connection that is gone is `Unavailable`, whatever the query said:
    /// the server, not the message, is at fault.
    /// `one_by_one` calls the handler's `handle` for each message instead
    /// of its `handle_batch`, to find the one at fault.
    pub(crate) async fn handle<H: Handler>(
        &self,
        pool: &Pool,
        handler: &H,
        messages: &[&Incoming],
        one_by_one: bool,
        steps: &mut Timeline,
    ) -> Result<Vec<Handled>, BatchFailure> {
        let mut client = pool.get().await.map_err(|e| {
            BatchFailure::Batch(HandlerError::Unavailable(outbox_service::db::pool_error(
                &e,
            )))
        })?;
        let result = self
            .transaction(&mut client, handler, messages, one_by_one, steps)
            .await;
        let closed = client.is_closed();
        let unavailable = |error| match error {
            HandlerError::Transient(reason) if closed => HandlerError::Unavailable(reason),
            other => other,
        };
        result.map_err(|failure| match failure {
            BatchFailure::Message(at, error) => BatchFailure::Message(at, unavailable(error)),
            BatchFailure::Batch(error) => BatchFailure::Batch(unavailable(error)),
            BatchFailure::Somewhere(error) => BatchFailure::Somewhere(unavailable(error)),
        })
    }

    async fn transaction<H: Handler>(
        &self,
        client: &mut Object,
        handler: &H,
        messages: &[&Incoming],
        one_by_one: bool,
        steps: &mut Timeline,
    ) -> Result<Vec<Handled>, BatchFailure> {
        // From here: a connection in hand (the pool's wait is not the inbox's).
        steps.began = Timeline::now();
        let batch = |e: tokio_postgres::Error| BatchFailure::Batch(classify(&e));
        // tokio-postgres' own transaction (not deadpool's wrapper): the
        // commit below is sent by hand, and only this type can then be
        // forgotten without leaking anything.
        let client: &mut tokio_postgres::Client = client;
        let tx = client.transaction().await.map_err(batch)?;
        let ids: Vec<Uuid> = messages.iter().map(|m| m.message_id).collect();
        let (keys, seqs) = highest_per_key(messages);
        let id_params = [(&ids as &(dyn ToSql + Sync), Type::UUID_ARRAY)];
        let inserted = tx.query_typed(&self.insert, &id_params);
        // Sent with the insert, in one round trip. A copy's number is at
        // or below its key's watermark already, so counting it moves
        // nothing.
        let advanced = async {
            if keys.is_empty() {
                return Ok(0);
            }
            self.keys.advance(&tx, &keys, &seqs).await
        };
        let (inserted, _) = futures::try_join!(inserted, advanced).map_err(batch)?;
        steps.inserted = Timeline::now();
        let mut new: HashSet<Uuid> = inserted.iter().map(|row| row.get(0)).collect();
        let mut handled = Vec::with_capacity(messages.len());
        let mut fresh = Vec::with_capacity(messages.len());
        let mut positions = Vec::with_capacity(messages.len());
        for (at, message) in messages.iter().enumerate() {
            // A second copy in the same batch is a duplicate too.
            if new.remove(&message.message_id) {
                handled.push(Handled::Committed);
                fresh.push(*message);
                positions.push(at);
            } else {
                handled.push(Handled::Duplicate);
            }
        }
        if fresh.is_empty() {
            // Dropping `tx` rolls back: there was nothing to write anyway.
            return Ok(handled);
        }
        let written = if one_by_one {
            let mut written = Ok(());
            for (at, message) in fresh.iter().enumerate() {
                let handled = caught(handler.handle(&tx, message)).await;
                if let Err(error) = handled.and_then(|handled| handled) {
                    written = Err(BatchError::at(at, error));
                    break;
                }
            }
            written
        } else {
            // A panic in the user's own `handle_batch` names no message.
            caught(handler.handle_batch(&tx, &fresh))
                .await
                .map_err(BatchError::somewhere)
                .and_then(|handled| handled)
        };
        written.map_err(|failed| match failed.index.and_then(|i| positions.get(i)) {
            Some(&at) => BatchFailure::Message(at, failed.error),
            None => BatchFailure::Somewhere(failed.error),
        })?;
        steps.handled = Timeline::now();
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
        steps.committed = Timeline::now();
        Ok(handled)
    }
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
