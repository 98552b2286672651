//! RabbitMQ helpers for tests: a private fanout exchange and queue per test
//! (they expire on their own), and reading what arrived.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind, message::Delivery};

use crate::{amqp_url, unique_name};

/// A test's own exchange and the queue bound to it.
pub struct Topology {
    pub exchange: String,
    pub queue: String,
    pub connection: Connection,
    pub channel: Channel,
}

pub async fn connect() -> Connection {
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&amqp_url(), ConnectionProperties::default()),
    )
    .await
    .expect("RabbitMQ connect timed out")
    .expect("connect to RabbitMQ")
}

/// A connection to the first node of `urls` (see [`crate::Servers::amqp_url`])
/// that answers, as the relay and the consumer connect.
pub async fn connect_to(urls: &str) -> Connection {
    outbox_service::amqp::connect(urls, None, "outbox-tests")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

impl Topology {
    /// Declares `kind` exchange and a queue bound with `binding_key`.
    pub async fn new(kind: ExchangeKind, binding_key: &str) -> Topology {
        let connection = connect().await;
        let channel = connection.create_channel().await.expect("channel");
        let exchange = unique_name("test_ex");
        let queue = unique_name("test_q");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                kind,
                // Auto-delete: gone once its queue expires.
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare exchange");
        let mut arguments = FieldTable::default();
        // Unused for 5 minutes: RabbitMQ deletes it (no cleanup code needed).
        arguments.insert("x-expires".into(), AMQPValue::LongInt(300_000));
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .expect("declare queue");
        let topology = Topology {
            exchange,
            queue,
            connection,
            channel,
        };
        topology.bind(binding_key).await;
        topology
    }

    pub async fn fanout() -> Topology {
        Topology::new(ExchangeKind::Fanout, "").await
    }

    pub async fn bind(&self, routing_key: &str) {
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }

    /// Reads and acks deliveries until `count` arrived or `limit` passed;
    /// what was not read stays in the queue (manual acks, bounded prefetch).
    /// Uses a connection of its own: a test may have closed the others.
    pub async fn receive(&self, count: usize, limit: Duration) -> Vec<Delivery> {
        let connection = connect().await;
        let channel = connection.create_channel().await.expect("channel");
        let prefetch = count.clamp(1, 500) as u16;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                unique_name("test_consumer").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut received = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        while received.len() < count {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    delivery.ack(BasicAckOptions::default()).await.expect("ack");
                    received.push(delivery);
                }
                Ok(Some(Err(error))) => panic!("consumer failed: {error}"),
                Ok(None) | Err(_) => break,
            }
        }
        let _ = connection.close(200, "done".into()).await;
        received
    }
}

/// The AMQP message_id of a delivery.
pub fn message_id(delivery: &Delivery) -> uuid::Uuid {
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .expect("delivery without message_id");
    id.as_str().parse().expect("message_id is a UUID")
}

/// A fanout exchange named `prefix_…`, gone once its queues are.
pub async fn fanout_exchange(channel: &Channel, prefix: &str) -> String {
    let exchange = unique_name(prefix);
    let auto_delete = ExchangeDeclareOptions {
        auto_delete: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            auto_delete,
            FieldTable::default(),
        )
        .await
        .expect("declare exchange");
    exchange
}

/// A new queue (it expires unused) with `arguments`, bound to `exchange`.
/// Durable: RabbitMQ 4.x deprecates transient non-exclusive queues, and a
/// broker that denies deprecated features refuses them.
pub async fn bound_queue(channel: &Channel, exchange: &str, mut arguments: FieldTable) -> String {
    let queue = unique_name("test_q");
    arguments.insert("x-expires".into(), AMQPValue::LongInt(300_000));
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.as_str().into(), options, arguments)
        .await
        .expect("declare queue");
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    queue
}

/// Freezes `queue`'s process on the broker (`sys:suspend`): it stops
/// answering, so publishes routed to it are never confirmed. Only the
/// test's own queue is touched; [`resume_queue`] thaws it.
pub fn suspend_queue(queue: &str) {
    queue_process(queue, "suspend");
}

pub fn resume_queue(queue: &str) {
    queue_process(queue, "resume");
}

fn queue_process(queue: &str, action: &str) {
    let expression = format!(
        "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{queue}\">>)), \
         sys:{action}(amqqueue:get_pid(Q))."
    );
    rabbitmqctl(&["eval", &expression]);
}

/// `rabbitmqctl` for the broker under test: `TEST_RABBITMQCTL` (a command
/// and its first arguments, split at spaces: `scripts/compat-servers.sh
/// ctl` for the compat broker), the machine's `rabbitmqctl` by default.
pub fn rabbitmqctl_command() -> std::process::Command {
    let given = std::env::var("TEST_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = given.split_whitespace();
    let mut command = std::process::Command::new(words.next().unwrap_or("rabbitmqctl"));
    command.args(words);
    command
}

/// Runs `rabbitmqctl` on the broker under test; fails the test if it fails.
pub fn rabbitmqctl(args: &[&str]) {
    let output = rabbitmqctl_command()
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
