//! The relay's life cycle, read top to bottom:
//!
//! ```text
//! wake   wait for a NOTIFY, an idle re-check or the sweep tick   run
//! claim  take leases on up to a batch of rows, ahead of the window  pump, claim_draining
//! publish  each row while its lease allows; confirms in a window  publish_at_hand
//! settle   acks, nacks, returns, deadlines, lost channels         settle
//! mark     handed to the marker, which fences on the lease        (marker.rs)
//! trace    each row's publish span, claim to confirm, if exported (spans.rs)
//! sweep    every sweep interval a drain runs without a wake-up   run
//! release  scheduled rows fallen due, before a claim             (schedule.rs)
//! ```
//! While claims find rows faster than one or two at a time, the drain lock
//! is held (writers skip their NOTIFY) and the relay claims again every
//! `REFILL_POLL`; slower, every commit wakes it and it claims only then.
//! The wake-up's connection and locks live in `wakeup`, the window in
//! `window`, the statements in `store`. An outage of the broker or the
//! database gives leases back, waits with backoff and reconnects
//! (`outage`, and `recovery` here); it never counts as a message's
//! attempt. A broker that stops answering without closing anything (a
//! black-holed network) is such an outage too: a confirm past its
//! deadline is the row's fault only once the broker shows it still
//! answers (`window`, `Broker::probe`).

mod recovery;

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::Broker;
use crate::config::Config;
use crate::cursor::Cursor;
use crate::fault_policy::BrokerError;
use crate::listener::Woken;
use crate::marker::{Mark, Marker};
use crate::meters::{DATABASE, Fault, Meters, Wake};
use crate::nack_runs::NackRuns;
use crate::outage::{Outage, Outages};
use crate::schedule::Schedule;
use crate::spans::PublishSpans;
use crate::store::{ClaimLimits, Claimed, Store};
use crate::wakeup::{IDLE_RECHECKS, Wakeup, next_recheck};
use crate::window::{Settled, Window};
use outbox_service::health::Health;

/// While confirms or marks are outstanding and writers' wake-ups do not
/// come (the drain lock held, or no listener), how often the relay claims
/// again for rows committed meanwhile.
const REFILL_POLL: Duration = Duration::from_millis(1);
/// Rows a claim finds when writers commit faster than the relay claims
/// (see `pump`).
const BUSY_CLAIM: usize = 3;
/// How often the relay claims while another session holds the wake-up
/// locks (writers' wake-ups may not come).
const FAST_POLL: Duration = Duration::from_millis(10);
/// How long a confirmed row, its mark perhaps not landed yet, does not
/// hold its key back (see `store::CLAIM`, $9); a mark slower than that
/// only makes the key wait for it.
const MARKING: Duration = Duration::from_secs(1);

pub(crate) struct Relay {
    config: Config,
    store: Store,
    /// `None` while reconnecting after a broker outage.
    broker: Option<Broker>,
    /// The broker's `max_message_size`, once a channel closed over it.
    broker_max: Option<u64>,
    /// The largest payload given back since the last outage, for a
    /// channel closed over a message too large for a limit the broker
    /// did not state (see `fault_policy::ChannelFault`).
    largest_lost: Option<u64>,
    wakeup: Wakeup,
    /// Scheduled rows: when the next falls due.
    schedule: Schedule,
    marker: Marker,
    /// Published rows awaiting their confirm; at most `max_in_flight`.
    window: Window,
    /// Rows claimed and not published yet, with their claim's instant:
    /// claims run ahead of the window (see `pump`).
    at_hand: VecDeque<(Instant, Claimed)>,
    /// Their payload bytes.
    at_hand_bytes: u64,
    /// Their publish spans, when traces are exported.
    spans: PublishSpans,
    /// Where claims start scanning keyless rows.
    cursor: Cursor,
    /// The ordering key the next claim looks at first.
    next_key: String,
    /// Some key had rows pending at the last claim (see `CLAIM_KEYLESS`).
    keys_pending: bool,
    /// Rows confirmed lately, whose marks may not have landed: with the
    /// window's rows, they are published and do not hold their keys back.
    confirmed: VecDeque<(Instant, i64)>,
    /// Exchanges whose publishes are all nacked on this channel.
    nack_runs: NackRuns,
    outages: Outages,
    meters: Meters,
    health: Health,
}

impl Relay {
    pub(crate) fn new(
        config: Config,
        store: Store,
        broker: Broker,
        wakeup: Wakeup,
        marker: Marker,
        meters: Meters,
        health: Health,
    ) -> Relay {
        Relay {
            window: Window::new(config.confirm_timeout),
            at_hand: VecDeque::new(),
            at_hand_bytes: 0,
            spans: PublishSpans::default(),
            cursor: Cursor::new(config.sweep_interval),
            next_key: String::new(),
            keys_pending: true,
            confirmed: VecDeque::new(),
            nack_runs: NackRuns::default(),
            config,
            store,
            broker: Some(broker),
            broker_max: None,
            largest_lost: None,
            schedule: Schedule::new(wakeup.schedule_changes(), meters.clone()),
            wakeup,
            marker,
            outages: Outages::new(meters.clone(), health.clone()),
            meters,
            health,
        }
    }

    /// Waits for a wake-up (a NOTIFY, an idle re-check, the sweep) and
    /// drains, until shutdown.
    pub(crate) async fn run(&mut self, shutdown: &CancellationToken) {
        let mut next_sweep = Instant::now();
        // Index into IDLE_RECHECKS of the next re-check, if one is due.
        let mut recheck: Option<usize> = None;
        loop {
            let reconnected = self.wakeup.connect().await;
            let wait = if reconnected {
                // LISTEN first, then drain: anything committed while no one
                // listened is claimed now.
                Duration::ZERO
            } else if let Some(step) = recheck {
                IDLE_RECHECKS[step]
            } else if self.wakeup.locks_held() {
                FAST_POLL
            } else {
                next_sweep
                    .min(self.wakeup.next_upkeep())
                    .min(self.schedule.next_look())
                    .saturating_duration_since(Instant::now())
            };
            let woken = tokio::select! {
                _ = shutdown.cancelled() => return,
                woken = self.wakeup.wait(wait) => woken,
            };
            self.wakeup.upkeep(&self.store).await;
            let sweep_due = Instant::now() >= next_sweep;
            let cause = match woken {
                _ if reconnected => Wake::Reconnect,
                Woken::Notified => Wake::Notify,
                Woken::Lost => Wake::Reconnect,
                Woken::TimedOut if recheck.is_some() => Wake::Recheck,
                Woken::TimedOut if sweep_due || self.wakeup.locks_held() => Wake::Sweep,
                // A scheduled row's time: drain only if one was released.
                Woken::TimedOut if self.schedule.due(Instant::now()) => {
                    match self.schedule.release(&self.store).await {
                        Ok(0) => continue,
                        Ok(_) => Wake::Schedule,
                        Err(error) => {
                            self.wait_out(Outage::from(error), shutdown).await;
                            continue;
                        }
                    }
                }
                // Only a housekeeping timer fired.
                Woken::TimedOut => continue,
            };
            if sweep_due {
                next_sweep = Instant::now() + self.config.sweep_interval;
                // The sweep scans from the start: a row committed late
                // below the floor waits one sweep interval at most, not
                // until the cursor's own pass comes round too.
                self.cursor.rewind();
            }
            match self.drain(shutdown).await {
                Ok(claimed) => {
                    self.meters.wakeup(cause, claimed).increment(1);
                    self.outages.over();
                    recheck = next_recheck(recheck, claimed, self.config.mode);
                }
                Err(outage) => self.wait_out(outage, shutdown).await,
            }
        }
    }

    /// Publishes until nothing is claimable; true when it claimed anything.
    async fn drain(&mut self, shutdown: &CancellationToken) -> Result<bool, Outage> {
        self.ensure_broker().await?;
        let result = self.pump(shutdown).await;
        // After shutdown or an outage: rows claimed and never published.
        let unpublished = self.take_at_hand();
        self.give_back(unpublished);
        if self.window.is_empty() {
            self.spans.clear();
        }
        self.wakeup.end_drain().await;
        result
    }

    /// Claims and publishes until nothing is claimable and everything has
    /// settled.
    async fn pump(&mut self, shutdown: &CancellationToken) -> Result<bool, Outage> {
        let window = self.config.max_in_flight as usize;
        let batch = self.config.batch_size as usize;
        let refill_at = (window.min(batch) / 4).max(1);
        let mut claimed_any = false;
        let mut exhausted = false;
        // Whether a key had unpublished rows at any claim of this drain:
        // only then can a mark make rows claimable.
        let mut keys_seen = false;
        // When to claim again after a claim that found everything: a fixed
        // instant, not a fresh REFILL_POLL at each pass through the loop,
        // or a stream of confirms (one every few hundred microseconds under
        // load) would keep putting the claim off until the window emptied.
        let mut next_claim = Instant::now();
        loop {
            if shutdown.is_cancelled() {
                return Ok(claimed_any);
            }
            self.wakeup.keep_draining().await;
            if self.schedule.due(Instant::now()) && self.schedule.release(&self.store).await? > 0 {
                exhausted = false;
            }
            // A channel to renew takes no more rows until what it has in
            // flight settled.
            let renewing = self.renew_channel_when_idle().await?;
            if !renewing {
                self.publish_at_hand().await?;
            }
            // Claims run up to a batch ahead of the window: RabbitMQ
            // confirms many publishes at once (after each fsync), and a
            // claim made only then left nothing in flight while it ran
            // (a quarter of a backlog's drain).
            let held = self.window.in_flight() + self.at_hand.len();
            let room = (window + batch).saturating_sub(held);
            let bytes_free = self
                .config
                .max_in_flight_bytes
                .saturating_sub(self.window.bytes() + self.at_hand_bytes);
            if !renewing
                && !exhausted
                && self.at_hand.len() < refill_at
                && room >= refill_at
                && bytes_free > 0
            {
                let claimed_at = Instant::now();
                let (rows, nothing_more, keys_pending) =
                    self.claim_draining(room.min(batch), bytes_free).await?;
                exhausted = nothing_more;
                keys_seen |= keys_pending;
                next_claim = claimed_at + REFILL_POLL;
                claimed_any |= !rows.is_empty();
                let busy = rows.len() >= BUSY_CLAIM;
                self.at_hand_bytes += rows.iter().map(|r| r.payload.len() as u64).sum::<u64>();
                self.at_hand
                    .extend(rows.into_iter().map(|row| (claimed_at, row)));
                self.publish_at_hand().await?;
                // Writers' wake-ups cost them their commits' grouping when
                // they come faster than we claim: then we take the drain
                // lock (writers skip their NOTIFY) and claim every
                // REFILL_POLL instead. Slower, each commit wakes us, and we
                // claim only then. Taken after the claim and its publishes,
                // off the wake-up's path; a writer committing before it is
                // held notifies, and we claim once more.
                if busy {
                    self.wakeup.begin_drain().await;
                }
            }
            if self.window.is_empty() {
                let claimable = !exhausted && bytes_free > 0;
                if (claimable || !self.at_hand.is_empty()) && !renewing {
                    continue;
                }
                if self.marker.unsettled() == 0 || (exhausted && !keys_seen) {
                    return Ok(claimed_any);
                }
                // Marking a key's head makes its successor claimable. (During
                // a database outage this waits for the marker's retries.)
                let wakes_come = self.wakeup.wakes_come();
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(claimed_any),
                    _ = self.marker.settled() => {}
                    _ = tokio::time::sleep(REFILL_POLL), if !wakes_come => {}
                    _ = self.wakeup.notified(), if wakes_come => {}
                }
                exhausted = false;
                continue;
            }
            // Holding the drain lock, writers skip NOTIFY: rows they commit
            // while confirms are outstanding are found by claiming again
            // every REFILL_POLL, not after the confirms (a broker fsync,
            // several milliseconds under load). Giving the lock back here
            // under load, so that they wake us, measured 0.89 of the
            // no-trigger tps on the write path (0.96 holding it). Without
            // the lock (claims of a row or two), their NOTIFY wakes us:
            // polling there cost 3 empty claims a message at 20 msg/s.
            let wakes_come = self.wakeup.wakes_come();
            let settled = tokio::select! {
                _ = shutdown.cancelled() => return Ok(claimed_any),
                settled = self.window.settled() => settled,
                _ = tokio::time::sleep_until(next_claim), if exhausted && !wakes_come => {
                    exhausted = false;
                    continue;
                }
                _ = self.wakeup.notified(), if exhausted && wakes_come => {
                    exhausted = false;
                    continue;
                }
            };
            let unanswered = self.settle(settled)?;
            self.show_window();
            if !unanswered.is_empty() {
                self.ask_the_broker(unanswered).await?;
            }
        }
    }

    /// Claims up to `limit` rows and `bytes` of payload; also says whether
    /// nothing more is claimable, and whether some key has rows pending.
    async fn claim_draining(
        &mut self,
        limit: usize,
        bytes: u64,
    ) -> Result<(Vec<Claimed>, bool, bool), Outage> {
        let now = Instant::now();
        if self.wakeup.locks_held() {
            // Likely a transaction that fired the trigger early: its row
            // has a low id and commits late.
            self.cursor.rewind();
        }
        let in_flight = self.published_unmarked(now);
        let limits = ClaimLimits {
            in_flight: &in_flight,
            after: self.cursor.start(now),
            keys_from: &self.next_key,
            rows: limit as u32,
            bytes,
            lease: self.config.lease,
            block_on_dead_head: self.config.block_on_dead_head,
            followers: self.config.key_pipeline,
            keyless_only: !self.keys_pending,
        };
        let claim = self.store.claim(limits).await;
        let claim = claim?;
        self.cursor.claimed(now, &claim.rows, claim.exhausted);
        self.next_key = claim.next_key;
        self.keys_pending = claim.keys_pending;
        self.health.set(DATABASE, true);
        self.meters.claim_batch.record(claim.rows.len() as f64);
        let keys_pending =
            claim.keys_pending || claim.rows.iter().any(|r| r.ordering_key.is_some());
        Ok((claim.rows, claim.exhausted, keys_pending))
    }

    /// Rows awaiting their confirms, and rows confirmed within [`MARKING`]
    /// while marks are outstanding: published either way. Only with keys
    /// pipelined.
    fn published_unmarked(&mut self, now: Instant) -> Vec<i64> {
        if self.config.key_pipeline == 0 {
            self.confirmed.clear();
            return Vec::new();
        }
        if self.marker.unsettled() == 0 {
            self.confirmed.clear();
        }
        while self
            .confirmed
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= MARKING)
        {
            self.confirmed.pop_front();
        }
        let mut ids = self.window.keyed_ids();
        ids.extend(self.confirmed.iter().map(|(_, id)| *id));
        ids
    }

    /// Every row at hand, which is left empty.
    fn take_at_hand(&mut self) -> Vec<Claimed> {
        self.at_hand_bytes = 0;
        self.at_hand.drain(..).map(|(_, row)| row).collect()
    }

    /// Publishes the rows at hand in id order, as far as the window has
    /// room. A row is published only while its confirm can still come back
    /// before its lease runs out: a relay frozen past its lease (say
    /// SIGSTOP) must not publish, after another relay took its rows over,
    /// a key's head behind its successors. Past that, the row and every row
    /// at hand behind it (the rest of its claim, perhaps its key's
    /// followers, and later claims) are given back.
    async fn publish_at_hand(&mut self) -> Result<(), Outage> {
        let margin = self
            .config
            .lease
            .saturating_sub(self.config.confirm_timeout);
        let max_payload = self.config.max_payload_bytes;
        while self.window.in_flight() < self.config.max_in_flight as usize {
            let Some((claimed_at, row)) = self.at_hand.pop_front() else {
                break;
            };
            self.at_hand_bytes = self.at_hand_bytes.saturating_sub(row.payload.len() as u64);
            if Instant::now() >= claimed_at + margin {
                let rest = self.take_at_hand();
                tracing::warn!(
                    rows = rest.len() + 1,
                    "claimed rows not published before their lease would run out; giving them back"
                );
                self.give_back(std::iter::once(row).chain(rest));
                break;
            }
            let trace = self.spans.start(&row, claimed_at);
            let published = match self.broker.as_mut() {
                Some(broker) => {
                    let trace = trace.as_ref();
                    broker
                        .publish(&row, trace, max_payload, self.broker_max)
                        .await
                }
                None => Err(BrokerError::NotConnected),
            };
            match published {
                Ok(pending) => self.window.push(row, pending.outcome()),
                Err(error) => {
                    // The rest at hand is given back when the drain ends.
                    self.note_lost(&row);
                    self.give_back([row]);
                    self.meters.failure(Fault::ConnectionLost).increment(1);
                    return Err(Outage::from(error));
                }
            }
        }
        self.show_window();
        Ok(())
    }

    /// Hands settled rows to the marker, and returns the unanswered ones
    /// (see [`Relay::ask_the_broker`]). A lost confirm means the channel is
    /// gone: the rest of the window is given back and the drain stops.
    fn settle(&mut self, settled: Vec<Settled>) -> Result<Vec<Claimed>, Outage> {
        let mut lost = None;
        let mut unanswered = Vec::new();
        let now = Instant::now();
        for row in settled {
            match row {
                Settled::Published(row) => {
                    self.nack_runs.acked(&row.exchange);
                    self.meters.published.increment(1);
                    if let Ok(age) = row.pending_since.elapsed() {
                        self.meters.enqueue_to_confirm.record(age.as_secs_f64());
                        if row.scheduled {
                            self.meters.schedule_lateness.record(age.as_secs_f64());
                        }
                    }
                    if self.config.key_pipeline > 0 && row.ordering_key.is_some() {
                        self.confirmed.push_back((now, row.id));
                    }
                    self.spans.published(row.id);
                    self.marker.send(Mark::Published(row.held()));
                }
                Settled::Failed(row, fault, error) => {
                    if fault == Fault::Nacked {
                        self.nack_runs.nacked(&row.exchange, now);
                    }
                    self.meters.failure(fault).increment(1);
                    self.spans.failed(row.id, fault, &error);
                    self.marker.send(Mark::Failed {
                        row: Box::new(row),
                        error,
                    });
                }
                Settled::Unanswered(row) => unanswered.push(row),
                Settled::Lost(row, error) => {
                    self.meters.failure(Fault::ConnectionLost).increment(1);
                    self.note_lost(&row);
                    self.give_back([row]);
                    lost = Some(error);
                }
            }
        }
        match lost {
            Some(error) => {
                self.give_back(unanswered);
                Err(Outage::Broker(error))
            }
            None => Ok(unanswered),
        }
    }
}
