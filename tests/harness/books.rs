//! Load and bookkeeping for fault scenarios: orders written at a steady
//! rate (order row + outbox row in one transaction, as the order service
//! does), then, once the pipeline settles, the books: every outbox row
//! published or dead for a reason the scenario caused, one delivery per
//! order in the dispatch database, per-key order intact at the broker, and
//! a probe order that still goes all the way through. The per-key order
//! checks are in `order` (`books/order.rs`).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::pipeline::Pipeline;

mod order;

use order::{check_broker_order, check_effect_order};

/// Messages per scenario, and the steady rate they are written at.
pub const MESSAGES: i64 = 10_000;
pub const RATE_PER_SEC: u64 = 400;
/// Half the orders carry one of this many ordering keys.
const KEYS: i64 = 64;
const WRITERS: i64 = 4;
/// The load's connections say so, and faults spare them: the scenarios
/// fault the relay and the consumer, not the app.
pub const LOAD_APP_NAME: &str = "fault-load";
/// How long the pipeline may take to settle after the load.
const SETTLE_LIMIT: Duration = Duration::from_secs(180);

/// What the load wrote: order id → the outbox message id of its order.
#[derive(Debug, Default)]
pub struct Load {
    pub orders: HashMap<i64, Uuid>,
    pub started_at: Option<Instant>,
    pub finished_at: Option<Instant>,
}

/// The load's connection to the app database.
pub async fn load_client(app_url: &str) -> Client {
    let separator = if app_url.contains('?') { '&' } else { '?' };
    crate::connect(&format!(
        "{app_url}{separator}application_name={LOAD_APP_NAME}"
    ))
    .await
}

/// Writes orders `1..=MESSAGES` at [`RATE_PER_SEC`] from a few connections.
pub fn start_load(app_url: &str, exchange: &str) -> JoinHandle<Load> {
    spawn_load(app_url, exchange, MESSAGES, None)
}

/// The load of a database failover: orders at [`RATE_PER_SEC`] until `stop`
/// (at most `max`). A writer whose connection fails connects again (a
/// multi-host URL finds the new primary) and writes the same order again;
/// one already there (its commit went through, its answer did not) is done.
/// `Load::orders` holds the commits the writers saw acknowledged.
pub fn start_load_through_failover(
    app_url: &str,
    exchange: &str,
    max: i64,
    stop: CancellationToken,
) -> JoinHandle<Load> {
    spawn_load(app_url, exchange, max, Some(stop))
}

fn spawn_load(
    app_url: &str,
    exchange: &str,
    max: i64,
    stop: Option<CancellationToken>,
) -> JoinHandle<Load> {
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let url = app_url.to_string();
            let exchange = exchange.to_string();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut client = load_client(&url).await;
                let mut ids = HashMap::new();
                let mut order = writer + 1;
                while order <= max && !stop.as_ref().is_some_and(|s| s.is_cancelled()) {
                    let due = started
                        + Duration::from_micros((order as u64 - 1) * 1_000_000 / RATE_PER_SEC);
                    tokio::time::sleep_until(due.into()).await;
                    let written = if stop.is_some() {
                        write_through_failover(&mut client, &url, &exchange, order).await
                    } else {
                        Some(write_order(&mut client, &exchange, order).await)
                    };
                    if let Some(id) = written {
                        ids.insert(order, id);
                    }
                    order += WRITERS;
                }
                ids
            })
        })
        .collect();
    tokio::spawn(async move {
        let mut load = Load {
            started_at: Some(started),
            ..Load::default()
        };
        for writer in writers {
            load.orders.extend(writer.await.expect("writer"));
        }
        load.finished_at = Some(Instant::now());
        load
    })
}

/// The ordering key of an order: every other order has one.
pub fn ordering_key(order: i64) -> Option<String> {
    (order % 2 == 0).then(|| format!("customer-{}", (order / 2) % KEYS))
}

/// One order and its message, committed together: one statement, so one
/// round trip (the load must keep its pace on a busy 2-core machine).
pub async fn write_order(client: &mut Client, exchange: &str, order: i64) -> Uuid {
    try_write_order(client, exchange, order)
        .await
        .unwrap_or_else(|e| panic!("write order {order}: {}", outbox::error_line(&e)))
}

async fn try_write_order(
    client: &mut Client,
    exchange: &str,
    order: i64,
) -> Result<Uuid, tokio_postgres::Error> {
    let body = json!({"orderId": order, "userName": "zhang", "context": "noodles", "num": 1});
    let row = client
        .query_one(
            "WITH o AS (INSERT INTO orders (id, user_name, context, num) \
                        VALUES ($1, 'zhang', 'noodles', 1) RETURNING id) \
             SELECT outbox.enqueue($2, '', $3::jsonb, '{}', $4) FROM o",
            &[&order, &exchange, &body, &ordering_key(order)],
        )
        .await?;
    Ok(row.get(0))
}

/// Writes `order` until it is in the database; its message id when this
/// writer saw the commit acknowledged, `None` when it found the order
/// already written (a commit whose answer was lost with the old primary).
async fn write_through_failover(
    client: &mut Client,
    url: &str,
    exchange: &str,
    order: i64,
) -> Option<Uuid> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        match try_write_order(client, exchange, order).await {
            Ok(id) => return Some(id),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                return None;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "write order {order}: no primary for {SETTLE_LIMIT:?}: {}",
                outbox::error_line(&e)
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if client.is_closed() {
            let separator = if url.contains('?') { '&' } else { '?' };
            let url = format!("{url}{separator}application_name={LOAD_APP_NAME}");
            if let Ok((new, connection)) = tokio_postgres::connect(&url, NoTls).await {
                tokio::spawn(connection);
                *client = new;
            }
        }
    }
}

/// Order id → message id of every order in the app database, as it is now
/// (after a failover: what the promoted database holds).
pub async fn orders_in(app: &Client, exchange: &str) -> HashMap<i64, Uuid> {
    app.query(
        "SELECT (convert_from(payload, 'UTF8')::jsonb->>'orderId')::bigint, message_id \
         FROM outbox.messages WHERE exchange = $1",
        &[&exchange],
    )
    .await
    .expect("orders in the database")
    .iter()
    .map(|row| (row.get(0), row.get(1)))
    .collect()
}

/// What a scenario expects besides the orders.
#[derive(Debug, Default)]
pub struct Expected {
    /// Outbox rows the scenario made undeliverable on purpose.
    pub dead: HashSet<Uuid>,
    /// Messages on the dispatch exchange that are not orders (poison).
    pub not_orders: usize,
}

/// The closing figures of a scenario.
#[derive(Debug)]
pub struct Books {
    pub lost: usize,
    pub duplicated: usize,
    /// Copies the broker routed beyond one per message (republished after
    /// a crash between confirm and mark; the inbox absorbs them).
    pub extra_copies: usize,
    /// How long the load took (it is paced, so it stretches only when the
    /// machine cannot keep up).
    pub load: Duration,
    pub settle: Duration,
}

/// Waits for the pipeline to settle, checks the books, sends a probe order
/// through and checks both processes are healthy; prints a report line.
pub async fn settle_and_check(
    pipeline: &mut Pipeline,
    load: &Load,
    expected: &Expected,
    scenario: &str,
    faults: &str,
) -> Books {
    let finished = load.finished_at.expect("load finished");
    let app = pipeline.app.connect().await;
    let dispatch = pipeline.dispatch_db.connect().await;
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        let pending = scalar(
            &app,
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NULL AND dead_at IS NULL",
        )
        .await;
        let delivered = scalar(&dispatch, "SELECT count(*) FROM dispatch.deliveries").await;
        if pending == 0 && delivered >= load.orders.len() as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{scenario}: not settled after {SETTLE_LIMIT:?}: {pending} rows pending, {delivered} of {} delivered",
            load.orders.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settle = finished.elapsed();

    // Dead rows: exactly the ones caused on purpose.
    let dead: HashSet<Uuid> = app
        .query(
            "SELECT message_id FROM outbox.messages WHERE dead_at IS NOT NULL",
            &[],
        )
        .await
        .expect("dead rows")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(dead, expected.dead, "{scenario}: unexpected dead rows");

    // One delivery per order, made by that order's message.
    let deliveries: Vec<(i64, Uuid)> = dispatch
        .query("SELECT order_id, message_id FROM dispatch.deliveries", &[])
        .await
        .expect("deliveries")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let delivered: HashMap<i64, Uuid> = deliveries.iter().copied().collect();
    let lost = load
        .orders
        .keys()
        .filter(|order| !delivered.contains_key(order))
        .count();
    let wrong_message = deliveries
        .iter()
        .filter(|(order, id)| load.orders.get(order) != Some(id))
        .count();
    let known: HashSet<Uuid> = load.orders.values().copied().collect();
    let inbox: Vec<Uuid> = dispatch
        .query("SELECT message_id FROM dispatch.inbox", &[])
        .await
        .expect("inbox")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let strangers = inbox.iter().filter(|id| !known.contains(id)).count();
    let duplicated = (deliveries.len() - delivered.len()) + wrong_message + strangers;

    let extra_copies = check_broker_order(pipeline, &app, load, expected, scenario).await;
    check_effect_order(&app, &dispatch, scenario).await;
    let books = Books {
        lost,
        duplicated,
        extra_copies,
        load: load
            .started_at
            .map_or(Duration::ZERO, |started| finished.duration_since(started)),
        settle,
    };
    report(scenario, load.orders.len(), faults, &books);
    assert_eq!((lost, duplicated), (0, 0), "{scenario}: {books:?}");

    probe(pipeline, &app, &dispatch).await;
    pipeline.assert_healthy().await;
    books
}

/// An order written after the faults reaches the dispatch database.
async fn probe(pipeline: &Pipeline, app: &Client, dispatch: &Client) {
    let order: i64 = scalar(app, "SELECT coalesce(max(id), 0) + 1 FROM orders").await;
    let mut writer = pipeline.app.connect().await;
    write_order(&mut writer, &pipeline.names.exchange, order).await;
    crate::dispatch::wait_until("the probe order is delivered", || async {
        dispatch
            .query_opt(
                "SELECT 1 FROM dispatch.deliveries WHERE order_id = $1",
                &[&order],
            )
            .await
            .expect("probe")
            .is_some()
    })
    .await;
}

pub async fn scalar(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// One table row on stderr, and in `$FAULT_REPORT` when set.
fn report(scenario: &str, messages: usize, faults: &str, books: &Books) {
    let line = format!(
        "| {scenario} | {messages} in {:.1} s | {faults} | {} | {} | {:.1} s | {} |",
        books.load.as_secs_f64(),
        books.lost,
        books.duplicated,
        books.settle.as_secs_f64(),
        books.extra_copies
    );
    record(&line);
}

/// A line on stderr, and in `$FAULT_REPORT` when set (the closing note's
/// figures come from there).
pub fn record(line: &str) {
    eprintln!("{line}");
    if let Ok(path) = std::env::var("FAULT_REPORT")
        && let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(file, "{line}");
    }
}
