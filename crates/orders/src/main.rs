//! `orders`: the demo order service. Migrates its database (the `orders`
//! table and the outbox schema), then serves HTTP until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use orders::{AppState, DEFAULT_EXCHANGE};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "orders",
    version,
    about = "Order service: POST /orders writes the order and its outbox message in one transaction"
)]
struct Args {
    /// PostgreSQL URL of the order database.
    #[arg(long, env = "ORDERS_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Address to serve HTTP on.
    #[arg(long, env = "ORDERS_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// Exchange order messages are published to.
    #[arg(long, env = "ORDERS_EXCHANGE", default_value = DEFAULT_EXCHANGE)]
    exchange: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    outbox_service::telemetry::init();
    match try_main(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("orders: error: {}", outbox::chain_line(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn try_main(args: Args) -> anyhow::Result<()> {
    let target = outbox_service::db::parse_url(&args.database_url, None)?.named("orders");
    orders::migrate(&target).await?;
    let pool = outbox_service::db::pool(&target, 16).await?;
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.http_addr))?;
    let shutdown = CancellationToken::new();
    outbox_service::shutdown::cancel_on_signal(shutdown.clone());
    let state = AppState {
        pool,
        exchange: args.exchange,
    };
    orders::serve(listener, state, shutdown).await
}
