//! `outbox-relay`: installs the outbox schema and publishes outbox rows to
//! RabbitMQ. The binary only parses flags, wires signals to a cancellation
//! token and reports errors; the work lives in the library.

use std::process::ExitCode;

use clap::Parser;
use outbox_admin::cli;
use outbox_relay::cli::{Cli, Command, RunArgs, check_console_environment, check_environment};
use outbox_relay::config::Settings;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    outbox_service::telemetry::init_with(cli.log_format);
    outbox::show_row_values(cli.log_row_values);
    match try_main(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the error and its causes, joined by ": " (see chain_line).
            eprintln!(
                "outbox-relay: error: {}",
                outbox::chain_line(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

async fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate(args) => outbox_relay::migrate::run(args).await,
        Command::Run(args) => run(*args).await,
        Command::Status(args) => cli::status::run(args).await,
        Command::Dead(args) => cli::dead::run(args).await,
        Command::Replay(args) => cli::replay::run(args).await,
        Command::Reconcile(args) => cli::reconcile::run(args).await,
        Command::Capture(args) => cli::capture::run(args).await,
        Command::Console(args) => console(*args).await,
    }
}

async fn console(args: outbox_admin::console::ConsoleArgs) -> anyhow::Result<()> {
    check_console_environment(std::env::vars())?;
    let shutdown = CancellationToken::new();
    outbox_service::shutdown::cancel_on_signal(shutdown.clone());
    outbox_admin::console::serve(args, shutdown).await
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    check_environment(std::env::vars())?;
    let file = match &args.config {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    let config = args.settings.over(file)?.validate()?;
    let traces = outbox_service::otel::init("outbox-relay")?;
    let shutdown = CancellationToken::new();
    outbox_service::shutdown::cancel_on_signal(shutdown.clone());
    let result = outbox_relay::run(config, shutdown).await;
    // The spans still buffered go out before the process does.
    traces.shutdown().await;
    result
}
