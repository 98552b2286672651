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

use tokio_util::sync::CancellationToken;

use crate::{Actor, Bulk, Filter, MessageRef, Outcome, Session, TimeArg};

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

/// The person at the command line making a change: two connections (the
/// change's and its audit row's) and Ctrl-C or SIGTERM stopping it between
/// two batches, logged as such.
pub struct Operator {
    client: Client,
    trail: Client,
    actor: Actor,
    stop: CancellationToken,
}

impl Operator {
    pub async fn connect(database: &DatabaseArgs) -> anyhow::Result<Operator> {
        let (client, target) = database.connect().await?;
        let trail = db::connect(&target).await?;
        let stop = CancellationToken::new();
        outbox_service::shutdown::cancel_on_signal(stop.clone());
        Ok(Operator {
            client,
            trail,
            actor: Actor::os_user(),
            stop,
        })
    }

    pub fn session(&self) -> Session<'_> {
        Session {
            work: &self.client,
            trail: &self.trail,
            actor: &self.actor,
            stop: &self.stop,
        }
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
    #[arg(long, default_value_t = 5_000.0, value_parser = rate)]
    pub rate: f64,
}

/// A rate: a number of rows per second, 0 or more.
pub fn rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err(format!(
            "`{text}` is not a rate: rows per second, 0 for no limit"
        )),
    }
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

/// Text from a row, safe to print on a terminal: a writer or the broker
/// set it, and an escape sequence in it (ESC[2J clears the screen) or a
/// bidi override (U+202E reverses what follows) must show, not act.
/// Newlines and tabs stay.
pub fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    let hidden = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(hidden) {
        return std::borrow::Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| {
            if hidden(c) {
                format!("\\u{{{:04x}}}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Prints the rows an outcome names (`verb` being its action's past
/// tense), then `summary`, or the dry run's line; an error when a named id
/// matched nothing (`not` says what they were not).
pub fn report(outcome: &Outcome, verb: &str, summary: &str, not: &str) -> anyhow::Result<()> {
    let label = if outcome.dry_run {
        format!("would {}", outcome.action)
    } else {
        verb.to_string()
    };
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

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn row_text_cannot_drive_the_terminal() {
        assert_eq!(shown("plain\ttext\n"), "plain\ttext\n");
        assert_eq!(shown("a\u{1b}[2Jb"), "a\\u{001b}[2Jb");
        assert_eq!(shown("\u{202e}evil"), "\\u{202e}evil");
    }
}
