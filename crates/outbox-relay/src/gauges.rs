//! The gauges the relay reads from the database every few seconds: the
//! backlog and its lag, dead letters, the NOTIFY queue, and what keeps
//! VACUUM from cleaning the outbox (the xmin horizon, dead tuples).

use std::time::Duration;

use crate::store::{Store, StoreError};
pub use outbox_admin::state::{Vacuum, vacuum};

/// What the gauges show; see [`Store::stats`].
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Rows waiting to be published (counted up to [`PENDING_COUNT_CAP`]).
    pub pending: i64,
    pub oldest_pending: Duration,
    pub dead: i64,
    /// `pg_notification_queue_usage()`: the cluster's NOTIFY queue, 0 to 1.
    pub notification_queue_usage: f64,
    pub vacuum: Vacuum,
}

/// Counting a huge backlog every few seconds would cost more than it tells.
pub const PENDING_COUNT_CAP: i64 = 1_000_000;

/// Pending rows and the oldest one come from the pending-rows index (the
/// lowest pending id, not a min(created_at) over the whole backlog), dead
/// ones from the dead-rows index (V4).
const STATS: &str = "SELECT \
     (SELECT count(*) FROM (SELECT 1 FROM outbox.messages \
         WHERE published_at IS NULL AND dead_at IS NULL LIMIT $1) backlog), \
     coalesce(extract(epoch FROM now() - ( \
         SELECT coalesce(replayed_at, created_at) FROM outbox.messages \
         WHERE published_at IS NULL AND dead_at IS NULL \
         ORDER BY id LIMIT 1)), 0)::float8, \
     (SELECT count(*) FROM outbox.messages WHERE dead_at IS NOT NULL), \
     pg_notification_queue_usage()";

impl Store {
    /// The gauges read from the database, in one round trip, within the
    /// statement deadline (they tell `/readyz` whether PostgreSQL answers
    /// while the relay is idle).
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            let row = client.query_one(STATS, &[&PENDING_COUNT_CAP]).await?;
            let stats = || -> Result<Stats, tokio_postgres::Error> {
                Ok(Stats {
                    pending: row.try_get(0)?,
                    oldest_pending: Duration::from_secs_f64(row.try_get::<_, f64>(1)?.max(0.0)),
                    dead: row.try_get(2)?,
                    notification_queue_usage: row.try_get(3)?,
                    vacuum: Vacuum::default(),
                })
            };
            let mut stats = stats().map_err(StoreError::from)?;
            stats.vacuum = vacuum(&**client).await.map_err(StoreError::from)?;
            Ok(stats)
        })
        .await
    }
    /// `VACUUM outbox.messages`, for a server whose autovacuum is off (see
    /// `maintenance`). It takes no lock that writers or the relay wait on.
    /// No statement deadline: a big table takes long; a frozen server
    /// holds only the upkeep task, and the drain reports the outage.
    pub async fn vacuum_messages(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .batch_execute("VACUUM outbox.messages")
            .await
            .map_err(StoreError::from)
    }
}
