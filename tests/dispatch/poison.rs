//! Poison, forged counts and exhausted retries go to the dead-letter queue
//! while keys keep their order and good messages keep flowing.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use outbox_tests::dispatch::*;
use serde_json::json;
use uuid::Uuid;

use super::{Fixture, dispatch_db, inbox};

/// Test 3: poison between good messages. The good ones all land; each
/// poison one sits in the dead-letter queue with its reason.
/// A JSON message under a new id, with these headers.
fn order_with_headers<const N: usize>(headers: [(&str, AMQPValue); N]) -> BasicProperties {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert(name.into(), value);
    }
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(Uuid::new_v4().to_string().into())
        .with_headers(table)
}

/// A keyed order dead-lettered as poison still moves its key's watermark
/// (`dispatch.inbox_keys`): a consumer that starts later expects the number
/// after it, instead of waiting `key_gap_wait` for a message that is gone.
/// Without it the watermark stayed at 1.
#[tokio::test]
async fn dispatch_a_dead_lettered_keyed_order_moves_its_keys_watermark() {
    let fixture = Fixture::start().await;
    let keyed = |seq: i64| {
        order_with_headers([
            ("x-outbox-key", AMQPValue::LongString("c-7".into())),
            ("x-outbox-seq", AMQPValue::LongLongInt(seq)),
        ])
    };
    fixture.publisher.raw(br#"{"orderId": 1}"#, keyed(1)).await;
    fixture.publisher.raw(b"not json", keyed(2)).await;
    fixture.wait_for_deliveries(1).await;
    assert_eq!(take(&fixture.names.dead_letter_queue, 1).await.len(), 1);
    wait_until("the watermark passes the dead letter", || async {
        count(
            &fixture.db,
            "SELECT coalesce(max(last_seq), 0) FROM dispatch.inbox_keys \
             WHERE ordering_key = 'c-7'::bytea",
        )
        .await
            == 2
    })
    .await;
    fixture.stop_with_queues_empty().await;
}

/// A keyed order whose key is too large for the watermark table's index
/// (a hostile publisher's: the relay's keys fit an index already) is
/// poison on its first delivery, and the order beside it lands. As a
/// transient failure it was retried in its lane for 15 s first.
#[tokio::test]
async fn dispatch_dead_letters_a_key_too_large_to_index_at_once() {
    let fixture = Fixture::start().await;
    let huge: String = (0..600)
        .map(|_| Uuid::new_v4().simple().to_string())
        .collect();
    let properties = order_with_headers([
        ("x-outbox-key", AMQPValue::LongString(huge.as_str().into())),
        ("x-outbox-seq", AMQPValue::LongLongInt(1)),
    ]);
    fixture
        .publisher
        .raw(br#"{"orderId": 1}"#, properties)
        .await;
    fixture.publisher.order(2).await;
    let dead = take(&fixture.names.dead_letter_queue, 1).await;
    assert_eq!(dead.len(), 1);
    let error = header(&dead[0], "x-consumer-error").unwrap_or_default();
    assert!(error.contains("index row"), "{error}");
    assert_eq!(
        header(&dead[0], "x-consumer-deliveries").as_deref(),
        Some("1")
    );
    fixture.wait_for_deliveries(1).await;
    fixture.stop_with_queues_empty().await;
}

#[tokio::test]
async fn dispatch_dead_letters_poison_and_keeps_going() {
    let fixture = Fixture::start().await;
    let json = || BasicProperties::default().with_content_type("application/json".into());
    let with_id = || json().with_message_id(Uuid::new_v4().to_string().into());
    let poison: [(&[u8], BasicProperties, &str); 5] = [
        (br#"{"orderId": 90}"#, json(), "no message_id"),
        (b"not json", with_id(), "body is not an order"),
        (br#"{"id": 91}"#, with_id(), "missing field `orderId`"),
        (
            br#"{"orderId": 92}"#,
            json().with_message_id("order-92".into()),
            "not a UUID",
        ),
        (
            br#"{"orderId": 93}"#,
            with_id().with_content_type("text/plain".into()),
            "content type",
        ),
    ];
    let mut good = 0;
    for (body, properties, _) in &poison {
        good += 1;
        fixture.publisher.order(good).await;
        fixture.publisher.raw(body, properties.clone()).await;
    }
    good += 1;
    fixture.publisher.order(good).await;

    fixture.wait_for_deliveries(good).await;
    let dead = take(&fixture.names.dead_letter_queue, poison.len()).await;
    assert_eq!(dead.len(), poison.len());
    // Handlers run concurrently, so dead letters may arrive in any order.
    for (body, _, reason) in &poison {
        let delivery = dead.iter().find(|d| d.data == *body);
        let error = delivery.and_then(|d| header(d, "x-consumer-error"));
        assert!(
            error.as_deref().is_some_and(|e| e.contains(reason)),
            "{}: {error:?}",
            String::from_utf8_lossy(body)
        );
    }
    fixture.stop_with_queues_empty().await;
}

/// A publisher cannot forge the counts that dead-letter a message: a fresh
/// order carrying `x-consumer-retries: 99` and `x-delivery-count: 99` is
/// its first delivery, and lands (it was dead-lettered at once before).
#[tokio::test]
async fn dispatch_a_fresh_message_cannot_forge_its_delivery_count() {
    let fixture = Fixture::start().await;
    let properties = order_with_headers([
        ("x-consumer-retries", AMQPValue::LongUInt(99)),
        ("x-delivery-count", AMQPValue::LongLongInt(99)),
    ]);
    fixture
        .publisher
        .raw(br#"{"orderId": 7}"#, properties)
        .await;
    fixture.wait_for_deliveries(1).await;
    let dead_letter_queue = fixture.names.dead_letter_queue.clone();
    fixture.stop_with_queues_empty().await;
    assert_eq!(ready(&dead_letter_queue).await, 0);
}

/// A keyed order that fails transiently is retried in its lane, so its
/// key's later orders commit after it: through the retry queue, as before,
/// they passed it (orders 6 to 10 landed before 5).
#[tokio::test]
async fn dispatch_retries_a_keyed_message_in_place_and_keeps_its_key_in_order() {
    let db = dispatch_db().await;
    // Order 5 fails twice, then lands.
    fail_order(&db, 5, Some(2)).await;
    let settings = test_settings(&db);
    let fixture = Fixture::start_with(db, settings).await;
    for order_id in 1..=10 {
        let mut headers = FieldTable::default();
        headers.insert(
            outbox_consumer::KEY_HEADER.into(),
            AMQPValue::LongString("customer-1".into()),
        );
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(Uuid::new_v4().to_string().into())
            .with_headers(headers);
        let body = json!({ "orderId": order_id }).to_string();
        fixture.publisher.raw(body.as_bytes(), properties).await;
    }
    fixture.wait_for_deliveries(10).await;
    let committed: Vec<i64> = fixture
        .db
        .connect()
        .await
        .query("SELECT order_id FROM dispatch.deliveries ORDER BY id", &[])
        .await
        .expect("deliveries")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(committed, (1..=10).collect::<Vec<i64>>());
    fixture.stop_with_queues_empty().await;
}

/// Test 6: an order whose insert always fails with a serialization failure
/// is retried, then dead-lettered after the configured deliveries, while
/// the others land.
async fn dead_letters_a_message_that_keeps_failing(queue_type: &str) {
    let db = dispatch_db().await;
    fail_order_666(&db).await;
    let mut settings = test_settings(&db);
    settings.queue_type = Some(queue_type.into());
    let fixture = Fixture::start_with(db, settings).await;
    let doomed = fixture.publisher.order(666).await;
    for order_id in 1..=5 {
        fixture.publisher.order(order_id).await;
    }
    fixture.wait_for_deliveries(5).await;
    let dead = take(&fixture.names.dead_letter_queue, 1).await;
    assert_eq!(dead.len(), 1);
    let message_id = dead[0].properties.message_id().as_ref();
    assert_eq!(message_id.map(|m| m.to_string()), Some(doomed.to_string()));
    let error = header(&dead[0], "x-consumer-error").unwrap_or_default();
    // The trigger's own text ("order 666 conflicts") may quote values:
    // its SQLSTATE is what the dead letter says.
    assert!(
        error.contains("delivery 3 of 3")
            && error.contains("40001 serialization_failure")
            && !error.contains("666"),
        "{error}"
    );
    assert_eq!(
        header(&dead[0], "x-consumer-deliveries").as_deref(),
        Some("3")
    );
    // The first two failures went through the retry queue.
    assert_eq!(header(&dead[0], "x-consumer-retries").as_deref(), Some("2"));
    let db = fixture.stop_with_queues_empty().await;
    assert_eq!(inbox(&db).await, 5, "the doomed message left no inbox row");
}

#[tokio::test]
async fn dispatch_dead_letters_a_message_that_keeps_failing() {
    dead_letters_a_message_that_keeps_failing("classic").await;
}

#[tokio::test]
async fn dispatch_dead_letters_a_message_that_keeps_failing_on_quorum_queues() {
    dead_letters_a_message_that_keeps_failing("quorum").await;
}
