//! The `dispatch` binary's settings as given: each a flag and a
//! `DISPATCH_*` variable, all optional so [`Settings::validate`] can tell
//! unset from set and apply the library's defaults.

use std::path::PathBuf;

use clap::Args;
use outbox_consumer::ConsumerConfig;
use outbox_service::with_default;

use super::defaults;

/// Every setting; the doc comments or `help` texts are the `--help` text,
/// a default named from where `validate` takes it.
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

    #[arg(long, env = "DISPATCH_AMQP_URL", hide_env_values = true, help = with_default!("RabbitMQ URL; `amqps://` for TLS", outbox_service::amqp::DEFAULT_URL))]
    pub amqp_url: Option<String>,

    /// PEM file of the CA that signed the RabbitMQ server certificate (default: system roots).
    #[arg(long, env = "DISPATCH_AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,

    #[arg(long, env = "DISPATCH_EXCHANGE", help = with_default!("Fanout exchange the orders arrive on", defaults::EXCHANGE))]
    pub exchange: Option<String>,

    #[arg(long, env = "DISPATCH_QUEUE", help = with_default!("Queue consumed", defaults::QUEUE))]
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

    #[arg(long, env = "DISPATCH_QUEUE_TYPE", help = with_default!("`classic`, or `quorum` for a clustered RabbitMQ (3.10 or later)", defaults::QUEUE_TYPE))]
    pub queue_type: Option<String>,

    #[arg(long, env = "DISPATCH_SINGLE_ACTIVE_CONSUMER", help = with_default!("Declare the queue with x-single-active-consumer: several dispatch processes, one consuming at a time, the next taking over in order (an existing queue must be deleted to change it)", false))]
    pub single_active_consumer: Option<bool>,

    /// Let the queues expire after this many idle milliseconds, and the exchanges go with them (for throwaway set-ups).
    #[arg(long, env = "DISPATCH_QUEUE_EXPIRES_MS")]
    pub queue_expires_ms: Option<u64>,

    #[arg(long, env = "DISPATCH_PREFETCH", help = with_default!("Unacked deliveries at once; LANES x BATCH_SIZE or more keeps batches full", ConsumerConfig::DEFAULT_PREFETCH))]
    pub prefetch: Option<u16>,

    #[arg(long, env = "DISPATCH_LANES", help = with_default!("Transactions at once; an order key's messages always take the same lane", ConsumerConfig::DEFAULT_LANES))]
    pub lanes: Option<u16>,

    #[arg(long, env = "DISPATCH_BATCH_SIZE", help = with_default!("Most deliveries handled in one transaction", ConsumerConfig::DEFAULT_BATCH_SIZE))]
    pub batch_size: Option<u16>,

    #[arg(long, env = "DISPATCH_MAX_DELIVERIES", help = with_default!("Deliveries of a transiently failing message before it is dead-lettered", ConsumerConfig::DEFAULT_MAX_DELIVERIES))]
    pub max_deliveries: Option<u32>,

    #[arg(long, env = "DISPATCH_RETRY_BASE_MS", help = with_default!("First retry delay in milliseconds; doubles per delivery", ConsumerConfig::DEFAULT_RETRY_BASE.as_millis()))]
    pub retry_base_ms: Option<u64>,

    #[arg(long, env = "DISPATCH_RETRY_MAX_MS", help = with_default!("Longest retry delay in milliseconds", ConsumerConfig::DEFAULT_RETRY_MAX.as_millis()))]
    pub retry_max_ms: Option<u64>,

    #[arg(long, env = "DISPATCH_INBOX_RETENTION_MS", help = with_default!("Inbox rows older than this many milliseconds are deleted (a copy arriving later is handled again); 0 keeps them all", defaults::INBOX_RETENTION_MS))]
    pub inbox_retention_ms: Option<u64>,

    #[arg(long, env = "DISPATCH_KEY_GAP_WAIT_MS", help = with_default!("Milliseconds a keyed order that came before an earlier one of its key (x-outbox-seq) waits for it; nothing waits while other consumers share the queue (0: nothing ever waits)", ConsumerConfig::DEFAULT_KEY_GAP_WAIT.as_millis()))]
    pub key_gap_wait_ms: Option<u64>,

    #[arg(long, env = "DISPATCH_SHUTDOWN_TIMEOUT_MS", help = with_default!("Milliseconds shutdown waits for handlers in progress", ConsumerConfig::DEFAULT_SHUTDOWN_TIMEOUT.as_millis()))]
    pub shutdown_timeout_ms: Option<u64>,

    #[arg(long, env = "DISPATCH_HTTP_ADDR", help = with_default!("Address of the HTTP API", defaults::HTTP_ADDR))]
    pub http_addr: Option<String>,

    #[arg(long, env = "DISPATCH_RIDERS", help = with_default!("Comma-separated riders, picked by order id", defaults::RIDERS))]
    pub riders: Option<String>,

    /// The seed's slow dispatcher: this order id takes DISPATCH_SLOW_ORDER_MS to handle (off by default).
    #[arg(long, env = "DISPATCH_SLOW_ORDER_ID")]
    pub slow_order_id: Option<i64>,

    #[arg(long, env = "DISPATCH_SLOW_ORDER_MS", help = with_default!("How long the slow order takes, in milliseconds", defaults::SLOW_ORDER_MS))]
    pub slow_order_ms: Option<u64>,
}
