//! The relay's life cycle, in one place:
//!
//! ```text
//! wait (wake-up | idle re-check | sweep tick) ─► drain:
//!     begin_drain ─► claim ─► publish (window of confirms) ─► hand outcomes
//!     to the marker ─► claim again until nothing is claimable ─► end_drain
//! ```
//! An outage of the broker or the database gives leases back, waits with
//! backoff and reconnects; it never counts as a message's attempt.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::alert::Alerter;
use crate::amqp::{Broker, Outcome, Returned};
use crate::backoff::Backoff;
use crate::config::{Config, Mode};
use crate::db::{self, PgTarget};
use crate::listener::{Listener, Woken};
use crate::maintenance;
use crate::marker::{Mark, Marker};
use crate::meters::{Fault, Health, Meters, Wake};
use crate::store::{Claimed, Store};
use crate::{endpoint, telemetry};

/// A writer whose wake-up probe ran while we drained sent no NOTIFY and
/// commits a moment later (one WAL flush). After a drain that found work the
/// relay claims again after each of these delays; the sweep catches
/// anything slower.
const IDLE_RECHECKS: [Duration; 2] = [Duration::from_millis(3), Duration::from_millis(25)];
/// While confirms or marks are outstanding, how often the relay claims
/// again for rows committed meanwhile.
const REFILL_POLL: Duration = Duration::from_millis(1);
/// How many windows of acked rows may wait for the pipe to drain.
const HELD_WINDOWS: usize = 8;
/// How often an idle listener's connection is proven alive.
const PROBE_INTERVAL: Duration = Duration::from_secs(10);

type InFlight = FuturesUnordered<BoxFuture<'static, (Claimed, Outcome, Option<Returned>)>>;

/// Why a drain stopped early.
#[derive(Debug)]
enum Outage {
    Broker(String),
    Database(String),
}

/// Runs a relay until `shutdown` is cancelled. Fails only at start (bad
/// settings, unreachable servers, missing schema); later outages are waited out.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let relay_id = relay_id();
    let target = db::parse_url(&config.database_url, config.database_ca_file.as_deref())?;
    let alerter = Alerter::new(&config.alert).map_err(|e| anyhow::anyhow!("{e}"))?;
    if config.metrics_addr.is_some() {
        // Before any handle is registered: those made earlier record nothing.
        telemetry::prometheus();
    }
    let meters = Meters::new();
    let health = Health::new();
    // Up before connecting, so `/healthz` answers and `/readyz` says what
    // is missing while the servers are still being reached.
    let endpoint_stop = CancellationToken::new();
    let endpoint = start_endpoint(&config, &health, &endpoint_stop).await?;
    let store = Store::connect(&target, &relay_id)
        .await?
        .prepare_claims(config.mode == Mode::Notify);
    health.database(true);
    let broker =
        Broker::connect(&config.amqp_url, config.amqp_ca_file.as_deref(), &relay_id).await?;
    health.broker(true);
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

    let mut relay = Relay {
        config,
        target,
        store,
        broker: Some(broker),
        listener: None,
        marker,
        in_flight: FuturesUnordered::new(),
        in_flight_ids: HashSet::new(),
        acked: Vec::new(),
        returned: HashMap::new(),
        confirms_lost: false,
        outage_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
        meters,
        health,
    };
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
    stop: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = config.metrics_addr else {
        return Ok(None);
    };
    match endpoint::start(addr, health.clone(), stop.clone()).await {
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
        Err(error) => Err(error),
    }
}

struct Relay {
    config: Config,
    target: PgTarget,
    store: Store,
    /// `None` while reconnecting after a broker outage.
    broker: Option<Broker>,
    /// `None` in poll mode, and while reconnecting.
    listener: Option<Listener>,
    marker: Marker,
    /// Published rows awaiting their confirm; at most `max_in_flight`.
    in_flight: InFlight,
    /// Their ids, to give back the leases of confirms that never come.
    in_flight_ids: HashSet<i64>,
    /// Acked rows, held until every confirm in flight has answered: only
    /// then is it known which of them the broker returned (see `Returned`).
    acked: Vec<Claimed>,
    /// Returns seen on confirms since the last such point, by message_id.
    returned: HashMap<String, String>,
    /// A confirm was lost with its connection: returns may never be seen.
    confirms_lost: bool,
    outage_backoff: Backoff,
    meters: Meters,
    health: Health,
}

impl Relay {
    async fn run(&mut self, shutdown: &CancellationToken) {
        let mut next_sweep = Instant::now();
        let mut last_probe = Instant::now();
        // Index into IDLE_RECHECKS of the next re-check, if one is due.
        let mut recheck: Option<usize> = None;
        loop {
            let reconnected = self.ensure_listener().await;
            let now = Instant::now();
            let wait = if reconnected {
                // LISTEN first, then drain: anything committed while no one
                // listened is claimed now.
                Duration::ZERO
            } else if let Some(step) = recheck {
                IDLE_RECHECKS[step]
            } else {
                next_sweep
                    .saturating_duration_since(now)
                    .min(PROBE_INTERVAL)
            };
            let woken = tokio::select! {
                _ = shutdown.cancelled() => return,
                woken = wait_for_wake(self.listener.as_mut(), wait) => woken,
            };
            let cause = match woken {
                _ if reconnected => Wake::Reconnect,
                Woken::Notified => Wake::Notify,
                Woken::Lost => Wake::Reconnect,
                Woken::TimedOut if recheck.is_some() => Wake::Recheck,
                Woken::TimedOut => Wake::Sweep,
            };
            match woken {
                Woken::Lost => {
                    tracing::warn!("wake-up listener lost; reconnecting");
                    self.drop_listener();
                }
                Woken::TimedOut
                    if !reconnected && recheck.is_none() && Instant::now() < next_sweep =>
                {
                    // Only the probe timer fired.
                    if last_probe.elapsed() >= PROBE_INTERVAL {
                        last_probe = Instant::now();
                        self.probe_listener().await;
                    }
                    continue;
                }
                _ => {}
            }
            if Instant::now() >= next_sweep {
                next_sweep = Instant::now() + self.config.sweep_interval;
            }
            match self.drain(shutdown).await {
                Ok(claimed) => {
                    self.meters.wakeup(cause, claimed).increment(1);
                    self.outage_backoff.reset();
                    recheck = next_recheck(recheck, claimed, self.config.mode);
                }
                Err(outage) => self.wait_out(outage, shutdown).await,
            }
        }
    }

    /// Connects the listener in notify mode; true when it just (re)connected.
    async fn ensure_listener(&mut self) -> bool {
        if self.config.mode == Mode::Poll || self.listener.is_some() {
            return false;
        }
        match Listener::connect(&self.target).await {
            Ok(listener) => {
                self.listener = Some(listener);
                self.health.listener(true);
                true
            }
            Err(error) => {
                // The sweep keeps rows moving meanwhile.
                tracing::warn!(%error, "cannot connect the wake-up listener; relying on the sweep");
                false
            }
        }
    }

    async fn probe_listener(&mut self) {
        if let Some(listener) = &self.listener
            && (listener.is_closed() || !listener.probe().await)
        {
            tracing::warn!("wake-up listener did not answer its probe; reconnecting");
            self.drop_listener();
        }
    }

    /// Publishes until nothing is claimable; true when it claimed anything.
    async fn drain(&mut self, shutdown: &CancellationToken) -> Result<bool, Outage> {
        self.ensure_broker().await?;
        let result = self.pump(shutdown).await;
        self.release_drain_lock().await;
        result
    }

    /// Claims and publishes until nothing is claimable and everything has
    /// settled.
    async fn pump(&mut self, shutdown: &CancellationToken) -> Result<bool, Outage> {
        let window = self.config.max_in_flight as usize;
        let refill_at = (window.min(self.config.batch_size as usize) / 4).max(1);
        let mut claimed_any = false;
        let mut exhausted = false;
        loop {
            if shutdown.is_cancelled() {
                return Ok(claimed_any);
            }
            let free = window - self.in_flight.len();
            // Held acked rows are settled only when nothing is in flight, so
            // stop refilling after HELD_WINDOWS windows of them and let the
            // pipe drain: one bubble of a confirm's round trip per that
            // many messages (after every window, it cost a backlog drain
            // about a tenth of its rate).
            if !exhausted && free >= refill_at && self.acked.len() < window * HELD_WINDOWS {
                let limit = free.min(self.config.batch_size as usize);
                let rows = self.claim_draining(limit).await?;
                exhausted = rows.len() < limit;
                claimed_any |= !rows.is_empty();
                self.publish_all(rows).await?;
            }
            if self.in_flight.is_empty() {
                if !exhausted {
                    continue;
                }
                if self.marker.unsettled() == 0 {
                    return Ok(claimed_any);
                }
                // Marking a key's head makes its successor claimable. (During
                // a database outage this waits for the marker's retries.)
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(claimed_any),
                    _ = self.marker.settled() => {}
                    _ = tokio::time::sleep(REFILL_POLL) => {}
                }
                exhausted = false;
                continue;
            }
            // Writers skip NOTIFY while we drain: rows they commit while
            // confirms are outstanding are found by claiming again every
            // REFILL_POLL, not after the confirms (a broker fsync, several
            // milliseconds under load). Giving the lock back here instead,
            // so that they wake us, measured 0.89 of the no-trigger tps on
            // the write path (0.96 holding it) for 0.2 ms off the p50.
            let settled = tokio::select! {
                _ = shutdown.cancelled() => return Ok(claimed_any),
                settled = self.in_flight.next() => settled,
                _ = tokio::time::sleep(REFILL_POLL), if exhausted => {
                    exhausted = false;
                    continue;
                }
            };
            if let Some((row, outcome, returned)) = settled {
                self.settle(row, outcome, returned)?;
            }
            while let Some(Some((row, outcome, returned))) = self.in_flight.next().now_or_never() {
                self.settle(row, outcome, returned)?;
            }
            if self.in_flight.is_empty() {
                self.settle_acked();
            }
            self.meters.in_flight.set(self.in_flight.len() as f64);
        }
    }

    /// Claims up to `limit` rows, taking the drain lock alongside (a no-op
    /// while held): a writer that probed before we hold it has notified (we
    /// drain again), one that probes after is covered by the claims and
    /// re-checks that follow. Saves a round trip on every wake-up.
    async fn claim_draining(&mut self, limit: usize) -> Result<Vec<Claimed>, Outage> {
        let (began, rows) = tokio::join!(
            begin_drain(self.listener.as_mut()),
            self.store.claim(
                limit as u32,
                self.config.lease,
                self.config.block_on_dead_head
            )
        );
        if let Err(error) = began {
            tracing::warn!(%error, "wake-up listener failed; reconnecting");
            self.drop_listener();
        }
        let rows = rows.map_err(Outage::Database)?;
        self.health.database(true);
        self.meters.claim_batch.record(rows.len() as f64);
        Ok(rows)
    }

    /// Ends the drain on the listener (a no-op when not draining).
    async fn release_drain_lock(&mut self) {
        if let Some(listener) = &mut self.listener
            && listener.end_drain().await.is_err()
        {
            self.drop_listener();
        }
    }

    /// Forgets a failed listener; the main loop connects a new one.
    fn drop_listener(&mut self) {
        self.listener = None;
        self.health.listener(false);
    }

    async fn publish_all(&mut self, rows: Vec<Claimed>) -> Result<(), Outage> {
        let max_payload = self.config.max_payload_bytes;
        let mut rows = rows.into_iter();
        while let Some(row) = rows.next() {
            let published = match self.broker.as_mut() {
                Some(broker) => broker.publish(&row, max_payload).await,
                None => Err("not connected".into()),
            };
            match published {
                Ok(pending) => {
                    self.in_flight_ids.insert(row.id);
                    self.in_flight.push(
                        async move {
                            let (outcome, returned) = pending.outcome().await;
                            (row, outcome, returned)
                        }
                        .boxed(),
                    );
                }
                Err(error) => {
                    let unpublished = std::iter::once(row.id).chain(rows.map(|r| r.id)).collect();
                    self.marker.send(Mark::Release(unpublished));
                    self.meters.failure(Fault::ConnectionLost).increment(1);
                    return Err(Outage::Broker(error));
                }
            }
        }
        self.meters.in_flight.set(self.in_flight.len() as f64);
        Ok(())
    }

    fn settle(
        &mut self,
        mut row: Claimed,
        outcome: Outcome,
        returned: Option<Returned>,
    ) -> Result<(), Outage> {
        self.in_flight_ids.remove(&row.id);
        if let Some(returned) = returned {
            self.returned.insert(returned.message_id, returned.reason);
        }
        match outcome {
            Outcome::Confirmed => {
                // Held rows are only marked: their payloads can go now, so
                // holding many costs little memory.
                row.payload = Vec::new();
                self.acked.push(row);
                Ok(())
            }
            Outcome::Rejected(fault, error) => {
                self.meters.failure(fault).increment(1);
                self.marker.send(Mark::Failed {
                    row: Box::new(row),
                    error,
                });
                Ok(())
            }
            Outcome::Lost(error) => {
                self.confirms_lost = true;
                self.meters.failure(Fault::ConnectionLost).increment(1);
                self.marker.send(Mark::Release(vec![row.id]));
                Err(Outage::Broker(error))
            }
        }
    }

    /// Nothing is in flight, so every return has been seen: held acked
    /// rows that were returned failed (an attempt), the others are published.
    fn settle_acked(&mut self) {
        for row in std::mem::take(&mut self.acked) {
            // Returns are rare: no key to build for the common case.
            let returned = if self.returned.is_empty() {
                None
            } else {
                self.returned.remove(&row.message_id.to_string())
            };
            match returned {
                Some(reason) => {
                    self.meters.failure(Fault::Returned).increment(1);
                    self.marker.send(Mark::Failed {
                        row: Box::new(row),
                        error: reason,
                    });
                }
                None => {
                    self.meters.published.increment(1);
                    if let Ok(age) = row.pending_since.elapsed() {
                        self.meters.enqueue_to_confirm.record(age.as_secs_f64());
                    }
                    self.marker.send(Mark::Published(row.id));
                }
            }
        }
        self.returned.clear();
    }

    /// Waits up to `limit` for in-flight confirms, settles what answered
    /// (a lost one is released by `settle`) and releases the rest. Held
    /// acked rows are settled when every confirm answered; after a lost
    /// one their returns may never come, so they are released and
    /// published again (at least once: the consumer deduplicates).
    async fn settle_in_flight(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while let Ok(Some((row, outcome, returned))) =
            tokio::time::timeout_at(deadline, self.in_flight.next()).await
        {
            let _ = self.settle(row, outcome, returned);
        }
        self.in_flight = FuturesUnordered::new();
        self.meters.in_flight.set(0.0);
        let mut unanswered: Vec<i64> = self.in_flight_ids.drain().collect();
        if unanswered.is_empty() && !self.confirms_lost {
            self.settle_acked();
        } else {
            unanswered.extend(self.acked.drain(..).map(|row| row.id));
            self.returned.clear();
        }
        self.confirms_lost = false;
        if !unanswered.is_empty() {
            self.marker.send(Mark::Release(unanswered));
        }
    }

    async fn ensure_broker(&mut self) -> Result<(), Outage> {
        if self.broker.as_ref().is_some_and(Broker::is_connected) {
            return Ok(());
        }
        if let Some(broker) = self.broker.take() {
            broker.close().await;
        }
        let broker = Broker::connect(
            &self.config.amqp_url,
            self.config.amqp_ca_file.as_deref(),
            "outbox-relay",
        )
        .await
        .map_err(|e| Outage::Broker(format!("{e:#}")))?;
        tracing::info!("connected to RabbitMQ");
        self.broker = Some(broker);
        self.health.broker(true);
        Ok(())
    }

    async fn wait_out(&mut self, outage: Outage, shutdown: &CancellationToken) {
        if let Outage::Broker(_) = outage {
            self.settle_in_flight(Duration::from_secs(1)).await;
            if let Some(broker) = self.broker.take() {
                broker.close().await;
            }
        }
        let delay = self.outage_backoff.next_delay();
        match &outage {
            Outage::Broker(error) => {
                self.health.broker(false);
                self.meters.broker_outages.increment(1);
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "RabbitMQ unavailable; pausing")
            }
            Outage::Database(error) => {
                self.health.database(false);
                self.meters.database_outages.increment(1);
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "PostgreSQL unavailable; pausing")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }

    /// Shutdown: no new claims; bounded wait for confirms; give back the rest.
    async fn stop(self) {
        let mut relay = self;
        let timeout = relay.config.shutdown_timeout;
        relay.settle_in_flight(timeout).await;
        if let Some(listener) = &mut relay.listener {
            let _ = listener.end_drain().await;
        }
        relay.marker.finish(timeout).await;
        if let Some(broker) = relay.broker.take() {
            broker.close().await;
        }
    }
}

/// After a drain: start the re-checks when it found work, else move on to
/// the next one, until they run out (poll mode has only the sweep).
fn next_recheck(current: Option<usize>, claimed: bool, mode: Mode) -> Option<usize> {
    if mode == Mode::Poll {
        return None;
    }
    match (claimed, current) {
        (true, _) => Some(0),
        (false, Some(step)) if step + 1 < IDLE_RECHECKS.len() => Some(step + 1),
        (false, _) => None,
    }
}

async fn begin_drain(listener: Option<&mut Listener>) -> Result<(), String> {
    match listener {
        Some(listener) => listener.begin_drain().await,
        None => Ok(()),
    }
}

async fn wait_for_wake(listener: Option<&mut Listener>, timeout: Duration) -> Woken {
    match listener {
        Some(listener) => listener.wait(timeout).await,
        None => {
            tokio::time::sleep(timeout).await;
            Woken::TimedOut
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rechecks_follow_work_and_run_out() {
        assert_eq!(next_recheck(None, true, Mode::Notify), Some(0));
        assert_eq!(next_recheck(Some(0), false, Mode::Notify), Some(1));
        assert_eq!(next_recheck(Some(1), false, Mode::Notify), None);
        assert_eq!(next_recheck(Some(1), true, Mode::Notify), Some(0));
        assert_eq!(next_recheck(None, false, Mode::Notify), None);
        assert_eq!(next_recheck(None, true, Mode::Poll), None);
    }
}
