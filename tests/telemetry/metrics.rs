//! The relay's metrics and logs as its events happen, and a channel whose
//! publishes are all nacked being replaced.

use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use outbox_tests::broker::{Topology, bound_queue, fanout_exchange};
use outbox_tests::dispatch::{PATIENCE, wait_until};
use outbox_tests::observe::{Scrape, documented_metrics, wait_for_metric};
use outbox_tests::relay::start_logged_relay;
use outbox_tests::*;
use serde_json::json;

use super::{enqueue, get};

/// An exchange whose only queue is full and rejects publishes: the broker
/// nacks every message sent to it.
async fn nacking_exchange(channel: &Channel) -> String {
    let exchange = fanout_exchange(channel, "test_nack_ex").await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(0));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    bound_queue(channel, &exchange, arguments).await;
    exchange
}

#[tokio::test]
async fn relay_metrics_move_with_their_events_and_logs_are_json() {
    let db = TestDb::with_outbox().await;
    let good = Topology::fanout().await;
    let routed = Topology::new(ExchangeKind::Direct, "bound").await;
    let nacking = nacking_exchange(&good.channel).await;
    let client = db.connect().await;
    let env = [
        ("OUTBOX_MAX_ATTEMPTS", "1"),
        ("OUTBOX_MAX_PAYLOAD_BYTES", "100"),
        ("OUTBOX_SWEEP_INTERVAL_MS", "500"),
        ("OUTBOX_RETENTION", "1s"),
    ];
    let (relay, addr) = start_logged_relay(&db, &env).await;
    let addr = addr.as_str();

    assert_eq!(get(addr, "/healthz").await.0, 200);
    wait_until("the relay is ready", || async {
        get(addr, "/readyz").await.0 == 200
    })
    .await;
    wait_for_metric(addr, "outbox_listener_connected", &[], |v| v == 1.0).await;
    let scrape = Scrape::of(addr).await;
    assert_eq!(scrape.value("outbox_database_connected", &[]), 1.0);
    assert_eq!(scrape.value("outbox_broker_connected", &[]), 1.0);
    assert_eq!(scrape.value("outbox_published_total", &[]), 0.0);

    // A wake-up by NOTIFY. (A writer's commit sends one only while no
    // relay drains, and a sweep may be draining right then: send it here.)
    client
        .batch_execute(&format!("NOTIFY {}", outbox::WAKE_CHANNEL))
        .await
        .expect("notify");
    let notified = [("cause", "notify")];
    wait_for_metric(addr, "outbox_wakeups_total", &notified, |n| n >= 1.0).await;

    // Published: five messages in one transaction.
    let tx_client = db.connect().await;
    tx_client.batch_execute("BEGIN").await.expect("begin");
    for seq in 0..5 {
        enqueue(&tx_client, &good.exchange, "", &json!({ "seq": seq })).await;
    }
    tx_client.batch_execute("COMMIT").await.expect("commit");
    wait_for_metric(addr, "outbox_published_total", &[], |n| n == 5.0).await;
    let scrape = Scrape::of(addr).await;
    assert_eq!(
        scrape.value("outbox_enqueue_to_confirm_seconds_count", &[]),
        5.0
    );
    assert!(
        scrape.value(
            "outbox_enqueue_to_confirm_seconds_bucket",
            &[("le", "+Inf")]
        ) >= 5.0
    );
    assert_eq!(good.receive(5, PATIENCE).await.len(), 5);

    // One failure of each kind; with one attempt allowed, each dies.
    enqueue(&client, &routed.exchange, "nowhere", &json!({})).await;
    enqueue(&client, &unique_name("missing_ex"), "", &json!({})).await;
    enqueue(
        &client,
        &good.exchange,
        "",
        &json!({ "pad": "x".repeat(200) }),
    )
    .await;
    enqueue(&client, &nacking, "", &json!({})).await;
    for reason in ["returned", "no_exchange", "oversized", "nack"] {
        let labels = [("reason", reason)];
        wait_for_metric(addr, "outbox_publish_failures_total", &labels, |n| n == 1.0).await;
    }
    wait_for_metric(addr, "outbox_dead_letters_total", &[], |n| n == 4.0).await;
    wait_for_metric(addr, "outbox_dead_messages", &[], |n| n == 4.0).await;
    let connection_lost = [("reason", "connection_lost")];
    assert_eq!(
        Scrape::of(addr)
            .await
            .value("outbox_publish_failures_total", &connection_lost),
        0.0
    );

    // A row due in a second: no wake-up covers it, the sweep finds it.
    client
        .execute(
            "INSERT INTO outbox.messages (exchange, routing_key, payload, next_attempt_at) \
             VALUES ($1, '', '{}', now() + interval '1 second')",
            &[&good.exchange],
        )
        .await
        .expect("insert a row due later");
    let swept = [("cause", "sweep"), ("found_work", "true")];
    wait_for_metric(addr, "outbox_wakeups_total", &swept, |n| n >= 1.0).await;
    wait_for_metric(addr, "outbox_published_total", &[], |n| n == 6.0).await;

    // Backlog and lag: a row enqueued an hour ago, not due for another.
    client
        .execute(
            "INSERT INTO outbox.messages (exchange, routing_key, payload, created_at, next_attempt_at) \
             VALUES ($1, '', '{}', now() - interval '1 hour', now() + interval '1 hour')",
            &[&good.exchange],
        )
        .await
        .expect("insert a waiting row");
    wait_for_metric(addr, "outbox_pending_messages", &[], |n| n == 1.0).await;
    wait_for_metric(addr, "outbox_oldest_pending_seconds", &[], |s| s >= 3600.0).await;
    // Retention (1 s here) deletes the six published rows.
    wait_for_metric(addr, "outbox_retention_deleted_total", &[], |n| n == 6.0).await;

    let scrape = Scrape::of(addr).await;
    // Every row claimed once: 5 + 4 + 1; claims that found nothing count too.
    assert_eq!(scrape.value("outbox_claim_batch_size_sum", &[]), 10.0);
    assert!(scrape.value("outbox_claim_batch_size_count", &[]) >= 3.0);
    assert_eq!(scrape.value("outbox_in_flight", &[]), 0.0);
    let usage = scrape.value("outbox_notification_queue_usage", &[]);
    assert!((0.0..1.0).contains(&usage), "{usage}");
    assert_eq!(scrape.value("outbox_outages_total", &[]), 0.0);
    let documented = documented_metrics("outbox_");
    assert!(documented.len() >= 15, "{documented:?}");
    let (_, page) = get(addr, "/metrics").await;
    for name in &documented {
        assert!(scrape.has(name), "{name} is documented but not served");
        assert!(
            page.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }

    let lines = relay.json_lines();
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string())
    );
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "ERROR"
                && l["message"].as_str().is_some_and(|m| m.contains("dead"))),
        "dead letters are logged as errors"
    );
    assert_eq!(relay.terminate().await, Some(0));
}

/// A channel on which every publish to an exchange is nacked is replaced
/// (RabbitMQ 3.10 quorum queues can nack a channel opened during their
/// election for good: see `nack_runs`), without an outage; the nacks still
/// count as attempts, and another exchange's rows flow throughout.
#[tokio::test]
async fn relay_renews_a_channel_whose_publishes_to_an_exchange_are_all_nacked() {
    let db = TestDb::with_outbox().await;
    let good = Topology::fanout().await;
    let nacking = nacking_exchange(&good.channel).await;
    let client = db.connect().await;
    let env = [
        ("OUTBOX_MAX_ATTEMPTS", "2"),
        ("OUTBOX_RETRY_BASE_MS", "200"),
    ];
    let (relay, addr) = start_logged_relay(&db, &env).await;
    let addr = addr.as_str();
    wait_for_metric(addr, "outbox_listener_connected", &[], |v| v == 1.0).await;
    assert_eq!(
        Scrape::of(addr)
            .await
            .value("outbox_channel_renewals_total", &[]),
        0.0
    );
    client
        .batch_execute(&format!(
            "INSERT INTO outbox.messages (exchange, routing_key, payload) \
             SELECT '{nacking}', '', '{{}}' FROM generate_series(1, 20)"
        ))
        .await
        .expect("rows for the nacking exchange");
    wait_for_metric(addr, "outbox_channel_renewals_total", &[], |n| n >= 1.0).await;
    enqueue(&client, &good.exchange, "", &json!({ "after": "renewal" })).await;
    assert_eq!(good.receive(1, PATIENCE).await.len(), 1);
    // Both attempts of each nacked row counted; none was an outage.
    wait_for_metric(addr, "outbox_dead_messages", &[], |n| n == 20.0).await;
    let scrape = Scrape::of(addr).await;
    assert_eq!(
        scrape.value("outbox_publish_failures_total", &[("reason", "nack")]),
        40.0
    );
    assert_eq!(scrape.value("outbox_outages_total", &[]), 0.0);
    assert_eq!(relay.terminate().await, Some(0));
}
