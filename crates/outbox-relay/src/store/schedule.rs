//! Scheduled delivery's statements (V9): moving due rows from
//! `outbox.scheduled` into `outbox.messages`, the schedule's gauges, and
//! retention of cancelled rows (run by `Store::delete_expired`).

use std::time::Duration;

use tokio_postgres::types::Type;

use super::{Store, StoreError};
pub use outbox_admin::state::{SCHEDULE_STATS, SCHEDULED_COUNT_CAP, ScheduleStats, schedule_stats};

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

const RELEASE_DUE: &str = "SELECT released, refused, next_due_in FROM outbox.release_due($1)";

/// Retention of cancelled rows; see `Store::delete_expired`.
pub(super) const DELETE_CANCELLED: &str = "DELETE FROM outbox.scheduled WHERE id IN ( \
     SELECT id FROM outbox.scheduled \
     WHERE cancelled_at < now() - $1 * interval '1 millisecond' \
     ORDER BY cancelled_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
     RETURNING 1";

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
