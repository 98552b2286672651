//! The relay's queries on `outbox.messages`: claim, mark, retry, release
//! and retention, over a small connection pool.

use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use serde_json::Value;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::db::{self, PgTarget};

/// A row leased to this relay for publishing.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub headers: Value,
    pub ordering_key: Option<String>,
    pub attempts: i32,
    /// When the row became pending: its enqueue, or its last replay (V5).
    pub pending_since: SystemTime,
}

/// Result of recording a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retried {
    /// Scheduled for another attempt.
    Later,
    /// Out of attempts: now a dead letter.
    Dead,
    /// Someone else settled the row meanwhile (published or released).
    Gone,
}

/// What the gauges show; see [`Store::stats`].
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Rows waiting to be published (counted up to [`PENDING_COUNT_CAP`]).
    pub pending: i64,
    pub oldest_pending: Duration,
    pub dead: i64,
    /// `pg_notification_queue_usage()`: the cluster's NOTIFY queue, 0 to 1.
    pub notification_queue_usage: f64,
}

/// Counting a huge backlog every few seconds would cost more than it tells.
pub const PENDING_COUNT_CAP: i64 = 1_000_000;

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    relay_id: String,
    /// Claim with a prepared statement (see [`Store::prepare_claims`]).
    prepared_claims: bool,
}

/// Pending rows in id order, skipping leased ones and, for an ordering key,
/// any row with an earlier unpublished row of the same key (only the head
/// of each key is claimable). $3 says whether a dead head blocks its key.
const CLAIM: &str = "
WITH picked AS (
    SELECT m.id FROM outbox.messages m
    WHERE m.published_at IS NULL AND m.dead_at IS NULL
      AND m.next_attempt_at <= now()
      AND (m.locked_until IS NULL OR m.locked_until < now())
      AND (m.ordering_key IS NULL OR NOT EXISTS (
            SELECT 1 FROM outbox.messages e
            WHERE e.ordering_key = m.ordering_key AND e.id < m.id
              AND e.published_at IS NULL
              AND ($3 OR e.dead_at IS NULL)))
    ORDER BY m.id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox.messages m
SET locked_by = $2, locked_until = now() + $4 * interval '1 millisecond'
FROM picked WHERE m.id = picked.id
RETURNING m.id, m.message_id, m.exchange, m.routing_key, m.payload, m.content_type,
          m.headers, m.ordering_key, m.attempts, coalesce(m.replayed_at, m.created_at)";

const CLAIM_TYPES: [Type; 4] = [Type::INT8, Type::TEXT, Type::BOOL, Type::FLOAT8];

const MARK_PUBLISHED: &str = "UPDATE outbox.messages \
     SET published_at = now(), locked_by = NULL, locked_until = NULL \
     WHERE id = ANY($1) AND published_at IS NULL";

/// Pending rows and the oldest one come from the pending-rows index (the
/// lowest pending id, not a min(created_at) over the whole backlog), dead
/// ones from the dead-rows index (V4).
const STATS: &str = "SELECT \
     (SELECT count(*) FROM (SELECT 1 FROM outbox.messages \
         WHERE published_at IS NULL AND dead_at IS NULL LIMIT $1) backlog), \
     coalesce(extract(epoch FROM now() - ( \
         SELECT coalesce(replayed_at, created_at) FROM outbox.messages \
         WHERE published_at IS NULL AND dead_at IS NULL \
         ORDER BY id LIMIT 1)), 0)::float8, \
     (SELECT count(*) FROM outbox.messages WHERE dead_at IS NOT NULL), \
     pg_notification_queue_usage()";

/// With a retention of zero, a confirmed row has no further use.
const DELETE_PUBLISHED: &str = "DELETE FROM outbox.messages WHERE id = ANY($1)";

const RETRY: &str = "UPDATE outbox.messages \
     SET attempts = attempts + 1, last_error = $2, \
         next_attempt_at = now() + $3 * interval '1 millisecond', \
         dead_at = CASE WHEN attempts + 1 >= $4 THEN now() END, \
         locked_by = NULL, locked_until = NULL \
     WHERE id = $1 AND published_at IS NULL AND dead_at IS NULL \
     RETURNING dead_at IS NOT NULL";

const RELEASE: &str = "UPDATE outbox.messages SET locked_by = NULL, locked_until = NULL \
     WHERE id = ANY($1) AND locked_by = $2 AND published_at IS NULL";

const DELETE_OLD: &str = "DELETE FROM outbox.messages WHERE id IN ( \
     SELECT id FROM outbox.messages \
     WHERE published_at < now() - $1 * interval '1 millisecond' \
     ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
     RETURNING 1";

impl Store {
    /// Builds the pool and takes one connection, so a wrong URL or a
    /// missing schema fails at start instead of on the first wake-up.
    pub async fn connect(target: &PgTarget, relay_id: &str) -> anyhow::Result<Store> {
        // The relay's own writes (leases, marks, attempts) need not wait for
        // a WAL flush: if the server crashes before flushing, a lost lease
        // frees its row, a lost mark republishes it with the same
        // message_id (consumers deduplicate), a lost attempt retries once
        // more. Two fsyncs per batch were the relay's throughput ceiling.
        let mut target = target.clone();
        let options = match target.config.get_options() {
            Some(given) => format!("{given} -c synchronous_commit=off"),
            None => "-c synchronous_commit=off".to_string(),
        };
        target.config.options(&options);
        let store = Store {
            pool: db::pool(&target, 4).await?,
            relay_id: relay_id.to_string(),
            prepared_claims: false,
        };
        let client = store.client().await.map_err(|e| anyhow::anyhow!(e))?;
        let installed: bool = client
            .query_one("SELECT to_regclass('outbox.messages') IS NOT NULL", &[])
            .await?
            .get(0);
        if !installed {
            anyhow::bail!(
                "the outbox schema is missing in {}: run `outbox-relay migrate` first",
                target.describe()
            );
        }
        Ok(store)
    }

    /// Claims through a statement prepared once per connection: no planning
    /// on the wake-up path (about 0.2 ms a claim here). Only where every
    /// connection is a session of its own: a pooler in transaction mode
    /// (PgBouncer before 1.21) loses prepared statements, and such set-ups
    /// run in poll mode, so notify mode turns this on.
    pub fn prepare_claims(mut self, prepared: bool) -> Store {
        self.prepared_claims = prepared;
        self
    }

    pub async fn claim(
        &self,
        limit: u32,
        lease: Duration,
        block_on_dead_head: bool,
    ) -> Result<Vec<Claimed>, String> {
        let client = self.client().await?;
        let lease_ms = lease.as_millis() as f64;
        let limit = i64::from(limit);
        let rows = if self.prepared_claims {
            let statement = client
                .prepare_typed_cached(CLAIM, &CLAIM_TYPES)
                .await
                .map_err(|e| outbox::error_line(&e))?;
            client
                .query(
                    &statement,
                    &[&limit, &self.relay_id, &block_on_dead_head, &lease_ms],
                )
                .await
        } else {
            client
                .query_typed(
                    CLAIM,
                    &[
                        (&limit, Type::INT8),
                        (&self.relay_id, Type::TEXT),
                        (&block_on_dead_head, Type::BOOL),
                        (&lease_ms, Type::FLOAT8),
                    ],
                )
                .await
        }
        .map_err(|e| outbox::error_line(&e))?;
        let mut claimed = rows
            .iter()
            .map(|row| {
                Ok(Claimed {
                    id: row.try_get(0)?,
                    message_id: row.try_get(1)?,
                    exchange: row.try_get(2)?,
                    routing_key: row.try_get(3)?,
                    payload: row.try_get(4)?,
                    content_type: row.try_get(5)?,
                    headers: row.try_get(6)?,
                    ordering_key: row.try_get(7)?,
                    attempts: row.try_get(8)?,
                    pending_since: row.try_get(9)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(|e| outbox::error_line(&e))?;
        // UPDATE ... RETURNING does not keep the CTE's order.
        claimed.sort_unstable_by_key(|row| row.id);
        Ok(claimed)
    }

    pub async fn mark_published(&self, ids: &[i64], delete: bool) -> Result<(), String> {
        let client = self.client().await?;
        let statement = if delete {
            DELETE_PUBLISHED
        } else {
            MARK_PUBLISHED
        };
        client
            .query_typed(statement, &[(&ids, Type::INT8_ARRAY)])
            .await
            .map_err(|e| outbox::error_line(&e))?;
        Ok(())
    }

    pub async fn retry(
        &self,
        id: i64,
        error: &str,
        delay: Duration,
        max_attempts: u32,
    ) -> Result<Retried, String> {
        let client = self.client().await?;
        let delay_ms = delay.as_millis() as f64;
        let row = client
            .query_typed(
                RETRY,
                &[
                    (&id, Type::INT8),
                    (&error, Type::TEXT),
                    (&delay_ms, Type::FLOAT8),
                    (&i64::from(max_attempts), Type::INT8),
                ],
            )
            .await
            .map_err(|e| outbox::error_line(&e))?;
        Ok(match row.first().map(|r| r.get::<_, bool>(0)) {
            Some(true) => Retried::Dead,
            Some(false) => Retried::Later,
            None => Retried::Gone,
        })
    }

    /// Gives leased rows back without counting an attempt.
    pub async fn release(&self, ids: &[i64]) -> Result<(), String> {
        let client = self.client().await?;
        client
            .query_typed(
                RELEASE,
                &[(&ids, Type::INT8_ARRAY), (&self.relay_id, Type::TEXT)],
            )
            .await
            .map_err(|e| outbox::error_line(&e))?;
        Ok(())
    }

    /// Deletes up to `limit` rows published longer ago than `retention`.
    pub async fn delete_published_before(
        &self,
        retention: Duration,
        limit: i64,
    ) -> Result<u64, String> {
        let client = self.client().await?;
        let retention_ms = retention.as_millis() as f64;
        let deleted = client
            .query_typed(
                DELETE_OLD,
                &[(&retention_ms, Type::FLOAT8), (&limit, Type::INT8)],
            )
            .await
            .map_err(|e| outbox::error_line(&e))?;
        Ok(deleted.len() as u64)
    }

    /// The gauges read from the database, in one round trip.
    pub async fn stats(&self) -> Result<Stats, String> {
        let client = self.client().await?;
        let rows = client
            .query_typed(STATS, &[(&PENDING_COUNT_CAP, Type::INT8)])
            .await
            .map_err(|e| outbox::error_line(&e))?;
        let row = rows.first().ok_or("the gauges query returned no row")?;
        let stats = || -> Result<Stats, tokio_postgres::Error> {
            Ok(Stats {
                pending: row.try_get(0)?,
                oldest_pending: Duration::from_secs_f64(row.try_get::<_, f64>(1)?.max(0.0)),
                dead: row.try_get(2)?,
                notification_queue_usage: row.try_get(3)?,
            })
        };
        stats().map_err(|e| outbox::error_line(&e))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, String> {
        self.pool.get().await.map_err(|e| db::pool_error(&e))
    }
}
