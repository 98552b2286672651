//! `latency`: a relay runs in this process while writers enqueue at a
//! steady rate, each message its own autocommit `SELECT outbox.enqueue(...)`.
//! Two figures per mode:
//!
//! - commit → consumer received: the writer notes the instant its enqueue
//!   returned (just after the commit), a consumer on the queue the instant
//!   the delivery arrived, joined on the AMQP `message_id`;
//! - enqueue → confirm: the relay's own `outbox_enqueue_to_confirm_seconds`
//!   histogram (from the row's `created_at`), captured by `capture`.
//!
//! One message goes through first and is left out, so relay start-up and
//! cold caches are not counted.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use lapin::Connection;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use outbox_relay::config::Mode;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_postgres::Client;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::capture::Captured;
use crate::cli::{LatencyArgs, ModeChoice};
use crate::report::Percentiles;
use crate::setup::{self, Fixture, Relay};

const ENQUEUE: &str = "SELECT outbox.enqueue($1, '', $2)";
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// How long deliveries may trail the last write, on top of two sweeps.
const TAIL_GRACE: Duration = Duration::from_secs(10);

/// What one mode measured.
pub struct LatencyResult {
    pub mode: &'static str,
    pub sweep_ms: u64,
    pub rate: f64,
    pub seconds: u64,
    pub writers: u32,
    pub sent: usize,
    pub received: usize,
    pub duplicates: u64,
    pub commit_to_received: Percentiles,
    pub enqueue_to_confirm: Percentiles,
}

/// One mode's settings.
struct Plan<'a> {
    mode: Mode,
    sweep: Duration,
    args: &'a LatencyArgs,
    captured: &'a Captured,
}

pub async fn run(args: LatencyArgs) -> anyhow::Result<()> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be a positive number of messages per second");
    }
    let modes = match (args.mode, args.sweep_ms) {
        (ModeChoice::All, Some(_)) => bail!(
            "--sweep-ms needs --mode notify or poll (--mode all runs its own sweeps: 1000 and 5000 ms)"
        ),
        (ModeChoice::All, None) => {
            vec![(Mode::Notify, 1000), (Mode::Poll, 1000), (Mode::Poll, 5000)]
        }
        (ModeChoice::Notify, sweep) => vec![(Mode::Notify, sweep.unwrap_or(1000))],
        (ModeChoice::Poll, sweep) => vec![(Mode::Poll, sweep.unwrap_or(1000))],
    };
    let captured = crate::capture::install()?;
    let mut results = Vec::new();
    for (mode, sweep_ms) in modes {
        let plan = Plan {
            mode,
            sweep: Duration::from_millis(sweep_ms),
            args: &args,
            captured: &captured,
        };
        let result =
            setup::with_fixture(&args.common, async |fixture| measure(fixture, &plan).await)
                .await?;
        results.push(result);
    }
    crate::report::print_latency(&results, args.common.json);
    Ok(())
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Notify => "notify",
        Mode::Poll => "poll",
    }
}

async fn measure(fixture: &Fixture, plan: &Plan<'_>) -> anyhow::Result<LatencyResult> {
    let consumer = Consumer::start(fixture).await?;
    let mut relay = Relay::start(outbox_relay::Settings {
        database_url: Some(fixture.db_url.clone()),
        amqp_url: Some(fixture.amqp_url.clone()),
        mode: Some(mode_name(plan.mode).into()),
        sweep_interval_ms: Some(plan.sweep.as_millis() as u64),
        ..outbox_relay::Settings::default()
    })?;
    let outcome = async {
        warm_up(fixture, plan, &consumer, &mut relay).await?;
        let sent = write(fixture, plan, &consumer, &mut relay).await?;
        await_deliveries(plan, &consumer, sent.len(), &mut relay).await?;
        Ok::<_, anyhow::Error>(sent)
    }
    .await;
    let stopped = relay.stop().await;
    let received = consumer.stop().await;
    let sent = outcome?;
    stopped?;

    let mut commit_to_received = crate::report::new_histogram()?;
    for (id, committed) in &sent {
        if let Some(arrived) = received.first.get(id) {
            // An arrival before the writer saw its commit return counts as 0.
            let micros = arrived.saturating_duration_since(*committed).as_micros();
            commit_to_received.saturating_record(micros as u64);
        }
    }
    Ok(LatencyResult {
        mode: mode_name(plan.mode),
        sweep_ms: plan.sweep.as_millis() as u64,
        rate: plan.args.rate,
        seconds: plan.args.duration,
        writers: plan.args.writers,
        sent: sent.len(),
        received: commit_to_received.len() as usize,
        duplicates: received.duplicates,
        commit_to_received: Percentiles::of(&commit_to_received),
        enqueue_to_confirm: Percentiles::of(&plan.captured.take()),
    })
}

/// One message end to end, then forgets it and the relay's samples so far.
async fn warm_up(
    fixture: &Fixture,
    plan: &Plan<'_>,
    consumer: &Consumer,
    relay: &mut Relay,
) -> anyhow::Result<()> {
    let client = fixture.connect_db().await?;
    enqueue(&client, &fixture.exchange, &json!({"warmUp": true})).await?;
    let deadline = Instant::now() + plan.sweep + TAIL_GRACE;
    while consumer.lock().first.is_empty() {
        relay.check_running().await?;
        if Instant::now() > deadline {
            bail!(
                "the warm-up message did not arrive within {deadline_s} s",
                deadline_s = (plan.sweep + TAIL_GRACE).as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    *consumer.lock() = Received::default();
    plan.captured.take();
    Ok(())
}

/// Runs the writers for the plan's duration; returns each message's id and
/// the instant its commit returned.
async fn write(
    fixture: &Fixture,
    plan: &Plan<'_>,
    consumer: &Consumer,
    relay: &mut Relay,
) -> anyhow::Result<Vec<(Uuid, Instant)>> {
    let writers = plan.args.writers;
    // Each writer keeps its own pace; their start offsets interleave them.
    let period = Duration::from_secs_f64(f64::from(writers) / plan.args.rate);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs(plan.args.duration);
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let client = fixture.connect_db().await?;
        let first = start + period * writer / writers;
        tasks.push(tokio::spawn(run_writer(
            client,
            fixture.exchange.clone(),
            writer,
            first,
            period,
            end,
        )));
    }
    let all = futures::future::join_all(tasks);
    tokio::pin!(all);
    let mut progress = tokio::time::interval_at(start + PROGRESS_INTERVAL, PROGRESS_INTERVAL);
    let finished = loop {
        tokio::select! {
            finished = &mut all => break finished,
            _ = progress.tick() => {
                relay.check_running().await?;
                eprintln!(
                    "latency {} (sweep {} ms): {:4.1} of {} s, {} received",
                    mode_name(plan.mode),
                    plan.sweep.as_millis(),
                    start.elapsed().as_secs_f64(),
                    plan.args.duration,
                    consumer.lock().first.len()
                );
            }
        }
    };
    let mut sent = Vec::new();
    for writer in finished {
        sent.extend(writer.context("a writer task panicked")??);
    }
    Ok(sent)
}

async fn run_writer(
    client: Client,
    exchange: String,
    writer: u32,
    first: Instant,
    period: Duration,
    end: Instant,
) -> anyhow::Result<Vec<(Uuid, Instant)>> {
    let mut ticker = tokio::time::interval_at(first, period);
    // A writer that fell behind catches up, so the combined rate holds.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut sent = Vec::new();
    for number in 0.. {
        if ticker.tick().await >= end {
            break;
        }
        let payload =
            json!({"writer": writer, "number": number, "context": "outbox-bench latency"});
        let id = enqueue(&client, &exchange, &payload).await?;
        sent.push((id, Instant::now()));
    }
    Ok(sent)
}

async fn enqueue(
    client: &Client,
    exchange: &str,
    payload: &serde_json::Value,
) -> anyhow::Result<Uuid> {
    let row = client
        .query_typed_one(ENQUEUE, &[(&exchange, Type::TEXT), (payload, Type::JSONB)])
        .await
        .map_err(|e| anyhow::anyhow!("enqueue: {}", outbox::error_line(&e)))?;
    Ok(row.try_get(0)?)
}

/// Waits until `expected` messages arrived, or two sweeps and a grace
/// period passed (then the report shows fewer received than sent).
async fn await_deliveries(
    plan: &Plan<'_>,
    consumer: &Consumer,
    expected: usize,
    relay: &mut Relay,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + plan.sweep * 2 + TAIL_GRACE;
    while consumer.lock().first.len() < expected && Instant::now() < deadline {
        relay.check_running().await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// When each message first arrived, by `message_id`.
#[derive(Default)]
struct Received {
    first: HashMap<Uuid, Instant>,
    /// Deliveries of a `message_id` that had arrived already.
    duplicates: u64,
}

/// Consumes the bench queue (auto-ack) and notes arrival instants.
struct Consumer {
    received: Arc<Mutex<Received>>,
    connection: Connection,
    task: JoinHandle<()>,
}

impl Consumer {
    async fn start(fixture: &Fixture) -> anyhow::Result<Consumer> {
        let connection = setup::connect_amqp(&fixture.amqp_url).await?;
        let channel = connection.create_channel().await?;
        let mut deliveries = channel
            .basic_consume(
                fixture.queue.as_str().into(),
                "outbox-bench".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("cannot consume the bench queue")?;
        let received = Arc::new(Mutex::new(Received::default()));
        let sink = received.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(delivery)) = deliveries.next().await {
                let arrived = Instant::now();
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .and_then(|id| id.as_str().parse::<Uuid>().ok());
                if let Some(id) = id {
                    let mut received = lock(&sink);
                    let received = &mut *received;
                    match received.first.entry(id) {
                        Entry::Vacant(first) => {
                            first.insert(arrived);
                        }
                        Entry::Occupied(_) => received.duplicates += 1,
                    }
                }
            }
        });
        Ok(Consumer {
            received,
            connection,
            task,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Received> {
        lock(&self.received)
    }

    /// Stops consuming; returns what arrived.
    async fn stop(self) -> Received {
        let _ = self.connection.close(200, "bench done".into()).await;
        self.task.abort();
        std::mem::take(&mut *lock(&self.received))
    }
}

fn lock(received: &Mutex<Received>) -> MutexGuard<'_, Received> {
    received
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
