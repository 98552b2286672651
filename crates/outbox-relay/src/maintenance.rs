//! Background upkeep: retention (delete published rows in small batches so
//! the table does not bloat), a VACUUM of `outbox.messages` where autovacuum
//! is off (every message leaves dead row versions behind: its lease, its
//! mark, its deletion; unvacuumed, a 30 s retention still grew the table to
//! 705 MiB over 2 million rows here), and the gauges read from the database
//! (backlog, lag, dead letters, the NOTIFY queue, the schedule), which also tell
//! `/readyz` whether PostgreSQL answers while the relay is idle.

use std::time::Duration;

use metrics::Counter;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::gauges::Vacuum;
use crate::meters::{DATABASE, Meters};
use crate::store::{Expired, Store};
use outbox_service::health::Health;

const INTERVAL: Duration = Duration::from_secs(5);
/// Small deletes keep locks and WAL bursts short next to the app's writes.
const DELETE_BATCH: i64 = 1000;
/// Autovacuum's own trigger, as its defaults set it: dead row versions
/// above a fifth of the table (and more than a handful).
const VACUUM_DEAD_RATIO: f64 = 0.2;
const VACUUM_DEAD_TUPLES: i64 = 10_000;

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
    let mut vacuum_warned = false;
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
                if needs_our_vacuum(&vacuum) {
                    self_vacuum(&store, &vacuum, &meters, &mut vacuum_warned).await;
                }
            }
            Err(error) => {
                // The drain reports the outage in its own words.
                health.set(DATABASE, false);
                tracing::debug!(%error, "cannot read the outbox gauges");
            }
        }
        match store.schedule_stats().await {
            Ok(schedule) => {
                meters.scheduled.set(schedule.scheduled as f64);
                meters.scheduled_cancelled.set(schedule.cancelled as f64);
                // NaN when nothing is scheduled: Prometheus shows no value.
                meters
                    .scheduled_next_due
                    .set(schedule.next_due_in_seconds.unwrap_or(f64::NAN));
            }
            Err(error) => tracing::debug!(%error, "cannot read the schedule's gauges"),
        }
        // With zero retention the marker deletes rows as they are confirmed.
        if !retention.is_zero() {
            let published = &meters.retention_deleted;
            delete_expired(&store, Expired::Published, retention, published, &shutdown).await;
        }
        // Cancelled scheduled rows stay visible as long as published ones
        // (at zero retention, until the next upkeep).
        let cancelled = &meters.cancelled_deleted;
        delete_expired(&store, Expired::Cancelled, retention, cancelled, &shutdown).await;
    }
}

/// Autovacuum cleans the table where it runs; elsewhere the relay does.
fn needs_our_vacuum(vacuum: &Vacuum) -> bool {
    !vacuum.autovacuum
        && vacuum.dead_tuples > VACUUM_DEAD_TUPLES
        && vacuum.dead_tuple_ratio > VACUUM_DEAD_RATIO
}

async fn self_vacuum(store: &Store, vacuum: &Vacuum, meters: &Meters, warned: &mut bool) {
    if !vacuum.can_vacuum {
        if !*warned {
            tracing::warn!(
                dead_tuples = vacuum.dead_tuples,
                "autovacuum is off and the relay's role does not own outbox.messages: \
                 nothing cleans its dead rows; turn autovacuum on or VACUUM it on a schedule"
            );
            *warned = true;
        }
        return;
    }
    tracing::info!(
        dead_tuples = vacuum.dead_tuples,
        "autovacuum is off: vacuuming outbox.messages"
    );
    match store.vacuum_messages().await {
        Ok(()) => meters.vacuums.increment(1),
        Err(error) => tracing::warn!(%error, "VACUUM outbox.messages failed; will retry"),
    }
}

/// Deletes what `what` names older than `retention`, a batch at a time.
async fn delete_expired(
    store: &Store,
    what: Expired,
    retention: Duration,
    deleted_total: &Counter,
    shutdown: &CancellationToken,
) {
    while !shutdown.is_cancelled() {
        match store.delete_expired(what, retention, DELETE_BATCH).await {
            Ok(deleted) => {
                deleted_total.increment(deleted);
                if deleted < DELETE_BATCH as u64 {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, ?what, "retention delete failed; will retry");
                return;
            }
        }
    }
}
