//! `outbox-relay`: installs the outbox schema and publishes outbox rows to
//! RabbitMQ. The binary only parses flags and reports errors; the work lives
//! in the library modules.

use std::process::ExitCode;

use clap::Parser;
use outbox_relay::cli::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    outbox_relay::telemetry::init();
    match try_main(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the error and its causes, joined by ": ".
            eprintln!("outbox-relay: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate(args) => outbox_relay::migrate::run(args).await,
    }
}
