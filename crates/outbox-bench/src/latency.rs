//! `latency`: writers commit at a steady rate while a publisher runs; per
//! message, from the instant its commit returned:
//!
//! - commit → consumer received: a consumer on the bench queue;
//! - commit → delivery committed: the dispatch consumer (the real `dispatch`
//!   binary) writes the delivery into its own database, whose bench trigger
//!   NOTIFYs at commit ([`crate::observe`]);
//! - enqueue → confirm: the relay's own `outbox_enqueue_to_confirm_seconds`
//!   histogram (from the row's `created_at`), captured by `capture`.
//!
//! Publishers: the relay (in this process) in notify mode, in poll mode at
//! two sweep intervals, and the bare NOTIFY → publish bridge as the floor.
//! One message goes through first and is left out, so start-up and cold
//! caches are not counted. With `--rates`, the relay in notify mode and the
//! bridge take turns at each rate, with their CPU per message (`cost`),
//! printed by `sweep`.

use std::time::Duration;

use anyhow::bail;
use hdrhistogram::Histogram as Hdr;
use outbox_relay::config::Mode;
use tokio::time::Instant;

use crate::bridge::Bridge;
use crate::capture::Captured;
use crate::cli::{LatencyArgs, ModeChoice};
use crate::cost::{Cost, CpuMeter};
use crate::figures::Percentiles;
use crate::observe::{Arrivals, Consumer, Delivered, Shared};
use crate::setup::{self, Fixture, Relay};
use crate::writers::{self, Load, Sent, Target};

/// How long deliveries may trail the last write, on top of two sweeps.
const TAIL_GRACE: Duration = Duration::from_secs(10);
/// The order id of the warm-up message (writers' ids start at 1e9).
const WARM_UP_ORDER: i64 = 1;

/// What publishes the messages.
#[derive(Debug, Clone, Copy)]
pub enum Publisher {
    Relay { mode: Mode, sweep: Duration },
    Bridge,
}

impl Publisher {
    pub fn name(self) -> &'static str {
        match self {
            Publisher::Relay {
                mode: Mode::Notify, ..
            } => "relay notify",
            Publisher::Relay {
                mode: Mode::Poll, ..
            } => "relay poll",
            Publisher::Bridge => "bare bridge",
        }
    }

    pub fn sweep_ms(self) -> Option<u64> {
        match self {
            Publisher::Relay { sweep, .. } => Some(sweep.as_millis() as u64),
            Publisher::Bridge => None,
        }
    }

    /// The longest a message may wait for a publisher that is working.
    fn patience(self) -> Duration {
        match self {
            Publisher::Relay { sweep, .. } => sweep * 2 + TAIL_GRACE,
            Publisher::Bridge => TAIL_GRACE,
        }
    }
}

/// What one publisher measured.
pub struct LatencyResult {
    pub publisher: Publisher,
    pub load: Load,
    pub sent: usize,
    pub received: usize,
    pub delivered: usize,
    /// Deliveries of a message the bench consumer had received already.
    pub duplicates: u64,
    pub commit_to_received: Hdr<u64>,
    pub commit_to_delivered: Hdr<u64>,
    /// The relay's histogram; empty for the bridge.
    pub enqueue_to_confirm: Hdr<u64>,
    /// From the first write to the last delivery (or the end of patience).
    pub cost: Cost,
}

impl LatencyResult {
    /// Adds another round of the same publisher at the same rate.
    fn absorb(&mut self, other: LatencyResult) -> anyhow::Result<()> {
        self.sent += other.sent;
        self.received += other.received;
        self.delivered += other.delivered;
        self.duplicates += other.duplicates;
        self.commit_to_received.add(&other.commit_to_received)?;
        self.commit_to_delivered.add(&other.commit_to_delivered)?;
        self.enqueue_to_confirm.add(&other.enqueue_to_confirm)?;
        self.cost.absorb(&other.cost);
        Ok(())
    }

    pub fn percentiles(&self) -> [Percentiles; 3] {
        [
            Percentiles::of(&self.commit_to_received),
            Percentiles::of(&self.commit_to_delivered),
            Percentiles::of(&self.enqueue_to_confirm),
        ]
    }
}

pub async fn run(args: &LatencyArgs) -> anyhow::Result<Vec<LatencyResult>> {
    if args.rates.is_empty() {
        check_rate(args.rate)?;
    }
    for rate in &args.rates {
        check_rate(*rate)?;
    }
    let relay = |mode, ms| Publisher::Relay {
        mode,
        sweep: Duration::from_millis(ms),
    };
    let publishers = match (args.mode, args.sweep_ms) {
        _ if !args.rates.is_empty() => vec![relay(Mode::Notify, 1000), Publisher::Bridge],
        (ModeChoice::All | ModeChoice::Bridge, Some(_)) => {
            bail!("--sweep-ms needs --mode notify or poll (--mode all runs 1000 and 5000 ms)")
        }
        (ModeChoice::All, None) => vec![
            relay(Mode::Notify, 1000),
            Publisher::Bridge,
            relay(Mode::Poll, 1000),
            relay(Mode::Poll, 5000),
        ],
        (ModeChoice::Notify, sweep) => vec![relay(Mode::Notify, sweep.unwrap_or(1000))],
        (ModeChoice::Poll, sweep) => vec![relay(Mode::Poll, sweep.unwrap_or(1000))],
        (ModeChoice::Bridge, None) => vec![Publisher::Bridge],
    };
    let rates = match args.rates.is_empty() {
        true => vec![args.rate],
        false => args.rates.clone(),
    };
    let captured = crate::capture::install()?;
    let mut results = Vec::new();
    // Rate by rate, the publishers one after the other: what drifts on the
    // machine during the run drifts for both.
    for rate in rates {
        let load = Load {
            rate,
            writers: args.writers,
            duration: Duration::from_secs(args.duration),
        };
        let first = results.len();
        for _ in 0..args.rounds {
            for (i, &publisher) in publishers.iter().enumerate() {
                let result = setup::with_fixture(&args.common, async |fixture| {
                    measure(fixture, publisher, load, &captured).await
                })
                .await?;
                match results.get_mut(first + i) {
                    Some(earlier) => LatencyResult::absorb(earlier, result)?,
                    None => results.push(result),
                }
            }
        }
    }
    Ok(results)
}

fn check_rate(rate: f64) -> anyhow::Result<()> {
    if !(rate.is_finite() && rate > 0.0) {
        bail!("a rate must be a positive number of messages per second (got {rate})");
    }
    Ok(())
}

/// A publisher started for one measurement.
enum Running {
    Relay(Relay),
    Bridge(Box<Bridge>),
}

impl Running {
    async fn start(fixture: &Fixture, publisher: Publisher) -> anyhow::Result<Running> {
        Ok(match publisher {
            Publisher::Relay { mode, sweep } => {
                Running::Relay(Relay::start(outbox_relay::Settings {
                    database_url: Some(fixture.db_url.clone()),
                    amqp_url: Some(fixture.amqp_url.clone()),
                    mode: Some(mode_name(mode).into()),
                    sweep_interval_ms: Some(sweep.as_millis() as u64),
                    ..outbox_relay::Settings::default()
                })?)
            }
            Publisher::Bridge => Running::Bridge(Box::new(Bridge::start(fixture).await?)),
        })
    }

    async fn check_running(&mut self) -> anyhow::Result<()> {
        match self {
            Running::Relay(relay) => relay.check_running().await,
            Running::Bridge(_) => Ok(()),
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Running::Relay(relay) => relay.stop().await,
            Running::Bridge(bridge) => {
                bridge.stop().await;
                Ok(())
            }
        }
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Notify => "notify",
        Mode::Poll => "poll",
    }
}

fn target(publisher: Publisher) -> Target {
    match publisher {
        Publisher::Relay { .. } => Target::Outbox,
        Publisher::Bridge => Target::Bridge,
    }
}

async fn measure(
    fixture: &Fixture,
    publisher: Publisher,
    load: Load,
    captured: &Captured,
) -> anyhow::Result<LatencyResult> {
    let consumer = Consumer::start(fixture).await?;
    let delivered = Delivered::start(&fixture.dispatch_db_url).await?;
    let mut dispatch = fixture.start_dispatch(&[]).await?;
    let mut running = Running::start(fixture, publisher).await?;
    let meter = CpuMeter::start(fixture, captured).await?;
    let outcome = async {
        warm_up(fixture, publisher, &delivered.arrivals, &mut running).await?;
        consumer.arrivals.take();
        captured.take();
        let start = meter.snapshot().await?;
        let bar = crate::progress::bar(load.duration.as_secs(), publisher.name());
        let sent = writers::write(fixture, target(publisher), load, async |_| {
            running.check_running().await?;
            dispatch.check_running()?;
            bar.inc(1);
            Ok(())
        })
        .await?
        .sent;
        bar.finish_and_clear();
        await_all(publisher, &delivered.arrivals, sent.len(), &mut running).await?;
        let cost = meter.since(&start).await?;
        Ok::<_, anyhow::Error>((sent, cost))
    }
    .await;
    let stopped = running.stop().await;
    let received = consumer.stop().await;
    let dispatch_stopped = dispatch.stop().await;
    let delivered = delivered.stop();
    let (sent, cost) = outcome?;
    stopped?;
    dispatch_stopped?;

    Ok(LatencyResult {
        publisher,
        load,
        sent: sent.len(),
        received: received.first.len(),
        delivered: delivered.first.len(),
        duplicates: received.duplicates,
        commit_to_received: since_commit(&sent, &received)?,
        commit_to_delivered: since_commit(&sent, &delivered)?,
        enqueue_to_confirm: captured.take(),
        cost,
    })
}

/// Microseconds from each commit to the message's arrival.
pub fn since_commit(sent: &[Sent], arrivals: &Arrivals) -> anyhow::Result<Hdr<u64>> {
    let mut histogram = crate::figures::new_histogram()?;
    for (id, committed) in sent {
        if let Some(micros) = arrivals.micros_since(id, *committed) {
            histogram.saturating_record(micros);
        }
    }
    Ok(histogram)
}

/// One message end to end, then forgets it.
async fn warm_up(
    fixture: &Fixture,
    publisher: Publisher,
    delivered: &Shared,
    running: &mut Running,
) -> anyhow::Result<()> {
    let client = fixture.connect_db().await?;
    writers::send(&client, target(publisher), &fixture.exchange, WARM_UP_ORDER).await?;
    let deadline = Instant::now() + publisher.patience();
    while delivered.count() == 0 {
        running.check_running().await?;
        if Instant::now() > deadline {
            bail!(
                "the warm-up message was not delivered within {} s",
                publisher.patience().as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    delivered.take();
    Ok(())
}

/// Waits until `expected` deliveries are committed, or the publisher's
/// patience ran out (then the report shows fewer delivered than sent).
async fn await_all(
    publisher: Publisher,
    delivered: &Shared,
    expected: usize,
    running: &mut Running,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + publisher.patience();
    while delivered.count() < expected && Instant::now() < deadline {
        running.check_running().await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
