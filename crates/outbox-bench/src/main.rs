//! `outbox-bench`: measures the relay against real servers and prints
//! figures (tables, or JSON with `--json`). The binary parses flags and
//! reports errors; each measurement lives in its own module.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

mod bridge;
mod capture;
mod cli;
mod consume;
mod cost;
mod drain;
mod figures;
mod latency;
mod observe;
mod otlp_sink;
mod plot;
mod processes;
mod progress;
mod report;
mod schedule;
mod setup;
mod soak;
mod sweep;
mod write_path;
mod writers;

use cli::{Cli, Command};

/// The relay's warnings are part of what a run shows; its info lines are not.
const DEFAULT_LOG_FILTER: &str = "warn,lapin=off,refinery_core=warn";

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    // The relay's guard too: the bench's own lapin connections would print
    // bodies and the broker login at `RUST_LOG=trace`.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .finish()
        .with(outbox_service::telemetry::guard())
        .init();
    // With OTEL_EXPORTER_OTLP_ENDPOINT set, the relay started in this
    // process exports its spans (the dispatch child inherits the variable).
    let traces = match &cli.command {
        Command::OtlpSink(_) => Ok(Default::default()),
        _ => outbox_service::otel::init("outbox-relay"),
    };
    let traces = match traces {
        Ok(traces) => traces,
        Err(error) => {
            eprintln!("outbox-bench: error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = try_main(cli).await;
    traces.shutdown().await;
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!(
                "outbox-bench: error: {}",
                outbox::chain_line(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

async fn try_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Drain(args) => report::print_drain(&drain::run(&args).await?, args.common.json),
        Command::Consume(args) => consume::run(args).await?,
        Command::Latency(args) => {
            let results = latency::run(&args).await?;
            if args.rates.is_empty() {
                report::print_latency(&results, args.common.json);
                plot::write(&args.plot, |path| plot::latency(path, &results))?;
            } else {
                sweep::print(&results, args.common.json);
                plot::write(&args.plot, |path| plot::sweep(path, &results))?;
            }
        }
        Command::Soak(args) => {
            let result = soak::run(&args).await?;
            report::print_soak(&result, args.every, args.common.json);
            plot::write(&args.plot, |path| plot::soak(path, &result))?;
        }
        Command::WritePath(args) => return write_path::run(&args),
        Command::Schedule(args) => schedule::print(&schedule::run(&args).await?, args.common.json),
        Command::OtlpSink(args) => otlp_sink::run(&args).await?,
    }
    Ok(ExitCode::SUCCESS)
}
