//! A delivery's properties and headers, read in one place: the header
//! names the consumer reads and writes, the message id a handler gets, a
//! keyed message's ordering key and sequence number, how many deliveries
//! a message had, when a retried copy is due back, and the trace it
//! belongs to. Everything else takes what this module parsed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use outbox_service::traceparent;
use uuid::Uuid;

use crate::handler::Incoming;

/// The relay's headers, as the wire contract names them.
pub use outbox::wire::{KEY_HEADER, SEQ_HEADER};

/// Transient failures so far, carried by the copies in the retry queue.
pub const RETRIES_HEADER: &str = "x-consumer-retries";
/// Why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-consumer-error";
/// How many deliveries a dead-lettered message had.
pub const DELIVERIES_HEADER: &str = "x-consumer-deliveries";
/// Set by quorum queues: how often this copy went back to the queue,
/// graceful returns included (before RabbitMQ 4.3), so never read as a
/// count of failures; dropped from copies.
pub(crate) const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// When a copy in the retry queue is due back (Unix epoch milliseconds).
pub(crate) const RETRY_AT_HEADER: &str = "x-consumer-retry-at";
/// The last transient failure, on copies in the retry queue.
pub(crate) const LAST_ERROR_HEADER: &str = "x-consumer-last-error";

/// The span every log line about this delivery is in: its message id and,
/// when the publisher sent a valid W3C `traceparent` header (the relay
/// copies it from the outbox row), the trace id and the header itself.
pub(crate) fn span(delivery: &Delivery) -> tracing::Span {
    let properties = &delivery.properties;
    let message_id = sent_message_id(delivery);
    let traceparent = header_text(properties, traceparent::HEADER);
    let trace_id = traceparent.and_then(traceparent::trace_id);
    tracing::info_span!(
        "message",
        message_id,
        trace_id,
        traceparent = trace_id.and(traceparent)
    )
}

/// A header's value when it is text.
pub(crate) fn header_text<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a str> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok(),
        AMQPValue::ShortString(text) => Some(text.as_str()),
        _ => None,
    }
}

/// The message id as the publisher sent it, a UUID or not: for log lines.
pub(crate) fn sent_message_id(delivery: &Delivery) -> Option<&str> {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str())
}

/// Why a delivery is poison before any handler sees it; the message is the
/// reason in its dead letter's `x-consumer-error`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadDelivery {
    #[error("no message_id: cannot be deduplicated")]
    NoMessageId,
    #[error("message_id `{id}` is not a UUID")]
    NotAUuid {
        id: String,
        #[source]
        source: uuid::Error,
    },
}

/// The delivery as a handler sees it.
pub(crate) fn incoming(delivery: &Delivery, deliveries: u32) -> Result<Incoming, BadDelivery> {
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .ok_or(BadDelivery::NoMessageId)?;
    let message_id = Uuid::parse_str(id.as_str()).map_err(|source| BadDelivery::NotAUuid {
        id: id.to_string(),
        source,
    })?;
    Ok(Incoming {
        message_id,
        body: delivery.data.clone(),
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        delivery: deliveries,
        properties: delivery.properties.clone(),
    })
}

/// The ordering key a delivery carries, if any.
pub(crate) fn ordering_key(delivery: &Delivery) -> Option<&[u8]> {
    key_of(&delivery.properties)
}

/// The ordering key and sequence number a message carries, if both. The
/// relay numbers from 1: a number below that is no number (it would set
/// its key's watermark below where the relay starts).
pub(crate) fn numbered(properties: &BasicProperties) -> Option<(&[u8], i64)> {
    key_of(properties).zip(sequence(properties).filter(|&seq| seq >= 1))
}

fn key_of(properties: &BasicProperties) -> Option<&[u8]> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(KEY_HEADER)? {
        AMQPValue::LongString(key) => Some(key.as_bytes()),
        AMQPValue::ShortString(key) => Some(key.as_str().as_bytes()),
        _ => None,
    }
}

/// The sequence number a message carries, if any.
fn sequence(properties: &BasicProperties) -> Option<i64> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(SEQ_HEADER)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// Deliveries of this message so far, this one included: 1 + transient
/// failures carried in `x-consumer-retries`. Only real failures count: not
/// a graceful return, a lost connection or a consumer restart, which a
/// quorum queue's `x-delivery-count` counts too (before RabbitMQ 4.3), so
/// it is not read. Only a count a publisher cannot forge is read: the
/// retries of a copy that came back from our retry queue (through the
/// default exchange, routed by the queue's name, which a publisher limited
/// to its own exchange cannot use). A fresh message carrying
/// `x-consumer-retries: 99` is delivery 1.
pub(crate) fn delivery_number(delivery: &Delivery, queue: &str) -> u32 {
    let from_retry_queue =
        delivery.exchange.as_str().is_empty() && delivery.routing_key.as_str() == queue;
    let retries = from_retry_queue
        .then(|| header_u32(delivery, RETRIES_HEADER))
        .flatten()
        .unwrap_or(0);
    1u32.saturating_add(retries)
}

/// When a copy in the retry queue is due back, if it says.
pub(crate) fn retry_at(delivery: &Delivery) -> Option<SystemTime> {
    let headers = delivery.properties.headers().as_ref()?;
    let millis = match headers.inner().get(RETRY_AT_HEADER)? {
        AMQPValue::LongLongInt(millis) => u64::try_from(*millis).ok()?,
        _ => return None,
    };
    UNIX_EPOCH.checked_add(Duration::from_millis(millis))
}

fn header_u32(delivery: &Delivery, key: &str) -> Option<u32> {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(key))
        .and_then(as_u32)
}

/// Any integer header value that fits; publishers pick various widths.
fn as_u32(value: &AMQPValue) -> Option<u32> {
    let wide: i64 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => *v,
        _ => return None,
    };
    u32::try_from(wide).ok()
}

/// A delivery with `headers` as it comes back from the retry queue
/// (default exchange, routed by the queue's name `q`), redelivered: for
/// the unit tests that read or copy headers.
#[cfg(test)]
pub(crate) fn retried_delivery(headers: lapin::types::FieldTable) -> Delivery {
    let mut delivery = Delivery::mock(1, "".into(), "q".into(), true, b"{}".to_vec());
    delivery.properties = BasicProperties::default()
        .with_headers(headers)
        .with_expiration("500".into())
        .with_message_id("m".into());
    delivery
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    fn keyed(seq: i64) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(KEY_HEADER.into(), AMQPValue::LongString("k".into()));
        headers.insert(SEQ_HEADER.into(), AMQPValue::LongLongInt(seq));
        BasicProperties::default().with_headers(headers)
    }

    /// A number below the relay's first would set its key's watermark
    /// below 1, and the key's real message 1 would then wait for numbers
    /// that never come.
    #[test]
    fn numbers_below_one_are_no_numbers() {
        assert_eq!(numbered(&keyed(1)), Some((&b"k"[..], 1)));
        assert_eq!(numbered(&keyed(0)), None);
        assert_eq!(numbered(&keyed(-5)), None);
    }

    fn delivery(headers: FieldTable) -> Delivery {
        retried_delivery(headers)
    }

    #[test]
    fn first_delivery_is_number_one() {
        assert_eq!(delivery_number(&delivery(FieldTable::default()), "q"), 1);
    }

    /// A quorum queue counts graceful returns (a consumer restarted, a
    /// lane given back) as deliveries: eight rolling restarts dead-lettered
    /// good messages as "delivered 6 times" when that count was read.
    #[test]
    fn retries_count_and_quorum_returns_do_not() {
        let mut headers = FieldTable::default();
        headers.insert(RETRIES_HEADER.into(), AMQPValue::LongUInt(2));
        headers.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongLongInt(7));
        assert_eq!(delivery_number(&delivery(headers), "q"), 3);
    }

    #[test]
    fn a_fresh_message_cannot_forge_its_counts() {
        let mut headers = FieldTable::default();
        headers.insert(RETRIES_HEADER.into(), AMQPValue::LongUInt(99));
        headers.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongLongInt(99));
        let mut fresh = delivery(headers);
        fresh.exchange = "orders".into();
        fresh.routing_key = "".into();
        fresh.redelivered = false;
        assert_eq!(delivery_number(&fresh, "q"), 1);
        // Through the default exchange to another queue: not our retry queue.
        fresh.exchange = "".into();
        fresh.routing_key = "other".into();
        assert_eq!(delivery_number(&fresh, "q"), 1);
    }

    #[test]
    fn nonsense_counts_are_ignored() {
        let mut headers = FieldTable::default();
        headers.insert(RETRIES_HEADER.into(), AMQPValue::LongString("many".into()));
        headers.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongLongInt(-3));
        assert_eq!(delivery_number(&delivery(headers), "q"), 1);
    }

    fn with_id(id: Option<&str>) -> Delivery {
        let mut delivery = Delivery::mock(1, "ex".into(), "".into(), false, b"{}".to_vec());
        if let Some(id) = id {
            delivery.properties = BasicProperties::default().with_message_id(id.into());
        }
        delivery
    }

    #[test]
    fn message_id_must_be_a_uuid() {
        let id = Uuid::new_v4().to_string();
        assert_eq!(
            incoming(&with_id(Some(&id)), 1)
                .map(|m| m.message_id.to_string())
                .ok(),
            Some(id)
        );
        let reason = |id| incoming(&with_id(id), 1).map_err(|e| e.to_string()).err();
        assert!(reason(None).is_some_and(|e| e.contains("no message_id")));
        assert!(reason(Some("42")).is_some_and(|e| e == "message_id `42` is not a UUID"));
    }
}
