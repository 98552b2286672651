//! Starting and stopping the three services inside the demo process, over
//! fresh tables, each with its own cancellation token.

use std::time::Duration;

use outbox_service::db;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::http;
use crate::seed_replay::SLOW_ORDER;

/// The seed's queue, which dispatch declares and consumes.
const QUEUE: &str = "order_confirm_fanoutQueue";

pub struct Running {
    pub orders_addr: String,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            match tokio::time::timeout(Duration::from_secs(15), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => eprintln!(
                    "demo: a service failed: {}",
                    outbox::chain_line(error.as_ref())
                ),
                Ok(Err(error)) => eprintln!("demo: a service panicked: {error}"),
                Err(_) => eprintln!("demo: a service did not stop within 15 s"),
            }
        }
    }
}

/// Creates each database that does not exist yet.
pub async fn create_databases(admin_url: &str, names: &[&str]) -> anyhow::Result<()> {
    let admin = db::connect(&db::parse_url(admin_url, None)?.named("demo")).await?;
    for name in names {
        let exists: bool = admin
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
                &[name],
            )
            .await?
            .get(0);
        if !exists {
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await?;
            println!("created database {name}");
        }
    }
    Ok(())
}

/// Migrates both databases, empties the demo's tables (a run is checked on
/// its own orders), then starts dispatch, the relay and the order service.
pub async fn start(
    orders_url: &str,
    dispatch_url: &str,
    amqp_url: &str,
) -> anyhow::Result<Running> {
    let orders_target = db::parse_url(orders_url, None)?.named("orders");
    orders::migrate(&orders_target).await?;
    let dispatch_target = db::parse_url(dispatch_url, None)?.named("dispatch");
    dispatch::migrate::run(&dispatch_target).await?;
    db::connect(&orders_target)
        .await?
        .batch_execute("TRUNCATE orders, outbox.messages")
        .await?;
    db::connect(&dispatch_target)
        .await?
        .batch_execute("TRUNCATE dispatch.deliveries, dispatch.inbox")
        .await?;

    purge_leftovers(amqp_url).await?;

    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    tasks.push(start_dispatch(dispatch_url, amqp_url, shutdown.clone()).await?);

    let relay = outbox_relay::Settings {
        database_url: Some(orders_url.to_string()),
        amqp_url: Some(amqp_url.to_string()),
        ..outbox_relay::Settings::default()
    }
    .validate()?;
    tasks.push(tokio::spawn(outbox_relay::run(relay, shutdown.clone())));

    let pool = db::pool(&orders_target, 16).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let orders_addr = listener.local_addr()?.to_string();
    let state = orders::AppState {
        pool,
        exchange: orders::DEFAULT_EXCHANGE.to_string(),
    };
    tasks.push(tokio::spawn(orders::serve(
        listener,
        state,
        shutdown.clone(),
    )));
    Ok(Running {
        orders_addr,
        shutdown,
        tasks,
    })
}

/// The dispatch consumer with the seed's slow order; returns once its
/// topology is declared, so no order is published before the queue exists.
async fn start_dispatch(
    dispatch_url: &str,
    amqp_url: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let config = dispatch::Settings {
        database_url: Some(dispatch_url.to_string()),
        amqp_url: Some(amqp_url.to_string()),
        slow_order_id: Some(SLOW_ORDER),
        ..dispatch::Settings::default()
    }
    .validate()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let task = tokio::spawn(dispatch::serve(config, listener, shutdown));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http::request(&addr, "GET", "/readyz", None, Duration::from_secs(2)).await;
        if matches!(ready, Ok((200, _))) {
            return Ok(task);
        }
        if task.is_finished() || tokio::time::Instant::now() > deadline {
            anyhow::bail!("the dispatch consumer did not become ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages an earlier run left in the queue would land as deliveries of
/// orders this run never placed: empty the queue if it exists.
async fn purge_leftovers(amqp_url: &str) -> anyhow::Result<()> {
    // Bounded: lapin can hang on a connection the broker refuses.
    let connect = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default());
    let connection = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| anyhow::anyhow!("RabbitMQ did not answer within 10 s"))??;
    let channel = connection.create_channel().await?;
    // A missing queue closes this channel with 404: nothing to purge then.
    let _ = channel
        .queue_purge(QUEUE.into(), lapin::options::QueuePurgeOptions::default())
        .await;
    let _ = connection.close(200, "purged".into()).await;
    Ok(())
}

/// Whether order 100001 exists and how many deliveries it has, in the outbox run.
pub async fn slow_order_state(
    orders_db: &Client,
    dispatch_db: &Client,
) -> anyhow::Result<(bool, i64)> {
    let exists = orders_db
        .query_one(
            "SELECT count(*) > 0 FROM orders WHERE id = $1",
            &[&SLOW_ORDER],
        )
        .await?
        .get(0);
    let deliveries = dispatch_db
        .query_one(
            "SELECT count(*) FROM dispatch.deliveries WHERE order_id = $1",
            &[&SLOW_ORDER],
        )
        .await?
        .get(0);
    Ok((exists, deliveries))
}
