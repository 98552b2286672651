//! Typed enqueue: one INSERT into `outbox.messages` inside the caller's
//! transaction, so the message commits or rolls back with the business rows.

use serde::Serialize;
use serde_json::{Map, Value};
use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::Error;

/// AMQP short strings (exchange, routing key, content type) are length-prefixed by one byte.
const SHORT_STRING_MAX: usize = 255;

/// A message to publish once the surrounding transaction commits.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    exchange: String,
    routing_key: String,
    payload: Vec<u8>,
    content_type: String,
    headers: Map<String, Value>,
    ordering_key: Option<String>,
}

impl Message {
    /// A JSON message (`application/json`), the common case.
    pub fn json<T: Serialize + ?Sized>(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        payload: &T,
    ) -> Result<Self, Error> {
        let payload = serde_json::to_vec(payload)?;
        Self::bytes(exchange, routing_key, payload, "application/json")
    }

    /// A message with any payload, e.g. protobuf.
    pub fn bytes(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        payload: impl Into<Vec<u8>>,
        content_type: impl Into<String>,
    ) -> Result<Self, Error> {
        let message = Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            payload: payload.into(),
            content_type: content_type.into(),
            headers: Map::new(),
            ordering_key: None,
        };
        check_short("exchange", &message.exchange)?;
        check_short("routing key", &message.routing_key)?;
        check_short("content type", &message.content_type)?;
        if message.content_type.is_empty() {
            return Err(Error::InvalidMessage("content type is empty".into()));
        }
        Ok(message)
    }

    /// Adds an AMQP header (strings, numbers, booleans, arrays, objects).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Messages with the same key are published one at a time, in enqueue order.
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    pub fn content_type(&self) -> &str {
        &self.content_type
    }
}

fn check_short(what: &str, value: &str) -> Result<(), Error> {
    if value.len() > SHORT_STRING_MAX {
        return Err(Error::InvalidMessage(format!(
            "{what} is {} bytes, AMQP allows at most {SHORT_STRING_MAX}",
            value.len()
        )));
    }
    Ok(())
}

const INSERT: &str = "INSERT INTO outbox.messages \
     (exchange, routing_key, payload, content_type, headers, ordering_key) \
     VALUES ($1, $2, $3, $4, $5, $6) RETURNING message_id";

/// Writes `message` to the outbox through `client` (a `Transaction` to make it
/// atomic with your own writes) and returns its `message_id`, which becomes
/// the AMQP `message_id` consumers deduplicate on.
///
/// One round trip: the statement is sent with its parameter types, unprepared.
/// With deadpool-postgres, pass the inner transaction: `enqueue(&*tx, ..)`.
pub async fn enqueue<C: GenericClient>(client: &C, message: &Message) -> Result<Uuid, Error> {
    let headers = Value::Object(message.headers.clone());
    let row = client
        .query_typed_one(
            INSERT,
            &[
                (&message.exchange, Type::TEXT),
                (&message.routing_key, Type::TEXT),
                (&message.payload, Type::BYTEA),
                (&message.content_type, Type::TEXT),
                (&headers, Type::JSONB),
                (&message.ordering_key, Type::TEXT),
            ],
        )
        .await?;
    Ok(row.try_get(0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_message_has_json_content_type() {
        let message = Message::json("ex", "rk", &serde_json::json!({"a": 1})).expect("valid");
        assert_eq!(message.content_type(), "application/json");
        assert_eq!(message.payload(), br#"{"a":1}"#);
    }

    #[test]
    fn overlong_exchange_is_rejected() {
        let error = Message::bytes("x".repeat(256), "", vec![], "application/octet-stream")
            .expect_err("256 bytes is too long");
        assert!(
            error.to_string().contains("exchange is 256 bytes"),
            "{error}"
        );
    }

    #[test]
    fn empty_content_type_is_rejected() {
        assert!(Message::bytes("ex", "", vec![1], "").is_err());
    }
}
