//! The dispatch service wired together: the schema, a pool sized to the
//! consumer's lanes, the HTTP API, and the consumer with the [`Dispatcher`]
//! handler, all stopped by one cancellation token.
//!
//! [`Dispatcher`]: crate::deliveries::Dispatcher

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::{http, migrate};

/// Binds `config.http_addr`, then [`serve`]s.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_addr))?;
    serve(config, listener, shutdown).await
}

/// Runs until `shutdown` is cancelled, serving HTTP on `listener` (tests
/// bind port 0 and read the address). Fails only at start.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Before anything records: metrics sent to no recorder are lost.
    outbox_service::telemetry::prometheus();
    let target = config.database()?;
    // One connection per lane (a transaction each), and two for the HTTP API.
    let pool = outbox_service::db::pool(&target, usize::from(config.consumer.lanes) + 2).await?;
    let mut client = pool.get().await?;
    migrate::migrate(&mut client)
        .await
        .map_err(|e| migrate::failed(&target, e))?;
    drop(client);

    let health = outbox_consumer::health::new();
    let readiness = outbox_consumer::readiness(health.clone(), pool.clone());
    let api_stop = shutdown.child_token();
    let address = listener.local_addr()?;
    let api = tokio::spawn(outbox_service::endpoint::serve(
        listener,
        readiness,
        http::router(pool.clone()),
        api_stop.clone(),
    ));
    tracing::info!(database = %target.describe(), http = %address, "database ready, HTTP API listening");
    let consumed =
        outbox_consumer::run(config.consumer, pool, config.dispatcher, health, shutdown).await;
    // The consumer failing at start stops the API too.
    api_stop.cancel();
    api.await.context("HTTP server task failed")?;
    consumed?;
    tracing::info!("dispatch stopped");
    Ok(())
}
