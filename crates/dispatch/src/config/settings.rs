//! The `dispatch` binary's settings as given: each a flag and a
//! `DISPATCH_*` variable, all optional so [`Settings::validate`] can tell
//! unset from set and apply the library's defaults.

use std::path::PathBuf;

use clap::Args;

/// Every setting; the doc comments are the `--help` text.
#[derive(Debug, Default, Clone, Args)]
pub struct Settings {
    /// PostgreSQL URL of the dispatch database; `sslmode=require|verify-ca|verify-full` for TLS.
    #[arg(
        long,
        env = "DISPATCH_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    pub database_url: Option<String>,

    /// PEM file of the CA that signed the PostgreSQL server certificate (default: system roots).
    #[arg(long, env = "DISPATCH_DATABASE_CA_FILE", global = true)]
    pub database_ca_file: Option<PathBuf>,

    /// RabbitMQ URL; `amqps://` for TLS [default: amqp://guest:guest@127.0.0.1:5672/%2f].
    #[arg(long, env = "DISPATCH_AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,

    /// PEM file of the CA that signed the RabbitMQ server certificate (default: system roots).
    #[arg(long, env = "DISPATCH_AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,

    /// Fanout exchange the orders arrive on [default: order_confirm_fanoutExchange].
    #[arg(long, env = "DISPATCH_EXCHANGE")]
    pub exchange: Option<String>,

    /// Queue consumed [default: order_confirm_fanoutQueue].
    #[arg(long, env = "DISPATCH_QUEUE")]
    pub queue: Option<String>,

    /// Queue holding transient failures until their retry [default: QUEUE.retry].
    #[arg(long, env = "DISPATCH_RETRY_QUEUE")]
    pub retry_queue: Option<String>,

    /// Dead-letter exchange [default: QUEUE.dlx].
    #[arg(long, env = "DISPATCH_DEAD_LETTER_EXCHANGE")]
    pub dead_letter_exchange: Option<String>,

    /// Dead-letter queue [default: QUEUE.dlq].
    #[arg(long, env = "DISPATCH_DEAD_LETTER_QUEUE")]
    pub dead_letter_queue: Option<String>,

    /// `classic`, or `quorum` for a clustered RabbitMQ (3.10 or later) [default: classic].
    #[arg(long, env = "DISPATCH_QUEUE_TYPE")]
    pub queue_type: Option<String>,

    /// Let the queues expire after this many idle milliseconds, and the exchanges go with them (for throwaway set-ups).
    #[arg(long, env = "DISPATCH_QUEUE_EXPIRES_MS")]
    pub queue_expires_ms: Option<u64>,

    /// Unacked deliveries at once, which is also how many handlers run concurrently [default: 16].
    #[arg(long, env = "DISPATCH_PREFETCH")]
    pub prefetch: Option<u16>,

    /// Deliveries of a transiently failing message before it is dead-lettered [default: 5].
    #[arg(long, env = "DISPATCH_MAX_DELIVERIES")]
    pub max_deliveries: Option<u32>,

    /// First retry delay in milliseconds; doubles per delivery [default: 1000].
    #[arg(long, env = "DISPATCH_RETRY_BASE_MS")]
    pub retry_base_ms: Option<u64>,

    /// Longest retry delay in milliseconds [default: 60000].
    #[arg(long, env = "DISPATCH_RETRY_MAX_MS")]
    pub retry_max_ms: Option<u64>,

    /// Milliseconds shutdown waits for handlers in progress [default: 10000].
    #[arg(long, env = "DISPATCH_SHUTDOWN_TIMEOUT_MS")]
    pub shutdown_timeout_ms: Option<u64>,

    /// Address of the HTTP API [default: 127.0.0.1:9000].
    #[arg(long, env = "DISPATCH_HTTP_ADDR")]
    pub http_addr: Option<String>,

    /// Comma-separated riders, picked by order id [default: Zhang Fei].
    #[arg(long, env = "DISPATCH_RIDERS")]
    pub riders: Option<String>,

    /// The seed's slow dispatcher: this order id takes DISPATCH_SLOW_ORDER_MS to handle (off by default).
    #[arg(long, env = "DISPATCH_SLOW_ORDER_ID")]
    pub slow_order_id: Option<i64>,

    /// How long the slow order takes, in milliseconds [default: 3000].
    #[arg(long, env = "DISPATCH_SLOW_ORDER_MS")]
    pub slow_order_ms: Option<u64>,
}
