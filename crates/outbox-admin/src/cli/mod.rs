//! The operator commands of `outbox-relay` (`status`, `dead`, `replay`,
//! `reconcile`, `capture`, `console`): flags in, the library's operations,
//! output for people or `--json` for scripts. They need no broker:
//! anything to publish again is handed back to the running relays.

pub mod capture;
pub mod dead;
pub mod reconcile;
pub mod replay;
pub mod status;

use std::path::PathBuf;

use clap::Args;
use tokio_postgres::Client;

use outbox_service::db::{self, PgTarget};

use crate::{Bulk, Filter, MessageRef, Outcome, TimeArg};

/// The app database, as for `run` and `migrate`.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL of the application database (`postgres://user@host/db?sslmode=require`).
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// PEM file of the CA that signed the PostgreSQL server certificate.
    #[arg(long, env = "OUTBOX_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
}

impl DatabaseArgs {
    pub fn target(&self, name: &str) -> anyhow::Result<PgTarget> {
        Ok(db::parse_url(&self.database_url, self.database_ca_file.as_deref())?.named(name))
    }

    /// Connects and checks that the outbox schema is there, so a wrong
    /// database is one clear line rather than "relation does not exist".
    pub async fn connect(&self) -> anyhow::Result<(Client, PgTarget)> {
        let target = self.target("outbox-relay command")?;
        let client = db::connect(&target).await?;
        check_schema(&client, &target).await?;
        Ok((client, target))
    }
}

/// Fails with one line when `outbox.messages` is missing.
pub async fn check_schema(client: &Client, target: &PgTarget) -> anyhow::Result<()> {
    let installed: bool = client
        .query_one("SELECT to_regclass('outbox.messages') IS NOT NULL", &[])
        .await
        .map_err(outbox::PgError)?
        .get(0);
    if !installed {
        anyhow::bail!(
            "the outbox schema is missing in {}: run `outbox-relay migrate` first",
            target.describe()
        );
    }
    Ok(())
}

/// Which rows, beside the ids each command takes its own way: every flag
/// optional, all ANDed.
#[derive(Debug, Clone, Default, Args)]
pub struct FilterArgs {
    /// Only messages to this exchange.
    #[arg(long)]
    pub exchange: Option<String>,
    /// Only messages with this routing key.
    #[arg(long)]
    pub routing_key: Option<String>,
    /// Only messages of this ordering key.
    #[arg(long)]
    pub ordering_key: Option<String>,
    /// Only messages whose last error contains this text (any case).
    #[arg(long)]
    pub error: Option<String>,
    /// From this time: a duration ago (`30m`, `2h`) or a timestamp (`2026-11-27T03:00:00Z`).
    #[arg(long)]
    pub since: Option<TimeArg>,
    /// Before this time.
    #[arg(long)]
    pub until: Option<TimeArg>,
}

impl FilterArgs {
    pub fn filter(&self, ids: &[MessageRef]) -> Filter {
        Filter {
            ids: ids.to_vec(),
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            ordering_key: self.ordering_key.clone(),
            error: self.error.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
        }
        .normalized()
    }

    /// Whether any flag narrows the rows.
    pub fn narrows(&self) -> bool {
        !self.filter(&[]).is_empty()
    }
}

/// How a change runs: a dry run, or batches at a bounded rate.
#[derive(Debug, Clone, Args)]
pub struct BulkArgs {
    /// Say what would change and change nothing (logged in outbox.admin_log too).
    #[arg(long)]
    pub dry_run: bool,
    /// Rows per statement.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub batch: i64,
    /// Rows changed per second at most, so the relays' claims are not starved; 0: no limit.
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,
}

impl BulkArgs {
    pub fn bulk(&self) -> Bulk {
        Bulk {
            dry_run: self.dry_run,
            batch: self.batch,
            rate: (self.rate > 0.0).then_some(self.rate),
        }
    }
}

/// Prints the rows an outcome names (`verb` being its action's past
/// tense), then `summary`, or the dry run's line; an error when a named id
/// matched nothing (`not` says what they were not).
pub fn report(outcome: &Outcome, verb: &str, summary: &str, not: &str) -> anyhow::Result<()> {
    let label = if outcome.dry_run { "would be" } else { verb };
    for row in &outcome.sample {
        println!("{label} {} {}", row.id, row.message_id);
    }
    if outcome.matched > outcome.sample.len() as i64 {
        println!(
            "… and {} more",
            outcome.matched - outcome.sample.len() as i64
        );
    }
    println!("{summary}");
    if !outcome.unmatched.is_empty() {
        anyhow::bail!("{not}, left alone: {}", outcome.unmatched.join(", "));
    }
    Ok(())
}

/// "would requeue 3 dead letter(s) (dry run: nothing changed)" or
/// "3 dead letter(s) requeued".
pub fn summary(outcome: &Outcome, verb: &str, noun: &str) -> String {
    match outcome.changed {
        Some(changed) => format!("{changed} {noun} {verb}"),
        None => format!(
            "would {} {} {noun} (dry run: nothing changed)",
            outcome.action, outcome.matched
        ),
    }
}
