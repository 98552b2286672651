//! A queue that stops confirming and relays frozen or past their lease:
//! they hold only their own rows and give their locks back, keys keep order.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use lapin::types::AMQPValue;
use outbox_relay::Settings;
use outbox_tests::broker::{Topology, message_id, resume_queue, suspend_queue};
use outbox_tests::dispatch::count;
use outbox_tests::relay::{RunningRelay, relay_run_command, test_settings};
use outbox_tests::*;
use tokio_postgres::Client;
use uuid::Uuid;

use super::{
    ARRIVAL, RelayProcess, distinct_ids, enqueue, start_idle_relay, wait_for_count,
    wake_lock_holders,
};

/// Thaws a suspended queue however the test ends: a frozen queue process
/// would never expire on its own.
struct Suspended(String);

impl Suspended {
    fn queue(queue: &str) -> Suspended {
        suspend_queue(queue);
        Suspended(queue.to_string())
    }
}

impl Drop for Suspended {
    fn drop(&mut self) {
        resume_queue(&self.0);
    }
}

/// A database, a queue that does not confirm (suspended until `frozen`
/// drops) and a healthy one, each on its own fanout exchange.
struct OneQueueFrozen {
    db: TestDb,
    stuck: Topology,
    healthy: Topology,
    frozen: Suspended,
    client: Client,
}

async fn one_queue_frozen() -> OneQueueFrozen {
    let db = TestDb::with_outbox().await;
    let stuck = Topology::fanout().await;
    let healthy = Topology::fanout().await;
    let frozen = Suspended::queue(&stuck.queue);
    let client = db.connect().await;
    OneQueueFrozen {
        db,
        stuck,
        healthy,
        frozen,
        client,
    }
}

#[tokio::test]
async fn faults_a_queue_that_stops_confirming_holds_only_its_own_rows() {
    let OneQueueFrozen {
        db,
        stuck,
        healthy,
        frozen,
        client,
    } = one_queue_frozen().await;
    for n in 0..5 {
        enqueue(&client, &stuck.exchange, &format!("{{\"n\": {n}}}"), None).await;
    }
    for n in 0..20 {
        enqueue(&client, &healthy.exchange, &format!("{{\"n\": {n}}}"), None).await;
    }
    let relay = RunningRelay::start(Settings {
        confirm_timeout_ms: Some(1_000),
        max_attempts: Some(20),
        ..test_settings(&db)
    })
    .await;
    let healthy_published = format!(
        "SELECT count(*) FROM outbox.messages WHERE exchange = '{}' AND published_at IS NOT NULL",
        healthy.exchange
    );
    wait_for_count(&db, &healthy_published, 20, Duration::from_secs(5)).await;
    wait_for_count(
        &db,
        &format!(
            "SELECT count(*) FROM outbox.messages WHERE exchange = '{}' \
             AND attempts >= 1 AND last_error LIKE 'no confirm%'",
            stuck.exchange
        ),
        5,
        Duration::from_secs(10),
    )
    .await;
    drop(frozen);
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL",
        25,
        ARRIVAL,
    )
    .await;
    assert_eq!(distinct_ids(&stuck.receive(5, ARRIVAL).await).len(), 5);
    relay.stop().await;
}

#[tokio::test]
async fn faults_a_frozen_relay_gives_the_drain_lock_back() {
    let OneQueueFrozen {
        db,
        stuck,
        healthy,
        frozen: _frozen,
        client,
    } = one_queue_frozen().await;
    // The first relay publishes to the frozen queue and waits for the
    // confirms, draining (holding the drain lock: its claim found three
    // rows, a busy outbox) when it is stopped.
    let first = RelayProcess(
        relay_run_command(
            &db,
            &[
                ("OUTBOX_SWEEP_INTERVAL_MS", "60000"),
                ("OUTBOX_CONFIRM_TIMEOUT_MS", "25000"),
            ],
        )
        .spawn()
        .expect("spawn outbox-relay"),
    );
    client
        .execute(
            "SELECT outbox.enqueue($1, '', '{}') FROM generate_series(1, 3)",
            &[&stuck.exchange],
        )
        .await
        .expect("enqueue three rows in one transaction");
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE locked_by IS NOT NULL",
        3,
        ARRIVAL,
    )
    .await;
    wait_for_count(&db, &wake_lock_holders(1), 1, ARRIVAL).await;
    first.signal("-STOP");
    // The server ends its silent drain transaction, and the lock with it.
    wait_for_count(&db, &wake_lock_holders(1), 0, Duration::from_secs(15)).await;
    // An idle second relay, which only a writer's wake-up moves (its sweep
    // is a minute away), is woken again.
    // (The frozen relay's listener went with its session.)
    let second = start_idle_relay(&db).await;
    let woken = enqueue(&client, &healthy.exchange, "{}", None).await;
    let deliveries = healthy.receive(1, Duration::from_secs(5)).await;
    assert_eq!(distinct_ids(&deliveries), HashSet::from([woken]));
    second.stop().await;
}

/// A relay with one row awaiting its confirm is not draining a busy
/// outbox: it leaves the drain lock free, so writers' commits wake it
/// (before, it held the lock until the confirm came and claimed every
/// millisecond meanwhile: 3.9 empty claims a message at 20 msg/s).
#[tokio::test]
async fn faults_a_relay_waiting_on_one_confirm_lets_writers_wake_it() {
    let OneQueueFrozen {
        db,
        stuck,
        healthy,
        frozen: _frozen,
        client,
    } = one_queue_frozen().await;
    let relay = start_idle_relay(&db).await;
    enqueue(&client, &stuck.exchange, "{}", None).await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE locked_by IS NOT NULL",
        1,
        ARRIVAL,
    )
    .await;
    for _ in 0..10 {
        let holders = count(&db, &wake_lock_holders(1)).await;
        assert_eq!(holders, 0, "the drain lock is held for one row in flight");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let woken = enqueue(&client, &healthy.exchange, "{}", None).await;
    let deliveries = healthy.receive(1, Duration::from_secs(5)).await;
    assert_eq!(distinct_ids(&deliveries), HashSet::from([woken]));
    relay.stop().await;
}

/// Heads only (`OUTBOX_KEY_PIPELINE=0`).
#[tokio::test]
async fn faults_a_relay_frozen_past_its_lease_keeps_key_order_and_publishes_at_most_twice() {
    frozen_relays_keep_key_order(&[("OUTBOX_KEY_PIPELINE", "0")]).await;
}

/// The same with keys pipelined (the default, 64): a frozen relay holds up
/// to 64 rows of a key behind its head, which the other relay takes over
/// from the head.
#[tokio::test]
async fn faults_a_pipelining_relay_frozen_past_its_lease_keeps_key_order() {
    frozen_relays_keep_key_order(&[]).await;
}

async fn frozen_relays_keep_key_order(extra: &[(&str, &str)]) {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    // 200 keys of 10 messages of 32 KiB: publishing a claim's heads takes
    // long enough that a stop often lands between claim and publish.
    db.connect()
        .await
        .execute(
            "INSERT INTO outbox.messages (exchange, payload, content_type, headers, ordering_key) \
             SELECT $1, convert_to(repeat('x', 32768), 'UTF8'), 'text/plain', \
                    jsonb_build_object('key', key, 'seq', seq), 'k' || key \
             FROM generate_series(0, 9) seq, generate_series(0, 199) key ORDER BY seq, key",
            &[&topology.exchange],
        )
        .await
        .expect("enqueue keyed rows");
    let mut settings = vec![
        ("OUTBOX_LEASE_MS", "2000"),
        ("OUTBOX_CONFIRM_TIMEOUT_MS", "1000"),
        ("OUTBOX_SWEEP_INTERVAL_MS", "100"),
    ];
    settings.extend_from_slice(extra);
    let frozen = RelayProcess(relay_run_command(&db, &settings).spawn().expect("spawn"));
    wait_for_count(
        &db,
        "SELECT least(count(*), 1) FROM outbox.messages WHERE published_at IS NOT NULL",
        1,
        ARRIVAL,
    )
    .await;
    let mut healthy = None;
    // Each stop outlives the lease (2 s); five, so that one lands
    // mid-publish (the relay before the fix then broke key order in about
    // half the runs of three stops).
    for _ in 0..5 {
        frozen.signal("-STOP");
        healthy.get_or_insert_with(|| {
            RelayProcess(relay_run_command(&db, &settings).spawn().expect("spawn"))
        });
        tokio::time::sleep(Duration::from_millis(2_300)).await;
        frozen.signal("-CONT");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE published_at IS NULL",
        0,
        Duration::from_secs(60),
    )
    .await;
    let mut deliveries = topology.receive(2000, ARRIVAL).await;
    deliveries.extend(topology.receive(usize::MAX, Duration::from_secs(2)).await);

    let mut copies: HashMap<Uuid, usize> = HashMap::new();
    let mut latest: HashMap<String, i64> = HashMap::new();
    let mut inversions = Vec::new();
    let mut late_copies = 0;
    for delivery in &deliveries {
        let seen = copies.entry(message_id(delivery)).or_default();
        *seen += 1;
        let first = *seen == 1;
        let number = |name: &str| match delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name).cloned())
        {
            Some(AMQPValue::LongLongInt(n)) => n,
            other => panic!("header {name}: {other:?}"),
        };
        let (key, seq) = (number("key").to_string(), number("seq"));
        let latest = latest.entry(key.clone()).or_insert(seq);
        // A frozen relay's copy may leave its socket buffer only after the
        // stall, behind the successor another relay published: a late
        // duplicate, which the consumer's inbox drops. First copies must
        // come in key order.
        if seq < *latest && first {
            inversions.push((key, seq, *latest));
        } else if seq < *latest {
            late_copies += 1;
        }
        *latest = (*latest).max(seq);
    }
    assert_eq!(copies.len(), 2000, "every row arrived");
    let most = copies.values().max().copied().unwrap_or(0);
    println!(
        "{} deliveries of 2000 rows, at most {most} copies, {} inversions, \
         {late_copies} late duplicates",
        deliveries.len(),
        inversions.len()
    );
    assert!(most <= 2, "a row arrived {most} times");
    assert!(
        inversions.is_empty(),
        "key order broken {} times, e.g. {:?}",
        inversions.len(),
        &inversions[..inversions.len().min(5)]
    );
}

#[tokio::test]
async fn faults_a_relay_whose_lease_expired_cannot_settle_rows_taken_over() {
    use outbox_relay::store::{ClaimLimits, Retried, Store};
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    enqueue(&client, "anywhere", "{}", None).await;
    let target = outbox_service::db::parse_url(&db.url, None).expect("url");
    let late = Store::connect(&target, "late").await.expect("store");
    let current = Store::connect(&target, "current").await.expect("store");
    let lease = Duration::from_millis(200);
    let stale = late
        .claim(ClaimLimits::from_start(10, lease))
        .await
        .expect("claim")
        .rows;
    assert_eq!(stale.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let taken = current
        .claim(ClaimLimits::from_start(10, Duration::from_secs(30)))
        .await
        .expect("claim")
        .rows;
    assert_eq!(taken.len(), 1, "the expired lease is taken over");
    // The late relay's release, failure and mark change nothing now.
    let stale_row = &stale[0];
    let held = [(stale_row.id, stale_row.lease.clone())];
    late.release(&held).await.expect("release");
    let retried = late
        .retry(stale_row, "late failure", Duration::ZERO, 1)
        .await
        .expect("retry");
    assert_eq!(retried, Retried::Gone);
    late.mark_published(&held, false).await.expect("mark");
    let row = client
        .query_one(
            "SELECT locked_by, attempts, dead_at IS NULL, published_at IS NULL FROM outbox.messages",
            &[],
        )
        .await
        .expect("row");
    assert_eq!(
        row.get::<_, Option<String>>(0),
        Some(taken[0].lease.clone())
    );
    assert_eq!(
        row.get::<_, i32>(1),
        0,
        "no attempt counted by the late relay"
    );
    assert!(row.get::<_, bool>(2) && row.get::<_, bool>(3));
    // The current holder's mark applies.
    current
        .mark_published(&[(taken[0].id, taken[0].lease.clone())], false)
        .await
        .expect("mark");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL"
        )
        .await,
        1
    );
}
