//! What the outbox holds, read for people and for the relay's gauges: what
//! keeps VACUUM from cleaning the table, and the schedule (V9). The relay's
//! gauges and the operator commands share these statements.

use tokio_postgres::types::Type;

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

/// The schedule as the gauges and `status` show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ScheduleStats {
    /// Rows waiting for their time (counted up to [`SCHEDULED_COUNT_CAP`]).
    pub scheduled: i64,
    /// Seconds until the next one falls due (negative: overdue).
    pub next_due_in_seconds: Option<f64>,
    /// Cancelled rows not yet deleted by retention.
    pub cancelled: i64,
    /// Rows that fell due but could not be released (see [`Released`]).
    pub refused: i64,
}

/// Counting a million scheduled rows every few seconds costs more than it
/// tells: past this the count says "at least".
pub const SCHEDULED_COUNT_CAP: i64 = 1_000_000;

/// Every count by an index (a refused row is a cancelled one too): the
/// relay's sessions run without sequential scans.
pub const SCHEDULE_STATS: &str = "SELECT \
     (SELECT count(*) FROM (SELECT 1 FROM outbox.scheduled \
         WHERE cancelled_at IS NULL LIMIT $1) waiting), \
     extract(epoch FROM (SELECT deliver_at FROM outbox.scheduled WHERE cancelled_at IS NULL \
         ORDER BY deliver_at, id LIMIT 1) - now())::float8, \
     (SELECT count(*) FROM outbox.scheduled WHERE cancelled_at IS NOT NULL AND refused IS NULL), \
     (SELECT count(*) FROM outbox.scheduled WHERE cancelled_at IS NOT NULL AND refused IS NOT NULL)";

/// Reads [`ScheduleStats`] (for the gauges and `outbox-relay status`).
pub async fn schedule_stats(
    client: &impl tokio_postgres::GenericClient,
) -> Result<ScheduleStats, tokio_postgres::Error> {
    let row = client
        .query_typed_one(SCHEDULE_STATS, &[(&SCHEDULED_COUNT_CAP, Type::INT8)])
        .await?;
    Ok(ScheduleStats {
        scheduled: row.try_get(0)?,
        next_due_in_seconds: row.try_get(1)?,
        cancelled: row.try_get(2)?,
        refused: row.try_get(3)?,
    })
}
