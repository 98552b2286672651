//! `drain`: how fast one relay empties a backlog, next to how fast a bare
//! lapin loop publishes the same messages with the same window of confirms.
//!
//! With `--hold-horizon` a second backlog is drained while another session
//! holds the xmin horizon, so that no published row's old version can be
//! pruned, and each third of each backlog is timed: the claim must not
//! slow down as dead index entries pile up.
//!
//! The backlog is inserted with no relay running (no listener has announced
//! itself, so the wake-up trigger never notifies). The relay phase is timed
//! from the relay's start until no row is pending; rows are marked right
//! after their confirm, so that is "all confirmed" give or take one mark batch.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation};
use tokio_postgres::Client;

use crate::cli::DrainArgs;
use crate::setup::{self, Fixture, Relay};

/// An order-confirmation-sized JSON payload.
pub(crate) const PAYLOAD: &[u8] = br#"{"orderId":1234567,"userName":"bench-user","context":"outbox-bench drain backlog","num":7}"#;
const INSERT_CHUNK: u32 = 10_000;
const POLL_INTERVAL: Duration = Duration::from_millis(20);
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// What one run measured.
pub struct DrainResult {
    pub backlog: u32,
    pub window: u32,
    pub batch: u32,
    pub payload_bytes: usize,
    pub insert_seconds: f64,
    pub relay: Timed,
    /// Messages in the queue after the relay phase (should equal the backlog).
    pub relay_queued: u32,
    /// The same drain while the xmin horizon is held (`--hold-horizon`).
    pub held: Option<Timed>,
    /// The bare loop's seconds and queue depth, unless `--no-bare`.
    pub bare: Option<(f64, u32)>,
}

/// A relay drain: its seconds in all, and the seconds of each third.
pub struct Timed {
    pub seconds: f64,
    pub thirds: [f64; 3],
}

pub async fn run(args: &DrainArgs) -> anyhow::Result<DrainResult> {
    setup::with_fixture(&args.common, async |fixture| measure(fixture, args).await).await
}

async fn measure(fixture: &Fixture, args: &DrainArgs) -> anyhow::Result<DrainResult> {
    let client = fixture.connect_db().await?;
    let insert_seconds = insert_backlog(&client, &fixture.exchange, args.backlog).await?;
    let relay = keyless_drain(fixture, &client, args).await?;
    let relay_queued = fixture.queued().await?;
    fixture.purge().await?;
    let held = if args.hold_horizon {
        insert_backlog(&client, &fixture.exchange, args.backlog).await?;
        let holder = fixture.connect_db().await?;
        // The snapshot is taken by the first statement and kept to the end.
        holder
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
            .await?;
        let held = keyless_drain(fixture, &client, args).await?;
        holder.batch_execute("ROLLBACK").await?;
        fixture.purge().await?;
        Some(held)
    } else {
        None
    };
    let bare = if args.no_bare {
        None
    } else {
        let seconds = bare_publish(fixture, args).await?;
        Some((seconds, fixture.queued().await?))
    };
    Ok(DrainResult {
        backlog: args.backlog,
        window: args.window,
        batch: args.batch,
        payload_bytes: PAYLOAD.len(),
        insert_seconds,
        relay,
        relay_queued,
        held,
        bare,
    })
}

/// Inserts `backlog` rows in chunks; returns the seconds it took.
pub(crate) async fn insert_backlog(
    client: &Client,
    exchange: &str,
    backlog: u32,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut inserted = 0;
    while inserted < backlog {
        let chunk = INSERT_CHUNK.min(backlog - inserted);
        client
            .execute(
                "INSERT INTO outbox.messages (exchange, routing_key, payload) \
                 SELECT $1, '', $2 FROM generate_series(1, $3::int)",
                &[&exchange, &PAYLOAD, &(chunk as i32)],
            )
            .await
            .map_err(outbox::PgError)
            .context("inserting the backlog")?;
        inserted += chunk;
    }
    // Planner statistics, as autovacuum would have them for a backlog that
    // built up during an outage.
    client.batch_execute("ANALYZE outbox.messages").await?;
    Ok(started.elapsed().as_secs_f64())
}

/// Starts a relay on `backlog` pending rows and times it until none is
/// pending (the bench queue's depth marks the thirds).
/// The relay's drain of a keyless backlog, with this run's window and batch.
async fn keyless_drain(
    fixture: &Fixture,
    client: &tokio_postgres::Client,
    args: &DrainArgs,
) -> anyhow::Result<Timed> {
    drain_with_relay(fixture, client, args.backlog, args.window, args.batch, None).await
}

pub(crate) async fn drain_with_relay(
    fixture: &Fixture,
    client: &Client,
    backlog: u32,
    window: u32,
    batch: u32,
    key_pipeline: Option<u32>,
) -> anyhow::Result<Timed> {
    let settings = outbox_relay::Settings {
        database_url: Some(fixture.db_url.clone()),
        amqp_url: Some(fixture.amqp_url.clone()),
        max_in_flight: Some(window),
        batch_size: Some(batch),
        key_pipeline,
        ..outbox_relay::Settings::default()
    };
    let started = Instant::now();
    let mut relay = Relay::start(settings)?;
    let mut last_progress = Instant::now();
    let bar = crate::progress::bar(u64::from(backlog), "drain: relay");
    // When the queue first held a third and two thirds of the backlog.
    let mut marks = Vec::with_capacity(2);
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        relay.check_running().await?;
        if marks.len() < 2 {
            let queued = u64::from(fixture.queued().await?);
            let next = (marks.len() as u64 + 1) * u64::from(backlog) / 3;
            if queued >= next {
                marks.push(started.elapsed().as_secs_f64());
            }
        }
        // EXISTS stops at the first pending row and uses the pending-rows
        // index, so polling every 20 ms costs the relay next to nothing.
        let pending: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM outbox.messages \
                 WHERE published_at IS NULL AND dead_at IS NULL)",
                &[],
            )
            .await?
            .get(0);
        if !pending {
            break;
        }
        if last_progress.elapsed() >= PROGRESS_INTERVAL {
            last_progress = Instant::now();
            // The queue depth costs the database nothing (a count(*) of
            // pending rows would compete with the relay's claims).
            bar.set_position(u64::from(fixture.queued().await?));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    relay.stop().await?;
    marks.resize(2, seconds);
    let dead: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox.messages WHERE dead_at IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if dead > 0 {
        bail!("{dead} messages died during the drain; the figures would mean nothing");
    }
    Ok(Timed {
        seconds,
        thirds: [marks[0], marks[1] - marks[0], seconds - marks[1]],
    })
}

/// Publishes `backlog` messages (mandatory, persistent) with at most
/// `window` confirms outstanding on one channel; returns the seconds from
/// the first publish to the last confirm.
async fn bare_publish(fixture: &Fixture, args: &DrainArgs) -> anyhow::Result<f64> {
    let connection = setup::connect_amqp(&fixture.amqp_url).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let window = args.window as usize;
    let mut in_flight = FuturesUnordered::new();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let bar = crate::progress::bar(u64::from(args.backlog), "drain: bare lapin");
    for published in 0..args.backlog {
        if in_flight.len() >= window
            && let Some(confirmation) = in_flight.next().await
        {
            check(confirmation)?;
        }
        let properties = BasicProperties::default()
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        let confirm = channel
            .basic_publish(
                fixture.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                PAYLOAD,
                properties,
            )
            .await
            .context("bare publish")?;
        in_flight.push(confirm);
        if last_progress.elapsed() >= PROGRESS_INTERVAL {
            last_progress = Instant::now();
            bar.set_position(u64::from(published));
        }
    }
    while let Some(confirmation) = in_flight.next().await {
        check(confirmation)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let _ = connection.close(200, "bench done".into()).await;
    Ok(seconds)
}

fn check(confirmation: lapin::Result<Confirmation>) -> anyhow::Result<()> {
    match confirmation.context("bare publish confirm")? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("bare publish was returned as unroutable"),
        Confirmation::Nack(_) => bail!("bare publish was nacked"),
        Confirmation::NotRequested => bail!("bare channel is not in confirm mode"),
    }
}
