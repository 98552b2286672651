//! Load and bookkeeping for fault scenarios: orders written at a steady
//! rate (order row + outbox row in one transaction, as the order service
//! does), then, once the pipeline settles, the books: every outbox row
//! published or dead for a reason the scenario caused, one delivery per
//! order in the dispatch database, per-key order intact at the broker, and
//! a probe order that still goes all the way through.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::connect_to;
use crate::pipeline::Pipeline;

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

/// Per-key order as the consumer's queue saw it: for each key, the first
/// copy of each message arrives in outbox id order. Returns the copies
/// beyond one per message.
async fn check_broker_order(
    pipeline: &Pipeline,
    app: &Client,
    load: &Load,
    expected: &Expected,
    scenario: &str,
) -> usize {
    let keyed = keyed_rows(app).await;
    let routed = drain_queue(
        &pipeline.servers.amqp_url,
        &pipeline.audit_queue,
        load.orders.len() + expected.not_orders,
    )
    .await;
    let mut seen = HashSet::new();
    let mut last_per_key: HashMap<&str, i64> = HashMap::new();
    let mut copies = 0;
    for id in routed.iter().flatten() {
        if !seen.insert(*id) {
            copies += 1;
            continue;
        }
        if let Some((key, row)) = keyed.get(id) {
            let last = last_per_key.entry(key.as_str()).or_insert(0);
            assert!(
                *row > *last,
                "{scenario}: key {key}: row {row} arrived after row {last}"
            );
            *last = *row;
        }
    }
    let missing = load.orders.values().filter(|id| !seen.contains(id)).count();
    assert_eq!(missing, 0, "{scenario}: orders never routed by the broker");
    copies
}

/// Each keyed message's key and outbox row id.
async fn keyed_rows(app: &Client) -> HashMap<Uuid, (String, i64)> {
    app.query(
        "SELECT message_id, ordering_key, id FROM outbox.messages WHERE ordering_key IS NOT NULL",
        &[],
    )
    .await
    .expect("keyed rows")
    .iter()
    .map(|row| (row.get(0), (row.get(1), row.get(2))))
    .collect()
}

/// Per-key order as the consumer committed it: `dispatch.deliveries.id`
/// is taken at the insert, inside the consumer's transaction, and a key's
/// messages are handled one after another in its lane, so for each key
/// the deliveries' ids follow the outbox rows' ids.
async fn check_effect_order(app: &Client, dispatch: &Client, scenario: &str) {
    let keyed = keyed_rows(app).await;
    let effects: Vec<Uuid> = dispatch
        .query(
            "SELECT message_id FROM dispatch.deliveries ORDER BY id",
            &[],
        )
        .await
        .expect("deliveries")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut last_per_key: HashMap<&str, i64> = HashMap::new();
    let mut inversions = Vec::new();
    for id in &effects {
        if let Some((key, row)) = keyed.get(id) {
            let last = last_per_key.entry(key.as_str()).or_insert(0);
            if *row < *last {
                inversions.push((key.clone(), *row, *last));
            }
            *last = (*last).max(*row);
        }
    }
    assert!(
        inversions.is_empty(),
        "{scenario}: {} keyed deliveries committed before an earlier one of their key, e.g. {:?}",
        inversions.len(),
        &inversions[..inversions.len().min(5)]
    );
}

/// Reads the audit queue until it has `at_least` messages and stays quiet;
/// the message ids, `None` where a peer sent none or not a UUID. Another
/// test may cut every broker connection meanwhile: then it reads on over a
/// new one (unacked copies come again and count as copies).
async fn drain_queue(amqp_url: &str, queue: &str, at_least: usize) -> Vec<Option<Uuid>> {
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if read_queue(amqp_url, queue, at_least, deadline, &mut ids)
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ids
}

async fn read_queue(
    amqp_url: &str,
    queue: &str,
    at_least: usize,
    deadline: Instant,
    ids: &mut Vec<Option<Uuid>>,
) -> Result<(), lapin::Error> {
    let connection = connect_to(amqp_url).await;
    let channel = connection.create_channel().await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            crate::unique_name("audit").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let quiet = if ids.len() >= at_least {
            Duration::from_millis(500)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match tokio::time::timeout(quiet, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                let id = delivery.properties.message_id().as_ref();
                ids.push(id.and_then(|id| Uuid::parse_str(id.as_str()).ok()));
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Ok(Some(Err(error))) => return Err(error),
            Ok(None) | Err(_) => break,
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(())
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
