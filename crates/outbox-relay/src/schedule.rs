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

use crate::fault_policy::{StoreDirective, store_directive};
use crate::meters::Meters;
use crate::store::{Store, StoreError};

/// How long the relay goes without looking at the schedule: a row written
/// further ahead than this is released on time.
const LOOK_AGAIN: Duration = Duration::from_secs(1);
/// Rows moved per statement: short transactions next to the app's writes
/// of the same keys (a release holds the locks of the keys it moves, as a
/// writer does, until it commits).
const RELEASE_BATCH: i32 = 1000;
/// A due row another session holds (another relay releasing it, a
/// writer's `outbox.cancel` in an open transaction, a writer holding its
/// key's lock) is looked at again after this, doubled while it stays held
/// up to [`LOOK_AGAIN`].
const HELD_RETRY: Duration = Duration::from_millis(20);
/// How often a refusal to release (the relay's role lacking
/// `outbox.release_due`, say) is logged: the rest of the outbox is
/// published meanwhile.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

pub(crate) struct Schedule {
    next_look: Instant,
    /// The wait after a look that found a due row held (see [`HELD_RETRY`]).
    held_retry: Duration,
    /// When a refusal was last logged.
    refusal_logged: Option<Instant>,
    /// Raised by a wake-up about a row due soon (see `wakeup`).
    changed: Arc<AtomicBool>,
    meters: Meters,
}

impl Schedule {
    pub(crate) fn new(changed: Arc<AtomicBool>, meters: Meters) -> Schedule {
        Schedule {
            next_look: Instant::now(),
            held_retry: HELD_RETRY,
            refusal_logged: None,
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

    /// Moves due rows into `outbox.messages`, one batch; returns how many.
    /// A full batch leaves the next look due at once: a backlog of due rows
    /// (after the relay was down) is released batch by batch between
    /// claims, not all before the first. Fails only when the database is
    /// away (an outage, as for a claim); a statement it refuses is logged,
    /// and tried again at the next look.
    pub(crate) async fn release(&mut self, store: &Store) -> Result<u64, StoreError> {
        self.changed.store(false, Ordering::Relaxed);
        let released = match store.release_due(RELEASE_BATCH).await {
            Ok(released) => released,
            Err(error) if store_directive(&error) == StoreDirective::Refused => {
                self.refused(&error);
                return Ok(0);
            }
            Err(error) => return Err(error),
        };
        self.meters.scheduled_released.increment(released.released);
        if released.refused > 0 {
            self.meters.scheduled_refused.increment(released.refused);
            tracing::warn!(
                rows = released.refused,
                "scheduled messages fell due whose message_id was already in outbox.messages; \
                 left in outbox.scheduled as refused (see outbox.scheduled_messages)"
            );
        }
        let full = released.released + released.refused >= RELEASE_BATCH as u64;
        // Something is due, yet nothing moved: another session holds it.
        let held = !full && released.released == 0 && released.next_due_in == Some(Duration::ZERO);
        let wait = if full {
            Duration::ZERO
        } else if held {
            let wait = self.held_retry;
            self.held_retry = (wait * 2).min(LOOK_AGAIN);
            wait
        } else {
            self.held_retry = HELD_RETRY;
            released
                .next_due_in
                .map_or(LOOK_AGAIN, |wait| wait.min(LOOK_AGAIN))
        };
        self.next_look = Instant::now() + wait;
        Ok(released.released)
    }

    fn refused(&mut self, error: &StoreError) {
        let now = Instant::now();
        self.next_look = now + LOOK_AGAIN;
        if self
            .refusal_logged
            .is_none_or(|at| now.duration_since(at) >= REFUSAL_LOG_EVERY)
        {
            self.refusal_logged = Some(now);
            tracing::error!(
                %error,
                "cannot release scheduled messages (outbox.release_due); they wait, the rest is published"
            );
        }
    }
}
