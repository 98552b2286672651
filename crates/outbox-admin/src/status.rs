//! What the outbox holds, by state and by exchange, the age of the oldest
//! pending message (the lag), dead letters, messages scheduled for later,
//! what holds VACUUM back, and how many relays listen right now.

use serde::Serialize;
use tokio_postgres::{Client, Row};

use crate::state::{ScheduleStats, Vacuum, schedule_stats, vacuum};
use crate::{Error, db};

/// Counts for one exchange, or for all of them.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Counts {
    /// Not yet confirmed by the broker, including those in flight and those waiting for a retry.
    pub pending: i64,
    /// Pending rows leased to a relay right now.
    pub in_flight: i64,
    /// Pending rows that failed at least once.
    pub retrying: i64,
    /// Confirmed rows still kept (see `OUTBOX_RETENTION`).
    pub published: i64,
    pub dead: i64,
    /// Seconds since the oldest pending row was enqueued (or replayed); 0 when none.
    pub oldest_pending_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct ExchangeStatus {
    pub exchange: String,
    #[serde(flatten)]
    pub counts: Counts,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub database: String,
    #[serde(flatten)]
    pub total: Counts,
    /// Relays holding the listener lock: relays in poll mode are not counted.
    pub relays_listening: i64,
    /// Of those, relays draining at this moment.
    pub relays_draining: i64,
    /// What holds VACUUM back.
    #[serde(flatten)]
    pub vacuum: Vacuum,
    /// Messages waiting for their `deliver_at` (V9).
    pub schedule: ScheduleStats,
    pub exchanges: Vec<ExchangeStatus>,
}

/// One pass over the table: an operator command may scan, the relay's hot
/// queries never do.
const BY_EXCHANGE: &str = "
SELECT exchange,
       count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL),
       count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL AND locked_until > now()),
       count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL AND attempts > 0),
       count(*) FILTER (WHERE published_at IS NOT NULL),
       count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NOT NULL),
       coalesce(extract(epoch FROM now() - min(coalesce(replayed_at, created_at))
                FILTER (WHERE published_at IS NULL AND dead_at IS NULL)), 0)::float8
FROM outbox.messages
GROUP BY exchange
ORDER BY exchange";

/// Holders of the advisory locks that `outbox.announce_listener()` (objid
/// 2) and `outbox.begin_drain()` (objid 1) take; see sql/outbox/V1.
const RELAYS: &str = "
SELECT count(*) FILTER (WHERE objid = 2), count(*) FILTER (WHERE objid = 1)
FROM pg_locks
WHERE locktype = 'advisory' AND classid = 1869968482 AND objsubid = 2
  AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

pub async fn read(client: &Client, database: String) -> Result<Status, Error> {
    let rows = client
        .query(BY_EXCHANGE, &[])
        .await
        .map_err(db("count outbox messages"))?;
    let exchanges = rows
        .iter()
        .map(|row| {
            Ok(ExchangeStatus {
                exchange: row.try_get(0)?,
                counts: counts(row)?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(db("read outbox counts"))?;
    let relays = client
        .query_one(RELAYS, &[])
        .await
        .map_err(db("count listening relays"))?;
    let vacuum = vacuum(client).await.map_err(db("read the xmin horizon"))?;
    let schedule = schedule_stats(client)
        .await
        .map_err(db("read outbox.scheduled"))?;
    let mut total = Counts::default();
    for e in &exchanges {
        total.pending += e.counts.pending;
        total.in_flight += e.counts.in_flight;
        total.retrying += e.counts.retrying;
        total.published += e.counts.published;
        total.dead += e.counts.dead;
        total.oldest_pending_seconds = total
            .oldest_pending_seconds
            .max(e.counts.oldest_pending_seconds);
    }
    Ok(Status {
        database,
        total,
        relays_listening: relays.get(0),
        relays_draining: relays.get(1),
        vacuum,
        schedule,
        exchanges,
    })
}

fn counts(row: &Row) -> Result<Counts, tokio_postgres::Error> {
    Ok(Counts {
        pending: row.try_get(1)?,
        in_flight: row.try_get(2)?,
        retrying: row.try_get(3)?,
        published: row.try_get(4)?,
        dead: row.try_get(5)?,
        oldest_pending_seconds: row.try_get(6)?,
    })
}
