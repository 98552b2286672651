//! Issue 16: the pipeline on a 3-node RabbitMQ cluster with quorum queues
//! and a PostgreSQL primary with a synchronous streaming standby
//! (`scripts/ha-cluster.sh`), under load: the node the relay is connected
//! to is SIGKILLed, then (that node back) the node leading the consumer's
//! quorum queue, then PostgreSQL fails over to the standby. The relay and
//! the consumer are given every node and both database hosts, and must find
//! the survivors themselves. Then the books, over what the promoted database
//! holds, and how long each fault held up the flow (reported, not asserted).
//!
//! `serial_*`: the cluster's ports and folders are one per machine.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outbox_tests::Servers;
use outbox_tests::books::{
    Expected, orders_in, record, settle_and_check, start_load_through_failover,
};
use outbox_tests::dispatch::wait_for;
use outbox_tests::pipeline::Pipeline;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/ha-cluster.sh");
/// The script's exit code when rabbitmq-server or initdb is not installed.
const NOT_INSTALLED: i32 = 3;
const FIRST_AMQP_PORT: u16 = 5681;
const NODES: u16 = 3;
/// Writers stop when the faults are over; this only bounds a runaway.
const MAX_ORDERS: i64 = 40_000;
/// How long a fault may hold up the flow before the test gives up.
const RESUME_LIMIT: Duration = Duration::from_secs(60);

/// The relay's default attempts and backoff (the fault suite's are short,
/// for unroutable rows): a quorum queue nacks publishes on a channel opened
/// while it elects a leader, and each nack is an attempt. A lease long
/// enough that rows confirmed during an election or a failover are not
/// claimed again meanwhile (the confirm timeout is half of it).
const RELAY_ENV: &[(&str, &str)] = &[
    ("OUTBOX_LEASE_MS", "10000"),
    ("OUTBOX_MAX_ATTEMPTS", "5"),
    ("OUTBOX_RETRY_BASE_MS", "1000"),
    ("OUTBOX_RETRY_MAX_MS", "300000"),
];

fn amqp_url(node: u16) -> String {
    format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        FIRST_AMQP_PORT + node - 1
    )
}

fn node_list(order: impl Iterator<Item = u16>) -> String {
    order.map(amqp_url).collect::<Vec<_>>().join(",")
}

fn cluster_servers() -> Servers {
    Servers {
        admin_url: "postgres://postgres@127.0.0.1:5441,127.0.0.1:5442/postgres\
                    ?target_session_attrs=read-write"
            .into(),
        amqp_url: node_list(1..=NODES),
        quorum_queues: true,
    }
}

/// The cluster while the test runs; down when it ends, however it ends.
struct Cluster;

impl Cluster {
    /// `None` (the test is skipped) when the servers are not installed.
    async fn up() -> Option<Cluster> {
        let check = script(&["check"]).await;
        if check.status.code() == Some(NOT_INSTALLED) {
            eprintln!("skipped: {}", String::from_utf8_lossy(&check.stderr).trim());
            return None;
        }
        assert!(check.status.success(), "ha-cluster.sh check: {check:?}");
        let cluster = Cluster;
        cluster.run(&["up"]).await;
        Some(cluster)
    }

    async fn run(&self, args: &[&str]) {
        let output = script(args).await;
        assert!(
            output.status.success(),
            "ha-cluster.sh {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let kept = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/ha-logs");
            let _ = std::fs::remove_dir_all(kept);
            let _ = std::process::Command::new(SCRIPT)
                .args(["save-logs", kept])
                .output();
            eprintln!("the cluster's logs are in {kept}");
        }
        let _ = std::process::Command::new(SCRIPT).arg("down").output();
    }
}

async fn script(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(SCRIPT)
        .args(args)
        .output()
        .await
        .expect("run scripts/ha-cluster.sh")
}

/// The cluster node (1 to 3) process `pid` has an AMQP connection to.
async fn connected_node(pid: u32) -> Option<u16> {
    let output = tokio::process::Command::new("ss")
        .args(["-Htnp", "state", "established"])
        .output()
        .await
        .expect("run ss");
    let owner = format!("pid={pid},");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&owner))
        .filter_map(|line| {
            line.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .find(|port: &u16| (FIRST_AMQP_PORT..FIRST_AMQP_PORT + NODES).contains(port))
        .map(|port| port - FIRST_AMQP_PORT + 1)
}

/// Waits until `pid` is connected to a node other than `lost`; that node.
async fn moved_from(pid: u32, lost: u16, who: &str) -> u16 {
    wait_for(&format!("the {who} connects to another node"), || async {
        connected_node(pid).await.filter(|node| *node != lost)
    })
    .await
}

/// The leader of quorum queue `queue` and how many members are online,
/// asked of node `ask`.
async fn quorum_state(ask: u16, queue: &str) -> Option<(u16, usize)> {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args(["-n", &format!("ha{ask}@localhost"), "list_queues"])
        .args(["name", "leader", "online", "--formatter", "json", "--quiet"])
        .output()
        .await
        .expect("run rabbitmqctl");
    let queues: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let entry = queues.as_array()?.iter().find(|q| q["name"] == queue)?;
    let leader = entry["leader"].as_str()?;
    let node = leader.strip_prefix("ha")?.split('@').next()?.parse().ok()?;
    Some((node, entry["online"].as_array()?.len()))
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One float from `sql` with the fault's epoch as `$1`, on a fresh
/// connection (the one before may have died with its server); `None`
/// while the server is away or the value is NULL.
async fn probe_value(url: &str, sql: &str, fault: f64) -> Option<f64> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.ok()?;
    tokio::spawn(connection);
    let row = client.query_one(sql, &[&fault]).await.map_err(fatal).ok()?;
    row.get::<_, Option<f64>>(0)
}

/// Passes on an error of a server going away or coming back (connection,
/// shutdown, recovery: SQLSTATE classes 08, 57, 25); any other is a bug in
/// the query, and fails the test at once rather than at its deadline.
fn fatal(error: tokio_postgres::Error) -> tokio_postgres::Error {
    if let Some(code) = error.code().map(|code| code.code())
        && !["08", "57", "25"]
            .iter()
            .any(|class| code.starts_with(class))
    {
        panic!("{}", outbox::error_line(&error));
    }
    error
}

/// Seconds after `fault` until `sql` (a delay after `$1`) has a value.
async fn seconds_until(url: &str, sql: &str, fault: f64, what: &str) -> f64 {
    let deadline = Instant::now() + RESUME_LIMIT;
    loop {
        if let Some(seconds) = probe_value(url, sql, fault).await {
            return seconds;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {RESUME_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long after `fault` the flow ran again: a message enqueued `after`
/// seconds past the fault (or later) confirmed and marked published, and
/// its effect committed.
async fn flow_resumed(pipeline: &Pipeline, fault: f64, after: f64, what: &str) -> (f64, f64) {
    let published = seconds_until(
        &pipeline.app.url,
        &format!(
            "SELECT extract(epoch FROM min(published_at))::float8 - $1 FROM outbox.messages \
             WHERE created_at > to_timestamp($1::float8 + {after})"
        ),
        fault,
        &format!("{what}: a message enqueued after the fault published"),
    )
    .await;
    let deadline = Instant::now() + RESUME_LIMIT;
    let effect = loop {
        if let Some(seconds) = first_effect_after(pipeline, fault, after).await {
            break seconds;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no message enqueued after the fault reached the dispatch database"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (published, effect)
}

/// The first effect of a message enqueued `after` seconds past `fault`, in
/// seconds after the fault.
async fn first_effect_after(pipeline: &Pipeline, fault: f64, after: f64) -> Option<f64> {
    let (app, connection) = tokio_postgres::connect(&pipeline.app.url, NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    let ids: Vec<uuid::Uuid> = app
        .query(
            "SELECT message_id FROM outbox.messages WHERE created_at > to_timestamp($1::float8 + $2::float8) \
             ORDER BY id LIMIT 2000",
            &[&fault, &after],
        )
        .await
        .map_err(fatal)
        .ok()?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let (dispatch, connection) = tokio_postgres::connect(&pipeline.dispatch_db.url, NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    let row = dispatch
        .query_one(
            "SELECT extract(epoch FROM min(processed_at))::float8 - $1 FROM dispatch.inbox \
             WHERE message_id = ANY($2)",
            &[&fault, &ids],
        )
        .await
        .map_err(fatal)
        .ok()?;
    row.get::<_, Option<f64>>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_ha_rabbit_node_loss_quorum_leader_loss_and_pg_failover() {
    let started = Instant::now();
    let Some(cluster) = Cluster::up().await else {
        return;
    };
    let cluster_up = started.elapsed();
    let servers = cluster_servers();
    // The consumer lists the nodes the other way round: it starts on
    // another node than the relay, and its queues are led from there.
    let consumer_nodes = node_list((1..=NODES).rev());
    let mut pipeline = Pipeline::start_on(
        &servers,
        1,
        RELAY_ENV,
        &[("DISPATCH_AMQP_URL", consumer_nodes.as_str())],
    )
    .await;
    let relay = pipeline.relays[0].id();
    let consumer = pipeline.consumer.id();
    let stop = CancellationToken::new();
    let load = start_load_through_failover(
        &pipeline.app.url,
        &pipeline.names.exchange,
        MAX_ORDERS,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 1. The node the relay is connected to.
    let relay_node = wait_for("the relay is connected to a node", || connected_node(relay)).await;
    let fault = epoch_now();
    cluster.run(&["kill-rabbit", &relay_node.to_string()]).await;
    let moved = moved_from(relay, relay_node, "relay").await;
    let relay_moved = epoch_now() - fault;
    let (published, effect) = flow_resumed(&pipeline, fault, 0.0, "relay's node killed").await;
    record(&format!(
        "| HA 1. relay's node ha{relay_node} SIGKILLed | relay on ha{moved} after {relay_moved:.2} s | \
         new message published after {published:.2} s, its effect after {effect:.2} s |"
    ));

    // 2. That node back, the leader of the consumer's queue.
    let queue = pipeline.names.queue.clone();
    cluster.run(&["up"]).await;
    let leader = wait_for(
        "the consumer's queue has 3 members online again",
        || async {
            quorum_state(moved, &queue)
                .await
                .filter(|(_, online)| *online == usize::from(NODES))
                .map(|(node, _)| node)
        },
    )
    .await;
    let consumer_node = connected_node(consumer).await;
    let fault = epoch_now();
    cluster.run(&["kill-rabbit", &leader.to_string()]).await;
    let survivor = (1..=NODES).find(|n| *n != leader).unwrap_or(1);
    // Both watched at once: rabbitmqctl takes a second or so per call.
    let elected = async {
        let node = wait_for("the consumer's queue has a new leader", || async {
            quorum_state(survivor, &queue)
                .await
                .map(|(node, _)| node)
                .filter(|node| *node != leader)
        })
        .await;
        (node, epoch_now() - fault)
    };
    let consumer_moved = async {
        if consumer_node == Some(leader) {
            let now_on = moved_from(consumer, leader, "consumer").await;
            format!(
                "consumer on ha{now_on} (seen after {:.2} s)",
                epoch_now() - fault
            )
        } else {
            format!("consumer stayed on ha{}", consumer_node.unwrap_or(0))
        }
    };
    let ((new_leader, elected), consumer_moved) = tokio::join!(elected, consumer_moved);
    let (published, effect) = flow_resumed(&pipeline, fault, 0.0, "quorum leader killed").await;
    record(&format!(
        "| HA 2. quorum leader ha{leader} SIGKILLed | ha{new_leader} leads (seen after {elected:.2} s), \
         {consumer_moved} | new message published after {published:.2} s, its effect after {effect:.2} s |"
    ));

    // 3. PostgreSQL fails over to the standby.
    let fault = epoch_now();
    cluster.run(&["failover-pg"]).await;
    let promoted = epoch_now() - fault;
    // Only what began after the promotion ran on the promoted database
    // (commits of the last instants before the stop were replicated too).
    let relay_back = seconds_until(
        &pipeline.app.url,
        &format!(
            "SELECT extract(epoch FROM min(published_at))::float8 - $1 FROM outbox.messages \
             WHERE published_at > to_timestamp($1::float8 + {promoted})"
        ),
        fault,
        "the relay marks on the promoted database",
    )
    .await;
    let consumer_back = seconds_until(
        &pipeline.dispatch_db.url,
        &format!(
            "SELECT extract(epoch FROM min(processed_at))::float8 - $1 FROM dispatch.inbox \
             WHERE processed_at > to_timestamp($1::float8 + {promoted})"
        ),
        fault,
        "the consumer commits on the promoted database",
    )
    .await;
    // The LISTEN connection found the promoted database too: it holds the
    // listener's advisory lock there (`outbox.announce_listener`).
    let listening = seconds_until(
        &pipeline.app.url,
        "SELECT extract(epoch FROM clock_timestamp())::float8 - $1 FROM pg_locks l \
         JOIN pg_database d ON d.oid = l.database AND d.datname = current_database() \
         WHERE l.locktype = 'advisory' AND l.classid = 1869968482 AND l.objid = 2 \
           AND l.granted LIMIT 1",
        fault,
        "the relay listens on the promoted database",
    )
    .await;
    let (published, effect) =
        flow_resumed(&pipeline, fault, promoted, "PostgreSQL failed over").await;
    record(&format!(
        "| HA 3. PostgreSQL primary stopped (immediate), standby promoted in {promoted:.2} s | \
         relay's first mark after {relay_back:.2} s, listening again (seen after {listening:.2} s), \
         consumer's first commit after {consumer_back:.2} s | \
         new message published after {published:.2} s, its effect after {effect:.2} s |"
    ));

    // A little more load on the promoted database, then the books.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let mut load = load.await.expect("load");
    let app = pipeline.app.connect().await;
    let held = orders_in(&app, &pipeline.names.exchange).await;
    let acknowledged_lost = acknowledged_but_gone(&load.orders, &held);
    let unacknowledged = held.len() - (load.orders.len() - acknowledged_lost);
    // Synchronous replication: no commit a writer saw is missing.
    assert_eq!(
        acknowledged_lost, 0,
        "acknowledged commits missing from the promoted database"
    );
    // The books are kept over what the promoted database holds, including
    // commits whose answer was lost with the old primary.
    load.orders = held;
    let books = settle_and_check(
        &mut pipeline,
        &load,
        &Expected::default(),
        "HA. node loss, quorum leader loss, PostgreSQL failover",
        &format!(
            "3 faults; {unacknowledged} commits unanswered but kept, {acknowledged_lost} acknowledged lost"
        ),
    )
    .await;
    let app = pipeline.app.connect().await;
    let retried = app
        .query_one(
            "SELECT count(*) FILTER (WHERE attempts > 0), coalesce(max(attempts), 0), \
                    count(*) FILTER (WHERE last_error LIKE 'nacked%') FROM outbox.messages",
            &[],
        )
        .await
        .expect("attempts");
    record(&format!(
        "| HA attempts | {} rows took an attempt ({} last nacked), at most {} of 5 |",
        retried.get::<_, i64>(0),
        retried.get::<_, i64>(2),
        retried.get::<_, i32>(1)
    ));
    drop(pipeline);
    drop(cluster);
    record(&format!(
        "| HA test | cluster up in {:.1} s | load {:.1} s, settled {:.1} s after | whole test {:.1} s |",
        cluster_up.as_secs_f64(),
        books.load.as_secs_f64(),
        books.settle.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
}

/// Commits a writer saw acknowledged whose order the database no longer
/// holds (or holds under another message).
fn acknowledged_but_gone(
    acknowledged: &HashMap<i64, uuid::Uuid>,
    held: &HashMap<i64, uuid::Uuid>,
) -> usize {
    acknowledged
        .iter()
        .filter(|(order, id)| held.get(order) != Some(id))
        .count()
}
