//! How the relay finds rows: the sweep alone, wake-ups, and keyed claims
//! that do not walk the backlog.

use std::time::Duration;

use outbox_relay::Settings;
use outbox_tests::broker::Topology;
use outbox_tests::relay::{RunningRelay, test_settings};
use outbox_tests::*;

use super::{ARRIVAL, assert_same_ids, enqueue, ids_of};

/// Runs a prepared claim statement (`CLAIM_TYPES`): up to 500 rows under
/// `lease`, with `followers` rows of a key behind its head, nothing in
/// flight.
async fn run_claim(
    client: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    lease: &str,
    followers: i64,
) -> Vec<tokio_postgres::Row> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
        &500_i64,
        &lease,
        &true,
        &10_000_f64,
        &i64::MAX,
        &0_i64,
        &"",
        &followers,
        &Vec::<i64>::new(),
    ];
    client.query(statement, &params).await.expect("claim")
}

#[tokio::test]
async fn poll_mode_publishes_on_the_sweep_alone() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(Settings {
        mode: Some("poll".into()),
        ..test_settings(&db)
    })
    .await;
    let mut client = db.connect().await;
    let expected = enqueue(&mut client, &topology.exchange, "", 100, 10).await;
    let received = ids_of(&topology.receive(expected.len(), ARRIVAL).await);
    assert_same_ids(
        &received.into_iter().collect(),
        &expected.into_iter().collect(),
    );
    let listeners: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
            &[],
        )
        .await
        .expect("listeners")
        .get(0);
    assert_eq!(listeners, 0, "poll mode must not LISTEN");
    relay.stop().await;
}

/// With the sweep an hour away, only wake-ups can deliver: a row committed
/// to an idle relay arrives, and so does one committed after the relay's
/// listening connection was killed (it reconnects, LISTENs, drains).
#[tokio::test]
async fn wake_ups_deliver_without_the_sweep_also_after_the_listener_dies() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(Settings {
        sweep_interval_ms: Some(3_600_000),
        ..test_settings(&db)
    })
    .await;
    let prompt = Duration::from_secs(20);
    let mut client = db.connect().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let first = enqueue(&mut client, &topology.exchange, "", 1, 1).await;
    assert_eq!(
        ids_of(&topology.receive(1, prompt).await),
        first,
        "idle relay not woken"
    );

    let admin = connect(&admin_url()).await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'outbox-relay'",
            &[&db.name],
        )
        .await
        .expect("terminate the relay's connections")
        .get(0);
    assert!(killed >= 2, "listener and pool: killed {killed}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = enqueue(&mut client, &topology.exchange, "", 1, 1).await;
    assert_eq!(
        ids_of(&topology.receive(1, prompt).await),
        second,
        "listener not back"
    );
    relay.stop().await;
}

/// A keyed backlog (20,000 rows over 50 keys, analyzed while all were
/// pending, then some published) once made every claim walk the backlog
/// in id order, asking of each row whether an earlier one of its key was
/// pending: 11.2 s a claim with one plan, 0.11 s with the best, for 50
/// heads. Heads are now found key by key, so a claim touches a few pages
/// per key whatever the backlog and the statistics.
#[tokio::test]
async fn relay_keyed_claim_finds_heads_key_by_key_without_walking_the_backlog() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    client
        .batch_execute(
            "INSERT INTO outbox.messages (exchange, routing_key, payload, ordering_key) \
             SELECT 'ex', '', '{}', 'customer-' || g % 50 FROM generate_series(1, 20000) g; \
             ANALYZE outbox.messages; \
             UPDATE outbox.messages SET published_at = now() WHERE id <= 2800",
        )
        .await
        .expect("a keyed backlog");
    let explain = client
        .prepare_typed(
            &format!(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}",
                outbox_relay::store::CLAIM
            ),
            &outbox_relay::store::CLAIM_TYPES,
        )
        .await
        .expect("prepare");
    let claim = |followers: i64, lease: &'static str| {
        let (client, explain) = (&client, &explain);
        async move {
            let plan: serde_json::Value =
                run_claim(client, explain, lease, followers).await[0].get(0);
            let top = &plan[0]["Plan"];
            let pages = top["Shared Hit Blocks"].as_i64().unwrap_or(0)
                + top["Shared Read Blocks"].as_i64().unwrap_or(0);
            let rows = top["Actual Rows"].as_i64().unwrap_or(0);
            (rows, pages)
        }
    };
    let (heads, pages) = claim(0, "heads").await;
    println!("50 heads: {heads} rows claimed, {pages} pages touched");
    assert_eq!(heads, 50, "one head per key");
    // The walk touched every pending row's page and index entry: 17,200
    // rows, tens of thousands of pages.
    assert!(pages < 5_000, "{pages} pages touched for 50 heads");
    client
        .batch_execute("UPDATE outbox.messages SET locked_by = NULL, locked_until = NULL")
        .await
        .expect("release");
    let (pipelined, pages) = claim(9, "pipelined").await;
    println!("50 heads and their next 9 rows: {pipelined} rows claimed, {pages} pages touched");
    assert_eq!(pipelined, 500, "each head and its next 9 rows");
    let numbers: Vec<(String, i64, i64, i64)> = client
        .query(
            "SELECT ordering_key, count(*), min(key_seq), max(key_seq) FROM outbox.messages \
             WHERE locked_by = 'pipelined' GROUP BY 1",
            &[],
        )
        .await
        .expect("numbers")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    assert_eq!(numbers.len(), 50);
    // Each key's rows claimed in the first claim kept their numbers.
    for (key, count, first, last) in numbers {
        assert_eq!((count, first, last), (10, 1, 10), "{key}");
    }
}

/// The claim a relay runs while no key has rows pending takes keyless
/// rows in id order from the keyless index, without walking the published
/// rows, and says whether a key has unpublished rows (then the whole
/// claim runs next).
#[tokio::test]
async fn relay_keyless_claim_takes_rows_in_order_and_sees_a_pending_key() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    client
        .batch_execute(
            "INSERT INTO outbox.messages (exchange, routing_key, payload) \
             SELECT 'ex', '', '{}' FROM generate_series(1, 20000); \
             ANALYZE outbox.messages; \
             UPDATE outbox.messages SET published_at = now() WHERE id <= 2800",
        )
        .await
        .expect("a keyless backlog");
    let statement = client
        .prepare_typed(
            outbox_relay::store::CLAIM_KEYLESS,
            &outbox_relay::store::CLAIM_TYPES,
        )
        .await
        .expect("prepare");
    let claim = |lease: &'static str| {
        let (client, statement) = (&client, &statement);
        async move {
            let rows = run_claim(client, statement, lease, 0).await;
            let mut ids: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
            ids.sort_unstable();
            let keys_pending = rows.first().map(|row| row.get::<_, i64>(13));
            (ids, keys_pending)
        }
    };
    let (ids, keys_pending) = claim("first").await;
    assert_eq!(ids, (2801..=3300).collect::<Vec<i64>>());
    assert_eq!(keys_pending, Some(0));
    let (ids, _) = claim("second").await;
    assert_eq!(ids.first(), Some(&3301), "leased rows are not taken again");
    client
        .execute(
            "INSERT INTO outbox.messages (exchange, routing_key, payload, ordering_key) \
             VALUES ('ex', '', '{}', 'k')",
            &[],
        )
        .await
        .expect("a keyed row");
    let (_, keys_pending) = claim("third").await;
    assert_eq!(keys_pending, Some(1), "a key has a row pending");
}
