//! Recording outcomes off the publish path: confirmed rows are marked in
//! batches, failed ones get an attempt and a backoff (or die and escalate),
//! and leases are given back after an outage. A database outage here only
//! delays the bookkeeping: the marker retries until it succeeds. A
//! statement the server refuses (a trigger of another role's, a row lock
//! held past the lock timeout) is retried row by row, so one row's problem
//! never stalls the others: a row that still fails is logged, counted and
//! left to its lease (it is published again, the consumer deduplicates).

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::alert::{Alerter, DeadLetter};
use crate::config::Config;
use crate::fault_policy::{StoreDirective, store_directive};
use crate::meters::Meters;
use crate::store::{Claimed, Retried, Store, StoreError};
use outbox_service::backoff::Backoff;
use outbox_service::traceparent;

/// Most outcomes recorded by one round of statements.
const MAX_BATCH: usize = 1000;

/// A row as the marker fences it: its id and lease token.
pub type Held = (i64, String);

#[derive(Debug, Clone)]
pub enum Mark {
    Published(Held),
    Failed { row: Box<Claimed>, error: String },
    Release(Vec<Held>),
}

impl Mark {
    /// How many rows it settles.
    fn rows(&self) -> usize {
        match self {
            Mark::Release(rows) => rows.len(),
            _ => 1,
        }
    }
}

/// The relay's handle: queue outcomes, and learn when all are recorded.
pub struct Marker {
    sender: mpsc::UnboundedSender<Mark>,
    /// Outcomes queued but not yet written. The drain waits for zero before
    /// it calls itself done: the next message of an ordering key becomes
    /// claimable only once its predecessor is marked.
    unsettled: Arc<watch::Sender<usize>>,
    task: JoinHandle<()>,
}

impl Marker {
    pub fn spawn(
        store: Store,
        config: &Config,
        alerter: Alerter,
        database: String,
        meters: Meters,
    ) -> Marker {
        let (sender, receiver) = mpsc::unbounded_channel();
        let unsettled = Arc::new(watch::Sender::new(0));
        let worker = Worker {
            store,
            alerter,
            database,
            delete_published: config.retention.is_zero(),
            max_attempts: config.max_attempts,
            retry_base: config.retry_base,
            retry_max: config.retry_max,
            unsettled: unsettled.clone(),
            meters,
        };
        let task = tokio::spawn(worker.run(receiver));
        Marker {
            sender,
            unsettled,
            task,
        }
    }

    pub fn send(&self, mark: Mark) {
        self.unsettled.send_modify(|n| *n += 1);
        if self.sender.send(mark).is_err() {
            // Only after shutdown; the lease expires and another relay retries.
            self.unsettled.send_modify(|n| *n -= 1);
        }
    }

    pub fn unsettled(&self) -> usize {
        *self.unsettled.borrow()
    }

    pub async fn settled(&self) {
        let mut receiver = self.unsettled.subscribe();
        let _ = receiver.wait_for(|n| *n == 0).await;
    }

    /// Writes what is queued, waiting at most `timeout`.
    pub async fn finish(self, timeout: Duration) {
        drop(self.sender);
        let mut task = self.task;
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            tracing::warn!(
                "outcomes not recorded before the shutdown timeout; their leases will expire and the rows be published again"
            );
            task.abort();
        }
    }
}

struct Worker {
    store: Store,
    alerter: Alerter,
    database: String,
    delete_published: bool,
    max_attempts: u32,
    retry_base: Duration,
    retry_max: Duration,
    unsettled: Arc<watch::Sender<usize>>,
    meters: Meters,
}

impl Worker {
    async fn run(self, mut receiver: mpsc::UnboundedReceiver<Mark>) {
        while let Some(first) = receiver.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(mark) => batch.push(mark),
                    Err(_) => break,
                }
            }
            let count = batch.len();
            if let Err(error) = self.record_through_outages(&batch).await {
                tracing::warn!(%error, "recording outcomes failed; retrying row by row");
                self.record_one_by_one(&batch).await;
            }
            self.unsettled.send_modify(|n| *n -= count);
        }
    }

    /// Records `batch`, waiting out outages with backoff; the error of a
    /// statement the server refused.
    async fn record_through_outages(&self, batch: &[Mark]) -> Result<(), StoreError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.record(batch).await {
                Ok(()) => return Ok(()),
                Err(error) if store_directive(&error) == StoreDirective::Refused => {
                    return Err(error);
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot record publish outcomes");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// After a refused batch: each row alone, giving up on those the server
    /// refuses.
    async fn record_one_by_one(&self, batch: &[Mark]) {
        let singles = batch.iter().flat_map(|mark| match mark {
            Mark::Release(rows) => rows
                .iter()
                .map(|r| Mark::Release(vec![r.clone()]))
                .collect(),
            single => vec![single.clone()],
        });
        for single in singles {
            if let Err(error) = self
                .record_through_outages(std::slice::from_ref(&single))
                .await
            {
                self.meters.mark_failures.increment(single.rows() as u64);
                tracing::error!(
                    %error,
                    row = ?held_ids(&single),
                    "cannot record this row's outcome; its lease will expire and it will be published again"
                );
            }
        }
    }

    /// Every statement here is idempotent, so a batch can be replayed whole
    /// after a failure part-way.
    async fn record(&self, batch: &[Mark]) -> Result<(), StoreError> {
        let mut published = Vec::new();
        let mut released = Vec::new();
        for mark in batch {
            match mark {
                Mark::Published(row) => published.push(row.clone()),
                Mark::Release(rows) => released.extend_from_slice(rows),
                Mark::Failed { .. } => {}
            }
        }
        if !published.is_empty() {
            self.store
                .mark_published(&published, self.delete_published)
                .await?;
        }
        if !released.is_empty() {
            self.store.release(&released).await?;
        }
        for mark in batch {
            if let Mark::Failed { row, error } = mark {
                self.fail(row, error).await?;
            }
        }
        Ok(())
    }

    async fn fail(&self, row: &Claimed, error: &str) -> Result<(), StoreError> {
        let delay = retry_delay(self.retry_base, self.retry_max, row.attempts);
        let retried = self
            .store
            .retry(row, error, delay, self.max_attempts)
            .await?;
        match retried {
            Retried::Later => tracing::warn!(
                message_id = %row.message_id,
                trace_id = traceparent::from_json(&row.headers),
                attempt = row.attempts + 1,
                retry_in_ms = delay.as_millis() as u64,
                error,
                "publish failed; will retry"
            ),
            Retried::Dead => {
                self.meters.dead_letters.increment(1);
                let dead = DeadLetter {
                    message_id: row.message_id,
                    exchange: row.exchange.clone(),
                    routing_key: row.routing_key.clone(),
                    ordering_key: row.ordering_key.clone(),
                    attempts: row.attempts + 1,
                    last_error: error.to_string(),
                    database: self.database.clone(),
                };
                // Queued, coalesced and bounded: never holds up marking.
                self.alerter.raise(dead);
            }
            Retried::Gone => {}
        }
        Ok(())
    }
}

/// The ids a mark settles, for the log.
fn held_ids(mark: &Mark) -> Vec<i64> {
    match mark {
        Mark::Published((id, _)) => vec![*id],
        Mark::Failed { row, .. } => vec![row.id],
        Mark::Release(rows) => rows.iter().map(|(id, _)| *id).collect(),
    }
}

/// Exponential backoff with jitter: base × 2^attempts, capped, then scaled
/// by a random factor in [0.5, 1) so failed messages do not retry in lockstep.
pub fn retry_delay(base: Duration, max: Duration, attempts_so_far: i32) -> Duration {
    let exponent = attempts_so_far.clamp(0, 30) as u32;
    let full = base.saturating_mul(1_u32 << exponent).min(max);
    full.mul_f64(rand::rng().random_range(0.5..1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for attempts in 0..10 {
            let delay = retry_delay(base, max, attempts);
            let full = (base * 2_u32.pow(attempts as u32)).min(max);
            assert!(
                delay >= full / 2 && delay < full,
                "{attempts}: {delay:?} vs {full:?}"
            );
        }
    }
}
