//! The Python consumer (`examples/python-consumer`) behind a real relay and
//! RabbitMQ: each order applied once, poison dead-lettered, and a key's
//! messages applied in number order.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use lapin::ExchangeKind;
use lapin::options::{
    BasicPublishOptions, ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use outbox_relay::Settings;
use outbox_tests::broker::{Topology, message_id};
use outbox_tests::dispatch::{Publisher, wait_until};
use outbox_tests::relay::{RunningRelay, test_settings};
use outbox_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use uuid::Uuid;

use super::{RUN_LIMIT, count, enqueued, example, run};

/// The consumer on `exchange`/`queue`, writing into `db`.
fn consumer(db: &TestDb, exchange: &str, queue: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(example("python-consumer"));
    command
        .args(["--amqp-url", &amqp_url(), "--exchange", exchange])
        .args(["--queue", queue])
        .args(extra)
        .env("DATABASE_URL", &db.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    command
}

/// Orders from all three producers go through the relay to the Python
/// consumer, with a duplicate of one and a poison message at the head of
/// the queue: each order has exactly one delivery, the duplicate changed
/// nothing, the poison was dead-lettered and blocked nobody.
#[tokio::test]
async fn python_consumer_applies_each_order_once_and_dead_letters_poison() {
    let orders_db = TestDb::with_outbox().await;
    let dispatch_db = TestDb::empty().await;
    let exchange = unique_name("examples_ex");
    let queue = unique_name("examples_q");

    let extra = ["--max-messages", "5", "--idle-exit-seconds", "60"];
    let (mut child, mut lines) = start_consumer(&dispatch_db, &exchange, &queue, &extra).await;

    // The poison first: everything after it must still get through.
    let broker = broker::connect().await;
    let channel = broker.create_channel().await.expect("channel");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirms");
    let poison = Uuid::new_v4();
    let properties = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    channel
        .basic_publish(
            exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            b"{\"orderId\": 1,",
            properties
                .clone()
                .with_message_id(poison.to_string().into()),
        )
        .await
        .expect("publish poison")
        .await
        .expect("confirm poison");

    // One order from each producer, then the relay.
    let mut messages = BTreeMap::new();
    let mut by_lang = BTreeMap::new();
    for (lang, order_id) in [("java", "100001"), ("node", "100002"), ("python", "100003")] {
        let produced = run(
            lang,
            Some(&orders_db.url),
            &[order_id],
            &[("OUTBOX_EXCHANGE", &exchange)],
        )
        .await;
        let (order_id, message_id) = enqueued(lang, &produced);
        messages.insert(message_id, order_id);
        by_lang.insert(lang, message_id);
    }
    let relay = RunningRelay::start(test_settings(&orders_db)).await;
    let orders = orders_db.connect().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count(
        &orders,
        "SELECT count(*) FROM outbox.messages WHERE published_at IS NULL",
    )
    .await
        > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay did not publish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The node order's message again, as a relay that crashed between
    // confirm and mark would publish it: same message_id, same body.
    let duplicate = by_lang["node"];
    let payload: Vec<u8> = orders
        .query_one(
            "SELECT payload FROM outbox.messages WHERE message_id = $1",
            &[&duplicate],
        )
        .await
        .expect("payload")
        .get(0);
    channel
        .basic_publish(
            exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &payload,
            properties.with_message_id(duplicate.to_string().into()),
        )
        .await
        .expect("publish duplicate")
        .await
        .expect("confirm duplicate");

    assert_stops_saying(
        &mut child,
        &mut lines,
        "processed=3 duplicates=1 rejected=1",
    )
    .await;
    relay.stop().await;

    // Effects exactly once, each made by its order's message.
    let dispatch = dispatch_db.connect().await;
    let deliveries: BTreeMap<Uuid, i64> = dispatch
        .query("SELECT message_id, order_id FROM deliveries", &[])
        .await
        .expect("deliveries")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(deliveries, messages);
    assert_eq!(count(&dispatch, "SELECT count(*) FROM deliveries").await, 3);
    let inbox: BTreeSet<Uuid> = dispatch
        .query("SELECT message_id FROM inbox", &[])
        .await
        .expect("inbox")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(inbox, messages.keys().copied().collect());

    // The poison is in the dead-letter queue, and nothing else.
    let connection = broker::connect().await;
    let dead = Topology {
        exchange: format!("{queue}.dlx"),
        queue: format!("{queue}.dead"),
        channel: connection.create_channel().await.expect("channel"),
        connection,
    };
    let dead_lettered = dead.receive(2, Duration::from_secs(2)).await;
    let ids: Vec<Uuid> = dead_lettered.iter().map(message_id).collect();
    assert_eq!(ids, vec![poison]);

    // Run again: the queue is empty (nothing was requeued), the consumer's
    // tables are reused, and it stops when idle.
    let again = consumer(
        &dispatch_db,
        &exchange,
        &queue,
        &["--idle-exit-seconds", "1"],
    )
    .output()
    .await
    .expect("run the consumer again");
    assert!(again.status.success(), "consumer exited {}", again.status);
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        format!(
            "consuming queue={queue} exchange={exchange}\nprocessed=0 duplicates=0 rejected=0\n"
        )
    );
    assert_eq!(count(&dispatch, "SELECT count(*) FROM deliveries").await, 3);

    remove_declared(&exchange, &queue).await;
}

/// The consumer declares durable names: takes them away.
async fn remove_declared(exchange: &str, queue: &str) {
    let connection = broker::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    for name in [queue.to_string(), format!("{queue}.dead")] {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for name in [exchange.to_string(), format!("{queue}.dlx")] {
        let _ = channel
            .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// Starts the consumer and waits for its `consuming` line; returns it and
/// its stdout's next lines.
async fn start_consumer(
    db: &TestDb,
    exchange: &str,
    queue: &str,
    extra: &[&str],
) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = consumer(db, exchange, queue, extra)
        .spawn()
        .expect("spawn the consumer");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(RUN_LIMIT, lines.next_line())
        .await
        .expect("the consumer never said it was consuming")
        .expect("read the consumer's stdout");
    assert_eq!(
        ready.as_deref(),
        Some(format!("consuming queue={queue} exchange={exchange}").as_str())
    );
    (child, lines)
}

/// Waits for the consumer to stop by itself (`--max-messages`), cleanly,
/// printing `summary`.
async fn assert_stops_saying(
    child: &mut Child,
    lines: &mut Lines<BufReader<ChildStdout>>,
    summary: &str,
) {
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait())
        .await
        .expect("the consumer did not stop after its --max-messages")
        .expect("wait for the consumer");
    let said = lines.next_line().await.expect("read summary");
    assert!(status.success(), "consumer exited {status}");
    assert_eq!(said.as_deref(), Some(summary));
}

/// The order ids of the consumer's effects, in the order they committed.
async fn applied_orders(client: &tokio_postgres::Client) -> Vec<i64> {
    client
        .query("SELECT order_id FROM deliveries ORDER BY id", &[])
        .await
        .expect("deliveries")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// An order message of `key` numbered `seq` (no key: a keyless one), as
/// the relay publishes it.
async fn publish_order(publisher: &Publisher, order_id: i64, keyed: Option<(&str, i64)>, id: Uuid) {
    let mut headers = FieldTable::default();
    if let Some((key, seq)) = keyed {
        headers.insert("x-outbox-key".into(), AMQPValue::LongString(key.into()));
        headers.insert("x-outbox-seq".into(), AMQPValue::LongLongInt(seq));
    }
    let body = serde_json::json!({ "orderId": order_id, "num": 1 }).to_string();
    let properties = lapin::BasicProperties::default()
        .with_message_id(id.to_string().into())
        .with_content_type("application/json".into())
        .with_headers(headers);
    publisher.raw(body.as_bytes(), properties).await;
}

/// A key's messages arriving out of number order (as they do when the
/// relay pipelines a key and one of them is nacked and retried) are
/// applied in number order, without holding up other messages; an early
/// message whose predecessor never comes is applied after
/// `--key-gap-wait`; a copy changes nothing. The watermarks are in
/// `inbox_keys`.
#[tokio::test]
async fn python_consumer_applies_a_keys_messages_in_number_order() {
    let db = TestDb::empty().await;
    let exchange = unique_name("examples_keys_ex");
    let queue = unique_name("examples_keys_q");
    let extra = [
        "--key-gap-wait",
        "1",
        "--max-messages",
        "6",
        "--idle-exit-seconds",
        "60",
    ];
    let (mut child, mut lines) = start_consumer(&db, &exchange, &queue, &extra).await;

    let publisher = Publisher::new(&exchange).await;
    let second = Uuid::new_v4();
    publish_order(&publisher, 102, Some(("customer-a", 2)), second).await;
    publish_order(&publisher, 103, Some(("customer-a", 3)), Uuid::new_v4()).await;
    // Its number 1 never comes.
    publish_order(&publisher, 202, Some(("customer-b", 2)), Uuid::new_v4()).await;
    publish_order(&publisher, 300, None, Uuid::new_v4()).await;
    publish_order(&publisher, 101, Some(("customer-a", 1)), Uuid::new_v4()).await;
    publish_order(&publisher, 102, Some(("customer-a", 2)), second).await;

    assert_stops_saying(
        &mut child,
        &mut lines,
        "processed=5 duplicates=1 rejected=0",
    )
    .await;

    let client = db.connect().await;
    let applied = applied_orders(&client).await;
    let of_a: Vec<i64> = applied.iter().copied().filter(|o| o / 100 == 1).collect();
    assert_eq!(of_a, [101, 102, 103], "key a in number order: {applied:?}");
    let position = |order| applied.iter().position(|o| *o == order);
    assert!(
        position(300) < position(101),
        "the keyless message did not wait for key a: {applied:?}"
    );
    assert!(position(202).is_some(), "key b's gap accepted: {applied:?}");
    let watermarks: BTreeMap<String, i64> = client
        .query("SELECT key, last FROM inbox_keys", &[])
        .await
        .expect("inbox_keys")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let expected = BTreeMap::from([("customer-a".to_string(), 3), ("customer-b".to_string(), 2)]);
    assert_eq!(watermarks, expected);

    remove_declared(&exchange, &queue).await;
}

/// End to end with the relay's default settings (keys pipelined): a key's
/// first row fails (its exchange is missing) while the four behind it,
/// published in the same claim, are confirmed and reach the queue first;
/// once the exchange exists (bound to the consumer's), the first row's
/// retry arrives, and the consumer applies the five in order.
#[tokio::test]
async fn python_consumer_keeps_a_keys_order_behind_a_pipelining_relay() {
    let orders_db = TestDb::with_outbox().await;
    let dispatch_db = TestDb::empty().await;
    let exchange = unique_name("examples_pipe_ex");
    let late = unique_name("examples_pipe_late");
    let queue = unique_name("examples_pipe_q");
    let extra = [
        "--key-gap-wait",
        "60",
        "--max-messages",
        "5",
        "--idle-exit-seconds",
        "120",
    ];
    let (mut child, mut lines) = start_consumer(&dispatch_db, &exchange, &queue, &extra).await;

    let orders = orders_db.connect().await;
    for order_id in 1..=5_i64 {
        let target = if order_id == 1 { &late } else { &exchange };
        orders
            .execute(
                "SELECT outbox.enqueue($1, '', $2::jsonb, '{}', 'customer-7')",
                &[target, &serde_json::json!({ "orderId": order_id })],
            )
            .await
            .expect("enqueue");
    }
    let settings = Settings {
        max_attempts: Some(1_000),
        ..test_settings(&orders_db)
    };
    let relay = RunningRelay::start(settings).await;
    let first_failed = "SELECT attempts::int8 FROM outbox.messages ORDER BY id LIMIT 1";
    let rest_published = "SELECT count(*) FROM outbox.messages WHERE id > (SELECT min(id) FROM outbox.messages) \
         AND published_at IS NOT NULL";
    wait_until(
        "the first row failed and the rest were published",
        || async {
            count(&orders, first_failed).await >= 1 && count(&orders, rest_published).await == 4
        },
    )
    .await;

    let connection = broker::connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            late.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the late exchange");
    channel
        .exchange_bind(
            exchange.as_str().into(),
            late.as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind it to the consumer's");
    assert_stops_saying(
        &mut child,
        &mut lines,
        "processed=5 duplicates=0 rejected=0",
    )
    .await;
    relay.stop().await;

    let dispatch = dispatch_db.connect().await;
    let applied = applied_orders(&dispatch).await;
    assert_eq!(applied, [1, 2, 3, 4, 5], "applied in the key's order");
    let watermark = "SELECT last FROM inbox_keys WHERE key = 'customer-7'";
    assert_eq!(count(&dispatch, watermark).await, 5);

    let _ = channel
        .exchange_delete(late.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    remove_declared(&exchange, &queue).await;
}
