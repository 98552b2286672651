//! `schedule`: scheduled delivery, measured two ways in one run.
//!
//! - Lateness: with a relay running, `--rows` messages are scheduled to
//!   fall due `--rate` per second, starting `--lead-ms` after they are
//!   written; for each, deliver_at → marked published (the mark follows
//!   the broker's confirm), by the database's clock.
//! - Future rows: a backlog of rows due now is drained by a fresh relay,
//!   first alone, then with `--future` rows scheduled for tomorrow beside
//!   it: the claim must not walk them.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio_postgres::Client;

use crate::cli::ScheduleArgs;
use crate::drain::{PAYLOAD, drain_with_relay, insert_backlog};
use crate::setup::{self, Fixture, Relay};

const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long after the last row's time the run waits for it.
const GRACE: Duration = Duration::from_secs(60);
const WINDOW: u32 = 256;
const BATCH: u32 = 500;

#[derive(Debug, Serialize)]
pub struct ScheduleResult {
    pub rows: u32,
    pub rate: f64,
    /// Lateness percentiles in ms: p50, p99, max.
    pub lateness_ms: [f64; 3],
    /// Rows published before their time (must be 0).
    pub early: i64,
    pub backlog: u32,
    pub future: u32,
    /// Drain msg/s without and with the future rows.
    pub drain_alone: f64,
    pub drain_beside_future: f64,
}

pub async fn run(args: &ScheduleArgs) -> anyhow::Result<ScheduleResult> {
    setup::with_fixture(&args.common, async |fixture| measure(fixture, args).await).await
}

async fn measure(fixture: &Fixture, args: &ScheduleArgs) -> anyhow::Result<ScheduleResult> {
    let client = fixture.connect_db().await?;
    let (lateness_ms, early) = lateness(fixture, &client, args).await?;
    fixture.purge().await?;
    client
        .batch_execute("TRUNCATE outbox.messages; TRUNCATE outbox.scheduled")
        .await?;

    insert_backlog(&client, &fixture.exchange, args.backlog).await?;
    let alone = drain_with_relay(fixture, &client, args.backlog, WINDOW, BATCH, None).await?;
    fixture.purge().await?;
    schedule_for_tomorrow(&client, &fixture.exchange, args.future).await?;
    insert_backlog(&client, &fixture.exchange, args.backlog).await?;
    let beside = drain_with_relay(fixture, &client, args.backlog, WINDOW, BATCH, None).await?;
    fixture.purge().await?;
    Ok(ScheduleResult {
        rows: args.rows,
        rate: args.rate,
        lateness_ms,
        early,
        backlog: args.backlog,
        future: args.future,
        drain_alone: f64::from(args.backlog) / alone.seconds,
        drain_beside_future: f64::from(args.backlog) / beside.seconds,
    })
}

/// Schedules `args.rows` rows and waits until the relay published them.
async fn lateness(
    fixture: &Fixture,
    client: &Client,
    args: &ScheduleArgs,
) -> anyhow::Result<([f64; 3], i64)> {
    let settings = outbox_relay::Settings {
        database_url: Some(fixture.db_url.clone()),
        amqp_url: Some(fixture.amqp_url.clone()),
        ..outbox_relay::Settings::default()
    };
    let mut relay = Relay::start(settings)?;
    client
        .execute(
            "INSERT INTO outbox.messages (exchange, routing_key, payload, deliver_at) \
             SELECT $1, '', $2, now() + $3::float8 * interval '1 millisecond' \
                    + g / $4::float8 * interval '1 second' \
             FROM generate_series(0, $5::int - 1) g",
            &[
                &fixture.exchange,
                &PAYLOAD,
                &(args.lead_ms as f64),
                &args.rate,
                &(args.rows as i32),
            ],
        )
        .await
        .map_err(outbox::PgError)
        .context("scheduling the rows")?;
    let span = Duration::from_secs_f64(f64::from(args.rows) / args.rate)
        + Duration::from_millis(args.lead_ms);
    let deadline = Instant::now() + span + GRACE;
    let bar = crate::progress::bar(u64::from(args.rows), "schedule: lateness");
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        relay.check_running().await?;
        let published: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL",
                &[],
            )
            .await?
            .get(0);
        bar.set_position(published as u64);
        if published >= i64::from(args.rows) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{published} of {} scheduled rows published in time",
                args.rows
            );
        }
    }
    bar.finish_and_clear();
    relay.stop().await?;
    let row = client
        .query_one(
            "SELECT percentile_disc(ARRAY[0.5, 0.99, 1.0]) WITHIN GROUP (ORDER BY late), \
                    count(*) FILTER (WHERE late < 0) \
             FROM (SELECT extract(epoch FROM published_at - scheduled_for)::float8 * 1000 AS late \
                   FROM outbox.messages) l",
            &[],
        )
        .await?;
    let percentiles: Vec<f64> = row.get(0);
    let early: i64 = row.get(1);
    Ok(([percentiles[0], percentiles[1], percentiles[2]], early))
}

/// `rows` rows due tomorrow, written straight into `outbox.scheduled` (as
/// the trigger would, only faster), then analysed.
async fn schedule_for_tomorrow(client: &Client, exchange: &str, rows: u32) -> anyhow::Result<()> {
    let bar = crate::progress::bar(u64::from(rows), "schedule: rows for tomorrow");
    let mut written = 0;
    while written < rows {
        let chunk = 100_000.min(rows - written);
        client
            .execute(
                "INSERT INTO outbox.scheduled \
                     (message_id, exchange, routing_key, payload, content_type, headers, deliver_at) \
                 SELECT gen_random_uuid(), $1, '', $2, 'application/json', '{}', \
                        now() + interval '1 day' + g * interval '1 millisecond' \
                 FROM generate_series($3::int, $3::int + $4::int - 1) g",
                &[&exchange, &PAYLOAD, &(written as i32), &(chunk as i32)],
            )
            .await
            .map_err(outbox::PgError)
            .context("scheduling rows for tomorrow")?;
        written += chunk;
        bar.set_position(u64::from(written));
    }
    bar.finish_and_clear();
    client.batch_execute("ANALYZE outbox.scheduled").await?;
    Ok(())
}

pub fn print(result: &ScheduleResult, json: bool) {
    if json {
        match serde_json::to_string_pretty(result) {
            Ok(text) => println!("{text}"),
            Err(error) => eprintln!("cannot print JSON: {error}"),
        }
        return;
    }
    let [p50, p99, max] = result.lateness_ms;
    println!(
        "lateness, {} rows due at {} per second: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; \
         {} published early",
        result.rows, result.rate, result.early
    );
    println!(
        "drain of {} rows due now: {:.0} msg/s alone, {:.0} msg/s beside {} rows due tomorrow ({:.2})",
        result.backlog,
        result.drain_alone,
        result.drain_beside_future,
        result.future,
        result.drain_beside_future / result.drain_alone
    );
}
