//! Dispatch consumers for tests: settings with private names (the queues
//! expire on their own, the exchanges go with them), consumers started
//! in-process or as a child process, publishing orders, reading queues, and
//! waiting on conditions with generous deadlines.

use std::future::Future;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ::dispatch::Settings;
use lapin::message::Delivery;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::{Topology, connect, connect_to};
use crate::{TestDb, amqp_url, unique_name, workspace_binary};

/// Deadline for anything that should take well under a second.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Settings for tests: private names, fast retries, a small prefetch.
pub fn test_settings(db: &TestDb) -> Settings {
    Settings {
        database_url: Some(db.url.clone()),
        amqp_url: Some(amqp_url()),
        exchange: Some(unique_name("dispatch_ex")),
        queue: Some(unique_name("dispatch_q")),
        queue_expires_ms: Some(300_000),
        prefetch: Some(8),
        max_deliveries: Some(3),
        retry_base_ms: Some(50),
        retry_max_ms: Some(200),
        shutdown_timeout_ms: Some(5_000),
        http_addr: Some("127.0.0.1:0".into()),
        ..Settings::default()
    }
}

/// The queue names that `settings` lead to.
pub fn topology(settings: &Settings) -> outbox_consumer::Topology {
    let config = settings.clone().validate().expect("valid settings");
    config.consumer.topology
}

/// A dispatch service running in this process.
pub struct RunningDispatch {
    pub shutdown: CancellationToken,
    /// Where its HTTP API listens.
    pub http: SocketAddr,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningDispatch {
    /// Starts it and waits until it consumes (its topology exists then).
    pub async fn start(settings: Settings) -> RunningDispatch {
        RunningDispatch::start_config(settings.validate().expect("valid settings")).await
    }

    pub async fn start_config(config: ::dispatch::Config) -> RunningDispatch {
        let queue = config.consumer.topology.queue.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let http = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(::dispatch::serve(config, listener, shutdown.clone()));
        wait_for_consumers(&queue, 1).await;
        RunningDispatch {
            shutdown,
            http,
            task,
        }
    }

    /// `GET path` on its HTTP API: status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        crate::http::request(&self.http.to_string(), "GET", path, None).await
    }

    /// Cancels and waits for a clean exit.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("dispatch did not stop in time")
            .expect("dispatch task panicked")
            .expect("dispatch failed");
    }
}

/// `dispatch` as a child process with `settings`' names and `env` on top.
pub fn spawn_dispatch_process(settings: &Settings, env: &[(&str, &str)]) -> Child {
    dispatch_command(settings, env)
        .spawn()
        .expect("spawn dispatch")
}

/// The command [`spawn_dispatch_process`] runs, to adjust before spawning.
pub fn dispatch_command(settings: &Settings, env: &[(&str, &str)]) -> Command {
    let topology = topology(settings);
    let mut command = Command::new(workspace_binary("dispatch"));
    command
        .env(
            "DISPATCH_DATABASE_URL",
            settings.database_url.as_deref().unwrap_or(""),
        )
        .env(
            "DISPATCH_AMQP_URL",
            settings.amqp_url.clone().unwrap_or_else(amqp_url),
        )
        .env("DISPATCH_EXCHANGE", &topology.exchange)
        .env("DISPATCH_QUEUE", &topology.queue)
        .env("DISPATCH_QUEUE_EXPIRES_MS", "300000")
        .env("DISPATCH_HTTP_ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

/// Closes the broker connection named `name` (as a broker restart or a
/// network cut would), leaving every other connection alone.
pub fn close_broker_connection(name: &str) {
    let listed = crate::broker::rabbitmqctl_command()
        .args(["list_connections", "pid", "client_properties"])
        .args(["--no-table-headers", "--quiet"])
        .output()
        .expect("run rabbitmqctl");
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    let lines = String::from_utf8_lossy(&listed.stdout).into_owned();
    let pid = lines
        .lines()
        .find(|line| line.contains(&needle))
        .and_then(|line| line.split('\t').next())
        .unwrap_or_else(|| panic!("no broker connection named {name}: {lines}"));
    let closed = crate::broker::rabbitmqctl_command()
        .args(["close_connection", pid, "test: connection cut"])
        .output()
        .expect("run rabbitmqctl");
    assert!(closed.status.success(), "{closed:?}");
}

/// Polls `condition` every 20 ms until it holds; fails after [`PATIENCE`].
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, || {
        let holds = condition();
        async move { holds.await.then_some(()) }
    })
    .await
}

/// Polls `found` every 20 ms until it finds something; fails after [`PATIENCE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut found: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = found().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes every insert of order 666 into `dispatch.deliveries` fail with a
/// serialization failure: a message the consumer retries, then dead-letters.
pub async fn fail_order_666(db: &TestDb) {
    fail_order(db, 666, None).await;
}

/// Every insert of `order_id` into `dispatch.deliveries` fails with a
/// serialization failure, or only its first `times` (counted by a
/// sequence, which a rolled-back transaction does not rewind).
pub async fn fail_order(db: &TestDb, order_id: i64, times: Option<i64>) {
    let limit = times.map_or(String::new(), |times| {
        format!(" AND nextval('dispatch.flaky_count') <= {times}")
    });
    db.connect()
        .await
        .batch_execute(&format!(
            "CREATE SEQUENCE dispatch.flaky_count; \
             CREATE FUNCTION dispatch.flaky() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.order_id = {order_id}{limit} THEN \
                 RAISE EXCEPTION 'order {order_id} conflicts' USING ERRCODE = 'serialization_failure'; \
             END IF; RETURN NEW; END $$; \
             CREATE TRIGGER flaky BEFORE INSERT ON dispatch.deliveries \
             FOR EACH ROW EXECUTE FUNCTION dispatch.flaky()"
        ))
        .await
        .expect("flaky trigger");
}

/// `SELECT count(*) ...` on `db`.
pub async fn count(db: &TestDb, sql: &str) -> i64 {
    db.connect()
        .await
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Messages ready in `queue` (not those delivered and unacked) and its
/// consumers; `None` while the queue does not exist.
pub async fn queue_state(queue: &str) -> Option<(u32, u32)> {
    queue_state_on(&amqp_url(), queue).await
}

/// [`queue_state`] on the broker (or cluster) at `amqp_url`.
pub async fn queue_state_on(amqp_url: &str, queue: &str) -> Option<(u32, u32)> {
    let connection = connect_to(amqp_url).await;
    let channel = connection.create_channel().await.expect("channel");
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
    declared
        .ok()
        .map(|q| (q.message_count(), q.consumer_count()))
}

pub async fn ready(queue: &str) -> u32 {
    queue_state(queue).await.map_or(0, |(ready, _)| ready)
}

pub async fn wait_for_consumers(queue: &str, consumers: u32) {
    wait_for_consumers_on(&amqp_url(), queue, consumers).await;
}

pub async fn wait_for_consumers_on(amqp_url: &str, queue: &str, consumers: u32) {
    wait_until(&format!("{queue} has {consumers} consumer(s)"), || async {
        queue_state_on(amqp_url, queue).await.map(|(_, c)| c) == Some(consumers)
    })
    .await;
}

/// Takes (and acks) up to `count` messages from `queue`.
pub async fn take(queue: &str, count: usize) -> Vec<Delivery> {
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let reader = Topology {
        exchange: String::new(),
        queue: queue.into(),
        connection,
        channel,
    };
    reader.receive(count, PATIENCE).await
}

/// A header of a delivery, as text.
pub fn header(delivery: &Delivery, name: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    Some(match headers.inner().get(name)? {
        AMQPValue::LongString(s) => s.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        other => format!("{other:?}"),
    })
}

/// Publishes to one exchange with confirms, as the outbox relay would.
pub struct Publisher {
    exchange: String,
    channel: Channel,
    _connection: Connection,
}

impl Publisher {
    pub async fn new(exchange: &str) -> Publisher {
        let connection = connect().await;
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Publisher {
            exchange: exchange.into(),
            channel,
            _connection: connection,
        }
    }

    /// The seed's order message under a new message id; returns the id.
    pub async fn order(&self, order_id: i64) -> Uuid {
        let id = Uuid::new_v4();
        self.order_as(order_id, id).await;
        id
    }

    pub async fn order_as(&self, order_id: i64, message_id: Uuid) {
        let body = serde_json::json!({
            "orderId": order_id, "userName": "zhang", "context": "noodles", "num": 1
        });
        let properties = BasicProperties::default()
            .with_message_id(message_id.to_string().into())
            .with_content_type("application/json".into());
        self.raw(body.to_string().as_bytes(), properties).await;
    }

    /// Any body and properties, waiting for the broker's ack.
    pub async fn raw(&self, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .expect("publish");
        match confirm.await.expect("confirm") {
            Confirmation::Ack(None) => {}
            other => panic!("publish to {} not confirmed: {other:?}", self.exchange),
        }
    }
}
