//! Slow orders, an unavailable database, a killed consumer, a cut broker
//! connection and a failing batch: nothing acked early, everything lands once.

use std::process::Command;

use ::dispatch::Settings;
use outbox_tests::dispatch::*;
use outbox_tests::*;
use uuid::Uuid;

use super::{Fixture, deliveries, dispatch_db, inbox};

/// Blocks every insert into `dispatch.deliveries` until `ROLLBACK` on the
/// returned connection, so that handlers hold their deliveries unacked.
async fn lock_deliveries(db: &TestDb) -> tokio_postgres::Client {
    let client = db.connect().await;
    client
        .batch_execute("BEGIN; LOCK TABLE dispatch.deliveries IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    client
}

/// Waits until the consumer holds all it can (`queue` is down to `left`
/// ready messages) and its handlers wait on that lock. How many handlers
/// that is depends on how the deliveries fell into batches.
async fn wait_until_held(db: &TestDb, queue: &str, left: u32) {
    wait_until(&format!("{queue} is down to {left} ready"), || async {
        ready(queue).await == left
    })
    .await;
    wait_until("a handler waits on the lock", || async {
        blocked_handlers(db).await >= 1
    })
    .await;
}

/// Waits until `handlers` dispatch connections wait on that lock.
async fn wait_for_blocked_handlers(db: &TestDb, handlers: i64) {
    wait_until(&format!("{handlers} handlers wait on the lock"), || async {
        blocked_handlers(db).await == handlers
    })
    .await;
}

async fn blocked_handlers(db: &TestDb) -> i64 {
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
         AND application_name = 'dispatch' AND wait_event_type = 'Lock'",
        db.name
    );
    count(db, &waiting).await
}

/// The seed's slow order (opt-in) takes its time in its own handler while
/// the others land; a shutdown that cannot wait for it gives it back.
#[tokio::test]
async fn dispatch_slow_order_holds_up_no_one_and_is_given_back_at_shutdown() {
    let db = dispatch_db().await;
    let settings = Settings {
        slow_order_id: Some(100001),
        slow_order_ms: Some(60_000),
        shutdown_timeout_ms: Some(200),
        ..test_settings(&db)
    };
    let fixture = Fixture::start_with(db, settings).await;
    fixture.publisher.order(100001).await;
    // Its batch is under way (its transaction open, its handler asleep)
    // before the others come: had they come first, they could share it.
    let open = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
         AND application_name = 'dispatch' AND state = 'idle in transaction'",
        fixture.db.name
    );
    wait_until("the slow order's batch is under way", || async {
        count(&fixture.db, &open).await == 1
    })
    .await;
    for order_id in 1..=5 {
        fixture.publisher.order(order_id).await;
    }
    fixture.wait_for_deliveries(5).await;
    let queue = fixture.names.queue.clone();
    fixture.consumer.stop().await;
    // The broker requeues a closed channel's deliveries asynchronously.
    wait_until("the slow order went back", || async {
        ready(&queue).await == 1
    })
    .await;
    let slow = "SELECT count(*) FROM dispatch.deliveries WHERE order_id = 100001";
    assert_eq!(count(&fixture.db, slow).await, 0);
    assert_eq!(inbox(&fixture.db).await, 5, "its inbox row rolled back");
}

/// Test 4: the dispatch database refuses connections for a while. Nothing
/// is acked meanwhile (the messages stay in the queue or in hand) and
/// nothing is retried or dead-lettered; everything lands once it is back.
#[tokio::test]
async fn dispatch_waits_out_an_unavailable_database() {
    const ORDERS: u32 = 12;
    let db = dispatch_db().await;
    let settings = test_settings(&db);
    let prefetch = u32::from(settings.prefetch.unwrap_or(8));
    let fixture = Fixture::start_with(db, settings).await;
    let names = &fixture.names;
    fixture.publisher.order(1).await;
    fixture.wait_for_deliveries(1).await;

    let admin = connect(&admin_url()).await;
    let name = &fixture.db.name;
    fixture.db.refuse_connections().await;
    let backends = format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}'");
    wait_until("its connections are gone", || async {
        let row = admin.query_one(&backends, &[]).await.expect("count");
        row.get::<_, i64>(0) == 0
    })
    .await;
    for order_id in 2..=i64::from(ORDERS) + 1 {
        fixture.publisher.order(order_id).await;
    }
    // The consumer takes a prefetch's worth and holds it, unacked.
    wait_until("the consumer holds a prefetch's worth", || async {
        ready(&names.queue).await == ORDERS - prefetch
    })
    .await;
    wait_until("readiness reports the database", || async {
        fixture.consumer.get("/readyz").await.0 == 503
    })
    .await;
    // Give a wrong ack, retry or dead letter a moment to show.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        ready(&names.queue).await,
        ORDERS - prefetch,
        "nothing acked"
    );
    assert_eq!(ready(&names.dead_letter_queue).await, 0);
    assert_eq!(ready(&names.retry_queue).await, 0, "an outage is no retry");

    fixture.db.allow_connections().await;
    fixture.wait_for_deliveries(i64::from(ORDERS) + 1).await;
    assert_eq!(fixture.consumer.get("/readyz").await.0, 200);
    let dead_letter_queue = fixture.names.dead_letter_queue.clone();
    fixture.stop_with_queues_empty().await;
    assert_eq!(ready(&dead_letter_queue).await, 0);
}

/// Test 5: a consumer process is SIGKILLed while its deliveries wait on a
/// lock, unacked. They are redelivered to the next consumer and land once;
/// that one stops on SIGTERM with exit code 0.
#[tokio::test]
async fn dispatch_killed_consumer_redelivers_and_lands_once() {
    const ORDERS: i64 = 10;
    let db = dispatch_db().await;
    let settings = test_settings(&db);
    let names = topology(&settings);
    let lock = lock_deliveries(&db).await;

    let env = [("DISPATCH_PREFETCH", "4")];
    let mut first = spawn_dispatch_process(&settings, &env);
    wait_for_consumers(&names.queue, 1).await;
    let publisher = Publisher::new(&names.exchange).await;
    for order_id in 1..=ORDERS {
        publisher.order(order_id).await;
    }
    // Prefetch 4: four orders in hand, unacked, the rest in the queue.
    wait_until_held(&db, &names.queue, (ORDERS - 4) as u32).await;
    first.kill().expect("SIGKILL");
    first.wait().expect("reap");
    lock.batch_execute("ROLLBACK").await.expect("unlock");

    let mut second = spawn_dispatch_process(&settings, &env);
    wait_until("every order landed", || async {
        deliveries(&db).await == ORDERS && ready(&names.queue).await == 0
    })
    .await;
    assert_eq!(inbox(&db).await, ORDERS);
    let term = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let status = second.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
    assert_eq!(ready(&names.queue).await, 0, "nothing given back");
    assert_eq!(deliveries(&db).await, ORDERS);
}

/// The broker connection is cut while handlers hold deliveries: the
/// consumer reconnects by itself, the deliveries come again (the old tags
/// die with the old channel) and every order lands once.
#[tokio::test]
async fn dispatch_reconnects_when_its_broker_connection_is_cut() {
    const ORDERS: i64 = 10;
    let db = dispatch_db().await;
    let settings = test_settings(&db);
    let names = topology(&settings);
    let mut config = settings.validate().expect("valid settings");
    config.consumer.name = unique_name("dispatch");
    let connection = config.consumer.name.clone();
    let consumer = RunningDispatch::start_config(config).await;
    let fixture = Fixture {
        publisher: Publisher::new(&names.exchange).await,
        db,
        names,
        consumer,
    };
    let lock = lock_deliveries(&fixture.db).await;
    for order_id in 1..=ORDERS {
        fixture.publisher.order(order_id).await;
    }
    // The prefetch (8) in hand, their transactions waiting on the lock.
    wait_until_held(&fixture.db, &fixture.names.queue, (ORDERS - 8) as u32).await;

    tokio::task::spawn_blocking(move || close_broker_connection(&connection))
        .await
        .expect("close connection");
    lock.batch_execute("ROLLBACK").await.expect("unlock");
    fixture.wait_for_deliveries(ORDERS).await;
    wait_for_consumers(&fixture.names.queue, 1).await;
    assert_eq!(fixture.consumer.get("/readyz").await.0, 200);
    let db = fixture.stop_with_queues_empty().await;
    assert_eq!(inbox(&db).await, ORDERS);
}

/// A backlog is handled in batches, one transaction each (the inbox rows of
/// a batch share their transaction's `now()`), and a batch with a poison
/// message, a message that keeps failing and a repeated copy in it commits
/// everything else: the poison and the failing one are dead-lettered, the
/// copy changes nothing. Each order lands once.
#[tokio::test]
async fn dispatch_commits_a_backlog_in_batches_and_takes_a_failing_batch_apart() {
    const ORDERS: i64 = 200;
    let db = dispatch_db().await;
    fail_order_666(&db).await;
    let settings = Settings {
        lanes: Some(1),
        batch_size: Some(50),
        prefetch: Some(250),
        ..test_settings(&db)
    };
    let fixture = Fixture::start_with(db, settings).await;
    // The first delivery's transaction waits on the lock while the backlog
    // arrives behind it.
    let lock = lock_deliveries(&fixture.db).await;
    fixture.publisher.order(ORDERS + 1).await;
    wait_for_blocked_handlers(&fixture.db, 1).await;
    let repeated = Uuid::new_v4();
    for order_id in 1..=ORDERS {
        match order_id {
            50 => fixture.publisher.order(-50).await,
            100 => fixture.publisher.order(666).await,
            _ => fixture.publisher.order(order_id).await,
        };
        if order_id == 150 {
            fixture.publisher.order_as(150, repeated).await;
            fixture.publisher.order_as(150, repeated).await;
        }
    }
    wait_until("the backlog is delivered", || async {
        ready(&fixture.names.queue).await == 0
    })
    .await;
    lock.batch_execute("ROLLBACK").await.expect("unlock");
    // 1..=200 without 50 and 100, 150 twice (two message ids), and 201.
    let landed = ORDERS - 2 + 1;
    fixture.wait_for_deliveries(landed).await;
    wait_until(
        "the poison and the failing order are dead-lettered",
        || async { ready(&fixture.names.dead_letter_queue).await == 2 },
    )
    .await;
    let db = fixture.stop_with_queues_empty().await;
    assert_eq!(inbox(&db).await, landed + 1, "one inbox row per message id");
    let transactions = count(
        &db,
        "SELECT count(DISTINCT processed_at) FROM dispatch.inbox",
    )
    .await;
    println!(
        "{} messages committed in {transactions} transactions",
        landed + 1
    );
    assert!(
        transactions <= 20,
        "{} messages took {transactions} transactions",
        landed + 1
    );
}
