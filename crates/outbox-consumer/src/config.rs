//! What a consumer is told: [`ConsumerConfig`], the broker, the queues,
//! the inbox table and the knobs of lanes, batches, retries and waits,
//! with their defaults.

use std::path::PathBuf;
use std::time::Duration;

use crate::topology::Topology;

/// Everything a consumer needs besides its handler and its pool.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub amqp_url: String,
    pub amqp_ca_file: Option<PathBuf>,
    pub topology: Topology,
    /// Unacked deliveries at once; `lanes` × `batch_size` or more keeps
    /// every lane's batches full under load.
    pub prefetch: u16,
    /// Transactions at once (size the pool to match): a free lane takes
    /// the oldest work whose key no other lane has in hand (see `lanes`).
    pub lanes: u16,
    /// Most deliveries handled in one transaction.
    pub batch_size: u16,
    /// Deliveries of a message that fails transiently before it is
    /// dead-lettered.
    pub max_deliveries: u32,
    /// Delay before the first retry; doubles per delivery up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How long shutdown waits for handlers in progress.
    pub shutdown_timeout: Duration,
    /// `schema.table` with a `message_id uuid` primary key.
    pub inbox_table: String,
    /// Inbox rows older than this are deleted (it needs a `processed_at`
    /// column): a copy arriving later is no longer recognised as one.
    /// `None` keeps every row.
    pub inbox_retention: Option<Duration>,
    /// How long a keyed message that came before an earlier one of its key
    /// (`x-outbox-seq`) waits for it before it is handled without it; zero:
    /// nothing waits. Nothing waits either while other consumers share the
    /// queue (not a single-active-consumer queue): the missing number most
    /// likely went to one of them (see `sequencer`).
    pub key_gap_wait: Duration,
    /// Shown as the connection name in RabbitMQ and prefixes consumer tags.
    pub name: String,
}

impl ConsumerConfig {
    pub const DEFAULT_PREFETCH: u16 = 256;
    pub const DEFAULT_LANES: u16 = 4;
    pub const DEFAULT_BATCH_SIZE: u16 = 64;
    pub const DEFAULT_MAX_DELIVERIES: u32 = 5;
    pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(1);
    pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(60);
    pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
    /// Longer than a relay's confirm timeout (10 s) and first retry (1 s).
    pub const DEFAULT_KEY_GAP_WAIT: Duration = Duration::from_secs(15);

    /// Defaults for everything but the broker, the topology and the inbox
    /// table (`schema.table` with a `message_id uuid` primary key).
    pub fn new(amqp_url: &str, topology: Topology, inbox_table: &str) -> ConsumerConfig {
        ConsumerConfig {
            amqp_url: amqp_url.into(),
            amqp_ca_file: None,
            topology,
            prefetch: Self::DEFAULT_PREFETCH,
            lanes: Self::DEFAULT_LANES,
            batch_size: Self::DEFAULT_BATCH_SIZE,
            max_deliveries: Self::DEFAULT_MAX_DELIVERIES,
            retry_base: Self::DEFAULT_RETRY_BASE,
            retry_max: Self::DEFAULT_RETRY_MAX,
            shutdown_timeout: Self::DEFAULT_SHUTDOWN_TIMEOUT,
            key_gap_wait: Self::DEFAULT_KEY_GAP_WAIT,
            inbox_table: inbox_table.into(),
            inbox_retention: None,
            name: "outbox-consumer".into(),
        }
    }
}
