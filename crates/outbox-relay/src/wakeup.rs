//! The relay's side of the wake-up: the LISTEN connection, the drain lock
//! taken on it while the relay drains (writers skip their NOTIFY then), and
//! the watch on other sessions holding the wake-up locks.
//!
//! Every failure here only loses wake-ups: the listener is dropped and
//! reconnected by the main loop, and the sweep keeps rows moving meanwhile.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Mode;
use crate::listener::{self, Listener, Woken};
use crate::meters::{LISTENER, Meters};
use crate::store::{Store, WakeLockHolder};
use outbox_service::db::PgTarget;
use outbox_service::health::Health;

/// How often an idle listener's connection is proven alive.
const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// How often the relay looks for other sessions holding the wake-up locks.
const WAKE_LOCK_CHECK: Duration = Duration::from_secs(1);

/// A writer whose wake-up probe ran while we drained sent no NOTIFY and
/// commits a moment later (one WAL flush). After a drain that found work the
/// relay claims again after each of these delays; the sweep catches
/// anything slower.
/// [`Wakeup::notified`]'s wait, long enough to mean "until a NOTIFY".
const NOTIFIED_WAIT: Duration = Duration::from_secs(3600);

pub(crate) const IDLE_RECHECKS: [Duration; 2] =
    [Duration::from_millis(3), Duration::from_millis(25)];
pub(crate) struct Wakeup {
    mode: Mode,
    target: PgTarget,
    /// `None` in poll mode, and while reconnecting.
    listener: Option<Listener>,
    /// When the drain's transaction on the listener was last kept alive.
    last_kept_draining: Instant,
    next_probe: Instant,
    next_lock_check: Instant,
    /// Foreign holders of the wake-up locks seen at the last check: one
    /// seen in the same transaction at two checks in a row is not a writer
    /// mid-commit. (A session holding a session-level lock while it runs
    /// one short transaction after another is not caught: writers may then
    /// skip wake-ups, and the sweep finds their rows within its interval.)
    suspects: HashSet<WakeLockHolder>,
    /// Wake-ups may be suppressed: the relay polls fast meanwhile.
    locks_held: bool,
    /// Raised by a wake-up about a scheduled row due soon, and by each
    /// (re)connect; read by `schedule`.
    schedule_changed: Arc<AtomicBool>,
    meters: Meters,
    health: Health,
}

impl Wakeup {
    pub(crate) fn new(mode: Mode, target: PgTarget, meters: Meters, health: Health) -> Wakeup {
        let now = Instant::now();
        Wakeup {
            mode,
            target,
            listener: None,
            last_kept_draining: now,
            next_probe: now + PROBE_INTERVAL,
            next_lock_check: now,
            suspects: HashSet::new(),
            locks_held: false,
            schedule_changed: Arc::new(AtomicBool::new(true)),
            meters,
            health,
        }
    }

    /// The flag a wake-up about the schedule raises (see `schedule`).
    pub(crate) fn schedule_changes(&self) -> Arc<AtomicBool> {
        self.schedule_changed.clone()
    }

    /// Connects the listener in notify mode; true when it just (re)connected.
    pub(crate) async fn connect(&mut self) -> bool {
        if self.mode == Mode::Poll || self.listener.is_some() {
            return false;
        }
        match Listener::connect(&self.target, self.schedule_changed.clone()).await {
            Ok(listener) => {
                self.listener = Some(listener);
                // Rows scheduled while no one listened.
                self.schedule_changed.store(true, Ordering::Relaxed);
                self.health.set(LISTENER, true);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot connect the wake-up listener; relying on the sweep");
                false
            }
        }
    }

    /// Waits for a NOTIFY (or, without a listener, just the timeout).
    pub(crate) async fn wait(&mut self, timeout: Duration) -> Woken {
        let woken = match &mut self.listener {
            Some(listener) => listener.wait(timeout).await,
            None => {
                tokio::time::sleep(timeout).await;
                Woken::TimedOut
            }
        };
        if woken == Woken::Lost {
            tracing::warn!("wake-up listener lost; reconnecting");
            self.lost();
        }
        woken
    }

    /// True while writers' commits wake us: a listener is connected and
    /// we do not hold the drain lock.
    pub(crate) fn wakes_come(&self) -> bool {
        self.listener.as_ref().is_some_and(|l| !l.draining()) && !self.locks_held
    }

    /// Waits for the next NOTIFY (or the listener's loss, which the main
    /// loop repairs); never returns without a listener.
    pub(crate) async fn notified(&mut self) {
        if self.listener.is_none() {
            return std::future::pending().await;
        }
        self.wait(NOTIFIED_WAIT).await;
    }

    /// True while another session holds the wake-up locks.
    pub(crate) fn locks_held(&self) -> bool {
        self.locks_held
    }

    /// When the next probe or lock check is due.
    pub(crate) fn next_upkeep(&self) -> Instant {
        self.next_probe.min(self.next_lock_check)
    }

    /// Probes the idle listener and checks the wake-up locks when due.
    pub(crate) async fn upkeep(&mut self, store: &Store) {
        let now = Instant::now();
        if now >= self.next_probe {
            self.next_probe = now + PROBE_INTERVAL;
            self.probe().await;
        }
        if now >= self.next_lock_check {
            self.next_lock_check = now + WAKE_LOCK_CHECK;
            self.check_locks(store).await;
        }
    }

    async fn probe(&mut self) {
        if let Some(listener) = &mut self.listener
            && (listener.is_closed() || !listener.probe().await)
        {
            tracing::warn!("wake-up listener did not answer its probe; reconnecting");
            self.lost();
        }
    }

    /// Another session holding the wake-up locks (a transaction that fired
    /// the trigger early and runs long, or anyone's on purpose) makes
    /// writers skip their NOTIFY. That cannot be prevented (advisory locks
    /// are anyone's), so it is looked for every second, logged, metered, and
    /// met by fast polling until it ends.
    async fn check_locks(&mut self, store: &Store) {
        if self.mode == Mode::Poll {
            return;
        }
        let holders: HashSet<WakeLockHolder> =
            match store.wake_lock_holders(listener::APPLICATION_NAME).await {
                Ok(holders) => holders.into_iter().collect(),
                Err(error) => {
                    tracing::debug!(%error, "cannot read the wake-up locks' holders");
                    return;
                }
            };
        let lasting: Vec<&WakeLockHolder> = holders.intersection(&self.suspects).collect();
        let held = !lasting.is_empty();
        if held && !self.locks_held {
            for holder in &lasting {
                tracing::warn!(
                    pid = holder.pid,
                    role = %holder.role,
                    lock = holder.lock,
                    mode = %holder.mode,
                    "another session holds a wake-up lock: writers may skip their wake-ups; claiming every 10 ms until it lets go"
                );
            }
        } else if !held && self.locks_held {
            tracing::info!("the wake-up locks are free again");
        }
        self.meters
            .wake_lock_foreign_holders
            .set(lasting.len() as f64);
        self.locks_held = held;
        self.suspects = holders;
    }

    /// Takes the drain lock (a no-op while held). Impatient while another
    /// session holds the wake-up locks, so that it cannot stall the drain.
    pub(crate) async fn begin_drain(&mut self) {
        if let Some(listener) = &mut self.listener
            && let Err(error) = listener.begin_drain(!self.locks_held).await
        {
            tracing::warn!(%error, "wake-up listener failed; reconnecting");
            self.lost();
        }
    }

    /// Keeps the drain's transaction on the listener alive: the server
    /// ends one that stays silent (a frozen relay), freeing the drain lock.
    pub(crate) async fn keep_draining(&mut self) {
        if self.last_kept_draining.elapsed() < listener::KEEP_DRAINING_EVERY {
            return;
        }
        self.last_kept_draining = Instant::now();
        if let Some(listener) = &mut self.listener
            && let Err(error) = listener.keep_draining().await
        {
            tracing::warn!(%error, "wake-up listener failed; reconnecting");
            self.lost();
        }
    }

    /// Ends the drain on the listener (a no-op when not draining).
    pub(crate) async fn end_drain(&mut self) {
        if let Some(listener) = &mut self.listener
            && listener.end_drain().await.is_err()
        {
            self.lost();
        }
    }

    /// Forgets a failed listener; the main loop connects a new one.
    fn lost(&mut self) {
        self.listener = None;
        self.health.set(LISTENER, false);
    }
}

/// After a drain: start the re-checks when it found work, else move on to
/// the next one, until they run out (poll mode has only the sweep).
pub(crate) fn next_recheck(current: Option<usize>, claimed: bool, mode: Mode) -> Option<usize> {
    if mode == Mode::Poll {
        return None;
    }
    match (claimed, current) {
        (true, _) => Some(0),
        (false, Some(step)) if step + 1 < IDLE_RECHECKS.len() => Some(step + 1),
        (false, _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rechecks_follow_work_and_run_out() {
        assert_eq!(next_recheck(None, true, Mode::Notify), Some(0));
        assert_eq!(next_recheck(Some(0), false, Mode::Notify), Some(1));
        assert_eq!(next_recheck(Some(1), false, Mode::Notify), None);
        assert_eq!(next_recheck(Some(1), true, Mode::Notify), Some(0));
        assert_eq!(next_recheck(None, false, Mode::Notify), None);
        assert_eq!(next_recheck(None, true, Mode::Poll), None);
    }
}
