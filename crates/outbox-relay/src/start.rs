//! Starting a relay: settings checked, servers reached, the ops endpoint
//! up, the marker and the upkeep tasks spawned; then the life cycle
//! (`relay`) runs until shutdown.

use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

use crate::alert::Alerter;
use crate::amqp::Broker;
use crate::config::{Config, Mode};
use crate::listener;
use crate::maintenance;
use crate::marker::Marker;
use crate::meters::{self, BROKER, DATABASE, Meters};
use crate::relay::Relay;
use crate::store::Store;
use crate::wakeup::Wakeup;
use outbox_service::db;
use outbox_service::health::{Health, NotReady};
use outbox_service::{endpoint, telemetry};

/// Runs a relay until `shutdown` is cancelled. Fails only at start (bad
/// settings, unreachable servers, missing schema); later outages are waited out.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let relay_id = relay_id();
    let target = db::parse_url(&config.database_url, config.database_ca_file.as_deref())?
        .named(listener::APPLICATION_NAME);
    let alerter = Alerter::new(&config.alert)?;
    if config.metrics_addr.is_some() {
        // Before any handle is registered: those made earlier record nothing.
        telemetry::prometheus();
    }
    let meters = Meters::new();
    let health = Health::new(&meters::LINKS);
    // Up before connecting, so `/healthz` answers and `/readyz` says what
    // is missing while the servers are still being reached.
    let endpoint_stop = CancellationToken::new();
    let probed = Arc::new(OnceLock::new());
    let endpoint = start_endpoint(&config, &health, &probed, &endpoint_stop).await?;
    let store = Store::connect(&target, &relay_id)
        .await?
        .prepare_statements(config.mode == Mode::Notify);
    let _ = probed.set(store.clone());
    health.set(DATABASE, true);
    let broker = Broker::connect(
        &config.amqp_url,
        config.amqp_ca_file.as_deref(),
        &relay_id,
        config.confirm_timeout,
    )
    .await?;
    health.set(BROKER, true);
    let marker = Marker::spawn(
        store.clone(),
        &config,
        alerter,
        target.describe(),
        meters.clone(),
    );
    let upkeep = tokio::spawn(maintenance::run(
        store.clone(),
        config.retention,
        meters.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    tracing::info!(
        relay = %relay_id,
        database = %target.describe(),
        mode = ?config.mode,
        "relay started"
    );

    let wakeup = Wakeup::new(config.mode, target, meters.clone(), health.clone());
    let mut relay = Relay::new(config, store, broker, wakeup, marker, meters, health);
    relay.run(&shutdown).await;
    relay.stop().await;
    let _ = upkeep.await;
    endpoint_stop.cancel();
    if let Some(task) = endpoint {
        let _ = task.await;
    }
    tracing::info!(relay = %relay_id, "relay stopped");
    Ok(())
}

/// Serves `/metrics`, `/healthz` and `/readyz` unless turned off. The
/// default address being taken (a second relay on the host) only warns.
async fn start_endpoint(
    config: &Config,
    health: &Health,
    store: &Arc<OnceLock<Store>>,
    stop: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = config.metrics_addr else {
        return Ok(None);
    };
    let readiness = endpoint::Readiness {
        health: health.clone(),
        probe: Some(probe(store.clone())),
    };
    match endpoint::start(addr, readiness, axum::Router::new(), stop.clone()).await {
        Ok((bound, task)) => {
            tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
            Ok(Some(task))
        }
        Err(error) if !config.metrics_addr_given => {
            tracing::warn!(
                error = format!("{error:#}"),
                "no metrics endpoint; set OUTBOX_METRICS_ADDR to a free address"
            );
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

/// `/readyz`'s own `SELECT 1`: the links say what the drain and the
/// upkeep last saw, which a database that stopped answering does not
/// change before their statements' deadline. Until the store exists the
/// links alone answer (PostgreSQL is not connected yet).
fn probe(store: Arc<OnceLock<Store>>) -> endpoint::Probe {
    Arc::new(move || {
        let store = store.clone();
        Box::pin(async move {
            let Some(store) = store.get() else {
                return Ok(());
            };
            store
                .ping(endpoint::PROBE_DEADLINE)
                .await
                .map_err(|error| NotReady::Probe {
                    what: "PostgreSQL does not answer",
                    source: Some(Box::new(error)),
                })
        })
    })
}

/// `host-pid-random`: tells in `locked_by` which relay holds a lease.
fn relay_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "relay".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}
