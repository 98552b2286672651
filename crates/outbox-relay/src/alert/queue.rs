//! The alert queue: [`Alerter::raise`](super::Alerter::raise) only counts a
//! dead letter in and keeps the first few, and one worker per alerter turns
//! whatever piled up into one [`Summary`] alert: the first at once, then at
//! most one per interval. 10,000 rows dying in a second thus cost one or two
//! webhook calls and mails, the queue never holds more than [`SAMPLE`] dead
//! letters, and a hung webhook delays alerts without ever holding up the
//! caller (the marker, which must keep recording outcomes).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use super::DeadLetter;

/// Dead letters listed by one alert; the rest are counted only (all of
/// them are in `outbox.dead_letters`).
pub(super) const SAMPLE: usize = 10;

/// Shortest time between two alerts of one alerter.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// What one alert reports.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    /// Messages that died since the previous alert.
    pub count: u64,
    /// The first of them, at most [`SAMPLE`]; never empty.
    pub sample: Vec<DeadLetter>,
}

impl Summary {
    #[cfg(test)]
    pub fn one(dead: DeadLetter) -> Summary {
        Summary {
            count: 1,
            sample: vec![dead],
        }
    }

    /// The dead letters counted but not listed.
    pub(crate) fn unlisted(&self) -> u64 {
        self.count.saturating_sub(self.sample.len() as u64)
    }
}

/// Dead letters raised and not alerted yet, shared by the raisers and the
/// worker. The lock is held only to count or to take, never across an await.
#[derive(Default)]
pub(super) struct Queue {
    pending: Mutex<Pending>,
    wake: Notify,
}

#[derive(Default)]
struct Pending {
    count: u64,
    sample: Vec<DeadLetter>,
    /// Every alerter handle is gone: the worker sends what is left and ends.
    closed: bool,
}

impl Queue {
    /// Counts `dead` in; never waits (but for the brief lock).
    pub(super) fn push(&self, dead: DeadLetter) {
        let mut pending = self.lock();
        pending.count += 1;
        if pending.sample.len() < SAMPLE {
            pending.sample.push(dead);
        }
        drop(pending);
        // Stores a permit when the worker is busy, so nothing is missed.
        self.wake.notify_one();
    }

    /// Dead letters counted and not yet taken.
    #[cfg(test)]
    pub fn waiting(&self) -> u64 {
        self.lock().count
    }

    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Waits `interval`, or less once closed: nothing more can arrive, so
    /// what is left goes out at once (a stopping relay still reports it).
    pub(super) async fn pause(&self, interval: Duration) {
        let deadline = tokio::time::Instant::now() + interval;
        while !self.lock().closed {
            let woken = tokio::time::timeout_at(deadline, self.wake.notified()).await;
            if woken.is_err() {
                return;
            }
        }
        // A push's permit taken here is harmless: `next` counts before it waits.
    }

    /// The next summary; `None` once closed and empty.
    pub(super) async fn next(&self) -> Option<Summary> {
        loop {
            {
                let mut pending = self.lock();
                if pending.count > 0 {
                    let sample = std::mem::take(&mut pending.sample);
                    let count = std::mem::take(&mut pending.count);
                    return Some(Summary { count, sample });
                }
                if pending.closed {
                    return None;
                }
            }
            self.wake.notified().await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Counting cannot panic half-way; a poisoned lock still holds sane data.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead(n: u128) -> DeadLetter {
        DeadLetter {
            message_id: uuid::Uuid::from_u128(n),
            exchange: "orders".into(),
            routing_key: String::new(),
            ordering_key: None,
            attempts: 5,
            last_error: "unroutable".into(),
            database: "relay@db/shop".into(),
        }
    }

    #[tokio::test]
    async fn a_burst_becomes_one_bounded_summary() {
        let queue = Queue::default();
        for n in 0..10_000 {
            queue.push(dead(n));
        }
        assert_eq!(queue.waiting(), 10_000);
        let summary = queue.next().await.expect("a summary");
        assert_eq!(summary.count, 10_000);
        assert_eq!(summary.sample.len(), SAMPLE);
        assert_eq!(summary.sample[0].message_id, uuid::Uuid::from_u128(0));
        assert_eq!(summary.unlisted(), 10_000 - SAMPLE as u64);
        assert_eq!(queue.waiting(), 0);
    }

    #[tokio::test]
    async fn closing_flushes_then_ends() {
        let queue = Queue::default();
        queue.push(dead(1));
        queue.close();
        assert_eq!(queue.next().await.map(|s| s.count), Some(1));
        assert!(queue.next().await.is_none());
    }
}
