//! Enqueue from SQL and from Rust commits and rolls back with the caller's
//! transaction; per-key ids follow commit order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outbox::Message;
use outbox_tests::*;
use serde_json::json;
use uuid::Uuid;

async fn count(client: &tokio_postgres::Client, id: Uuid) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM outbox.messages WHERE message_id = $1",
            &[&id],
        )
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn sql_enqueue_commits_and_rolls_back_with_the_transaction() {
    let db = TestDb::with_outbox().await;
    let mut client = db.connect().await;
    client
        .batch_execute("CREATE TABLE orders (id bigint PRIMARY KEY)")
        .await
        .expect("app table");

    let tx = client.transaction().await.expect("begin");
    tx.execute("INSERT INTO orders VALUES (1)", &[])
        .await
        .expect("order");
    let committed: Uuid = tx
        .query_one(
            "SELECT outbox.enqueue('order_confirm_fanoutExchange', '', $1::jsonb, '{\"h\": 1}')",
            &[&json!({"orderId": 1})],
        )
        .await
        .expect("enqueue")
        .get(0);
    tx.commit().await.expect("commit");

    let tx = client.transaction().await.expect("begin");
    let rolled_back: Uuid = tx
        .query_one(
            "SELECT outbox.enqueue_bytes('ex', 'rk', '\\x0a0b'::bytea, 'application/x-protobuf')",
            &[],
        )
        .await
        .expect("enqueue bytes")
        .get(0);
    assert_eq!(
        count(tx.client(), rolled_back).await,
        1,
        "visible inside its own tx"
    );
    tx.rollback().await.expect("rollback");

    assert_eq!(count(&client, committed).await, 1);
    assert_eq!(
        count(&client, rolled_back).await,
        0,
        "rolled-back message exists"
    );
    let row = client
        .query_one(
            "SELECT exchange, payload, content_type, headers FROM outbox.messages WHERE message_id = $1",
            &[&committed],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "order_confirm_fanoutExchange");
    let payload: serde_json::Value =
        serde_json::from_slice(row.get::<_, &[u8]>(1)).expect("payload is JSON");
    assert_eq!(payload, json!({"orderId": 1}));
    assert_eq!(row.get::<_, String>(2), "application/json");
    assert_eq!(row.get::<_, serde_json::Value>(3), json!({"h": 1}));
}

#[tokio::test]
async fn rust_enqueue_commits_and_rolls_back_with_the_transaction() {
    let db = TestDb::with_outbox().await;
    let mut client = db.connect().await;

    let message = Message::bytes(
        "ex",
        "rk",
        vec![0_u8, 159, 146, 150],
        "application/x-protobuf",
    )
    .expect("valid")
    .header("tenant", "acme")
    .header("version", 3)
    .ordering_key("order-7");
    let tx = client.transaction().await.expect("begin");
    let committed = outbox::enqueue(&tx, &message).await.expect("enqueue");
    tx.commit().await.expect("commit");

    let tx = client.transaction().await.expect("begin");
    let rolled_back = outbox::enqueue(
        &tx,
        &Message::json("ex", "", &json!({"n": 2})).expect("json"),
    )
    .await
    .expect("enqueue");
    tx.rollback().await.expect("rollback");

    assert_eq!(
        count(&client, rolled_back).await,
        0,
        "rolled-back message exists"
    );
    let row = client
        .query_one(
            "SELECT payload, content_type, headers, ordering_key, attempts, published_at IS NULL \
             FROM outbox.messages WHERE message_id = $1",
            &[&committed],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, Vec<u8>>(0), vec![0_u8, 159, 146, 150]);
    assert_eq!(row.get::<_, String>(1), "application/x-protobuf");
    assert_eq!(
        row.get::<_, serde_json::Value>(2),
        json!({"tenant": "acme", "version": 3})
    );
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("order-7"));
    assert_eq!(row.get::<_, i32>(4), 0);
    assert!(row.get::<_, bool>(5), "new message is pending");
}

#[tokio::test]
async fn schema_rejects_what_the_broker_would() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    let headers_not_object = client
        .execute("SELECT outbox.enqueue('ex', '', '{}', '[1, 2]')", &[])
        .await;
    assert!(headers_not_object.is_err(), "array headers accepted");
    let long_exchange = client
        .execute("SELECT outbox.enqueue(repeat('x', 256), '', '{}')", &[])
        .await;
    assert!(long_exchange.is_err(), "256-byte exchange accepted");
}

/// Two transactions enqueuing the same key commit in id order: the second
/// waits for the first, so a relay never sees id 11 of a key before id 10.
#[tokio::test]
async fn same_key_enqueuers_commit_in_id_order() {
    let db = TestDb::with_outbox().await;
    let mut first = db.connect().await;
    let second = db.connect().await;
    let keyed = Message::json("ex", "", &json!({}))
        .expect("json")
        .ordering_key("k");

    let first_tx = first.transaction().await.expect("begin");
    let first_id = outbox::enqueue(&first_tx, &keyed).await.expect("enqueue 1");

    let second_done = Arc::new(AtomicBool::new(false));
    let done = second_done.clone();
    let second_message = keyed.clone();
    let second_task = tokio::spawn(async move {
        let id = outbox::enqueue(&second, &second_message)
            .await
            .expect("enqueue 2");
        done.store(true, Ordering::SeqCst);
        id
    });

    // A different key is not held up by the open transaction.
    let other = db.connect().await;
    let other_key = Message::json("ex", "", &json!({}))
        .expect("json")
        .ordering_key("other");
    tokio::time::timeout(Duration::from_secs(10), outbox::enqueue(&other, &other_key))
        .await
        .expect("other key blocked")
        .expect("enqueue other");

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second_done.load(Ordering::SeqCst),
        "same-key enqueue committed while an earlier one was open"
    );
    first_tx.commit().await.expect("commit 1");
    let second_id = second_task.await.expect("task");

    let ids = first
        .query(
            "SELECT message_id FROM outbox.messages WHERE ordering_key = 'k' ORDER BY id",
            &[],
        )
        .await
        .expect("ids");
    let order: Vec<Uuid> = ids.iter().map(|row| row.get(0)).collect();
    assert_eq!(order, vec![first_id, second_id]);
}
