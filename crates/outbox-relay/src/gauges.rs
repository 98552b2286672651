//! The gauges the relay reads from the database every few seconds: the
//! backlog and its lag, dead letters, the NOTIFY queue, and what keeps
//! VACUUM from cleaning the outbox (the xmin horizon, dead tuples).

use std::time::Duration;

use crate::store::{Store, StoreError};

/// What the gauges show; see [`Store::stats`].
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Rows waiting to be published (counted up to [`PENDING_COUNT_CAP`]).
    pub pending: i64,
    pub oldest_pending: Duration,
    pub dead: i64,
    /// `pg_notification_queue_usage()`: the cluster's NOTIFY queue, 0 to 1.
    pub notification_queue_usage: f64,
    pub vacuum: Vacuum,
}

/// What holds VACUUM back; see [`VACUUM`].
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Vacuum {
    /// How long the oldest snapshot still needed has been held, in seconds.
    pub xmin_horizon_age_seconds: f64,
    /// How many transactions old the xmin horizon is.
    pub xmin_horizon_age_xids: i64,
    /// Dead row versions in `outbox.messages`, 0 to 1 (statistics).
    pub dead_tuple_ratio: f64,
    /// The same, counted.
    pub dead_tuples: i64,
    /// Whether autovacuum will clean `outbox.messages`: on for the server
    /// and not turned off for the table.
    pub autovacuum: bool,
    /// Whether the relay's role may `VACUUM outbox.messages` (its owner).
    pub can_vacuum: bool,
}

/// Counting a huge backlog every few seconds would cost more than it tells.
pub const PENDING_COUNT_CAP: i64 = 1_000_000;

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

/// The xmin horizon: the oldest snapshot any session, replication slot or
/// prepared transaction still holds, which VACUUM may not clean past.
/// Published rows' old versions then stay in the pending index and every
/// scan walks them (see `cursor`). In xids from `backend_xmin`, which every
/// role sees; in seconds from `xact_start`, which PostgreSQL shows only for
/// the relay's own role's sessions unless it has `pg_read_all_stats`.
pub const VACUUM: &str = "SELECT \
     greatest( \
         (SELECT max(extract(epoch FROM now() - xact_start)) FROM pg_stat_activity \
             WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid()), \
         (SELECT max(extract(epoch FROM now() - prepared)) FROM pg_prepared_xacts), \
         0)::float8, \
     greatest( \
         (SELECT max(age(backend_xmin)) FROM pg_stat_activity WHERE pid <> pg_backend_pid()), \
         (SELECT max(age(xmin)) FROM pg_replication_slots), \
         (SELECT max(age(transaction)) FROM pg_prepared_xacts), \
         0)::int8, \
     coalesce((SELECT n_dead_tup::float8 / nullif(n_live_tup + n_dead_tup, 0) \
         FROM pg_stat_user_tables WHERE relid = 'outbox.messages'::regclass), 0)::float8, \
     coalesce((SELECT n_dead_tup FROM pg_stat_user_tables \
         WHERE relid = 'outbox.messages'::regclass), 0)::int8, \
     current_setting('autovacuum')::bool AND NOT coalesce( \
         (SELECT 'autovacuum_enabled=false' = ANY(reloptions) FROM pg_class \
          WHERE oid = 'outbox.messages'::regclass), false), \
     coalesce((SELECT pg_has_role(relowner, 'USAGE') FROM pg_class \
      WHERE oid = 'outbox.messages'::regclass), false)";

/// Reads [`VACUUM`].
pub async fn vacuum(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Vacuum, tokio_postgres::Error> {
    let row = client.query_one(VACUUM, &[]).await?;
    Ok(Vacuum {
        xmin_horizon_age_seconds: row.try_get(0)?,
        xmin_horizon_age_xids: row.try_get(1)?,
        dead_tuple_ratio: row.try_get(2)?,
        dead_tuples: row.try_get(3)?,
        autovacuum: row.try_get(4)?,
        can_vacuum: row.try_get(5)?,
    })
}

impl Store {
    /// The gauges read from the database, in one round trip, within the
    /// statement deadline (they tell `/readyz` whether PostgreSQL answers
    /// while the relay is idle).
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            let row = client.query_one(STATS, &[&PENDING_COUNT_CAP]).await?;
            let stats = || -> Result<Stats, tokio_postgres::Error> {
                Ok(Stats {
                    pending: row.try_get(0)?,
                    oldest_pending: Duration::from_secs_f64(row.try_get::<_, f64>(1)?.max(0.0)),
                    dead: row.try_get(2)?,
                    notification_queue_usage: row.try_get(3)?,
                    vacuum: Vacuum::default(),
                })
            };
            let mut stats = stats().map_err(StoreError::from)?;
            stats.vacuum = vacuum(&**client).await.map_err(StoreError::from)?;
            Ok(stats)
        })
        .await
    }
    /// `VACUUM outbox.messages`, for a server whose autovacuum is off (see
    /// `maintenance`). It takes no lock that writers or the relay wait on.
    /// No statement deadline: a big table takes long; a frozen server
    /// holds only the upkeep task, and the drain reports the outage.
    pub async fn vacuum_messages(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .batch_execute("VACUUM outbox.messages")
            .await
            .map_err(StoreError::from)
    }
}
