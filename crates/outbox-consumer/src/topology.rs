//! The consumer's RabbitMQ topology, declared at every (re)connect; declaring
//! what already exists with the same arguments changes nothing.
//!
//! ```text
//! exchange (fanout) ─► queue ─► consumer ─┬─ commit ─► ack
//!                        ▲                ├─ transient ─► retry queue (due time in a header)
//!                        └── due, confirmed ──────┘  (the consumer brings it back: `retrier`)
//!                                         └─ poison, out of deliveries ─►
//!                                            dead-letter exchange (fanout) ─► dead-letter queue
//! ```
//! The queue also names the dead-letter exchange as its own
//! `x-dead-letter-exchange`, so whatever the broker itself drops (a length
//! limit or TTL set by a policy) lands in the dead-letter queue too. The
//! retry queue still dead-letters into the queue: copies made by earlier
//! consumer versions carry a TTL, and keeping its arguments lets it be declared
//! again as it is.
//!
//! Quorum queues are declared with a delivery limit no message reaches
//! ([`DELIVERY_LIMIT`]): RabbitMQ 4.0 – 4.2 set one of 20 by default, and
//! count every return (a consumer restarted, a connection lost) against
//! it, so a message that saw 20 rolling restarts would be dead-lettered by
//! the broker, with no `x-consumer-error`, though it never failed. The
//! consumer counts failures itself (`x-consumer-retries`).

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};

/// The `x-delivery-limit` of the quorum queues we declare: in effect none.
/// Not -1, which means "none" on RabbitMQ 4.x but was measured on 3.10 to
/// dead-letter a message at its first return.
pub const DELIVERY_LIMIT: i32 = 1_000_000_000;

/// Classic queues live on one node; quorum queues are replicated (for a
/// clustered RabbitMQ) and count redeliveries in `x-delivery-count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

/// Names and kinds of everything the consumer declares.
#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    pub queue: String,
    /// Holds messages that failed transiently until their backoff expires.
    pub retry_queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub queue_type: QueueType,
    /// Lets idle queues expire (`x-expires`) and exchanges auto-delete, for
    /// throwaway set-ups such as tests; `None` keeps everything.
    pub expires: Option<Duration>,
    /// Declares the queue with `x-single-active-consumer`: of several
    /// consumer processes on it, RabbitMQ delivers to one at a time and
    /// hands over to the next when it goes, with its unacked deliveries
    /// back in their places, so a key's order holds across the handover.
    pub single_active_consumer: bool,
}

impl Topology {
    /// The seed's exchange and queue, with `.retry`, `.dlx` and `.dlq` beside them.
    pub fn named(exchange: &str, queue: &str) -> Topology {
        Topology {
            exchange: exchange.into(),
            queue: queue.into(),
            retry_queue: format!("{queue}.retry"),
            dead_letter_exchange: format!("{queue}.dlx"),
            dead_letter_queue: format!("{queue}.dlq"),
            queue_type: QueueType::Classic,
            expires: None,
            single_active_consumer: false,
        }
    }

    /// Declares everything on a channel of its own, closed afterwards (a
    /// refused declaration closes the channel it was made on).
    pub async fn declare(&self, connection: &Connection) -> Result<(), lapin::Error> {
        let mut channel = connection.create_channel().await?;
        let declared = self.declare_on(connection, &mut channel).await;
        if channel.status().connected() {
            let _ = channel.close(200, "declared".into()).await;
        }
        declared
    }

    async fn declare_on(
        &self,
        connection: &Connection,
        channel: &mut Channel,
    ) -> Result<(), lapin::Error> {
        self.exchange(channel, &self.exchange).await?;
        self.exchange(channel, &self.dead_letter_exchange).await?;

        let mut main = self.arguments();
        main.insert(
            "x-dead-letter-exchange".into(),
            string(&self.dead_letter_exchange),
        );
        if self.single_active_consumer {
            main.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        self.queue(connection, channel, &self.queue, main).await?;

        // Only copies with a TTL (older consumers', or a policy's) expire
        // into the queue; ours are brought back by the `retrier`.
        let mut retry = self.arguments();
        retry.insert("x-dead-letter-exchange".into(), string(""));
        retry.insert("x-dead-letter-routing-key".into(), string(&self.queue));
        self.queue(connection, channel, &self.retry_queue, retry)
            .await?;

        self.queue(
            connection,
            channel,
            &self.dead_letter_queue,
            self.arguments(),
        )
        .await?;
        bind(channel, &self.queue, &self.exchange).await?;
        bind(channel, &self.dead_letter_queue, &self.dead_letter_exchange).await
    }

    /// Arguments every queue gets: its type and, if set, its expiry.
    fn arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        // Classic is the default; naming it would make a queue declared by
        // older clients (without the argument) look different.
        if self.queue_type == QueueType::Quorum {
            arguments.insert("x-queue-type".into(), string("quorum"));
        }
        if let Some(expires) = self.expires {
            let millis = i64::try_from(expires.as_millis()).unwrap_or(i64::MAX);
            arguments.insert("x-expires".into(), AMQPValue::LongLongInt(millis));
        }
        arguments
    }

    async fn exchange(&self, channel: &Channel, name: &str) -> Result<(), lapin::Error> {
        let options = ExchangeDeclareOptions {
            durable: true,
            // Gone with its last binding, i.e. once its queue expired.
            auto_delete: self.expires.is_some(),
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Fanout,
                options,
                FieldTable::default(),
            )
            .await
    }

    /// Declares a queue; a quorum queue with [`DELIVERY_LIMIT`], unless it
    /// exists without one (declared by an older consumer): then as it is,
    /// with a warning, since the broker refuses to change its arguments.
    async fn queue(
        &self,
        connection: &Connection,
        channel: &mut Channel,
        name: &str,
        arguments: FieldTable,
    ) -> Result<(), lapin::Error> {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        if self.queue_type == QueueType::Classic {
            return channel
                .queue_declare(name.into(), options, arguments)
                .await
                .map(drop);
        }
        let mut limited = arguments.clone();
        limited.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(DELIVERY_LIMIT),
        );
        match channel.queue_declare(name.into(), options, limited).await {
            Ok(_) => Ok(()),
            Err(error) if is_precondition_failed(&error) => {
                *channel = connection.create_channel().await?;
                channel
                    .queue_declare(name.into(), options, arguments)
                    .await?;
                tracing::warn!(
                    queue = name,
                    "quorum queue declared earlier without x-delivery-limit: RabbitMQ 4.0 to 4.2 \
                     dead-letter a message returned 20 times (restarts count); set a policy with \
                     delivery-limit {DELIVERY_LIMIT} on it, or move to a new queue"
                );
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

async fn bind(channel: &Channel, queue: &str, exchange: &str) -> Result<(), lapin::Error> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// The broker refused a declaration over arguments (406).
fn is_precondition_failed(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(reply)
        if *reply.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}
