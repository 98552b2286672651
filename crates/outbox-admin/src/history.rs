//! The last hour, minute by minute, from the published rows still kept
//! (`OUTBOX_RETENTION`): how many went out and how long they waited, from
//! enqueue (or due time, or replay) to the broker's confirm.

use std::time::SystemTime;

use serde::Serialize;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::{Error, db, format_time};

#[derive(Debug, Serialize)]
pub struct Minute {
    /// The minute's start.
    pub minute: String,
    pub published: i64,
    pub lag_p50_ms: f64,
    pub lag_max_ms: f64,
}

/// By the index of published rows (V1); minutes with no row are left out.
const MINUTES: &str = "
SELECT date_trunc('minute', published_at) AS minute, count(*),
       (percentile_cont(0.5) WITHIN GROUP (ORDER BY lag) * 1000)::float8,
       (max(lag) * 1000)::float8
FROM (SELECT published_at,
             greatest(extract(epoch FROM published_at
                      - coalesce(replayed_at, scheduled_for, created_at)), 0) AS lag
      FROM outbox.messages
      WHERE published_at >= now() - $1 * interval '1 minute') published
GROUP BY 1
ORDER BY 1";

/// The last `minutes` minutes.
pub async fn lag(client: &Client, minutes: i32) -> Result<Vec<Minute>, Error> {
    let minutes = f64::from(minutes.clamp(1, 24 * 60));
    let rows = client
        .query_typed(MINUTES, &[(&minutes, Type::FLOAT8)])
        .await
        .map_err(db("read the lag of the last hour"))?;
    rows.iter()
        .map(|row| {
            Ok(Minute {
                minute: format_time(row.try_get::<_, SystemTime>(0)?),
                published: row.try_get(1)?,
                lag_p50_ms: row.try_get(2)?,
                lag_max_ms: row.try_get(3)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(db("read the lag of the last hour"))
}
