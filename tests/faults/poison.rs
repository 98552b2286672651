//! Scenario 7: poison and unroutable messages mixed into the stream. Poison
//! (bodies that are not orders) is published and dead-lettered by the
//! consumer with a reason; unroutable rows (missing exchange, no binding)
//! die in the outbox after their attempts. Neither holds up the orders.

use std::collections::HashSet;
use std::time::Duration;

use outbox_tests::books::{Expected, load_client, settle_and_check, start_load};
use outbox_tests::dispatch::{header, take};
use outbox_tests::pipeline::Pipeline;
use outbox_tests::{broker::message_id, unique_name};
use uuid::Uuid;

const EXTRAS: usize = 210;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_poison_and_unroutable_mixed_in() {
    let mut pipeline = Pipeline::start(1, &[], &[]).await;
    let load = start_load(&pipeline.app.url, &pipeline.names.exchange);
    let client = load_client(&pipeline.app.url).await;
    let exchange = pipeline.names.exchange.clone();
    let missing_exchange = unique_name("no_such_exchange");
    let (mut poison, mut unroutable) = (HashSet::new(), HashSet::new());
    for i in 0..EXTRAS {
        tokio::time::sleep(Duration::from_millis(45)).await;
        let enqueue = |exchange: &str, routing_key: &str, payload: Vec<u8>, content_type: &str| {
            let message = outbox::Message::bytes(exchange, routing_key, payload, content_type)
                .expect("message");
            let client = &client;
            async move { outbox::enqueue(client, &message).await.expect("enqueue") }
        };
        let json = "application/json";
        let order =
            serde_json::json!({"orderId": 900_000 + i, "userName": "x", "context": "y", "num": 1});
        let id: Uuid = match i % 7 {
            0 => enqueue(&exchange, "", b"not json".to_vec(), json).await,
            1 => enqueue(&exchange, "", Vec::new(), json).await,
            2 => enqueue(&exchange, "", vec![0xff, 0xfe, b'{', 0x80], json).await,
            3 => enqueue(&exchange, "", order.to_string().into_bytes(), "text/plain").await,
            4 => {
                enqueue(
                    &exchange,
                    "",
                    br#"{"userName": "no order id"}"#.to_vec(),
                    json,
                )
                .await
            }
            5 => {
                let id = enqueue(&missing_exchange, "", b"{}".to_vec(), json).await;
                unroutable.insert(id);
                continue;
            }
            _ => {
                let id = enqueue("amq.direct", &unique_name("nobody"), b"{}".to_vec(), json).await;
                unroutable.insert(id);
                continue;
            }
        };
        poison.insert(id);
    }
    let load = load.await.expect("load");
    settle_and_check(
        &mut pipeline,
        &load,
        &Expected {
            dead: unroutable.clone(),
            not_orders: poison.len(),
        },
        "7. poison and unroutable mixed in",
        &format!("{} poison, {} unroutable", poison.len(), unroutable.len()),
    )
    .await;

    let app = pipeline.app.connect().await;
    for row in app
        .query(
            "SELECT last_error FROM outbox.messages WHERE dead_at IS NOT NULL",
            &[],
        )
        .await
        .expect("dead rows")
    {
        let error: String = row.get(0);
        assert!(
            error.contains("does not exist") || error.contains("unroutable"),
            "{error}"
        );
    }
    let dead_lettered = take(&pipeline.names.dead_letter_queue, poison.len()).await;
    let ids: HashSet<Uuid> = dead_lettered.iter().map(message_id).collect();
    assert_eq!(ids, poison, "dead-letter queue holds exactly the poison");
    for delivery in &dead_lettered {
        let reason = header(delivery, "x-consumer-error").expect("a reason");
        assert!(!reason.is_empty());
    }
}
