//! `soak`: a long steady run with the relay and the dispatch consumer as
//! child processes (`outbox-relay run`, `dispatch`), as deployed. Every
//! second it samples the lag (age of the oldest pending row, and how many
//! are pending) and both children's resident memory; afterwards it splits
//! commit → received and commit → delivered latency by the second of the
//! commit, so a slow leak or a growing backlog shows as a trend.

use std::time::Duration;

use anyhow::{Context, bail};
use hdrhistogram::Histogram as Hdr;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::cli::SoakArgs;
use crate::figures::Percentiles;
use crate::observe::{Arrivals, Consumer, Delivered};
use crate::processes::Process;
use crate::setup::{self, Fixture};
use crate::writers::{self, Load, Sent, Target};

const LAG: &str = "SELECT count(*), \
     coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8, \
     pg_table_size('outbox.messages'), pg_indexes_size('outbox.messages'), \
     (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8, \
     (SELECT n_dead_tup FROM pg_stat_user_tables \
      WHERE schemaname = 'outbox' AND relname = 'messages') \
     FROM outbox.messages WHERE published_at IS NULL AND dead_at IS NULL";
/// How long the pipeline may take to catch up once writing stopped.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One second of the run.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Seconds since writing started.
    pub second: u64,
    pub pending: i64,
    /// Age of the oldest pending row, in seconds.
    pub lag_s: f64,
    /// On-disk size of `outbox.messages` (with TOAST) and of its indexes.
    pub table_bytes: i64,
    pub index_bytes: i64,
    /// The server's WAL position (bytes), for WAL written per message.
    pub wal_bytes: i64,
    /// Dead tuples in `outbox.messages`, as the statistics last saw them.
    pub dead_tuples: i64,
    pub relay_rss: Option<u64>,
    pub dispatch_rss: Option<u64>,
    /// CPU seconds used since the child started.
    pub relay_cpu: Option<f64>,
    pub dispatch_cpu: Option<f64>,
    /// Messages committed during this second, and their latencies.
    pub sent: u64,
    pub received: Option<Percentiles>,
    pub delivered: Option<Percentiles>,
}

pub struct SoakResult {
    pub load: Load,
    pub retention: Option<String>,
    pub sent: usize,
    pub received: usize,
    pub delivered: usize,
    pub duplicates: u64,
    pub settle_seconds: f64,
    pub commit_to_received: Percentiles,
    pub commit_to_delivered: Percentiles,
    /// How long each writer's enqueue took, start to commit.
    pub write: Percentiles,
    pub samples: Vec<Sample>,
}

pub async fn run(args: &SoakArgs) -> anyhow::Result<SoakResult> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be a positive number of messages per second");
    }
    let load = Load {
        rate: args.rate,
        writers: args.writers,
        duration: Duration::from_secs(args.duration),
    };
    let retention = args.retention.as_deref();
    let with_dispatch = !args.no_dispatch;
    let result = setup::with_fixture(&args.common, async |fixture| {
        measure(fixture, load, retention, with_dispatch).await
    })
    .await?;
    Ok(result)
}

/// The running pipeline and what the bench samples of it.
struct Pipeline {
    relay: Process,
    /// None with `--no-dispatch`.
    dispatch: Option<Process>,
    monitor: Client,
    samples: Vec<Sample>,
}

impl Pipeline {
    async fn sample(&mut self, second: u64) -> anyhow::Result<()> {
        self.relay.check_running()?;
        if let Some(dispatch) = &mut self.dispatch {
            dispatch.check_running()?;
        }
        let row = self
            .monitor
            .query_one(LAG, &[])
            .await
            .map_err(outbox::PgError)
            .context("lag query")?;
        self.samples.push(Sample {
            second,
            pending: row.try_get(0)?,
            lag_s: row.try_get(1)?,
            table_bytes: row.try_get(2)?,
            index_bytes: row.try_get(3)?,
            wal_bytes: row.try_get(4)?,
            dead_tuples: row.try_get::<_, Option<i64>>(5)?.unwrap_or(0),
            relay_rss: self.relay.rss_bytes(),
            dispatch_rss: self.dispatch.as_ref().and_then(Process::rss_bytes),
            relay_cpu: self.relay.cpu_seconds(),
            dispatch_cpu: self.dispatch.as_ref().and_then(Process::cpu_seconds),
            ..Sample::default()
        });
        Ok(())
    }
}

async fn measure(
    fixture: &Fixture,
    load: Load,
    retention: Option<&str>,
    with_dispatch: bool,
) -> anyhow::Result<SoakResult> {
    let consumer = Consumer::start(fixture).await?;
    let delivered = Delivered::start(&fixture.dispatch_db_url).await?;
    let dispatch = match with_dispatch {
        true => Some(fixture.start_dispatch(&[]).await?),
        false => None,
    };
    // Without the consumer, the bench queue's arrivals are the end of the line.
    let arrived = |delivered: &Delivered| match with_dispatch {
        true => delivered.arrivals.count(),
        false => consumer.arrivals.count(),
    };
    let mut env = vec![
        ("OUTBOX_DATABASE_URL", fixture.db_url.as_str()),
        ("OUTBOX_AMQP_URL", fixture.amqp_url.as_str()),
        ("OUTBOX_METRICS_ADDR", "127.0.0.1:0"),
    ];
    env.extend(retention.map(|r| ("OUTBOX_RETENTION", r)));
    let relay = Process::spawn("outbox-relay", &["run"], &env)?;
    let mut pipeline = Pipeline {
        relay,
        dispatch,
        monitor: fixture.connect_db().await?,
        samples: Vec::new(),
    };
    let outcome = async {
        // One message end to end: both children are up and connected.
        let client = fixture.connect_db().await?;
        writers::send(&client, Target::Outbox, &fixture.exchange, 1).await?;
        let started = Instant::now();
        while arrived(&delivered) == 0 {
            pipeline.relay.check_running()?;
            if started.elapsed() > START_TIMEOUT {
                bail!("the first message was not delivered within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        delivered.arrivals.take();
        consumer.arrivals.take();

        let bar = crate::progress::bar(load.duration.as_secs(), "soak");
        let written = writers::write(fixture, Target::Outbox, load, async |elapsed| {
            pipeline.sample(elapsed.round() as u64).await?;
            bar.inc(1);
            bar.set_message(format!(
                "{} pending",
                pipeline.samples.last().map_or(0, |s| s.pending)
            ));
            Ok(())
        })
        .await?;
        bar.finish_and_clear();

        let writing_ended = Instant::now();
        let mut next_sample = writing_ended;
        while arrived(&delivered) < written.sent.len() {
            if writing_ended.elapsed() > SETTLE_TIMEOUT {
                break;
            }
            if Instant::now() >= next_sample {
                pipeline
                    .sample(written.start.elapsed().as_secs_f64().round() as u64)
                    .await?;
                next_sample += Duration::from_secs(1);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, anyhow::Error>((written, writing_ended.elapsed().as_secs_f64()))
    }
    .await;
    let relay_stopped = pipeline.relay.stop().await;
    let dispatch_stopped = match pipeline.dispatch.take() {
        Some(dispatch) => dispatch.stop().await,
        None => Ok(()),
    };
    let received = consumer.stop().await;
    let delivered = delivered.stop();
    let (written, settle_seconds) = outcome?;
    let (sent, start) = (written.sent, written.start);
    relay_stopped.context("relay")?;
    dispatch_stopped.context("dispatch")?;

    let mut samples = pipeline.samples;
    split_by_second(&mut samples, &sent, start, &received, &delivered)?;
    Ok(SoakResult {
        load,
        retention: retention.map(str::to_string),
        sent: sent.len(),
        received: received.first.len(),
        delivered: delivered.first.len(),
        duplicates: received.duplicates,
        settle_seconds,
        commit_to_received: Percentiles::of(&crate::latency::since_commit(&sent, &received)?),
        commit_to_delivered: Percentiles::of(&crate::latency::since_commit(&sent, &delivered)?),
        write: Percentiles::of(&written.write_micros),
        samples,
    })
}

/// Fills each sample's latency from the messages committed in its second.
fn split_by_second(
    samples: &mut [Sample],
    sent: &[Sent],
    start: Instant,
    received: &Arrivals,
    delivered: &Arrivals,
) -> anyhow::Result<()> {
    let seconds = samples.iter().map(|s| s.second + 1).max().unwrap_or(0) as usize;
    let mut buckets: Vec<(u64, Hdr<u64>, Hdr<u64>)> = Vec::with_capacity(seconds);
    for _ in 0..seconds {
        buckets.push((
            0,
            crate::figures::new_histogram()?,
            crate::figures::new_histogram()?,
        ));
    }
    for (id, committed) in sent {
        // Second n holds the commits of (n-1, n]: the sample taken at n saw them.
        let second = committed.saturating_duration_since(start).as_secs() as usize + 1;
        let Some((count, to_received, to_delivered)) = buckets.get_mut(second) else {
            continue;
        };
        *count += 1;
        for (arrivals, histogram) in [(received, to_received), (delivered, to_delivered)] {
            if let Some(micros) = arrivals.micros_since(id, *committed) {
                histogram.saturating_record(micros);
            }
        }
    }
    for sample in samples {
        if let Some((count, to_received, to_delivered)) = buckets.get(sample.second as usize) {
            sample.sent = *count;
            sample.received = (!to_received.is_empty()).then(|| Percentiles::of(to_received));
            sample.delivered = (!to_delivered.is_empty()).then(|| Percentiles::of(to_delivered));
        }
    }
    Ok(())
}
