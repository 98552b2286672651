//! The relay's life cycle, in one place:
//!
//! ```text
//! wait (wake-up | idle re-check | sweep tick) ─► drain:
//!     begin_drain ─► claim ─► publish (window of confirms) ─► hand outcomes
//!     to the marker ─► claim again until nothing is claimable ─► end_drain
//! ```
//! An outage of the broker or the database gives leases back, waits with
//! backoff and reconnects; it never counts as a message's attempt.

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::alert::Alerter;
use crate::amqp::{Broker, ChannelFault};
use crate::config::{Config, Mode};
use crate::listener::{self, Listener, Woken};
use crate::maintenance;
use crate::marker::{Mark, Marker};
use crate::meters::{self, BROKER, DATABASE, Fault, LISTENER, Meters, Wake};
use crate::store::{Claimed, Store, WakeLockHolder};
use crate::window::{Settled, Window};
use outbox_service::backoff::Backoff;
use outbox_service::db::{self, PgTarget};
use outbox_service::health::Health;
use outbox_service::{endpoint, telemetry};

/// A writer whose wake-up probe ran while we drained sent no NOTIFY and
/// commits a moment later (one WAL flush). After a drain that found work the
/// relay claims again after each of these delays; the sweep catches
/// anything slower.
const IDLE_RECHECKS: [Duration; 2] = [Duration::from_millis(3), Duration::from_millis(25)];
/// While confirms or marks are outstanding, how often the relay claims
/// again for rows committed meanwhile.
const REFILL_POLL: Duration = Duration::from_millis(1);
/// How often an idle listener's connection is proven alive.
const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// How often the relay claims while another session holds the wake-up
/// locks (writers' wake-ups may not come).
const FAST_POLL: Duration = Duration::from_millis(10);

/// How often the relay looks for other sessions holding the wake-up locks.
const WAKE_LOCK_CHECK: Duration = Duration::from_secs(1);

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
    let health = Health::new(&meters::LINKS);
    // Up before connecting, so `/healthz` answers and `/readyz` says what
    // is missing while the servers are still being reached.
    let endpoint_stop = CancellationToken::new();
    let endpoint = start_endpoint(&config, &health, &endpoint_stop).await?;
    let store = Store::connect(&target, &relay_id)
        .await?
        .prepare_claims(config.mode == Mode::Notify);
    health.set(DATABASE, true);
    let broker =
        Broker::connect(&config.amqp_url, config.amqp_ca_file.as_deref(), &relay_id).await?;
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

    let mut relay = Relay {
        window: Window::new(config.confirm_timeout),
        config,
        target,
        store,
        broker: Some(broker),
        broker_max: None,
        listener: None,
        last_kept_draining: Instant::now(),
        wake_lock_suspects: HashSet::new(),
        wake_locks_held: false,
        marker,
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
    let readiness = endpoint::Readiness {
        health: health.clone(),
        probe: None,
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

struct Relay {
    config: Config,
    target: PgTarget,
    store: Store,
    /// `None` while reconnecting after a broker outage.
    broker: Option<Broker>,
    /// The broker's `max_message_size`, once a channel closed over it.
    broker_max: Option<u64>,
    /// `None` in poll mode, and while reconnecting.
    listener: Option<Listener>,
    /// When the drain's transaction on the listener was last kept alive.
    last_kept_draining: Instant,
    /// Foreign holders of the wake-up locks seen at the last sweep: one
    /// seen at two sweeps in a row is not a writer mid-commit.
    wake_lock_suspects: HashSet<WakeLockHolder>,
    /// Wake-ups may be suppressed: claim every FAST_POLL meanwhile.
    wake_locks_held: bool,
    marker: Marker,
    /// Published rows awaiting their confirm; at most `max_in_flight`.
    window: Window,
    outage_backoff: Backoff,
    meters: Meters,
    health: Health,
}

impl Relay {
    async fn run(&mut self, shutdown: &CancellationToken) {
        let mut next_sweep = Instant::now();
        let mut next_probe = Instant::now() + PROBE_INTERVAL;
        let mut next_lock_check = Instant::now();
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
            } else if self.wake_locks_held {
                FAST_POLL
            } else {
                next_sweep
                    .min(next_probe)
                    .min(next_lock_check)
                    .saturating_duration_since(now)
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
                    if !reconnected
                        && recheck.is_none()
                        && !self.wake_locks_held
                        && Instant::now() < next_sweep =>
                {
                    // Only a housekeeping timer fired.
                    if Instant::now() >= next_probe {
                        next_probe = Instant::now() + PROBE_INTERVAL;
                        self.probe_listener().await;
                    }
                    if Instant::now() >= next_lock_check {
                        next_lock_check = Instant::now() + WAKE_LOCK_CHECK;
                        self.check_wake_locks().await;
                    }
                    continue;
                }
                _ => {}
            }
            if Instant::now() >= next_lock_check {
                next_lock_check = Instant::now() + WAKE_LOCK_CHECK;
                self.check_wake_locks().await;
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
                self.health.set(LISTENER, true);
                true
            }
            Err(error) => {
                // The sweep keeps rows moving meanwhile.
                tracing::warn!(%error, "cannot connect the wake-up listener; relying on the sweep");
                false
            }
        }
    }

    /// Another session holding the wake-up locks (a transaction that fired
    /// the trigger early and runs long, or anyone's on purpose) makes
    /// writers skip their NOTIFY. That cannot be prevented (advisory locks
    /// are anyone's), so it is looked for every second, logged, metered, and
    /// met by claiming every FAST_POLL until it ends.
    async fn check_wake_locks(&mut self) {
        if self.config.mode == Mode::Poll {
            return;
        }
        let holders: HashSet<WakeLockHolder> = match self
            .store
            .wake_lock_holders(listener::APPLICATION_NAME)
            .await
        {
            Ok(holders) => holders.into_iter().collect(),
            Err(error) => {
                tracing::debug!(%error, "cannot read the wake-up locks' holders");
                return;
            }
        };
        let lasting: Vec<&WakeLockHolder> =
            holders.intersection(&self.wake_lock_suspects).collect();
        let held = !lasting.is_empty();
        if held && !self.wake_locks_held {
            for holder in &lasting {
                tracing::warn!(
                    pid = holder.pid,
                    role = %holder.role,
                    lock = holder.lock,
                    mode = %holder.mode,
                    "another session holds a wake-up lock: writers may skip their wake-ups; claiming every 10 ms until it lets go"
                );
            }
        } else if !held && self.wake_locks_held {
            tracing::info!("the wake-up locks are free again");
        }
        self.meters
            .wake_lock_foreign_holders
            .set(lasting.len() as f64);
        self.wake_locks_held = held;
        self.wake_lock_suspects = holders;
    }

    async fn probe_listener(&mut self) {
        if let Some(listener) = &mut self.listener
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
            self.keep_draining().await;
            let free = window - self.window.in_flight();
            let bytes_free = self
                .config
                .max_in_flight_bytes
                .saturating_sub(self.window.bytes());
            if !exhausted && free >= refill_at && bytes_free > 0 {
                let limit = free.min(self.config.batch_size as usize);
                let claimed_at = Instant::now();
                let (rows, nothing_more) = self.claim_draining(limit, bytes_free).await?;
                exhausted = nothing_more;
                claimed_any |= !rows.is_empty();
                self.publish_all(rows, claimed_at).await?;
            }
            if self.window.is_empty() {
                if !exhausted && bytes_free > 0 {
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
                settled = self.window.settled() => settled,
                _ = tokio::time::sleep(REFILL_POLL), if exhausted => {
                    exhausted = false;
                    continue;
                }
            };
            self.settle(settled)?;
            self.meters.in_flight.set(self.window.in_flight() as f64);
            self.meters.in_flight_bytes.set(self.window.bytes() as f64);
        }
    }

    /// Keeps the drain's transaction on the listener alive: the server
    /// ends one that stays silent (a frozen relay), freeing the drain lock.
    async fn keep_draining(&mut self) {
        if self.last_kept_draining.elapsed() < listener::KEEP_DRAINING_EVERY {
            return;
        }
        self.last_kept_draining = Instant::now();
        if let Some(listener) = &mut self.listener
            && let Err(error) = listener.keep_draining().await
        {
            tracing::warn!(%error, "wake-up listener failed; reconnecting");
            self.drop_listener();
        }
    }

    /// Claims up to `limit` rows and `bytes` of payload, taking the drain
    /// lock alongside (a no-op while held): a writer that probed before we
    /// hold it has notified (we drain again), one that probes after is
    /// covered by the claims and re-checks that follow. Saves a round trip
    /// on every wake-up. Also says whether nothing more is claimable.
    async fn claim_draining(
        &mut self,
        limit: usize,
        bytes: u64,
    ) -> Result<(Vec<Claimed>, bool), Outage> {
        let (began, claim) = tokio::join!(
            begin_drain(self.listener.as_mut(), !self.wake_locks_held),
            self.store.claim(
                limit as u32,
                bytes,
                self.config.lease,
                self.config.block_on_dead_head
            )
        );
        if let Err(error) = began {
            tracing::warn!(%error, "wake-up listener failed; reconnecting");
            self.drop_listener();
        }
        let claim = claim.map_err(|e| Outage::Database(e.to_string()))?;
        self.health.set(DATABASE, true);
        self.meters.claim_batch.record(claim.rows.len() as f64);
        Ok((claim.rows, claim.exhausted))
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
        self.health.set(LISTENER, false);
    }

    /// Publishes a claim's rows in id order. A row is published only while
    /// its confirm can still come back before its lease runs out: a relay
    /// frozen past its lease (say SIGSTOP) must not publish, after another
    /// relay took its rows over, a key's head behind its successors.
    async fn publish_all(&mut self, rows: Vec<Claimed>, claimed_at: Instant) -> Result<(), Outage> {
        let publish_by = claimed_at
            + self
                .config
                .lease
                .saturating_sub(self.config.confirm_timeout);
        let max_payload = self.config.max_payload_bytes;
        let mut rows = rows.into_iter();
        while let Some(row) = rows.next() {
            if Instant::now() >= publish_by {
                let late: Vec<_> = std::iter::once(row).chain(rows).map(held).collect();
                tracing::warn!(
                    rows = late.len(),
                    "claimed rows not published before their lease would run out; giving them back"
                );
                self.marker.send(Mark::Release(late));
                return Ok(());
            }
            let published = match self.broker.as_mut() {
                Some(broker) => broker.publish(&row, max_payload, self.broker_max).await,
                None => Err("not connected".into()),
            };
            match published {
                Ok(pending) => self.window.push(row, pending.outcome()),
                Err(error) => {
                    let unpublished = std::iter::once(row).chain(rows).map(held).collect();
                    self.marker.send(Mark::Release(unpublished));
                    self.meters.failure(Fault::ConnectionLost).increment(1);
                    return Err(Outage::Broker(error));
                }
            }
        }
        self.meters.in_flight.set(self.window.in_flight() as f64);
        self.meters.in_flight_bytes.set(self.window.bytes() as f64);
        Ok(())
    }

    /// Hands settled rows to the marker. A lost confirm means the channel
    /// is gone: the rest of the window is given back and the drain stops.
    fn settle(&mut self, settled: Vec<Settled>) -> Result<(), Outage> {
        let mut lost = None;
        for row in settled {
            match row {
                Settled::Published(row) => {
                    self.meters.published.increment(1);
                    if let Ok(age) = row.pending_since.elapsed() {
                        self.meters.enqueue_to_confirm.record(age.as_secs_f64());
                    }
                    self.marker.send(Mark::Published(held(row)));
                }
                Settled::Failed(row, fault, error) => {
                    self.meters.failure(fault).increment(1);
                    self.marker.send(Mark::Failed {
                        row: Box::new(row),
                        error,
                    });
                }
                Settled::Lost(row, error) => {
                    self.meters.failure(Fault::ConnectionLost).increment(1);
                    self.marker.send(Mark::Release(vec![held(row)]));
                    lost = Some(error);
                }
            }
        }
        match lost {
            Some(error) => Err(Outage::Broker(error)),
            None => Ok(()),
        }
    }

    /// Waits up to `limit` for the window to settle, then gives back what
    /// has not (its outcome unknown: published again, at least once).
    async fn settle_in_flight(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.window.is_empty() {
            match tokio::time::timeout_at(deadline, self.window.settled()).await {
                Ok(settled) => {
                    let _ = self.settle(settled);
                }
                Err(_) => break,
            }
        }
        let unanswered: Vec<_> = self.window.abandon().into_iter().map(held).collect();
        if !unanswered.is_empty() {
            self.marker.send(Mark::Release(unanswered));
        }
        self.meters.in_flight.set(0.0);
        self.meters.in_flight_bytes.set(0.0);
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
        self.health.set(BROKER, true);
        Ok(())
    }

    async fn wait_out(&mut self, outage: Outage, shutdown: &CancellationToken) {
        if let Outage::Broker(error) = &outage {
            self.settle_in_flight(Duration::from_secs(1)).await;
            if let Some(broker) = self.broker.take() {
                broker.close().await;
            }
            if let Some(fault) = ChannelFault::from_error(error) {
                // One message's fault: reconnect now (the new connection
                // checks exchanges afresh); claimed again, that message
                // alone fails (the others are published again).
                if let ChannelFault::TooLarge { broker_max } = fault {
                    self.broker_max = Some(broker_max);
                }
                tracing::warn!(%error, "the broker closed the channel over one message; reconnecting");
                return;
            }
        }
        let delay = self.outage_backoff.next_delay();
        match &outage {
            Outage::Broker(error) => {
                self.health.set(BROKER, false);
                self.meters.broker_outages.increment(1);
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "RabbitMQ unavailable; pausing")
            }
            Outage::Database(error) => {
                self.health.set(DATABASE, false);
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
        // Confirms may take up to their deadline; the shutdown timeout
        // bounds the wait.
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

/// A row as the marker fences it.
fn held(row: Claimed) -> (i64, String) {
    (row.id, row.lease)
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

async fn begin_drain(listener: Option<&mut Listener>, patient: bool) -> Result<(), String> {
    match listener {
        Some(listener) => listener.begin_drain(patient).await,
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
