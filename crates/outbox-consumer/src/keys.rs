//! The key table beside the inbox (`<inbox>_keys`): each ordering key's
//! watermark, the highest `x-outbox-seq` of the key whose effect
//! committed (or that was dead-lettered). The inbox's transaction moves
//! it (see `inbox`); a lane reads it the first time it sees a key (see
//! `lanes`, `sequencer`), so a consumer that starts, or takes a queue
//! over, expects the number after what the last one committed. One row
//! per key; the inbox retention deletes the rows of keys idle past it.

use std::collections::HashMap;

use deadpool_postgres::Pool;
use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use crate::handler::{HandlerError, Incoming, classify};
use crate::message::numbered;

/// The key table's name and statements.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    table: String,
    advance: String,
    read: String,
    delete_idle: String,
}

impl Keys {
    /// The key table of the inbox `inbox` (a plain name, checked by the
    /// inbox).
    pub(crate) fn new(inbox: &str) -> Keys {
        let table = format!("{inbox}_keys");
        Keys {
            // Sorted, so two batches lock shared keys in the same order.
            advance: format!(
                "INSERT INTO {table} AS k (ordering_key, last_seq) \
                 SELECT key, seq FROM unnest($1::bytea[], $2::int8[]) AS t(key, seq) ORDER BY key \
                 ON CONFLICT (ordering_key) DO UPDATE \
                 SET last_seq = greatest(k.last_seq, excluded.last_seq), updated_at = now()"
            ),
            read: format!(
                "SELECT ordering_key, last_seq FROM {table} WHERE ordering_key = ANY($1::bytea[])"
            ),
            delete_idle: format!(
                "DELETE FROM {table} WHERE ordering_key IN (SELECT ordering_key FROM {table} \
                 WHERE updated_at < now() - $1 * interval '1 millisecond' \
                 LIMIT $2 FOR UPDATE SKIP LOCKED)"
            ),
            table,
        }
    }

    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    /// Its `CREATE TABLE IF NOT EXISTS`.
    pub(crate) fn create(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (ordering_key bytea PRIMARY KEY, \
             last_seq bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())",
            self.table
        )
    }

    /// Deletes keys idle longer than `$1` ms, at most `$2`.
    pub(crate) fn delete_idle(&self) -> &str {
        &self.delete_idle
    }

    /// Moves each of `keys` to its number in `seqs`, unless it is past it.
    pub(crate) async fn advance(
        &self,
        client: &impl GenericClient,
        keys: &[Vec<u8>],
        seqs: &[i64],
    ) -> Result<u64, tokio_postgres::Error> {
        let rows = client
            .query_typed(
                &self.advance,
                &[(&keys, Type::BYTEA_ARRAY), (&seqs, Type::INT8_ARRAY)],
            )
            .await?;
        Ok(rows.len() as u64)
    }

    /// Runs the statements with nothing to write (in the caller's
    /// transaction, rolled back): the column types of the watermark read.
    pub(crate) async fn probe(
        &self,
        client: &impl GenericClient,
    ) -> Result<Vec<Type>, tokio_postgres::Error> {
        let (keys, seqs) = (Vec::<Vec<u8>>::new(), Vec::<i64>::new());
        self.advance(client, &keys, &seqs).await?;
        let read = client
            .prepare_typed(&self.read, &[Type::BYTEA_ARRAY])
            .await?;
        client.query(&read, &[&keys]).await?;
        Ok(read.columns().iter().map(|c| c.type_().clone()).collect())
    }

    /// The highest number whose effect committed, for those of `keys` that
    /// have one.
    pub(crate) async fn watermarks(
        &self,
        pool: &Pool,
        keys: &[Vec<u8>],
    ) -> Result<Vec<(Vec<u8>, i64)>, HandlerError> {
        let client = pool
            .get()
            .await
            .map_err(|e| HandlerError::Unavailable(outbox_service::db::pool_error(&e)))?;
        let rows = client
            .query_typed(&self.read, &[(&keys, Type::BYTEA_ARRAY)])
            .await
            .map_err(|e| match classify(&e) {
                HandlerError::Transient(reason) if client.is_closed() => {
                    HandlerError::Unavailable(reason)
                }
                other => other,
            })?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| classify(&e))
    }

    /// Moves the watermarks of a message that was settled without a
    /// commit (dead-lettered), on its own: a consumer that starts later
    /// then does not wait for it.
    pub(crate) async fn advance_alone(
        &self,
        pool: &Pool,
        key: &[u8],
        seq: i64,
    ) -> Result<(), String> {
        let client = pool
            .get()
            .await
            .map_err(|e| outbox_service::db::pool_error(&e))?;
        self.advance(&**client, &[key.to_vec()], &[seq])
            .await
            .map(drop)
            .map_err(|e| outbox::error_line(&e))
    }
}

/// Each key's highest number among `messages` (an upsert may touch a row
/// only once).
pub(crate) fn highest_per_key(messages: &[&Incoming]) -> (Vec<Vec<u8>>, Vec<i64>) {
    let mut highest: HashMap<&[u8], i64> = HashMap::new();
    for (key, seq) in messages.iter().filter_map(|m| numbered(&m.properties)) {
        let top = highest.entry(key).or_insert(seq);
        *top = (*top).max(seq);
    }
    highest
        .into_iter()
        .map(|(key, seq)| (key.to_vec(), seq))
        .unzip()
}
