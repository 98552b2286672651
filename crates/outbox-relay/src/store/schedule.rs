//! Scheduled delivery's statements (V9): moving due rows from
//! `outbox.scheduled` into `outbox.messages`, the schedule's gauges, and
//! retention of cancelled rows (run by `Store::delete_expired`).

use std::time::Duration;

use tokio_postgres::types::Type;

use super::{Store, StoreError};

/// What one [`Store::release_due`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Released {
    /// Rows moved into `outbox.messages`, now claimable.
    pub released: u64,
    /// Due rows that could not move (their message_id was taken
    /// meanwhile): marked refused in `outbox.scheduled`.
    pub refused: u64,
    /// When the next scheduled row falls due, from now: `None` when none
    /// is scheduled, zero when one is due already (held by another relay's
    /// release or a writer's open `outbox.cancel`).
    pub next_due_in: Option<Duration>,
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

const RELEASE_DUE: &str = "SELECT released, refused, next_due_in FROM outbox.release_due($1)";

/// Every count by an index (a refused row is a cancelled one too): the
/// relay's sessions run without sequential scans.
pub const SCHEDULE_STATS: &str = "SELECT \
     (SELECT count(*) FROM (SELECT 1 FROM outbox.scheduled \
         WHERE cancelled_at IS NULL LIMIT $1) waiting), \
     extract(epoch FROM (SELECT deliver_at FROM outbox.scheduled WHERE cancelled_at IS NULL \
         ORDER BY deliver_at, id LIMIT 1) - now())::float8, \
     (SELECT count(*) FROM outbox.scheduled WHERE cancelled_at IS NOT NULL AND refused IS NULL), \
     (SELECT count(*) FROM outbox.scheduled WHERE cancelled_at IS NOT NULL AND refused IS NOT NULL)";

/// Retention of cancelled rows; see `Store::delete_expired`.
pub(super) const DELETE_CANCELLED: &str = "DELETE FROM outbox.scheduled WHERE id IN ( \
     SELECT id FROM outbox.scheduled \
     WHERE cancelled_at < now() - $1 * interval '1 millisecond' \
     ORDER BY cancelled_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
     RETURNING 1";

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

impl Store {
    /// Moves up to `rows` due rows into `outbox.messages` (`outbox.release_due`).
    pub async fn release_due(&self, rows: i32) -> Result<Released, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            let row = client
                .query_typed_one(RELEASE_DUE, &[(&rows, Type::INT4)])
                .await?;
            let released: i64 = row.try_get(0)?;
            let refused: i64 = row.try_get(1)?;
            let next_due_in: Option<f64> = row.try_get(2)?;
            Ok(Released {
                released: released.max(0) as u64,
                refused: refused.max(0) as u64,
                // NaN and infinities (a time the schema refuses, written
                // behind its back) would panic in from_secs_f64.
                next_due_in: next_due_in
                    .map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)),
            })
        })
        .await
    }

    /// The schedule's gauges, in one round trip.
    pub async fn schedule_stats(&self) -> Result<ScheduleStats, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            Ok(schedule_stats(&**client).await?)
        })
        .await
    }
}
