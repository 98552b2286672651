//! 100,000 dead letters requeued through the API while a relay drains
//! other rows: the change goes in batches at a bounded rate, the relay
//! keeps publishing the other rows meanwhile, and every requeued row goes
//! out once.

use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};
use outbox_tests::broker::{bound_queue, connect, fanout_exchange};
use outbox_tests::console::{RunningConsole, TOKEN};
use outbox_tests::dispatch::wait_for;
use outbox_tests::relay::{RunningRelay, test_settings};
use outbox_tests::*;
use serde_json::json;

use super::{count, dead_letters};

const DEAD: i64 = 100_000;
const PUBLISHED: &str = "SELECT count(*) FROM outbox.messages WHERE published_at IS NOT NULL";

#[tokio::test]
async fn a_hundred_thousand_dead_letters_are_requeued_in_batches_while_a_relay_drains_other_rows() {
    let db = TestDb::with_outbox().await;
    let channel = connect().await.create_channel().await.expect("channel");
    // The requeued rows land in a queue that keeps only its last 1,000.
    let revived = fanout_exchange(&channel, "revived").await;
    let mut short = FieldTable::default();
    short.insert("x-max-length".into(), AMQPValue::LongInt(1_000));
    bound_queue(&channel, &revived, short).await;
    let others = fanout_exchange(&channel, "others").await;
    bound_queue(&channel, &others, FieldTable::default()).await;
    let client = db.connect().await;
    dead_letters(&client, &revived, DEAD, "NOT_FOUND - no exchange").await;

    let relay = RunningRelay::start(test_settings(&db)).await;
    let console = RunningConsole::start(
        &db.url,
        &[
            ("OUTBOX_CONSOLE_BULK_BATCH", "1000"),
            ("OUTBOX_CONSOLE_BULK_RATE", "5000"),
        ],
    )
    .await;

    // Other rows, 50 a second, all through the requeue.
    let writer = {
        let client = db.connect().await;
        let others = others.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let started = Instant::now();
            let mut written = 0_i64;
            while started.elapsed() < Duration::from_secs(25) {
                tick.tick().await;
                client
                    .execute(
                        "SELECT outbox.enqueue($1, 'other', '{}'::jsonb)",
                        &[&others],
                    )
                    .await
                    .expect("enqueue");
                written += 1;
            }
            written
        })
    };

    let started = Instant::now();
    let (status, outcome) = console
        .post(
            "/api/v1/dead-letters/requeue",
            Some(TOKEN),
            &json!({"filter": {"exchange": revived}, "dry_run": false}),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["matched"], DEAD, "{outcome}");
    assert_eq!(outcome["changed"], DEAD, "{outcome}");
    // 1,000 rows a statement, and an empty one to find the end.
    assert_eq!(outcome["batches"], DEAD / 1_000, "{outcome}");
    // At 5,000 rows a second at most, 100,000 take 20 s at least.
    assert!(took >= Duration::from_secs(19), "requeued in {took:?}");
    eprintln!("requeued {DEAD} in {took:?}");

    // While the requeue ran, the relay kept claiming: rows of the other
    // exchange went out during it, not only after.
    let during = count(
        &db,
        &format!(
            "SELECT count(*) FROM outbox.messages WHERE exchange = '{others}' \
             AND published_at < (SELECT max(at) FROM outbox.admin_log)"
        ),
    )
    .await;
    assert!(during > 0, "no other row published during the requeue");
    eprintln!("{during} other rows published during the requeue");

    let written = writer.await.expect("writer");
    let total = DEAD + written;
    // A debug-build relay beside the rest of the suite takes its time:
    // each wait is bounded, and only a stall fails.
    let mut published = 0;
    while published < total {
        let before = published;
        published = wait_for(
            &format!("more than {before} of {total} rows published"),
            || async {
                let now = count(&db, PUBLISHED).await;
                (now > before).then_some(now)
            },
        )
        .await;
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.dead_letters").await,
        0
    );
    let logged = count(
        &db,
        "SELECT count(*) FROM outbox.admin_log \
         WHERE action = 'requeue' AND NOT dry_run AND changed = 100000 AND actor = 'tester'",
    )
    .await;
    assert_eq!(logged, 1);
    eprintln!(
        "all published {:?} after the requeue started",
        started.elapsed()
    );
    relay.stop().await;
}
