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

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

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

    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
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
        self.queue(channel, &self.queue, main).await?;

        // Only copies with a TTL (older consumers', or a policy's) expire
        // into the queue; ours are brought back by the `retrier`.
        let mut retry = self.arguments();
        retry.insert("x-dead-letter-exchange".into(), string(""));
        retry.insert("x-dead-letter-routing-key".into(), string(&self.queue));
        self.queue(channel, &self.retry_queue, retry).await?;

        self.queue(channel, &self.dead_letter_queue, self.arguments())
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

    async fn queue(
        &self,
        channel: &Channel,
        name: &str,
        arguments: FieldTable,
    ) -> Result<(), lapin::Error> {
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(name.into(), options, arguments)
            .await
            .map(|_| ())
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

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}
