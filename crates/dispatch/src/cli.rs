//! Command-line interface: `dispatch` (or `dispatch run`) consumes,
//! `dispatch migrate` only installs the schema. Every setting is also a
//! `DISPATCH_*` environment variable.

use clap::{CommandFactory, Parser, Subcommand};

use outbox_service::telemetry::LogFormat;

use crate::config::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "dispatch",
    version,
    about = "Dispatch center: consumes order messages into the dispatch database, effectively once"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub settings: Settings,

    /// Log lines as human-readable `text` or one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "DISPATCH_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,

    /// Debugging only: database errors in logs and dead letters' x-consumer-error quote the server's message and DETAIL, which can carry row values (a failing row, a duplicate key). Off: the SQLSTATE and the constraint, table and column names only.
    #[arg(
        long,
        global = true,
        env = "DISPATCH_LOG_ROW_VALUES",
        default_value_t = false,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    pub log_row_values: bool,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum Command {
    /// Migrate the dispatch schema, then consume until SIGTERM or SIGINT (the default).
    Run,
    /// Install or upgrade the `dispatch` schema and exit; running it twice changes nothing.
    Migrate,
}

/// Rejects `DISPATCH_*` variables that no setting reads: a typo would
/// otherwise silently leave the default in force.
pub fn check_environment(vars: impl Iterator<Item = (String, String)>) -> anyhow::Result<()> {
    let command = Cli::command();
    Ok(outbox_service::environment::check(
        &command,
        "DISPATCH_",
        &[],
        vars,
    )?)
}
