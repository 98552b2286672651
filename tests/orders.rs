//! The order service: an order and its outbox message commit together.

use orders::AppState;
use outbox_tests::http::request;
use outbox_tests::*;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// An order service on a free port, over its own fresh database.
struct Service {
    db: TestDb,
    addr: String,
    shutdown: CancellationToken,
}

impl Service {
    async fn start() -> Service {
        let db = TestDb::empty().await;
        let target = outbox_service::db::parse_url(&db.url, None).expect("url");
        orders::migrate(&target).await.expect("migrate");
        let pool = outbox_service::db::pool(&target, 4).await.expect("pool");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let shutdown = CancellationToken::new();
        let state = AppState {
            pool,
            exchange: "order_confirm_fanoutExchange".into(),
        };
        tokio::spawn(orders::serve(listener, state, shutdown.clone()));
        Service { db, addr, shutdown }
    }

    async fn post(&self, body: &str) -> (u16, Value) {
        let (status, body) = request(&self.addr, "POST", "/orders", Some(body)).await;
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test]
async fn an_order_and_its_message_commit_together() {
    let service = Service::start().await;
    let (status, body) = service
        .post(r#"{"orderId": 100001, "userName": "zhang", "context": "noodles", "num": 2}"#)
        .await;
    assert_eq!(status, 201, "{body}");
    let message_id: uuid::Uuid = body["messageId"]
        .as_str()
        .expect("messageId")
        .parse()
        .expect("uuid");

    let client = service.db.connect().await;
    let row = client
        .query_one(
            "SELECT exchange, convert_from(payload, 'UTF8')::jsonb FROM outbox.messages WHERE message_id = $1",
            &[&message_id],
        )
        .await
        .expect("outbox row");
    assert_eq!(row.get::<_, String>(0), "order_confirm_fanoutExchange");
    assert_eq!(
        row.get::<_, Value>(1),
        json!({"orderId": 100001, "userName": "zhang", "context": "noodles", "num": 2})
    );

    let (status, body) = request(&service.addr, "GET", "/orders/100001", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json")["num"],
        json!(2)
    );
}

#[tokio::test]
async fn duplicate_orders_conflict_and_write_no_second_message() {
    let service = Service::start().await;
    let order = r#"{"orderId": 7, "userName": "u", "context": "c", "num": 1}"#;
    assert_eq!(service.post(order).await.0, 201);
    let (status, body) = service.post(order).await;
    assert_eq!(status, 409, "{body}");
    let client = service.db.connect().await;
    let messages: i64 = client
        .query_one("SELECT count(*) FROM outbox.messages", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(messages, 1);
}

#[tokio::test]
async fn orders_without_an_id_get_one() {
    let service = Service::start().await;
    let (status, body) = service
        .post(r#"{"userName": "u", "context": "c", "num": 1}"#)
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["order"]["orderId"].as_i64().expect("generated id");
    let (status, _) = request(&service.addr, "GET", &format!("/orders/{id}"), None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn bad_requests_are_explained_and_write_nothing() {
    let service = Service::start().await;
    let cases = [
        ("{not json", "Failed to parse the request body as JSON"),
        (r#"{"userName": "u", "num": 1}"#, "context"),
        (
            r#"{"userName": "", "context": "c", "num": 1}"#,
            "userName must not be empty",
        ),
        (
            r#"{"userName": "u", "context": "c", "num": 0}"#,
            "num must be at least 1",
        ),
        (
            r#"{"userName": "u", "context": "c", "num": 1, "price": 9}"#,
            "unknown field",
        ),
    ];
    for (body, reason) in cases {
        let (status, answer) = service.post(body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{body}: {answer}");
    }
    let (status, _) = request(&service.addr, "GET", "/orders/424242", None).await;
    assert_eq!(status, 404);
    let client = service.db.connect().await;
    let rows: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM orders) + (SELECT count(*) FROM outbox.messages)",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 0);
}
