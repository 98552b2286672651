//! `outbox-relay reconcile --dispatch-database-url URL`: which messages the
//! broker confirmed but the consumer never processed. The outbox knows what
//! was published (`published_at`), the consumer's inbox knows what was
//! processed (`message_id` committed with its writes); a message in the
//! first and not the second was lost or dead-lettered downstream, or is
//! still queued. No broker-side tool can tell this.
//!
//! Exits 1 when anything is missing, so a cron job can page on it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::SystemTime;

use clap::Args;
use serde::Serialize;
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::{DatabaseArgs, TimeArg, format_time, query_error};
use outbox_service::db;

/// Message ids per inbox query.
const CHUNK: usize = 5_000;

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// PostgreSQL URL of the consumer's database (the one holding its inbox).
    #[arg(long, env = "DISPATCH_DATABASE_URL", hide_env_values = true)]
    pub dispatch_database_url: String,

    /// PEM file of the CA that signed the consumer database's certificate.
    #[arg(long)]
    pub dispatch_database_ca_file: Option<PathBuf>,

    /// The consumer's inbox table, with a `message_id uuid` column.
    #[arg(long, default_value = "dispatch.inbox")]
    pub inbox_table: String,

    /// Start of the window: messages published at or after this time (a duration ago or a timestamp).
    #[arg(long, default_value = "1h")]
    pub since: TimeArg,

    /// End of the window: messages published before this time. The default leaves the consumer a minute to process what was just published.
    #[arg(long, default_value = "1m")]
    pub until: TimeArg,

    /// Only messages to this exchange (the one the consumer's queue is bound to).
    #[arg(long)]
    pub exchange: Option<String>,

    /// Print one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct Unprocessed {
    pub id: i64,
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub published_at: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub since: String,
    pub until: String,
    /// Published messages in the window (still kept: see `OUTBOX_RETENTION`).
    pub checked: usize,
    pub unprocessed: Vec<Unprocessed>,
    /// Set when retention may have deleted part of the window: a clean
    /// report then covers only the rows still kept.
    pub warning: Option<String>,
}

const PUBLISHED: &str = "SELECT id, message_id, exchange, routing_key, published_at \
     FROM outbox.messages \
     WHERE published_at >= $1 AND published_at < $2 AND ($3::text IS NULL OR exchange = $3) \
     ORDER BY id";

/// Retention deletes published rows oldest first, so what is kept starts here.
const OLDEST_KEPT: &str =
    "SELECT min(published_at) FROM outbox.messages WHERE published_at IS NOT NULL";

pub async fn run(args: ReconcileArgs) -> anyhow::Result<()> {
    let report = reconcile(&args).await?;
    if let Some(warning) = &report.warning {
        eprintln!("warning: {warning}");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for m in &report.unprocessed {
            println!(
                "{} {} published {} to {} `{}`",
                m.id, m.message_id, m.published_at, m.exchange, m.routing_key
            );
        }
        println!(
            "{} of {} message(s) published between {} and {} were never processed",
            report.unprocessed.len(),
            report.checked,
            report.since,
            report.until
        );
        if let Some(warning) = &report.warning {
            println!("not checked: {warning}");
        }
        if let Some(first) = report.unprocessed.first() {
            let ids: Vec<String> = report
                .unprocessed
                .iter()
                .take(20)
                .map(|m| m.message_id.to_string())
                .collect();
            println!(
                "to publish them again: outbox-relay replay --id {}{}",
                ids.join(" "),
                if report.unprocessed.len() > 20 {
                    format!(" … (or --since {})", first.published_at)
                } else {
                    String::new()
                }
            );
        }
    }
    if !report.unprocessed.is_empty() {
        anyhow::bail!(
            "{} of {} published message(s) were never processed",
            report.unprocessed.len(),
            report.checked
        );
    }
    Ok(())
}

pub(crate) async fn reconcile(args: &ReconcileArgs) -> anyhow::Result<Report> {
    let inbox = quote_table(&args.inbox_table)?;
    let (outbox, _) = args.database.connect().await?;
    let consumer_target = db::parse_url(
        &args.dispatch_database_url,
        args.dispatch_database_ca_file.as_deref(),
    )?
    .named("outbox-relay reconcile");
    let consumer = db::connect(&consumer_target).await?;
    let since = args.since.resolve(&outbox).await?;
    let until = args.until.resolve(&outbox).await?;
    if since >= until {
        anyhow::bail!(
            "--since ({}) must be before --until ({}): the window is empty",
            format_time(since),
            format_time(until)
        );
    }
    let oldest: Option<SystemTime> = outbox
        .query_one(OLDEST_KEPT, &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(query_error("read the oldest published message"))?;
    let warning = match oldest {
        None => Some(
            "no published message is kept (OUTBOX_RETENTION deletes them; 0 deletes them \
             once published), so there was nothing to check"
                .to_string(),
        ),
        Some(oldest) if oldest > since => Some(format!(
            "the window starts at {} but the oldest published message still kept is from {}: \
             anything published before was deleted by retention (OUTBOX_RETENTION) or never existed",
            format_time(since),
            format_time(oldest)
        )),
        Some(_) => None,
    };
    let rows = outbox
        .query_typed(
            PUBLISHED,
            &[
                (&since, Type::TIMESTAMPTZ),
                (&until, Type::TIMESTAMPTZ),
                (&args.exchange, Type::TEXT),
            ],
        )
        .await
        .map_err(query_error("read published messages"))?;
    let published = rows
        .iter()
        .map(|row| {
            Ok(Unprocessed {
                id: row.try_get(0)?,
                message_id: row.try_get(1)?,
                exchange: row.try_get(2)?,
                routing_key: row.try_get(3)?,
                published_at: format_time(row.try_get::<_, SystemTime>(4)?),
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(query_error("read published messages"))?;
    let lookup = format!("SELECT message_id FROM {inbox} WHERE message_id = ANY($1)");
    let mut processed = HashSet::with_capacity(published.len());
    for chunk in published.chunks(CHUNK) {
        let wanted: Vec<Uuid> = chunk.iter().map(|m| m.message_id).collect();
        let found = consumer
            .query_typed(&lookup, &[(&wanted, Type::UUID_ARRAY)])
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot read the inbox {} on {}: {}",
                    args.inbox_table,
                    consumer_target.describe(),
                    outbox::error_line(&e)
                )
            })?;
        processed.extend(found.iter().map(|row| row.get::<_, Uuid>(0)));
    }
    let checked = published.len();
    let unprocessed = published
        .into_iter()
        .filter(|m| !processed.contains(&m.message_id))
        .collect();
    Ok(Report {
        since: format_time(since),
        until: format_time(until),
        checked,
        unprocessed,
        warning,
    })
}

/// `schema.table` as quoted identifiers: the name comes from a flag and
/// goes into SQL text, so it must not be able to carry anything else.
fn quote_table(name: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.is_empty() || parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
        anyhow::bail!("--inbox-table `{name}` must be `table` or `schema.table`");
    }
    Ok(parts
        .iter()
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join("."))
}

#[cfg(test)]
mod tests {
    use super::quote_table;

    #[test]
    fn inbox_table_names_are_quoted() {
        assert_eq!(
            quote_table("dispatch.inbox").ok().as_deref(),
            Some("\"dispatch\".\"inbox\"")
        );
        assert_eq!(
            quote_table("in\"box").ok().as_deref(),
            Some("\"in\"\"box\"")
        );
        assert!(quote_table("a.b.c").is_err());
        assert!(quote_table("a.").is_err());
    }
}
