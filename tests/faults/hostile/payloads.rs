//! Big payloads: bounded by bytes, not rows; one over the broker's maximum
//! is that row's fault. Both are `serial_`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};
use outbox_relay::Settings;
use outbox_tests::broker::{Topology, bound_queue, fanout_exchange};
use outbox_tests::dispatch::count;
use outbox_tests::relay::{RunningRelay, relay_run_command, test_settings};
use outbox_tests::*;

use super::{ARRIVAL, RelayProcess, distinct_ids, enqueue, wait_for_count};

/// A fanout exchange whose one queue keeps at most two messages: big
/// payloads are confirmed without the broker keeping them.
async fn short_queue() -> (lapin::Connection, String) {
    let connection = outbox_tests::broker::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let exchange = fanout_exchange(&channel, "test_big_ex").await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(2));
    bound_queue(&channel, &exchange, arguments).await;
    (connection, exchange)
}

/// The peak resident memory of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

// Serial: it pushes 800 MiB through the shared broker, which slows the
// tests beside it.
#[tokio::test]
async fn serial_faults_big_payloads_are_bounded_by_bytes_not_rows() {
    let db = TestDb::with_outbox().await;
    let (_connection, exchange) = short_queue().await;
    // 100 rows of 8 MiB (TOAST compresses them in the database, the relay
    // sees them whole), with the relay's default settings.
    db.connect()
        .await
        .execute(
            "INSERT INTO outbox.messages (exchange, payload, content_type) \
             SELECT $1, convert_to(repeat('x', 8388608), 'UTF8'), 'text/plain' \
             FROM generate_series(1, 100)",
            &[&exchange],
        )
        .await
        .expect("insert big rows");
    let relay = RelayProcess(
        relay_run_command(&db, &[])
            .spawn()
            .expect("spawn outbox-relay"),
    );
    let pid = relay.0.id();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut peak: f64 = 0.0;
    loop {
        peak = peak.max(peak_rss_mib(pid));
        let published = count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL",
        )
        .await;
        if published == 100 {
            break;
        }
        assert!(Instant::now() < deadline, "{published} of 100 published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak = peak.max(peak_rss_mib(pid));
    println!("peak RSS publishing 100 rows of 8 MiB: {peak:.0} MiB");
    assert!(peak < 256.0, "peak RSS {peak:.0} MiB");
}

// Serial: a 128 MiB message slows the shared broker for everyone.
#[tokio::test]
async fn serial_faults_a_payload_over_the_brokers_max_is_that_rows_fault() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let client = db.connect().await;
    let before = enqueue(&client, &topology.exchange, r#"{"n": 1}"#, None).await;
    // RabbitMQ's max_message_size is 128 MiB by default on 3.x, 16 MiB on
    // 4.x: this row is over both; ours allows more.
    client
        .execute(
            "INSERT INTO outbox.messages (exchange, payload, content_type) \
             VALUES ($1, convert_to(repeat('x', 134217728 + 4096), 'UTF8'), 'text/plain')",
            &[&topology.exchange],
        )
        .await
        .expect("insert a huge row");
    let after = enqueue(&client, &topology.exchange, r#"{"n": 2}"#, None).await;
    let relay = RunningRelay::start(Settings {
        max_attempts: Some(2),
        max_payload_bytes: Some(256 << 20),
        ..test_settings(&db)
    })
    .await;
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.messages WHERE dead_at IS NOT NULL \
         AND last_error LIKE '%max_message_size%'",
        1,
        Duration::from_secs(60),
    )
    .await;
    let deliveries = topology.receive(2, ARRIVAL).await;
    assert_eq!(distinct_ids(&deliveries), HashSet::from([before, after]));
    relay.stop().await;
}
