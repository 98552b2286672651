//! `outbox-relay reconcile --dispatch-database-url URL`: which messages the
//! broker confirmed but the consumer never processed. The outbox knows what
//! was published (`published_at`), the consumer's inbox knows what was
//! processed (`message_id` committed with its writes); a message in the
//! first and not the second was lost or dead-lettered downstream, or is
//! still queued. No broker-side tool can tell this.
//!
//! Exits 1 when anything is missing, so a cron job can page on it.

use std::path::PathBuf;

use clap::Args;

use super::DatabaseArgs;
use crate::TimeArg;
use crate::reconcile::{Inbox, Report};
use outbox_service::db;

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

async fn reconcile(args: &ReconcileArgs) -> anyhow::Result<Report> {
    let (outbox, _) = args.database.connect().await?;
    let consumer_target = db::parse_url(
        &args.dispatch_database_url,
        args.dispatch_database_ca_file.as_deref(),
    )?
    .named("outbox-relay reconcile");
    let consumer = db::connect(&consumer_target).await?;
    let inbox = Inbox {
        client: &consumer,
        described: consumer_target.describe(),
        table: &args.inbox_table,
    };
    Ok(crate::reconcile::reconcile(
        &outbox,
        &inbox,
        &args.since,
        &args.until,
        args.exchange.as_deref(),
    )
    .await?)
}
