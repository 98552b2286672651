//! Scheduled delivery, the relay's side. Rows written with a future
//! `deliver_at` wait in `outbox.scheduled` (V9), outside every index a
//! claim reads; the relay moves them into `outbox.messages` when they fall
//! due (`outbox.release_due`), and then claims and publishes them like any
//! other row.
//!
//! The relay wakes for the next due time, which every release reads
//! back. Rows written since are learnt at the next look, at most
//! [`LOOK_AGAIN`] later, or at once when the writer's wake-up says a row
//! falls due within 2 s. Several relays release at once without moving a
//! row twice (the release skips rows another one holds).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::meters::Meters;
use crate::store::{Store, StoreError};

/// How long the relay goes without looking at the schedule: a row written
/// further ahead than this is released on time.
const LOOK_AGAIN: Duration = Duration::from_secs(1);
/// Rows moved per statement: short transactions next to the app's writes
/// of the same keys (a release takes each key's lock, like a writer).
const RELEASE_BATCH: i32 = 1000;
/// A due row another session holds (another relay releasing it, or a
/// writer's `outbox.cancel` in an open transaction) is looked at again
/// after this.
const HELD_RETRY: Duration = Duration::from_millis(20);

pub(crate) struct Schedule {
    next_look: Instant,
    /// Raised by a wake-up about a row due soon (see `wakeup`).
    changed: Arc<AtomicBool>,
    meters: Meters,
}

impl Schedule {
    pub(crate) fn new(changed: Arc<AtomicBool>, meters: Meters) -> Schedule {
        Schedule {
            next_look: Instant::now(),
            changed,
            meters,
        }
    }

    /// When the relay must look at the schedule next, at the latest.
    pub(crate) fn next_look(&self) -> Instant {
        self.next_look
    }

    /// Whether a look is due: a row may have fallen due.
    pub(crate) fn due(&self, now: Instant) -> bool {
        now >= self.next_look || self.changed.load(Ordering::Relaxed)
    }

    /// Moves every due row into `outbox.messages`; returns how many.
    pub(crate) async fn release(&mut self, store: &Store) -> Result<u64, StoreError> {
        self.changed.store(false, Ordering::Relaxed);
        let mut total = 0;
        loop {
            let released = store.release_due(RELEASE_BATCH).await?;
            total += released.released;
            self.meters.scheduled_released.increment(released.released);
            if released.refused > 0 {
                self.meters.scheduled_refused.increment(released.refused);
                tracing::warn!(
                    rows = released.refused,
                    "scheduled messages fell due whose message_id was already in outbox.messages; \
                     left in outbox.scheduled as refused (see outbox.scheduled_messages)"
                );
            }
            if released.released + released.refused < RELEASE_BATCH as u64 {
                self.next_look = Instant::now()
                    + match released.next_due_in {
                        None => LOOK_AGAIN,
                        Some(wait) if wait.is_zero() => HELD_RETRY,
                        Some(wait) => wait.min(LOOK_AGAIN),
                    };
                return Ok(total);
            }
        }
    }
}
