//! `outbox-relay capture add|list|remove`: publish an existing table's
//! changes without touching the app. The SQL functions of
//! `sql/outbox/V2__capture.sql` do the work (and any language can call them);
//! this is their command line, with one-line errors.

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use outbox_service::db;

pub use super::DatabaseArgs;
use crate::Actor;
use crate::audit::{self, Entry};

#[derive(Debug, Args)]
pub struct CaptureArgs {
    #[command(subcommand)]
    pub action: CaptureAction,
}

#[derive(Debug, Subcommand)]
pub enum CaptureAction {
    /// Attach a trigger to TABLE so its changes enqueue outbox messages in the
    /// same transaction. Adding the same capture again changes nothing;
    /// different options replace the table's capture.
    Add(AddArgs),
    /// List the captured tables and their options.
    List(DatabaseArgs),
    /// Detach the capture from TABLE: drops its trigger and its function,
    /// leaving the table as it was. Removing twice is fine.
    Remove(RemoveArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The table, as SQL names it: `orders`, `shop.orders`, `"Orders"`.
    pub table: String,

    /// Exchange the messages go to.
    #[arg(long)]
    pub exchange: String,

    /// Routing key template: text with `{op}` (insert, update, delete),
    /// `{table}`, `{schema}` or `{COLUMN}` (the new row's value; the old
    /// row's for deletes).
    #[arg(long, default_value = "{table}.{op}")]
    pub routing_key: String,

    /// Ordering key template naming at least one column, e.g. `{id}` or
    /// `order-{id}`: the changes of one key are published in commit order.
    /// Without it messages are unordered and fully pipelined.
    #[arg(long)]
    pub ordering_key: Option<String>,

    /// Operations to capture.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "insert,update,delete"
    )]
    pub operations: Vec<Operation>,

    /// Publish only these columns (comma-separated) instead of the whole row.
    #[arg(long, value_delimiter = ',')]
    pub columns: Option<Vec<String>>,

    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The table, as SQL names it.
    pub table: String,

    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Operation {
    Insert,
    Update,
    Delete,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }
}

pub async fn run(args: CaptureArgs) -> anyhow::Result<()> {
    match args.action {
        CaptureAction::Add(args) => add(args).await,
        CaptureAction::List(args) => list(args).await,
        CaptureAction::Remove(args) => remove(args).await,
    }
}

/// Writes the change to the audit trail. After the fact: a capture is
/// made by the schema's owner, who may always write it.
async fn log(
    client: &Client,
    action: &str,
    options: serde_json::Value,
    changed: bool,
) -> anyhow::Result<()> {
    let entry = Entry {
        actor: &Actor::os_user(),
        action,
        dry_run: false,
        filter: options,
        matched: 1,
        changed: Some(i64::from(changed)),
        error: None,
    };
    Ok(audit::record(client, &entry).await?)
}

async fn connect(args: &DatabaseArgs) -> anyhow::Result<Client> {
    db::connect(&args.target("outbox-relay capture")?).await
}

/// The table given as `$1`, schema-qualified whatever the search path.
const QUALIFIED: &str = "(SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::text::regclass)";

/// One line for a failed capture call; names the missing migration when
/// that is the cause.
fn explain(error: tokio_postgres::Error) -> anyhow::Error {
    let line = outbox::error_line(&error);
    if error.code() == Some(&SqlState::UNDEFINED_FUNCTION)
        || error.code() == Some(&SqlState::UNDEFINED_TABLE) && line.contains("outbox.captures")
    {
        anyhow::anyhow!("{line} (is the outbox schema installed? run `outbox-relay migrate`)")
    } else {
        anyhow::anyhow!(line)
    }
}

async fn add(args: AddArgs) -> anyhow::Result<()> {
    let client = connect(&args.database).await?;
    let operations: Vec<&str> = args.operations.iter().map(|op| op.as_str()).collect();
    let row = client
        .query_one(
            &format!("SELECT outbox.capture($1::text::regclass, $2, $3, $4, $5, $6), {QUALIFIED}"),
            &[
                &args.table,
                &args.exchange,
                &args.routing_key,
                &args.ordering_key,
                &operations,
                &args.columns,
            ],
        )
        .await
        .map_err(explain)
        .with_context(|| format!("cannot capture {}", args.table))?;
    let (changed, table): (bool, String) = (row.get(0), row.get(1));
    let options = serde_json::json!({
        "table": table,
        "exchange": args.exchange,
        "routing_key": args.routing_key,
        "ordering_key": args.ordering_key,
        "operations": operations,
        "columns": args.columns,
    });
    log(&client, "capture add", options, changed).await?;
    if changed {
        println!(
            "capturing {table}: {} to exchange {:?}, routing key {:?}",
            operations.join(", "),
            args.exchange,
            args.routing_key
        );
    } else {
        println!("{table} is already captured with these options; nothing changed");
    }
    Ok(())
}

async fn list(args: DatabaseArgs) -> anyhow::Result<()> {
    let (client, _) = args.connect().await?;
    let captures = crate::captures::list(&client).await?;
    if captures.is_empty() {
        println!("no table is captured");
        return Ok(());
    }
    let header = [
        "table",
        "operations",
        "exchange",
        "routing key",
        "ordering key",
        "payload",
        "enabled",
    ];
    let mut table: Vec<[String; 7]> = vec![header.map(String::from)];
    for capture in captures {
        table.push([
            capture.table,
            capture.operations.join(","),
            capture.exchange,
            capture.routing_key,
            capture.ordering_key.unwrap_or_else(|| "-".into()),
            capture
                .columns
                .map_or_else(|| "whole row".into(), |columns| columns.join(",")),
            if capture.enabled {
                "yes"
            } else {
                "no (trigger disabled)"
            }
            .to_string(),
        ]);
    }
    let mut widths = [0; 7];
    for line in &table {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for line in &table {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    Ok(())
}

async fn remove(args: RemoveArgs) -> anyhow::Result<()> {
    let client = connect(&args.database).await?;
    let row = client
        .query_one(
            &format!("SELECT outbox.capture_remove($1::text::regclass), {QUALIFIED}"),
            &[&args.table],
        )
        .await
        .map_err(explain)
        .with_context(|| format!("cannot remove the capture of {}", args.table))?;
    let (removed, table): (bool, String) = (row.get(0), row.get(1));
    log(
        &client,
        "capture remove",
        serde_json::json!({ "table": table }),
        removed,
    )
    .await?;
    if removed {
        println!("stopped capturing {table}: its trigger and function are dropped");
    } else {
        println!("{table} was not captured; nothing changed");
    }
    Ok(())
}
