//! Retention and vacuum: rows deleted once confirmed or once old enough,
//! the table vacuumed where autovacuum is off.

use std::time::{Duration, Instant};

use outbox_relay::Settings;
use outbox_tests::broker::Topology;
use outbox_tests::relay::{RunningRelay, test_settings};
use outbox_tests::*;

use super::{ARRIVAL, enqueue};

#[tokio::test]
async fn zero_retention_deletes_rows_once_confirmed() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(Settings {
        retention: Some("0".into()),
        ..test_settings(&db)
    })
    .await;
    let mut client = db.connect().await;
    let expected = enqueue(&mut client, &topology.exchange, "", 50, 10).await;
    assert_eq!(
        topology.receive(expected.len(), ARRIVAL).await.len(),
        expected.len()
    );
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let left: i64 = client
            .query_one("SELECT count(*) FROM outbox.messages", &[])
            .await
            .expect("count")
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} confirmed rows not deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await;
}

/// Leases, marks and deletes leave dead row versions; with autovacuum off
/// for the table nothing reclaimed them, and a 30 s retention still grew
/// the table to 705 MiB over 2 million rows. The relay vacuums it then.
#[tokio::test]
async fn the_relay_vacuums_its_table_where_autovacuum_is_off() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    client
        .batch_execute("ALTER TABLE outbox.messages SET (autovacuum_enabled = false)")
        .await
        .expect("turn autovacuum off for the table");
    let relay = RunningRelay::start(Settings {
        retention: Some("0".into()),
        ..test_settings(&db)
    })
    .await;
    // More dead rows than the relay's threshold (10,000) once all are deleted.
    let expected = enqueue(&mut client, &topology.exchange, "", 12_000, 1_000).await;
    assert_eq!(
        topology.receive(expected.len(), ARRIVAL).await.len(),
        expected.len()
    );
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let vacuums: i64 = client
            .query_one(
                "SELECT vacuum_count FROM pg_stat_user_tables \
                 WHERE relid = 'outbox.messages'::regclass",
                &[],
            )
            .await
            .expect("vacuum count")
            .get(0);
        if vacuums > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "outbox.messages never vacuumed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    relay.stop().await;
}

#[tokio::test]
async fn retention_deletes_published_rows_older_than_the_setting() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    let old = enqueue(&mut client, &topology.exchange, "", 30, 10).await;
    let fresh = enqueue(&mut client, &topology.exchange, "", 30, 10).await;
    // Pretend the first batch was published two hours ago.
    client
        .execute(
            "UPDATE outbox.messages SET published_at = now() - interval '2 hours' WHERE message_id = ANY($1)",
            &[&old],
        )
        .await
        .expect("age rows");
    let relay = RunningRelay::start(Settings {
        retention: Some("1h".into()),
        ..test_settings(&db)
    })
    .await;
    assert_eq!(
        topology.receive(fresh.len(), ARRIVAL).await.len(),
        fresh.len()
    );
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE message_id = ANY($1)), count(*) FILTER (WHERE message_id = ANY($2)) FROM outbox.messages",
                &[&old, &fresh],
            )
            .await
            .expect("count");
        let (old_left, fresh_left): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(fresh_left, fresh.len() as i64, "recent rows must be kept");
        if old_left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{old_left} expired rows not deleted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    relay.stop().await;
}
