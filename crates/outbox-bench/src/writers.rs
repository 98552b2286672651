//! Writers at a steady combined rate, each on its own connection, each
//! message its own autocommit statement: the way an application commits.
//! They note the instant each commit returned, by `message_id`.

use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram as Hdr;
use serde_json::json;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_postgres::Client;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::setup::Fixture;

const ENQUEUE: &str = "SELECT outbox.enqueue($1, '', $2)";
/// How often the caller's `every_second` runs while writers write.
const TICK: Duration = Duration::from_secs(1);

/// Where a writer's message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// An outbox row (`outbox.enqueue`), for the relay.
    Outbox,
    /// A bare `pg_notify`, for the bridge baseline.
    Bridge,
}

/// How much, how fast.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub rate: f64,
    pub writers: u32,
    pub duration: Duration,
}

/// One message written: its id and when its commit returned.
pub type Sent = (Uuid, Instant);

/// What the writers wrote.
pub struct Written {
    pub sent: Vec<Sent>,
    /// When writing started.
    pub start: Instant,
    /// How long each write took, in microseconds: the app's write path.
    pub write_micros: Hdr<u64>,
}

/// Runs the writers for `load.duration`, calling `every_second` with the
/// seconds written so far (for progress and sampling; an error stops the
/// run).
pub async fn write(
    fixture: &Fixture,
    target: Target,
    load: Load,
    mut every_second: impl AsyncFnMut(f64) -> anyhow::Result<()>,
) -> anyhow::Result<Written> {
    // Each writer keeps its own pace; their start offsets interleave them.
    let period = Duration::from_secs_f64(f64::from(load.writers) / load.rate);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + load.duration;
    let mut tasks = Vec::new();
    for writer in 0..load.writers {
        let client = fixture.connect_db().await?;
        let first = start + period * writer / load.writers;
        let exchange = fixture.exchange.clone();
        tasks.push(tokio::spawn(async move {
            run_writer(&client, target, &exchange, writer, first, period, end).await
        }));
    }
    let all = futures::future::join_all(tasks);
    tokio::pin!(all);
    let mut ticks = tokio::time::interval_at(start + TICK, TICK);
    let finished = loop {
        tokio::select! {
            finished = &mut all => break finished,
            _ = ticks.tick() => every_second(start.elapsed().as_secs_f64()).await?,
        }
    };
    let mut written = Written {
        sent: Vec::new(),
        start,
        write_micros: crate::figures::new_histogram()?,
    };
    for writer in finished {
        let (sent, write_micros) = writer.context("a writer task panicked")??;
        written.sent.extend(sent);
        written.write_micros.add(&write_micros)?;
    }
    Ok(written)
}

async fn run_writer(
    client: &Client,
    target: Target,
    exchange: &str,
    writer: u32,
    first: Instant,
    period: Duration,
    end: Instant,
) -> anyhow::Result<(Vec<Sent>, Hdr<u64>)> {
    let mut ticker = tokio::time::interval_at(first, period);
    // A writer that fell behind catches up, so the combined rate holds.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut sent = Vec::new();
    let mut write_micros = crate::figures::new_histogram()?;
    for number in 0_i64.. {
        if ticker.tick().await >= end {
            break;
        }
        // Unique per run, so each message becomes its own delivery.
        let order_id = (i64::from(writer) + 1) * 1_000_000_000 + number;
        let began = Instant::now();
        let id = send(client, target, exchange, order_id).await?;
        let committed = Instant::now();
        write_micros.saturating_record((committed - began).as_micros() as u64);
        sent.push((id, committed));
    }
    Ok((sent, write_micros))
}

/// Writes one order-shaped message; returns its `message_id`.
pub async fn send(
    client: &Client,
    target: Target,
    exchange: &str,
    order_id: i64,
) -> anyhow::Result<Uuid> {
    let payload = json!({"orderId": order_id, "userName": "bench", "context": "outbox-bench"});
    let failed = |e: tokio_postgres::Error| anyhow::Error::new(outbox::PgError(e)).context("write");
    match target {
        Target::Outbox => {
            let row = client
                .query_typed_one(ENQUEUE, &[(&exchange, Type::TEXT), (&payload, Type::JSONB)])
                .await
                .map_err(failed)?;
            Ok(row.try_get(0)?)
        }
        Target::Bridge => {
            let id = Uuid::new_v4();
            let notified = json!({"id": id, "payload": payload}).to_string();
            client
                .query_typed(crate::bridge::NOTIFY, &[(&notified, Type::TEXT)])
                .await
                .map_err(failed)?;
            Ok(id)
        }
    }
}
