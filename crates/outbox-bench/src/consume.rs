//! `consume`: how fast the dispatch consumer empties its queue, beside how
//! fast the relay filled it, in the same run.
//!
//! The consumer starts once to declare its queue and stops; the relay then
//! drains a backlog of orders (distinct order ids, each a real delivery)
//! into that queue and the bench's own. The consumer starts again and is
//! timed from consuming until every order is in its inbox. With `--keys`
//! the rows carry ordering keys, and the commit order of each key's
//! deliveries (their identity column) is checked against the order ids.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_postgres::Client;

use crate::cli::ConsumeArgs;
use crate::drain::{Timed, drain_with_relay};
use crate::figures::Table;
use crate::setup::{self, Fixture};

const INSERT_CHUNK: i64 = 10_000;
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// A consumer that commits nothing for this long has stalled.
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// What one run measured.
pub struct ConsumeResult {
    pub backlog: u32,
    pub keys: Option<u32>,
    /// The consumer's settings, as passed (`None`: its default).
    pub lanes: Option<u16>,
    pub batch_size: Option<u16>,
    pub prefetch: Option<u16>,
    pub relay: Timed,
    pub consumer_seconds: f64,
    pub consumer_cpu_seconds: Option<f64>,
    /// Distinct inbox commit times: the transactions that wrote anything.
    pub transactions: i64,
    /// Deliveries of a key committed after a later one of the same key.
    pub inversions: Option<i64>,
}

pub async fn run(args: ConsumeArgs) -> anyhow::Result<()> {
    let result =
        setup::with_fixture(&args.common, async |fixture| measure(fixture, &args).await).await?;
    print(&result, args.common.json);
    Ok(())
}

async fn measure(fixture: &Fixture, args: &ConsumeArgs) -> anyhow::Result<ConsumeResult> {
    let settings: Vec<(&str, String)> = [
        ("DISPATCH_LANES", args.lanes),
        ("DISPATCH_BATCH_SIZE", args.batch_size),
        ("DISPATCH_PREFETCH", args.prefetch),
    ]
    .into_iter()
    .filter_map(|(name, value)| Some((name, value?.to_string())))
    .collect();
    let env: Vec<(&str, &str)> = settings.iter().map(|(n, v)| (*n, v.as_str())).collect();
    // Declares the consumer's queue, which keeps what the relay publishes.
    fixture.start_dispatch(&env).await?.stop().await?;
    let client = fixture.connect_db().await?;
    insert_orders(&client, &fixture.exchange, args.backlog, args.keys).await?;
    let relay = drain_with_relay(
        fixture,
        &client,
        args.backlog,
        args.window,
        args.batch,
        args.key_pipeline,
    )
    .await?;
    fixture.purge().await?;

    let dispatch_db = setup::connect(&fixture.dispatch_db_url).await?;
    let bar = crate::progress::bar(u64::from(args.backlog), "consume: dispatch");
    let mut dispatch = fixture.start_dispatch(&env).await?;
    let started = Instant::now();
    let (mut last, mut last_change) = (0, Instant::now());
    while last < i64::from(args.backlog) {
        tokio::time::sleep(POLL_INTERVAL).await;
        dispatch.check_running()?;
        let inbox = count(&dispatch_db, "SELECT count(*) FROM dispatch.inbox").await?;
        if inbox > last {
            (last, last_change) = (inbox, Instant::now());
            bar.set_position(inbox as u64);
        } else if last_change.elapsed() > STALL_LIMIT {
            bail!(
                "the consumer committed nothing for 60 s, at {last} of {}",
                args.backlog
            );
        }
    }
    let consumer_seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let consumer_cpu_seconds = dispatch.cpu_seconds();
    dispatch.stop().await?;
    let transactions = count(
        &dispatch_db,
        "SELECT count(DISTINCT processed_at) FROM dispatch.inbox",
    )
    .await?;
    let inversions = match args.keys {
        Some(keys) => Some(inversions(&dispatch_db, keys).await?),
        None => None,
    };
    Ok(ConsumeResult {
        backlog: args.backlog,
        keys: args.keys,
        lanes: args.lanes,
        batch_size: args.batch_size,
        prefetch: args.prefetch,
        relay,
        consumer_seconds,
        consumer_cpu_seconds,
        transactions,
        inversions,
    })
}

/// Orders 1 to `backlog`, keyed `customer-(order % keys)` when `keys` is set.
async fn insert_orders(
    client: &Client,
    exchange: &str,
    backlog: u32,
    keys: Option<u32>,
) -> anyhow::Result<()> {
    let keys = i64::from(keys.unwrap_or(0));
    let mut first = 1;
    while first <= i64::from(backlog) {
        let last = (first + INSERT_CHUNK - 1).min(i64::from(backlog));
        client
            .execute(
                "INSERT INTO outbox.messages (exchange, routing_key, payload, ordering_key) \
                 SELECT $1, '', convert_to(json_build_object('orderId', g, \
                     'userName', 'bench-user', 'context', 'outbox-bench consume', 'num', 7)::text, \
                     'UTF8'), \
                     CASE WHEN $4::bigint > 0 THEN 'customer-' || g % $4::bigint END \
                 FROM generate_series($2::bigint, $3::bigint) g",
                &[&exchange, &first, &last, &keys],
            )
            .await
            .map_err(outbox::PgError)
            .context("inserting the orders")?;
        first = last + 1;
    }
    client.batch_execute("ANALYZE outbox.messages").await?;
    Ok(())
}

/// A key's deliveries whose order id is below that of the key's delivery
/// inserted just before (order ids rise within a key).
async fn inversions(dispatch_db: &Client, keys: u32) -> anyhow::Result<i64> {
    let sql = format!(
        "SELECT count(*) FROM (SELECT order_id < lag(order_id) \
         OVER (PARTITION BY order_id % {keys} ORDER BY id) AS inverted \
         FROM dispatch.deliveries) d WHERE inverted"
    );
    count(dispatch_db, &sql).await
}

async fn count(client: &Client, sql: &str) -> anyhow::Result<i64> {
    Ok(client
        .query_one(sql, &[])
        .await
        .map_err(outbox::PgError)?
        .get(0))
}

fn print(result: &ConsumeResult, as_json: bool) {
    let rate = |seconds: f64| f64::from(result.backlog) / seconds;
    let ratio = result.relay.seconds / result.consumer_seconds;
    let setting = |value: Option<u16>| value.map_or("default".to_string(), |v| v.to_string());
    let cpu_us = result
        .consumer_cpu_seconds
        .map(|cpu| cpu * 1e6 / f64::from(result.backlog));
    if as_json {
        let value = serde_json::json!({
            "backlog": result.backlog,
            "keys": result.keys,
            "lanes": result.lanes,
            "batch_size": result.batch_size,
            "prefetch": result.prefetch,
            "relay": { "seconds": result.relay.seconds, "msgs_per_s": rate(result.relay.seconds) },
            "consumer": {
                "seconds": result.consumer_seconds,
                "msgs_per_s": rate(result.consumer_seconds),
                "cpu_us_per_msg": cpu_us,
                "transactions": result.transactions,
            },
            "consumer_to_relay": ratio,
            "inversions": result.inversions,
        });
        println!("{value:#}");
        return;
    }
    println!(
        "consume: {} orders{}; consumer lanes {}, batch {}, prefetch {}; {}",
        result.backlog,
        result
            .keys
            .map_or(String::new(), |keys| format!(" over {keys} keys")),
        setting(result.lanes),
        setting(result.batch_size),
        setting(result.prefetch),
        crate::figures::machine()
    );
    let mut table = Table::new(&["phase", "seconds", "msgs/s"]);
    for (phase, seconds) in [
        ("relay drain", result.relay.seconds),
        ("consumer drain", result.consumer_seconds),
    ] {
        table.row(vec![
            phase.into(),
            format!("{seconds:.2}"),
            format!("{:.0}", rate(seconds)),
        ]);
    }
    print!("{}", table.render());
    println!("consumer / relay: {ratio:.2}");
    println!(
        "{} transactions ({:.1} messages each){}",
        result.transactions,
        f64::from(result.backlog) / result.transactions.max(1) as f64,
        cpu_us.map_or(String::new(), |us| format!(
            "; consumer CPU {us:.0} µs per message"
        ))
    );
    if let Some(inversions) = result.inversions {
        println!("key order: {inversions} inversions");
    }
}
