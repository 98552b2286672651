//! Consumes the messages of an exchange and a queue of your choosing into a
//! table of your choosing, effectively once, with the `outbox-consumer`
//! library:
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/shop \
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//! cargo run -p outbox-consumer --example into_my_table -- \
//!     --exchange order_confirm_fanoutExchange --queue shop.orders --table shop_orders
//! ```
//!
//! Each message becomes one row of `--table` (created when missing) with
//! its `message_id`, exchange, routing key and JSON body. The inbox table
//! (`--inbox-table`, by default the table's name with `_inbox`) records
//! each `message_id` in the same transaction, so a redelivered or
//! republished copy writes nothing. A body that is not JSON is poison: the
//! database refuses it, and the consumer moves it to the dead-letter queue
//! `QUEUE.dlq` with the reason in its `x-consumer-error` header. A lost
//! connection or deadlock is retried through `QUEUE.retry`; a database
//! outage holds the deliveries until it is over. `/metrics` (the
//! `consumer_*` series), `/healthz` and `/readyz` are served on
//! `--metrics-addr`. SIGTERM or Ctrl-C stops it, giving back what it holds.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use outbox_consumer::{ConsumerConfig, Handler, HandlerError, Inbox, Incoming, Topology};
use outbox_service::telemetry::LogFormat;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    about = "Consumes a RabbitMQ queue into a PostgreSQL table of your choosing, effectively once"
)]
struct Args {
    /// PostgreSQL URL of the database that holds the table.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,

    /// RabbitMQ URL; several comma-separated URLs name the nodes of one cluster.
    #[arg(long, env = "AMQP_URL", hide_env_values = true, default_value = outbox_service::amqp::DEFAULT_URL)]
    amqp_url: String,

    /// Fanout exchange to consume from (declared when missing).
    #[arg(long)]
    exchange: String,

    /// Queue bound to it (declared when missing, with QUEUE.retry and QUEUE.dlq).
    #[arg(long)]
    queue: String,

    /// Table the messages go into, `name` or `schema.name` (created when missing).
    #[arg(long)]
    table: String,

    /// Inbox table, `name` or `schema.name` [default: TABLE_inbox].
    #[arg(long)]
    inbox_table: Option<String>,

    /// Where `/metrics`, `/healthz` and `/readyz` are served (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:9300")]
    metrics_addr: SocketAddr,

    /// Let idle queues expire after this many milliseconds (for throwaway set-ups).
    #[arg(long)]
    queue_expires_ms: Option<u64>,

    /// Log lines as text or as one JSON object per line.
    #[arg(long, value_enum, default_value_t)]
    log_format: LogFormat,
}

/// The handler: one row per message. The consumer has written the inbox row
/// in `tx` already and commits both together.
struct IntoTable {
    insert: String,
}

impl Handler for IntoTable {
    async fn handle(&self, tx: &Transaction<'_>, message: &Incoming) -> Result<(), HandlerError> {
        let body = std::str::from_utf8(&message.body)
            .map_err(|_| HandlerError::Poison("the body is not UTF-8 text".into()))?;
        // A body that is not JSON fails the cast (SQLSTATE 22P02), which
        // `From<tokio_postgres::Error>` sorts as poison.
        tx.execute(
            &self.insert,
            &[
                &message.message_id,
                &message.exchange,
                &message.routing_key,
                &body,
            ],
        )
        .await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    outbox_service::telemetry::init_with(args.log_format);
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "into_my_table: error: {}",
                outbox::chain_line(error.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let table = outbox_consumer::plain_table_name(&args.table)?;
    let inbox_table = args.inbox_table.unwrap_or_else(|| format!("{table}_inbox"));
    let inbox = Inbox::new(&inbox_table)?;

    // Before anything records: metrics sent to no recorder are lost.
    outbox_service::telemetry::prometheus();
    let target = outbox_service::db::parse_url(&args.database_url, None)?.named("into_my_table");
    let mut topology = Topology::named(&args.exchange, &args.queue);
    topology.expires = args.queue_expires_ms.map(Duration::from_millis);
    let config = ConsumerConfig {
        name: "into_my_table".into(),
        ..ConsumerConfig::new(&args.amqp_url, topology, &inbox_table)
    };
    // One connection per handler running at once, and one for `/readyz`.
    let pool = outbox_service::db::pool(&target, usize::from(config.lanes) + 1).await?;

    let client = pool.get().await?;
    inbox
        .create_table(&**client)
        .await
        .map_err(outbox::PgError)
        .with_context(|| format!("cannot create the inbox table {inbox_table}"))?;
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (message_id uuid PRIMARY KEY, \
             exchange text NOT NULL, routing_key text NOT NULL, body jsonb NOT NULL, \
             received_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await
        .map_err(outbox::PgError)
        .with_context(|| format!("cannot create the table {table}"))?;
    drop(client);
    let handler = IntoTable {
        insert: format!(
            "INSERT INTO {table} (message_id, exchange, routing_key, body) \
             VALUES ($1, $2, $3, $4::text::jsonb)"
        ),
    };

    // Spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let traces = outbox_service::otel::init("into_my_table")?;
    let shutdown = CancellationToken::new();
    outbox_service::shutdown::cancel_on_signal(shutdown.clone());
    let health = outbox_consumer::health::new();
    let readiness = outbox_consumer::readiness(health.clone(), pool.clone());
    let endpoint_stop = shutdown.child_token();
    let (addr, endpoint) = outbox_service::endpoint::start(
        args.metrics_addr,
        readiness,
        axum::Router::new(),
        endpoint_stop.clone(),
    )
    .await?;
    tracing::info!(%addr, %table, inbox = %inbox_table, "serving /metrics, /healthz and /readyz");

    let consumed = outbox_consumer::run(config, pool, handler, health, shutdown).await;
    endpoint_stop.cancel();
    let _ = endpoint.await;
    traces.shutdown().await;
    consumed
}
