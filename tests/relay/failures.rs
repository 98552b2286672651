//! Outages and takeover: closed broker connections, terminated database
//! connections, a relay killed before or after marking, three relays at once.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use lapin::ExchangeKind;
use lapin::options::BasicPublishOptions;
use outbox_relay::Settings;
use outbox_tests::broker::Topology;
use outbox_tests::relay::{RunningRelay, spawn_relay_process, test_settings};
use outbox_tests::*;
use serde_json::json;
use uuid::Uuid;

use super::{ARRIVAL, assert_same_ids, enqueue, ids_of, wait_all_published};

/// Disturbs every connection on the broker: runs alone (`serial_`).
#[tokio::test]
async fn serial_broker_closing_all_connections_loses_nothing() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(test_settings(&db)).await;
    let mut client = db.connect().await;

    let mut expected = enqueue(&mut client, &topology.exchange, "", 500, 50).await;
    let writer = {
        let exchange = topology.exchange.clone();
        let mut client = db.connect().await;
        tokio::spawn(async move { enqueue(&mut client, &exchange, "", 1500, 10).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let closed = outbox_tests::broker::rabbitmqctl_command()
        .args(["close_all_connections", "test: broker outage"])
        .output()
        .expect("run rabbitmqctl");
    assert!(closed.status.success(), "{closed:?}");
    expected.extend(writer.await.expect("writer"));

    wait_all_published(&client, ARRIVAL).await;
    let received: HashSet<Uuid> =
        ids_of(&topology.receive(usize::MAX, Duration::from_secs(3)).await)
            .into_iter()
            .collect();
    let expected: HashSet<Uuid> = expected.into_iter().collect();
    assert!(
        expected.is_subset(&received),
        "{} lost",
        expected.difference(&received).count()
    );
    let attempts: i64 = client
        .query_one(
            "SELECT coalesce(sum(attempts), 0) FROM outbox.messages",
            &[],
        )
        .await
        .expect("attempts")
        .get(0);
    assert_eq!(attempts, 0, "an outage must not count as attempts");
    relay.stop().await;
}

#[tokio::test]
async fn relay_recovers_when_its_database_connections_are_terminated() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let relay = RunningRelay::start(test_settings(&db)).await;

    let mut client = db.connect().await;
    let mut expected = enqueue(&mut client, &topology.exchange, "", 200, 20).await;
    wait_all_published(&client, ARRIVAL).await;
    drop(client);

    let admin = connect(&admin_url()).await;
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1",
            &[&db.name],
        )
        .await
        .expect("terminate")
        .get(0);
    assert!(
        killed >= 2,
        "expected the relay's pool and listener, killed {killed}"
    );

    let mut client = db.connect().await;
    expected.extend(enqueue(&mut client, &topology.exchange, "", 200, 20).await);
    let received: HashSet<Uuid> = ids_of(&topology.receive(expected.len(), ARRIVAL).await)
        .into_iter()
        .collect();
    assert_same_ids(&received, &expected.into_iter().collect());
    relay.stop().await;
}

/// A relay that published but died before marking: the row's lease expires
/// and the next relay publishes it again, with the same message_id.
#[tokio::test]
async fn a_row_published_but_not_marked_is_published_again_with_the_same_id() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    let id = enqueue(&mut client, &topology.exchange, "", 1, 1).await[0];

    // What the dead relay did: lease the row, publish it, never mark it.
    client
        .execute(
            "UPDATE outbox.messages SET locked_by = 'crashed', locked_until = now() + interval '1 second'",
            &[],
        )
        .await
        .expect("lease");
    topology
        .channel
        .basic_publish(
            topology.exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            b"{}",
            lapin::BasicProperties::default().with_message_id(id.to_string().into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");

    let relay = RunningRelay::start(test_settings(&db)).await;
    let received = ids_of(&topology.receive(2, ARRIVAL).await);
    assert_eq!(received, vec![id, id]);
    wait_all_published(&client, ARRIVAL).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_killed_relay_process_is_taken_over_and_nothing_is_lost() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::fanout().await;
    let mut client = db.connect().await;
    let lease = [("OUTBOX_LEASE_MS", "2000")];

    let mut first = spawn_relay_process(&db, &lease);
    let mut expected = enqueue(&mut client, &topology.exchange, "", 300, 30).await;
    let writer = {
        let exchange = topology.exchange.clone();
        let mut client = db.connect().await;
        tokio::spawn(async move { enqueue(&mut client, &exchange, "", 2000, 20).await })
    };
    let early = topology.receive(1, ARRIVAL).await;
    assert_eq!(early.len(), 1, "first relay published nothing");
    first.kill().expect("kill -9");
    let _ = first.wait();
    expected.extend(writer.await.expect("writer"));

    let mut second = spawn_relay_process(&db, &lease);
    wait_all_published(&client, ARRIVAL).await;
    // SIGTERM: a clean stop, exit code 0.
    let term = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let exit = second.wait().expect("wait for relay");
    assert!(exit.success(), "relay exited with {exit} on SIGTERM");

    let mut received: Vec<Uuid> = ids_of(&early);
    received.extend(ids_of(
        &topology.receive(usize::MAX, Duration::from_secs(3)).await,
    ));
    let unique: HashSet<Uuid> = received.iter().copied().collect();
    let expected: HashSet<Uuid> = expected.into_iter().collect();
    assert_same_ids(&unique, &expected);
    println!(
        "duplicates after kill -9: {}",
        received.len() - unique.len()
    );
}

/// Three relays publishing heads only (`OUTBOX_KEY_PIPELINE=0`, for
/// consumers that cannot reorder); four ordering keys whose messages must
/// arrive in the queue in order; the head of key `a` is unroutable at
/// first, so it is retried while the rest of `a` waits behind it.
#[tokio::test]
async fn three_relays_publish_everything_and_keep_per_key_order() {
    let db = TestDb::with_outbox().await;
    let topology = Topology::new(ExchangeKind::Direct, "go").await;
    let mut client = db.connect().await;
    let keys = ["a", "b", "c", "d"];
    let per_key = 60;

    let tx = client.transaction().await.expect("begin");
    for seq in 0..per_key {
        for key in keys {
            let routing_key = if key == "a" && seq == 0 {
                "later"
            } else {
                "go"
            };
            tx.execute(
                "SELECT outbox.enqueue($1, $2, $3::jsonb, '{}', $4)",
                &[
                    &topology.exchange,
                    &routing_key,
                    &json!({"key": key, "seq": seq}),
                    &key,
                ],
            )
            .await
            .expect("enqueue keyed");
        }
    }
    tx.commit().await.expect("commit");
    let keyless = enqueue(&mut client, &topology.exchange, "go", 200, 50).await;

    let settings = Settings {
        max_attempts: Some(100),
        key_pipeline: Some(0),
        ..test_settings(&db)
    };
    let relays = [
        RunningRelay::start(settings.clone()).await,
        RunningRelay::start(settings.clone()).await,
        RunningRelay::start(settings).await,
    ];

    // Let the head of `a` fail at least twice, then make it routable.
    let deadline = Instant::now() + ARRIVAL;
    loop {
        let attempts: i32 = client
            .query_one(
                "SELECT attempts FROM outbox.messages WHERE ordering_key = 'a' ORDER BY id LIMIT 1",
                &[],
            )
            .await
            .expect("head")
            .get(0);
        if attempts >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "head of `a` never failed twice");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    topology.bind("later").await;

    let total = keys.len() * per_key + keyless.len();
    let deliveries = topology.receive(total, ARRIVAL).await;
    assert_eq!(deliveries.len(), total);
    let mut next_seq: HashMap<String, i64> = HashMap::new();
    for delivery in &deliveries {
        let body: serde_json::Value = serde_json::from_slice(&delivery.data).expect("JSON");
        if let Some(key) = body["key"].as_str() {
            let seq = body["seq"].as_i64().expect("seq");
            let expected = next_seq.entry(key.to_string()).or_insert(0);
            assert_eq!(seq, *expected, "key {key} out of order");
            *expected += 1;
        }
    }
    assert!(
        next_seq.values().all(|n| *n == per_key as i64),
        "{next_seq:?}"
    );
    for relay in relays {
        relay.stop().await;
    }
}
