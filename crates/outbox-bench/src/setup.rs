//! What a run needs and leaves nothing of: a fresh database with the outbox
//! schema, a fresh dispatch database, a fanout exchange with a durable queue
//! bound to it (the queue expires on its own should a run die before
//! deleting it; so do the dispatch consumer's queues), and relays started in
//! this process.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use outbox_service::db::with_dbname;

use crate::cli::Common;
use crate::processes::Process;

/// The channel the dispatch database's bench trigger notifies.
pub const DELIVERED_CHANNEL: &str = "outbox_bench_delivered";

/// Installed in the bench's own dispatch database only.
pub const DELIVERED_TRIGGER: &str = "
CREATE FUNCTION dispatch.bench_notify_delivered() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_bench_delivered', NEW.message_id::text);  -- DELIVERED_CHANNEL
    RETURN NULL;
END $$;
CREATE TRIGGER bench_notify_delivered AFTER INSERT ON dispatch.deliveries
    FOR EACH ROW EXECUTE FUNCTION dispatch.bench_notify_delivered();";

const AMQP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An unused queue is deleted by RabbitMQ after this long.
const QUEUE_EXPIRES_MS: i32 = 300_000;
const RELAY_STOP_TIMEOUT: Duration = Duration::from_secs(30);
const CHILD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// One run's database and broker names.
pub struct Fixture {
    pub db_url: String,
    /// The dispatch consumer's database, with the bench's delivery trigger.
    pub dispatch_db_url: String,
    pub amqp_url: String,
    pub exchange: String,
    /// The bench's own queue on `exchange`.
    pub queue: String,
    /// The dispatch consumer's queue on `exchange`.
    pub dispatch_queue: String,
    /// Keeps the declaring connection for purges and counts.
    channel: Channel,
    connection: Connection,
}

/// Creates a fixture, runs `body` on it and removes the fixture again
/// (unless `--keep`), whether `body` succeeded, failed or was interrupted
/// with Ctrl-C.
pub async fn with_fixture<T>(
    common: &Common,
    body: impl AsyncFnOnce(&Fixture) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let id = Uuid::new_v4().simple().to_string();
    let db_names = [
        format!("outbox_bench_{id}"),
        format!("outbox_bench_{id}_dispatch"),
    ];
    let admin = connect(&common.postgres_url).await?;
    for db_name in &db_names {
        admin
            .batch_execute(&format!("CREATE DATABASE {db_name}"))
            .await
            .map_err(outbox::PgError)
            .context("cannot create a database")?;
    }
    let db_url = with_dbname(&common.postgres_url, &db_names[0]);
    let dispatch_db_url = with_dbname(&common.postgres_url, &db_names[1]);

    let result = async {
        let mut client = connect(&db_url).await?;
        outbox::migrate(&mut client).await?;
        let mut dispatch_client = connect(&dispatch_db_url).await?;
        dispatch::migrate(&mut dispatch_client).await?;
        dispatch_client
            .batch_execute(DELIVERED_TRIGGER)
            .await
            .map_err(outbox::PgError)
            .context("delivery trigger")?;
        let connection = connect_amqp(&common.amqp_url).await?;
        let channel = connection.create_channel().await?;
        let fixture = Fixture {
            db_url: db_url.clone(),
            dispatch_db_url,
            amqp_url: common.amqp_url.clone(),
            exchange: format!("outbox_bench_ex_{id}"),
            queue: format!("outbox_bench_q_{id}"),
            dispatch_queue: format!("outbox_bench_dispatch_{id}"),
            channel,
            connection,
        };
        fixture.declare().await?;
        let result = tokio::select! {
            result = body(&fixture) => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        let removed = fixture.remove(common.keep).await;
        let value = result?;
        removed?;
        Ok(value)
    }
    .await;

    for db_name in &db_names {
        if common.keep {
            eprintln!("kept database {db_name}");
        } else {
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
                .await
                .map_err(outbox::PgError)
                .with_context(|| format!("cannot drop {db_name}"))?;
        }
    }
    result
}

impl Fixture {
    pub async fn connect_db(&self) -> anyhow::Result<Client> {
        connect(&self.db_url).await
    }

    async fn declare(&self) -> anyhow::Result<()> {
        self.channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Fanout,
                // Gone with its last binding, i.e. when the queues go; the
                // dispatch consumer declares it alike.
                ExchangeDeclareOptions {
                    durable: true,
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("cannot declare the bench exchange")?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongInt(QUEUE_EXPIRES_MS));
        self.channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .context("cannot declare the bench queue")?;
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("cannot bind the bench queue")?;
        Ok(())
    }

    /// Starts the dispatch consumer (the `dispatch` binary) on this
    /// fixture's exchange and database, with `settings` on top; returns
    /// once it consumes.
    pub async fn start_dispatch(&self, settings: &[(&str, &str)]) -> anyhow::Result<Process> {
        let expires = QUEUE_EXPIRES_MS.to_string();
        let mut env = vec![
            ("DISPATCH_DATABASE_URL", self.dispatch_db_url.as_str()),
            ("DISPATCH_AMQP_URL", &self.amqp_url),
            ("DISPATCH_EXCHANGE", &self.exchange),
            ("DISPATCH_QUEUE", &self.dispatch_queue),
            ("DISPATCH_QUEUE_EXPIRES_MS", &expires),
            ("DISPATCH_HTTP_ADDR", "127.0.0.1:0"),
        ];
        env.extend_from_slice(settings);
        let mut dispatch = Process::spawn("dispatch", &[], &env)?;
        let deadline = Instant::now() + CHILD_START_TIMEOUT;
        while self.consumers(&self.dispatch_queue).await < 1 {
            dispatch.check_running()?;
            if Instant::now() > deadline {
                bail!("the dispatch consumer did not start consuming within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(dispatch)
    }

    /// Consumers of `queue`; 0 while it does not exist.
    async fn consumers(&self, queue: &str) -> u32 {
        // A missing queue closes the channel that asked: use a throwaway one.
        let Ok(channel) = self.connection.create_channel().await else {
            return 0;
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let consumers = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .map_or(0, |queue| queue.consumer_count());
        let _ = channel.close(200, "counted".into()).await;
        consumers
    }

    /// Messages ready in the queue.
    pub async fn queued(&self) -> anyhow::Result<u32> {
        let queue = self
            .channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(queue.message_count())
    }

    pub async fn purge(&self) -> anyhow::Result<()> {
        self.channel
            .queue_purge(self.queue.as_str().into(), QueuePurgeOptions::default())
            .await?;
        Ok(())
    }

    async fn remove(self, keep: bool) -> anyhow::Result<()> {
        if keep {
            eprintln!("kept exchange {} and queue {}", self.exchange, self.queue);
        } else {
            self.channel
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
            self.channel
                .exchange_delete(
                    self.exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await?;
        }
        let _ = self.connection.close(200, "bench done".into()).await;
        Ok(())
    }
}

/// A relay running in this process.
pub struct Relay {
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

/// The name of every thread of a relay started in this process (its own
/// runtime's workers and blocking threads): its CPU time is theirs.
pub const RELAY_THREAD: &str = "outbox-relay";
/// Worker threads of that runtime: the relay binary's on this machine.
const RELAY_WORKERS: usize = 2;

impl Relay {
    /// Starts a relay on a runtime of its own, as in its own process: its
    /// tasks neither wait behind the bench's writers and consumers nor
    /// share their threads, and [`relay_cpu_seconds`] reads its CPU time.
    pub fn start(mut settings: outbox_relay::Settings) -> anyhow::Result<Relay> {
        // The bench's own recorder captures what it needs; no endpoint.
        settings.metrics_addr.get_or_insert_with(|| "off".into());
        let config = settings.validate()?;
        let shutdown = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RELAY_WORKERS)
            .thread_name(RELAY_THREAD)
            .enable_all()
            .build()
            .context("cannot start the relay's runtime")?;
        let stop = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(RELAY_THREAD.into())
            .spawn(move || runtime.block_on(outbox_relay::run(config, stop)))
            .context("cannot start the relay's thread")?;
        Ok(Relay {
            shutdown,
            thread: Some(thread),
        })
    }

    /// Fails when the relay has stopped on its own (it only does at start,
    /// on bad settings or unreachable servers).
    pub async fn check_running(&mut self) -> anyhow::Result<()> {
        if self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            return Ok(());
        }
        self.join().await?;
        bail!("the relay stopped on its own")
    }

    /// Cancels it and waits for its clean exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(RELAY_STOP_TIMEOUT, self.join())
            .await
            .context("the relay did not stop within 30 s")?
    }

    async fn join(&mut self) -> anyhow::Result<()> {
        let Some(thread) = self.thread.take() else {
            bail!("the relay has stopped already");
        };
        match tokio::task::spawn_blocking(move || thread.join()).await? {
            Ok(outcome) => outcome,
            Err(_) => bail!("the relay panicked"),
        }
    }
}

/// CPU time, user plus system, of every relay thread in this process so
/// far (Linux: `/proc/self/task/*/stat`; a thread gone meanwhile is
/// skipped).
pub fn relay_cpu_seconds() -> anyhow::Result<f64> {
    let tasks = std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")?;
    Ok(tasks
        .flatten()
        .filter_map(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            if comm.trim_end() != RELAY_THREAD {
                return None;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            crate::processes::cpu_seconds_of_stat(&stat)
        })
        .sum())
}

/// A PostgreSQL connection whose driver runs on a background task.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(outbox::PgError)
        .context("cannot connect to PostgreSQL")?;
    tokio::spawn(connection);
    Ok(client)
}

/// A RabbitMQ connection, bounded in time (lapin can hang on a rejected login).
pub async fn connect_amqp(url: &str) -> anyhow::Result<Connection> {
    tokio::time::timeout(
        AMQP_CONNECT_TIMEOUT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .context("cannot connect to RabbitMQ: timed out")?
    .context("cannot connect to RabbitMQ")
}

/// The 1-minute load average, to tell a quiet machine from a busy one.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
