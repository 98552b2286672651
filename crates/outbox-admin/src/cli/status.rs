//! `outbox-relay status`: what the outbox holds, by state and by exchange,
//! the age of the oldest pending message (the lag), dead letters, messages
//! scheduled for later, and how many relays listen right now.

use std::time::Duration;

use clap::Args;

use super::DatabaseArgs;
use crate::format_age;
use crate::state::{SCHEDULED_COUNT_CAP, ScheduleStats};
use crate::status::Status;

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let (client, target) = args.database.connect().await?;
    let status = crate::status::read(&client, target.describe()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
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

pub fn render(status: &Status) -> String {
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
