//! Background upkeep: retention (delete published rows in small batches so
//! the table does not bloat) and the gauges read from the database (backlog,
//! lag, dead letters, the NOTIFY queue), which also tell `/readyz` whether
//! PostgreSQL answers while the relay is idle.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::meters::{DATABASE, Meters};
use crate::store::Store;
use outbox_service::health::Health;

const INTERVAL: Duration = Duration::from_secs(5);
/// Small deletes keep locks and WAL bursts short next to the app's writes.
const DELETE_BATCH: i64 = 1000;

pub(crate) async fn run(
    store: Store,
    retention: Duration,
    meters: Meters,
    health: Health,
    shutdown: CancellationToken,
) {
    // The first tick is immediate: the gauges have values from the start.
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.stats().await {
            Ok(stats) => {
                health.set(DATABASE, true);
                meters.pending.set(stats.pending as f64);
                meters
                    .oldest_pending
                    .set(stats.oldest_pending.as_secs_f64());
                meters.dead_messages.set(stats.dead as f64);
                meters
                    .notification_queue_usage
                    .set(stats.notification_queue_usage);
                let vacuum = stats.vacuum;
                meters.xmin_horizon_age.set(vacuum.xmin_horizon_age_seconds);
                meters
                    .xmin_horizon_xids
                    .set(vacuum.xmin_horizon_age_xids as f64);
                meters.dead_tuple_ratio.set(vacuum.dead_tuple_ratio);
            }
            Err(error) => {
                // The drain reports the outage in its own words.
                health.set(DATABASE, false);
                tracing::debug!(%error, "cannot read the outbox gauges");
            }
        }
        // With zero retention the marker deletes rows as they are confirmed.
        if !retention.is_zero() {
            delete_expired(&store, retention, &meters, &shutdown).await;
        }
    }
}

async fn delete_expired(
    store: &Store,
    retention: Duration,
    meters: &Meters,
    shutdown: &CancellationToken,
) {
    while !shutdown.is_cancelled() {
        match store.delete_published_before(retention, DELETE_BATCH).await {
            Ok(deleted) => {
                meters.retention_deleted.increment(deleted);
                if deleted < DELETE_BATCH as u64 {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "retention delete failed; will retry");
                return;
            }
        }
    }
}
