//! Typed enqueue: one INSERT into `outbox.messages` inside the caller's
//! transaction, so the message commits or rolls back with the business rows.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Map, Value};
use tokio_postgres::GenericClient;
use tokio_postgres::types::{ToSql, Type};
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
    delivery: Option<Delivery>,
}

/// When a scheduled message is to be published.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Delivery {
    At(SystemTime),
    /// From the database's clock at enqueue, not this process's.
    In(Duration),
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
            delivery: None,
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

    /// Publish at `time`, not at commit (a time not in the future means
    /// now). Until then `outbox::cancel` or `outbox.reschedule` can change
    /// it; more than the database's `outbox.schedule_horizon` (1 year)
    /// ahead, the enqueue fails.
    pub fn deliver_at(mut self, time: SystemTime) -> Self {
        self.delivery = Some(Delivery::At(time));
        self
    }

    /// Publish `delay` after the enqueue, by the database's clock.
    pub fn deliver_in(mut self, delay: Duration) -> Self {
        self.delivery = Some(Delivery::In(delay));
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

/// A scheduled message goes to `outbox.scheduled` (V9's trigger), so no
/// row comes back: its id is made here.
const INSERT_SCHEDULED: &str = "INSERT INTO outbox.messages \
     (exchange, routing_key, payload, content_type, headers, ordering_key, message_id, deliver_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, now() + $9 * interval '1 millisecond'))";

const CANCEL: &str = "SELECT outbox.cancel($1)";

/// Writes `message` to the outbox through `client` (a `Transaction` to make it
/// atomic with your own writes) and returns its `message_id`, which becomes
/// the AMQP `message_id` consumers deduplicate on.
///
/// One round trip: the statement is sent with its parameter types, unprepared.
/// With deadpool-postgres, pass the inner transaction: `enqueue(&*tx, ..)`.
pub async fn enqueue<C: GenericClient>(client: &C, message: &Message) -> Result<Uuid, Error> {
    let headers = Value::Object(message.headers.clone());
    let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
        (&message.exchange, Type::TEXT),
        (&message.routing_key, Type::TEXT),
        (&message.payload, Type::BYTEA),
        (&message.content_type, Type::TEXT),
        (&headers, Type::JSONB),
        (&message.ordering_key, Type::TEXT),
    ];
    let Some(delivery) = message.delivery else {
        let row = client.query_typed_one(INSERT, &params).await?;
        return Ok(row.try_get(0)?);
    };
    let (at, in_ms) = match delivery {
        Delivery::At(time) => (Some(time), None),
        Delivery::In(delay) => (None, Some(delay.as_secs_f64() * 1000.0)),
    };
    let message_id = Uuid::new_v4();
    params.extend([
        (&message_id as &(dyn ToSql + Sync), Type::UUID),
        (&at, Type::TIMESTAMPTZ),
        (&in_ms, Type::FLOAT8),
    ]);
    client.query_typed(INSERT_SCHEDULED, &params).await?;
    Ok(message_id)
}

/// Cancels a scheduled message for good, inside `client`'s transaction:
/// true when it was still waiting for its time (it will never be
/// published), false when it already fell due, was cancelled before, or
/// is unknown (`outbox.cancel`, V9).
pub async fn cancel<C: GenericClient>(client: &C, message_id: Uuid) -> Result<bool, Error> {
    let row = client
        .query_typed_one(CANCEL, &[(&message_id, Type::UUID)])
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
