//! Command-line interface. Every `run` setting is also an `OUTBOX_*`
//! variable and a key of the optional TOML file.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::config::Settings;
use outbox_admin::cli;
use outbox_service::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Transactional outbox relay: publishes rows of outbox.messages to RabbitMQ with publisher confirms"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log lines as human-readable `text` or one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "OUTBOX_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,

    /// Debugging only: database errors in logs and alerts quote the server's message and DETAIL, which can carry row values (a failing row, a duplicate key). Off: the SQLSTATE and the constraint, table and column names only.
    #[arg(
        long,
        global = true,
        env = "OUTBOX_LOG_ROW_VALUES",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub log_row_values: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install or upgrade the `outbox` schema; running it twice changes nothing.
    Migrate(MigrateArgs),
    /// Publish outbox rows until SIGTERM or SIGINT.
    Run(Box<RunArgs>),
    /// Counts by state and by exchange, the oldest pending age, dead letters, listening relays.
    Status(cli::status::StatusArgs),
    /// List, show, requeue or discard dead letters.
    Dead(cli::dead::DeadArgs),
    /// Publish already-published messages again, with the same message_id.
    Replay(cli::replay::ReplayArgs),
    /// List messages published but never processed, from the consumer's inbox.
    Reconcile(cli::reconcile::ReconcileArgs),
    /// Publish an existing table's changes without touching the app: add, list, remove.
    Capture(cli::capture::CaptureArgs),
    /// Serve the web console and its JSON API (read-only unless OUTBOX_CONSOLE_TOKEN is set).
    Console(Box<outbox_admin::console::ConsoleArgs>),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// PostgreSQL URL of the application database (`postgres://user@host/db?sslmode=require`).
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// PEM file of the CA that signed the PostgreSQL server certificate.
    #[arg(long, env = "OUTBOX_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML file with any of the settings below (keys as the flag names, with underscores); flags and environment win over it.
    #[arg(long, env = "OUTBOX_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub settings: Settings,
}

/// Rejects `OUTBOX_*` variables that `outbox-relay run` does not read (a
/// typo would otherwise silently leave the default in force). The names
/// come from the clap definitions, `OUTBOX_CONFIG` and the global
/// `OUTBOX_LOG_FORMAT` included; the console's (`OUTBOX_CONSOLE_*`) pass.
pub fn check_environment(vars: impl Iterator<Item = (String, String)>) -> anyhow::Result<()> {
    let mut command = Cli::command();
    // Copies the global flags into the subcommands and names them
    // `outbox-relay run`, as the error's pointer to `--help` should.
    command.build();
    let run = command
        .find_subcommand("run")
        .context("the command line has no `run`")?;
    // The console's settings may share the relay's environment.
    let console = command
        .find_subcommand("console")
        .map(outbox_service::environment::known)
        .unwrap_or_default();
    let console: Vec<&str> = console.iter().map(String::as_str).collect();
    Ok(outbox_service::environment::check(
        run, "OUTBOX_", &console, vars,
    )?)
}

/// Rejects `OUTBOX_CONSOLE_*` variables that `outbox-relay console` does
/// not read: a misspelt token would leave the console read-only without a
/// word. (The relay's own variables may share its environment.)
pub fn check_console_environment(
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    let mut command = Cli::command();
    command.build();
    let console = command
        .find_subcommand("console")
        .context("the command line has no `console`")?;
    Ok(outbox_service::environment::check(
        console,
        "OUTBOX_CONSOLE_",
        &[],
        vars,
    )?)
}
