//! What a capture publishes: changes with routing keys, payloads and
//! per-row order; chosen operations and columns; templates with dollar quotes.

use std::collections::HashMap;
use std::time::Duration;

use lapin::ExchangeKind;
use outbox_tests::broker::Topology;
use outbox_tests::relay::{RunningRelay, test_settings};
use outbox_tests::*;
use serde_json::{Value, json};

use super::{capture_cli, create_orders, header};

const ARRIVAL: Duration = Duration::from_secs(60);

#[tokio::test]
async fn captured_changes_arrive_with_routing_keys_payloads_and_per_row_order() {
    let db = TestDb::with_outbox().await;
    let mut client = db.connect().await;
    create_orders(&client).await;
    let topology = Topology::new(ExchangeKind::Topic, "orders.#").await;

    let add = |table| {
        [
            "add",
            table,
            "--exchange",
            &topology.exchange,
            "--routing-key",
            "orders.{op}.{user_name}",
            "--ordering-key",
            "order-{id}",
        ]
    };
    let added = capture_cli(&db.url, &add("orders")).await;
    assert!(added.expect_code(0).contains("capturing public.orders"));
    // The same capture again, the table named another way: nothing changes.
    let again = capture_cli(&db.url, &add("public.orders")).await;
    assert!(again.expect_code(0).contains("nothing changed"));
    let listed = capture_cli(&db.url, &["list"]).await;
    assert!(listed.expect_code(0).contains("public.orders"));
    assert!(listed.stdout.contains("order-{id}"), "{listed:?}");

    // A rolled-back change leaves no message.
    let tx = client.transaction().await.expect("begin");
    tx.execute("INSERT INTO orders VALUES (99, 'ghost', 'never', 9)", &[])
        .await
        .expect("insert");
    tx.rollback().await.expect("rollback");

    // Order 1 and 2 change in interleaved transactions, order 3 in one
    // statement with order 2's update.
    let statements = [
        "INSERT INTO orders VALUES (1, 'zhang', 'noodles', 1), (2, 'li', 'rice', 2)",
        "UPDATE orders SET num = 10 WHERE id = 1",
        "UPDATE orders SET num = 20 WHERE id = 2; INSERT INTO orders VALUES (3, 'wang', 'tea', 3)",
        "UPDATE orders SET num = 11 WHERE id = 1",
        "DELETE FROM orders WHERE id IN (1, 3)",
    ];
    for statement in statements {
        client.batch_execute(statement).await.expect("app write");
    }
    let queued: i64 = client
        .query_one("SELECT count(*) FROM outbox.messages", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        queued, 8,
        "one message per changed row, none for the rollback"
    );

    let relay = RunningRelay::start(test_settings(&db)).await;
    let mut deliveries = topology.receive(8, ARRIVAL).await;
    deliveries.extend(topology.receive(1, Duration::from_millis(500)).await);
    relay.stop().await;
    assert_eq!(
        deliveries.len(),
        8,
        "each change exactly once, nothing else"
    );

    let mut per_order: HashMap<i64, Vec<(String, Value)>> = HashMap::new();
    for delivery in &deliveries {
        assert_eq!(header(delivery, "table"), "public.orders");
        let operation = header(delivery, "operation");
        let body: Value = serde_json::from_slice(&delivery.data).expect("JSON body");
        let row = if operation == "update" {
            &body["new"]
        } else {
            &body
        };
        let id = row["id"].as_i64().expect("id");
        let user = row["user_name"].as_str().expect("user_name");
        assert_eq!(
            delivery.routing_key.as_str(),
            format!("orders.{operation}.{user}")
        );
        per_order.entry(id).or_default().push((operation, body));
    }
    let row = |id: i64, user: &str, context: &str, num: i64| json!({"id": id, "user_name": user, "context": context, "num": num});
    let change = |old: Value, new: Value| json!({"old": old, "new": new});
    assert_eq!(
        per_order[&1],
        vec![
            ("insert".into(), row(1, "zhang", "noodles", 1)),
            (
                "update".into(),
                change(
                    row(1, "zhang", "noodles", 1),
                    row(1, "zhang", "noodles", 10)
                )
            ),
            (
                "update".into(),
                change(
                    row(1, "zhang", "noodles", 10),
                    row(1, "zhang", "noodles", 11)
                )
            ),
            ("delete".into(), row(1, "zhang", "noodles", 11)),
        ]
    );
    assert_eq!(
        per_order[&2],
        vec![
            ("insert".into(), row(2, "li", "rice", 2)),
            (
                "update".into(),
                change(row(2, "li", "rice", 2), row(2, "li", "rice", 20))
            ),
        ]
    );
    assert_eq!(
        per_order[&3],
        vec![
            ("insert".into(), row(3, "wang", "tea", 3)),
            ("delete".into(), row(3, "wang", "tea", 3)),
        ]
    );
    let keys: Vec<String> = client
        .query(
            "SELECT DISTINCT ordering_key FROM outbox.messages ORDER BY 1",
            &[],
        )
        .await
        .expect("keys")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(keys, ["order-1", "order-2", "order-3"]);
}

#[tokio::test]
async fn chosen_operations_and_columns_shape_the_message() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    create_orders(&client).await;
    let changed: bool = client
        .query_one(
            "SELECT outbox.capture('orders', 'shop', '{schema}.{table}.{id}', \
             operations => '{delete,insert}', columns => '{id,num}')",
            &[],
        )
        .await
        .expect("capture")
        .get(0);
    assert!(changed);
    client
        .batch_execute(
            "INSERT INTO orders VALUES (7, 'zhang', 'noodles', 1); \
             UPDATE orders SET num = 2; DELETE FROM orders",
        )
        .await
        .expect("app writes");
    let rows: Vec<(String, String, Value, Value, Option<String>)> = client
        .query(
            "SELECT exchange, routing_key, convert_from(payload, 'UTF8')::jsonb, headers, \
                    ordering_key FROM outbox.messages ORDER BY id",
            &[],
        )
        .await
        .expect("messages")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                "shop".into(),
                "public.orders.7".into(),
                json!({"id": 7, "num": 1}),
                json!({"table": "public.orders", "operation": "insert"}),
                None
            ),
            (
                "shop".into(),
                "public.orders.7".into(),
                json!({"id": 7, "num": 2}),
                json!({"table": "public.orders", "operation": "delete"}),
                None
            ),
        ],
        "no update captured, only the chosen columns"
    );
}

#[tokio::test]
async fn templates_may_contain_a_dollar_quote_tag() {
    let db = TestDb::with_outbox().await;
    let client = db.connect().await;
    create_orders(&client).await;
    client
        .batch_execute(
            "SELECT outbox.capture('orders', 'shop', routing_key => 'o.$capture$.{op}', \
             ordering_key => '$capture$ {id}'); \
             INSERT INTO orders VALUES (1, 'zhang', 'noodles', 1)",
        )
        .await
        .expect("capture and write");
    let row = client
        .query_one("SELECT routing_key, ordering_key FROM outbox.messages", &[])
        .await
        .expect("the message");
    assert_eq!(row.get::<_, String>(0), "o.$capture$.insert");
    assert_eq!(row.get::<_, String>(1), "$capture$ 1");
}
