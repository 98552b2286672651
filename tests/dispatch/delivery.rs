//! Each outbox order delivered once, end to end and when repeated.

use outbox_tests::dispatch::*;
use outbox_tests::relay::{RunningRelay, test_settings as relay_settings};
use outbox_tests::*;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Fixture, inbox};

/// Test 1, end to end: orders enqueued in the order database go through
/// the outbox relay and land as deliveries, each once; the HTTP API shows
/// them. (The service migrates its empty database itself.)
#[tokio::test]
async fn dispatch_consumes_each_outbox_order_once() {
    const ORDERS: i64 = 100;
    let orders_db = TestDb::with_outbox().await;
    let db = TestDb::empty().await;
    let settings = test_settings(&db);
    let fixture = Fixture::start_with(db, settings).await;
    let relay = RunningRelay::start(relay_settings(&orders_db)).await;

    let mut client = orders_db.connect().await;
    let tx = client.transaction().await.expect("begin");
    let mut sent = Vec::new();
    for order_id in 1..=ORDERS {
        let order =
            json!({"orderId": order_id, "userName": "zhang", "context": "noodles", "num": 1});
        let message = outbox::Message::json(&fixture.names.exchange, "", &order).expect("message");
        sent.push(outbox::enqueue(&tx, &message).await.expect("enqueue"));
    }
    tx.commit().await.expect("commit");

    fixture.wait_for_deliveries(ORDERS).await;
    let mut landed: Vec<Uuid> = fixture
        .db
        .connect()
        .await
        .query("SELECT message_id FROM dispatch.deliveries", &[])
        .await
        .expect("deliveries")
        .iter()
        .map(|row| row.get(0))
        .collect();
    landed.sort();
    sent.sort();
    assert_eq!(landed, sent, "each outbox message is one delivery");
    assert_eq!(inbox(&fixture.db).await, ORDERS);

    let api = &fixture.consumer;
    let (status, body) = api.get("/deliveries/42").await;
    assert_eq!(status, 200, "{body}");
    let delivery: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (
            &delivery["orderId"],
            &delivery["rider"],
            &delivery["status"]
        ),
        (&json!(42), &json!("Zhang Fei"), &json!(0))
    );
    assert_eq!(api.get("/deliveries/999999").await.0, 404);
    assert_eq!(api.get("/deliveries/abc").await.0, 400);
    assert_eq!(api.get("/healthz").await.0, 200);
    assert_eq!(api.get("/readyz").await.0, 200);
    let (status, metrics) = api.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("consumer_messages_total{outcome=\"processed\"}"),
        "{metrics}"
    );
    relay.stop().await;
    fixture.stop_with_queues_empty().await;
}

/// Test 2: the same message three times is one delivery; another message
/// for the same order changes nothing either.
#[tokio::test]
async fn dispatch_handles_a_repeated_message_once() {
    let fixture = Fixture::start().await;
    let id = Uuid::new_v4();
    for _ in 0..3 {
        fixture.publisher.order_as(7, id).await;
    }
    fixture.publisher.order(7).await;

    wait_until("both message ids are in the inbox", || async {
        inbox(&fixture.db).await == 2 && ready(&fixture.names.queue).await == 0
    })
    .await;
    let db = fixture.stop_with_queues_empty().await;
    let row = db
        .connect()
        .await
        .query_one(
            "SELECT count(*), min(message_id::text) FROM dispatch.deliveries",
            &[],
        )
        .await
        .expect("deliveries");
    assert_eq!(row.get::<_, i64>(0), 1);
    assert_eq!(row.get::<_, String>(1), id.to_string());
}
