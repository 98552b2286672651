//! `outbox-relay dead list|show|requeue|discard`: the dead letters
//! (`outbox.dead_letters`), one in full, a fresh set of attempts once the
//! cause is fixed, or deletion for good; each by ids or a filter.

use clap::{Args, Subcommand};

use super::{BulkArgs, DatabaseArgs, FilterArgs, Operator, report, shown, summary};
use crate::dead::{self, DeadLetter};
use crate::{Filter, MessageRef};

#[derive(Debug, Args)]
pub struct DeadArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(subcommand)]
    pub action: DeadAction,
}

#[derive(Debug, Subcommand)]
pub enum DeadAction {
    /// One line per dead letter, oldest first, with its last error.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
        limit: i64,
        /// Print JSON lines instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one dead letter, payload and headers included.
    Show {
        /// Its message_id, or its row id.
        id: MessageRef,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Give dead letters a fresh set of attempts (attempts reset to 0) once the cause is fixed.
    Requeue(Change),
    /// Delete dead letters for good (a dead head then stops blocking its ordering key).
    Discard(Change),
}

/// Which dead letters to change: ids, a filter, or `--all`.
#[derive(Debug, Args)]
pub struct Change {
    /// message_ids or row ids.
    #[arg(required_unless_present_any = ["all", "exchange", "routing_key", "ordering_key", "error", "since", "until"], conflicts_with = "all")]
    pub ids: Vec<MessageRef>,
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub bulk: BulkArgs,
}

pub async fn run(args: DeadArgs) -> anyhow::Result<()> {
    match args.action {
        DeadAction::List {
            filter,
            limit,
            json,
        } => {
            let (client, _) = args.database.connect().await?;
            let page = dead::list(&client, &filter.filter(&[]), limit).await?;
            list(&page.dead_letters, page.total, json)
        }
        DeadAction::Show { id, json } => {
            let (client, _) = args.database.connect().await?;
            show(&client, id, json).await
        }
        DeadAction::Requeue(change) => {
            let filter = change.filter()?;
            let operator = Operator::connect(&args.database).await?;
            let outcome = dead::requeue(operator.session(), &filter, change.bulk.bulk()).await?;
            let done = summary(
                &outcome,
                "requeued with a fresh set of attempts",
                "dead letter(s)",
            );
            report(&outcome, "requeued", &done, "not dead letters")
        }
        DeadAction::Discard(change) => {
            let filter = change.filter()?;
            let operator = Operator::connect(&args.database).await?;
            let outcome = dead::discard(operator.session(), &filter, change.bulk.bulk()).await?;
            let done = summary(&outcome, "deleted", "dead letter(s)");
            report(&outcome, "discarded", &done, "not dead letters")
        }
    }
}

impl Change {
    /// The dead letters named, refusing what would reach every one of them
    /// by accident (an empty `--error "$VAR"`, say) rather than by `--all`.
    fn filter(&self) -> anyhow::Result<Filter> {
        if self.all && self.filter.narrows() {
            anyhow::bail!("--all takes no filter: drop --all to act on what the filter matches");
        }
        if self.filter.error.as_deref() == Some("") {
            anyhow::bail!("--error needs a text: part of the last error to match");
        }
        let filter = self.filter.filter(&self.ids);
        if filter.is_empty() && !self.all {
            anyhow::bail!("name dead letters (ids or a filter), or --all for every one");
        }
        Ok(filter)
    }
}

fn list(letters: &[DeadLetter], total: i64, json: bool) -> anyhow::Result<()> {
    if json {
        for l in letters {
            println!("{}", serde_json::to_string(l)?);
        }
        return Ok(());
    }
    if letters.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    println!(
        "{:>8}  {:<36}  {:<20}  {:<20}  {:>8}  last error",
        "id", "message_id", "dead at", "exchange", "attempts"
    );
    for l in letters {
        println!(
            "{:>8}  {:<36}  {:<20}  {:<20}  {:>8}  {}",
            l.id,
            l.message_id,
            shown(&l.dead_at),
            shown(&l.exchange),
            l.attempts,
            shown(l.last_error.as_deref().unwrap_or(""))
        );
    }
    let shown = if total > letters.len() as i64 {
        format!(" (the first {} shown; --limit for more)", letters.len())
    } else {
        String::new()
    };
    println!(
        "{total} dead letter(s){shown}; `outbox-relay dead show ID` for one, `dead requeue ID…|--all` once the cause is fixed",
    );
    Ok(())
}

async fn show(client: &tokio_postgres::Client, id: MessageRef, json: bool) -> anyhow::Result<()> {
    // The command line is the operator's own: payloads are shown.
    let detail = dead::show(client, id, true).await.map_err(|e| match e {
        crate::Error::NotFound(_) => {
            anyhow::anyhow!("{id} is not a dead letter (see `outbox-relay dead list`)")
        }
        other => other.into(),
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&detail)?);
        return Ok(());
    }
    let l = &detail.letter;
    println!("id            {}", l.id);
    println!("message_id    {}", l.message_id);
    println!("exchange      {}", shown(&l.exchange));
    println!("routing_key   {}", shown(&l.routing_key));
    println!(
        "ordering_key  {}",
        shown(l.ordering_key.as_deref().unwrap_or("-"))
    );
    println!("created_at    {}", shown(&l.created_at));
    println!("dead_at       {}", shown(&l.dead_at));
    println!("attempts      {}", l.attempts);
    println!(
        "last_error    {}",
        shown(l.last_error.as_deref().unwrap_or("-"))
    );
    println!("content_type  {}", shown(&l.content_type));
    // serde_json escapes control characters in the headers.
    println!("headers       {}", detail.headers);
    match &detail.payload_text {
        Some(text) => println!("payload       {}", shown(text)),
        None => println!(
            "payload       {} bytes, not UTF-8 (SELECT payload FROM outbox.messages WHERE id = {})",
            detail.payload_bytes, l.id
        ),
    }
    Ok(())
}
