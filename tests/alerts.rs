//! Dead-letter alerts under a burst: 1,000 rows dying at once reach the
//! webhook as a few summary alerts that together count all 1,000, and the
//! relay says (metric, log) how many it coalesced.

use std::time::Duration;

use lapin::ExchangeKind;
use outbox_tests::broker::Topology;
use outbox_tests::observe::{Logged, Scrape, logged_address, wait_for_metric};
use outbox_tests::receivers::http_receiver;
use outbox_tests::relay::relay_run_command;
use outbox_tests::*;

const BURST: u64 = 1000;

#[tokio::test]
async fn a_burst_of_dead_letters_is_alerted_in_a_few_calls_that_count_them_all() {
    let db = TestDb::with_outbox().await;
    // Unroutable: the only queue is bound to another key.
    let topology = Topology::new(ExchangeKind::Direct, "bound").await;
    let (webhook_url, mut webhooks) = http_receiver().await;
    db.connect()
        .await
        .execute(
            "SELECT outbox.enqueue($1, 'nowhere', jsonb_build_object('n', n)) \
             FROM generate_series(1, $2::int) AS n",
            &[&topology.exchange, &(BURST as i32)],
        )
        .await
        .expect("enqueue the burst");

    let mut command = relay_run_command(
        &db,
        &[
            ("OUTBOX_MAX_ATTEMPTS", "1"),
            ("OUTBOX_ALERT_WEBHOOK_URL", &webhook_url),
        ],
    );
    command.arg("--log-format").arg("json");
    let relay = Logged::spawn(command);
    let addr = logged_address(&relay, "serving /metrics, /healthz and /readyz", "addr").await;

    // The first alert at once, the rest after the 10 s interval.
    let mut counted = 0;
    let mut calls = 0;
    let mut alerts = Vec::new();
    while counted < BURST {
        let alert = tokio::time::timeout(Duration::from_secs(30), webhooks.recv())
            .await
            .unwrap_or_else(|_| panic!("{counted} of {BURST} alerted after {calls} calls"))
            .expect("receiver open");
        calls += 1;
        // An alert without a count stands for one message.
        counted += alert["count"].as_u64().unwrap_or(1);
        assert!(
            calls <= 3,
            "{calls} webhook calls for {counted} dead letters"
        );
        alerts.push(alert);
    }
    assert_eq!(counted, BURST);
    for alert in &alerts {
        let listed = alert["message_ids"].as_array().map(Vec::len);
        assert!(listed.is_some_and(|n| (1..=10).contains(&n)), "{alert}");
    }

    let coalesced = (BURST - calls) as f64;
    wait_for_metric(&addr, "outbox_alerts_coalesced_total", &[], |v| {
        v == coalesced
    })
    .await;
    assert_eq!(
        Scrape::of(&addr)
            .await
            .value("outbox_dead_letters_total", &[]),
        BURST as f64
    );
    // Logged before the webhook call, but read from the relay's stderr by
    // another thread, which may lag the webhook: wait for it.
    relay
        .wait_for_line("the coalesced alert", |line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.contains("coalesced"))
        })
        .await;
    assert_eq!(relay.terminate().await, Some(0));
}
