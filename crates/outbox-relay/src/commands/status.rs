//! `outbox-relay status`: what the outbox holds, by state and by exchange,
//! the age of the oldest pending message (the lag), dead letters, messages
//! scheduled for later, and how many relays listen right now.

use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tokio_postgres::Row;

use super::{DatabaseArgs, format_age, query_error};
use crate::gauges::{self, Vacuum};
use crate::store::{SCHEDULED_COUNT_CAP, ScheduleStats, schedule_stats};

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Counts for one exchange, or for all of them.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub(crate) struct Counts {
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
pub(crate) struct ExchangeStatus {
    pub exchange: String,
    #[serde(flatten)]
    pub counts: Counts,
}

#[derive(Debug, Serialize)]
pub(crate) struct Status {
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

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let status = read(&args.database).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

pub(crate) async fn read(database: &DatabaseArgs) -> anyhow::Result<Status> {
    let (client, target) = database.connect().await?;
    let rows = client
        .query(BY_EXCHANGE, &[])
        .await
        .map_err(query_error("count outbox messages"))?;
    let exchanges = rows
        .iter()
        .map(|row| {
            Ok(ExchangeStatus {
                exchange: row.try_get(0)?,
                counts: counts(row)?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(query_error("read outbox counts"))?;
    let relays = client
        .query_one(RELAYS, &[])
        .await
        .map_err(query_error("count listening relays"))?;
    let vacuum = gauges::vacuum(&client)
        .await
        .map_err(query_error("read the xmin horizon"))?;
    let schedule = schedule_stats(&client)
        .await
        .map_err(query_error("read outbox.scheduled"))?;
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
        database: target.describe(),
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

fn age(seconds: f64, pending: i64) -> String {
    if pending == 0 {
        "-".into()
    } else {
        format_age(Duration::from_secs_f64(seconds.max(0.0)))
    }
}

/// "12 (next due in 3m 2s), 1 cancelled, 0 refused"
fn scheduled(schedule: &ScheduleStats) -> String {
    let count = if schedule.scheduled >= SCHEDULED_COUNT_CAP {
        format!("at least {}", schedule.scheduled)
    } else {
        schedule.scheduled.to_string()
    };
    let age = |seconds: f64| {
        Duration::try_from_secs_f64(seconds).map_or_else(|_| "ever".to_string(), format_age)
    };
    let next = match schedule.next_due_in_seconds {
        Some(seconds) if seconds < 0.0 => format!(" (next overdue by {})", age(-seconds)),
        Some(seconds) => format!(" (next due in {})", age(seconds)),
        None => String::new(),
    };
    format!(
        "{count}{next}, {} cancelled, {} refused",
        schedule.cancelled, schedule.refused
    )
}

pub(crate) fn render(status: &Status) -> String {
    let t = &status.total;
    let mut out = format!(
        "outbox on {}\n\
         pending    {} (in flight {}, retrying {}), oldest {}\n\
         published  {} (kept for OUTBOX_RETENTION)\n\
         dead       {}{}\n\
         scheduled  {}\n\
         relays     {} listening, {} draining (relays in poll mode are not seen)\n\
         vacuum     xmin horizon {} old ({} xids), dead tuples {:.0} %\n",
        status.database,
        t.pending,
        t.in_flight,
        t.retrying,
        age(t.oldest_pending_seconds, t.pending),
        t.published,
        t.dead,
        if t.dead > 0 {
            "  -> outbox-relay dead list"
        } else {
            ""
        },
        scheduled(&status.schedule),
        status.relays_listening,
        status.relays_draining,
        format_age(Duration::from_secs_f64(
            status.vacuum.xmin_horizon_age_seconds.max(0.0)
        )),
        status.vacuum.xmin_horizon_age_xids,
        status.vacuum.dead_tuple_ratio * 100.0,
    );
    if status.exchanges.is_empty() {
        out.push_str("\nno messages\n");
        return out;
    }
    let width = status
        .exchanges
        .iter()
        .map(|e| e.exchange.len().max(9))
        .max()
        .unwrap_or(9)
        .max(8);
    out.push_str(&format!(
        "\n{:<width$}  {:>9}  {:>9}  {:>9}  {:>10}  {:>7}  {:>10}\n",
        "exchange", "pending", "in flight", "retrying", "published", "dead", "oldest"
    ));
    for e in &status.exchanges {
        let c = &e.counts;
        let name = if e.exchange.is_empty() {
            "(default)"
        } else {
            &e.exchange
        };
        out.push_str(&format!(
            "{:<width$}  {:>9}  {:>9}  {:>9}  {:>10}  {:>7}  {:>10}\n",
            name,
            c.pending,
            c.in_flight,
            c.retrying,
            c.published,
            c.dead,
            age(c.oldest_pending_seconds, c.pending)
        ));
    }
    out
}
