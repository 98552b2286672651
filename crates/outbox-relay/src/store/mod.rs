//! The relay's queries on `outbox.messages`: claim, mark, retry, release
//! and retention, over a small connection pool.

mod claim;
mod schedule;

pub use claim::{CLAIM, CLAIM_KEYLESS, CLAIM_TYPES, Claim, ClaimLimits};
pub use schedule::{Released, SCHEDULE_STATS, SCHEDULED_COUNT_CAP, ScheduleStats, schedule_stats};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio_postgres::types::Type;
use uuid::Uuid;

use outbox_service::db::{self, PgTarget};

/// A row leased to this relay for publishing.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub message_id: Uuid,
    /// The lease token (`locked_by`): unique to the claim that took the
    /// row, so a relay whose lease expired cannot settle the row after
    /// another claim (its own included) took it over.
    pub lease: String,
    pub exchange: String,
    pub routing_key: String,
    /// Shared, not copied, with the publish that sends it.
    pub payload: Bytes,
    pub content_type: String,
    /// `{}` when the stored headers cannot be decoded (see `problem`).
    pub headers: Value,
    /// Why this row cannot be published as stored (headers JSON that
    /// serde cannot hold: a number beyond f64, nesting past its limit).
    /// The row's own fault: an attempt, never a failed claim.
    pub problem: Option<String>,
    pub ordering_key: Option<String>,
    /// The row's number among its key's messages (`x-outbox-seq`).
    pub key_seq: Option<i64>,
    pub attempts: i32,
    /// When the row became pending: its enqueue, its due time if it was
    /// scheduled (V9), or its last replay (V5).
    pub pending_since: SystemTime,
    /// Released from `outbox.scheduled` (and not replayed since):
    /// `pending_since` is its `deliver_at`.
    pub scheduled: bool,
}

impl Claimed {
    /// The row as the marker fences it: its id and lease token.
    pub(crate) fn held(self) -> (i64, String) {
        (self.id, self.lease)
    }
}

#[cfg(test)]
impl Claimed {
    /// A keyless row of ten bytes, for unit tests.
    pub(crate) fn for_test(id: i64) -> Claimed {
        Claimed {
            id,
            message_id: Uuid::new_v4(),
            lease: "test#1".into(),
            exchange: "x".into(),
            routing_key: String::new(),
            payload: Bytes::from(vec![0; 10]),
            content_type: "application/json".into(),
            headers: serde_json::json!({}),
            problem: None,
            ordering_key: None,
            key_seq: None,
            attempts: 0,
            pending_since: std::time::SystemTime::now(),
            scheduled: false,
        }
    }
}

/// Why a statement of the relay failed, its kind kept for
/// `fault_policy::store_directive` (wait and retry, or refused).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// PostgreSQL answered with an error (its SQLSTATE says which), or
    /// the connection failed.
    #[error("{}", outbox::error_line(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The pool had no connection to give (deadpool's reason).
    #[error("{0}")]
    NoConnection(String),
    /// No answer within the statement's deadline.
    #[error("PostgreSQL did not answer within {0:?}")]
    NoAnswer(Duration),
}

/// What retention deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// Rows of `outbox.messages` published longer ago than the retention.
    Published,
    /// Rows of `outbox.scheduled` cancelled (or refused) that long ago.
    Cancelled,
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

/// How long a relay statement waits for a row lock before giving up.
const LOCK_TIMEOUT_MS: u32 = 2_000;
/// How long any of the relay's statements may take, connection included.
/// A server that stops answering without closing anything (under
/// SIGSTOP, behind a black-holed network) would otherwise hold a claim, a
/// mark or the gauges forever, and `/readyz` would say ready throughout:
/// past this it is an outage (the drain pauses, `/readyz` says
/// PostgreSQL). TCP keepalives do not help there: a stalled peer's kernel,
/// or a proxy's, still answers them. Generous next to the lock timeout.
pub const STATEMENT_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    relay_id: String,
    /// Claims made so far: the lease token's counter.
    claims: Arc<AtomicU64>,
    /// Claim and mark with prepared statements (see
    /// [`Store::prepare_statements`]).
    prepared: bool,
}

/// Every state change is fenced on the lease token: only rows this
/// relay's claim still holds change.
const MARK_PUBLISHED: &str = "UPDATE outbox.messages m \
     SET published_at = now(), locked_by = NULL, locked_until = NULL \
     FROM unnest($1::int8[], $2::text[]) AS held(id, lease) \
     WHERE m.id = held.id AND m.locked_by = held.lease AND m.published_at IS NULL";

/// With a retention of zero, a confirmed row has no further use.
const DELETE_PUBLISHED: &str = "DELETE FROM outbox.messages m \
     USING unnest($1::int8[], $2::text[]) AS held(id, lease) \
     WHERE m.id = held.id AND m.locked_by = held.lease";

const RETRY: &str = "UPDATE outbox.messages \
     SET attempts = attempts + 1, last_error = $2, \
         next_attempt_at = now() + $3 * interval '1 millisecond', \
         dead_at = CASE WHEN attempts + 1 >= $4 THEN now() END, \
         locked_by = NULL, locked_until = NULL \
     WHERE id = $1 AND locked_by = $5 AND published_at IS NULL AND dead_at IS NULL \
     RETURNING dead_at IS NOT NULL";

const RELEASE: &str = "UPDATE outbox.messages m SET locked_by = NULL, locked_until = NULL \
     FROM unnest($1::int8[], $2::text[]) AS held(id, lease) \
     WHERE m.id = held.id AND m.locked_by = held.lease AND m.published_at IS NULL";

const DELETE_OLD: &str = "DELETE FROM outbox.messages WHERE id IN ( \
     SELECT id FROM outbox.messages \
     WHERE published_at < now() - $1 * interval '1 millisecond' \
     ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
     RETURNING 1";

/// Sessions holding a wake-up advisory lock (1869968482, 1 or 2) in this
/// database that are not listening relays: an exclusive hold (a writer
/// mid-commit, briefly; a transaction that fired the trigger early, or
/// anyone, for long) or a shared one under another name. With the holder's
/// transaction (`virtualtransaction`, visible to every role): a busy
/// writer seen at two checks is seen in two transactions, not one.
const WAKE_LOCK_HOLDERS: &str = "SELECT coalesce(l.pid, 0), l.objid::int8, l.mode, \
     coalesce(a.usename::text, '?'), coalesce(l.virtualtransaction, '?') FROM pg_locks l \
     LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
     WHERE l.locktype = 'advisory' AND l.classid = 1869968482 AND l.objsubid = 2 \
       AND l.objid IN (1, 2) AND l.granted \
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
       AND (l.mode = 'ExclusiveLock' OR coalesce(a.application_name, '') <> $1)";

/// A session found holding a wake-up lock; see [`Store::wake_lock_holders`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WakeLockHolder {
    /// 0 for a prepared transaction.
    pub pid: i32,
    /// 1: the drain lock, 2: the listener lock.
    pub lock: i64,
    pub mode: String,
    pub role: String,
    /// The holder's current transaction (`backend/local id`; `…/0` while
    /// idle, which is how a session-level lock stays the same holder).
    pub transaction: String,
}

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
        // No lock the relay waits on may stall it: another role holding a
        // row lock (claims skip locked rows; marks wait) times out, and the
        // marker sets that row aside.
        // Every statement of the relay finds its rows by an index, but a
        // plan made while the table was small (a prepared claim's generic
        // plan, cached for the connection's life) joined the claimed ids to
        // a sequential scan of outbox.messages: 2.2 ms of a 2.5 ms claim
        // after 5,000 rows, growing with the table and so with the rate.
        // Without sequential scans (still taken where no index serves)
        // plans stay on the indexes whatever the table's size was; and
        // generic plans always, or each mark (its arrays' lengths known
        // only at bind) was planned again: 0.2 ms a mark. No JIT: a
        // sequential scan left where no index serves is costed so high
        // that it crosses jit_above_cost, and compiling took 180 ms of a
        // statement that reads an empty table (the schedule's gauges,
        // before they went by index); the relay's statements are short.
        let ours = format!(
            "-c synchronous_commit=off -c lock_timeout={LOCK_TIMEOUT_MS} -c enable_seqscan=off -c plan_cache_mode=force_generic_plan -c jit=off"
        );
        let options = match target.config.get_options() {
            Some(given) => format!("{given} {ours}"),
            None => ours,
        };
        target.config.options(&options);
        let store = Store {
            pool: db::pool(&target, 4).await?,
            relay_id: relay_id.to_string(),
            claims: Arc::new(AtomicU64::new(0)),
            prepared: false,
        };
        let client = store.client().await.map_err(|e| anyhow::anyhow!(e))?;
        // The newest migration's function stands for the whole schema: an
        // older one would fail every claim (an outage, waited out forever).
        let schema = client
            .query_one(
                "SELECT to_regclass('outbox.messages') IS NOT NULL, \
                        to_regprocedure('outbox.release_due(integer)') IS NOT NULL",
                &[],
            )
            .await?;
        if !schema.try_get::<_, bool>(0)? {
            anyhow::bail!(
                "the outbox schema is missing in {}: run `outbox-relay migrate` first",
                target.describe()
            );
        }
        if !schema.try_get::<_, bool>(1)? {
            anyhow::bail!(
                "the outbox schema in {} is older than this relay (V9, scheduled delivery, is missing): \
                 run `outbox-relay migrate` first",
                target.describe()
            );
        }
        Ok(store)
    }

    /// Claims and marks through statements prepared once per connection:
    /// no parsing or planning on the wake-up path (about 0.2 ms a claim
    /// here, 0.1 ms a mark). Only where every
    /// connection is a session of its own: a pooler in transaction mode
    /// (PgBouncer before 1.21) loses prepared statements, and such set-ups
    /// run in poll mode, so notify mode turns this on.
    pub fn prepare_statements(mut self, prepared: bool) -> Store {
        self.prepared = prepared;
        self
    }

    /// The relay's id: its leases' prefix, and its broker connection's name.
    pub(crate) fn relay_id(&self) -> &str {
        &self.relay_id
    }

    /// `relay-id#n`: a fresh lease token per claim.
    fn next_lease(&self) -> String {
        let n = self.claims.fetch_add(1, Ordering::Relaxed);
        format!("{}#{n}", self.relay_id)
    }

    /// Marks (or, with `delete`, deletes) rows still held under `leases`.
    pub async fn mark_published(
        &self,
        held: &[(i64, String)],
        delete: bool,
    ) -> Result<(), StoreError> {
        let statement = if delete {
            DELETE_PUBLISHED
        } else {
            MARK_PUBLISHED
        };
        self.execute_held(statement, held).await
    }

    pub async fn retry(
        &self,
        row: &Claimed,
        error: &str,
        delay: Duration,
        max_attempts: u32,
    ) -> Result<Retried, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            let delay_ms = delay.as_millis() as f64;
            // PostgreSQL text cannot hold NUL; a broker's text might.
            let error = error.replace('\0', "");
            let row = client
                .query_typed(
                    RETRY,
                    &[
                        (&row.id, Type::INT8),
                        (&error, Type::TEXT),
                        (&delay_ms, Type::FLOAT8),
                        (&i64::from(max_attempts), Type::INT8),
                        (&row.lease, Type::TEXT),
                    ],
                )
                .await
                .map_err(StoreError::from)?;
            Ok(match row.first().map(|r| r.try_get::<_, bool>(0)) {
                Some(Ok(true)) => Retried::Dead,
                Some(Ok(false)) => Retried::Later,
                Some(Err(e)) => return Err(e.into()),
                None => Retried::Gone,
            })
        })
        .await
    }

    /// Gives leased rows back without counting an attempt.
    pub async fn release(&self, held: &[(i64, String)]) -> Result<(), StoreError> {
        self.execute_held(RELEASE, held).await
    }

    async fn execute_held(
        &self,
        statement: &str,
        held: &[(i64, String)],
    ) -> Result<(), StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            let ids: Vec<i64> = held.iter().map(|(id, _)| *id).collect();
            let leases: Vec<&str> = held.iter().map(|(_, lease)| lease.as_str()).collect();
            let executed = if self.prepared {
                // A mark follows nearly every claim under load: parsing it
                // each time cost about a third of its server time.
                let types = [Type::INT8_ARRAY, Type::TEXT_ARRAY];
                let prepared = client.prepare_typed_cached(statement, &types).await;
                match prepared {
                    Ok(prepared) => client.execute(&prepared, &[&ids, &leases]).await,
                    Err(error) => Err(error),
                }
            } else {
                let params = [
                    (&ids as _, Type::INT8_ARRAY),
                    (&leases as _, Type::TEXT_ARRAY),
                ];
                client.query_typed(statement, &params).await.map(|_| 0)
            };
            executed.map_err(StoreError::from)?;
            Ok(())
        })
        .await
    }

    /// Deletes up to `limit` rows that `what` names, older than `retention`.
    pub async fn delete_expired(
        &self,
        what: Expired,
        retention: Duration,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let statement = match what {
            Expired::Published => DELETE_OLD,
            Expired::Cancelled => schedule::DELETE_CANCELLED,
        };
        self.bounded(async {
            let client = self.client().await?;
            let retention_ms = retention.as_millis() as f64;
            let deleted = client
                .query_typed(
                    statement,
                    &[(&retention_ms, Type::FLOAT8), (&limit, Type::INT8)],
                )
                .await
                .map_err(StoreError::from)?;
            Ok(deleted.len() as u64)
        })
        .await
    }

    /// Who else holds the wake-up locks (`relays_name`: what listening
    /// relays call their sessions).
    pub async fn wake_lock_holders(
        &self,
        relays_name: &str,
    ) -> Result<Vec<WakeLockHolder>, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            let rows = client
                .query_typed(WAKE_LOCK_HOLDERS, &[(&relays_name, Type::TEXT)])
                .await
                .map_err(StoreError::from)?;
            rows.iter()
                .map(|row| {
                    Ok(WakeLockHolder {
                        pid: row.try_get(0)?,
                        lock: row.try_get(1)?,
                        mode: row.try_get(2)?,
                        role: row.try_get(3)?,
                        transaction: row.try_get(4)?,
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()
                .map_err(StoreError::from)
        })
        .await
    }

    /// Runs `work` within [`STATEMENT_DEADLINE`]. A statement that does
    /// not answer in time leaves its connection busy: dropped with `work`,
    /// it went back to the pool, where the next statement would queue
    /// behind it, so every idle connection is let go (new ones are made,
    /// within the pool's create timeout).
    pub(crate) async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.within(STATEMENT_DEADLINE, work).await
    }

    /// Runs `work` within `deadline`, as [`Store::bounded`] does.
    async fn within<T>(
        &self,
        deadline: Duration,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(deadline, work).await {
            Ok(result) => result,
            Err(_) => {
                self.pool.retain(|_, _| false);
                Err(StoreError::NoAnswer(deadline))
            }
        }
    }

    /// `SELECT 1` within `deadline`, for `/readyz`; a connection that did
    /// not answer is let go as in [`Store::bounded`].
    pub async fn ping(&self, deadline: Duration) -> Result<(), StoreError> {
        self.within(deadline, async {
            let client = self.client().await?;
            client
                .simple_query("SELECT 1")
                .await
                .map(drop)
                .map_err(StoreError::from)
        })
        .await
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::NoConnection(db::pool_error(&e)))
    }
}
