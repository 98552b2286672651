//! `dispatch`: the dispatch center's binary. It parses flags, wires signals
//! to a cancellation token and reports errors in one line; the work lives
//! in the library.

use std::process::ExitCode;

use clap::Parser;
use dispatch::cli::{Cli, Command};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    outbox_service::telemetry::init_with(cli.log_format);
    outbox::show_row_values(cli.log_row_values);
    match try_main(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dispatch: error: {}", outbox::chain_line(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn try_main(cli: Cli) -> anyhow::Result<()> {
    dispatch::cli::check_environment(std::env::vars())?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Migrate => dispatch::migrate::run(&cli.settings.database()?).await,
        Command::Run => {
            let config = cli.settings.validate()?;
            let traces = outbox_service::otel::init("dispatch")?;
            let shutdown = CancellationToken::new();
            // Stop consuming, finish or give back the deliveries in hand.
            outbox_service::shutdown::cancel_on_signal(shutdown.clone());
            let result = dispatch::run(config, shutdown).await;
            traces.shutdown().await;
            result
        }
    }
}
