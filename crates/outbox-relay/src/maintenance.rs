//! Background upkeep: retention (delete published rows in small batches so
//! the table does not bloat) and the lag gauge.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

const INTERVAL: Duration = Duration::from_secs(5);
/// Small deletes keep locks and WAL bursts short next to the app's writes.
const DELETE_BATCH: i64 = 1000;

pub async fn run(store: Store, retention: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
        match store.oldest_pending_age().await {
            Ok(age) => metrics::gauge!("outbox_oldest_pending_seconds").set(age.as_secs_f64()),
            Err(error) => tracing::debug!(%error, "cannot read the outbox lag"),
        }
        // With zero retention the marker deletes rows as they are confirmed.
        if !retention.is_zero() {
            delete_expired(&store, retention, &shutdown).await;
        }
    }
}

async fn delete_expired(store: &Store, retention: Duration, shutdown: &CancellationToken) {
    while !shutdown.is_cancelled() {
        match store.delete_published_before(retention, DELETE_BATCH).await {
            Ok(deleted) => {
                metrics::counter!("outbox_retention_deleted_total").increment(deleted);
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
