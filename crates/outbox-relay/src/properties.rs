//! A claimed row as an AMQP message: its properties and headers, as the
//! wire contract (`outbox::wire`) says, and why a row's headers cannot be
//! sent, when they cannot.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use outbox::wire::{KEY_HEADER, SEQ_HEADER, is_reserved};
use serde_json::Value;

use crate::store::Claimed;

/// `row` as a message, with `headers` (the row's own, or the row's with
/// the relay's trace context: see `spans`).
pub(crate) fn properties(row: &Claimed, headers: &Value) -> BasicProperties {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    BasicProperties::default()
        .with_message_id(row.message_id.to_string().into())
        .with_content_type(row.content_type.as_str().into())
        .with_delivery_mode(2)
        .with_timestamp(timestamp)
        .with_headers(field_headers(row, headers))
}

/// The row's headers, its ordering key as `x-outbox-key` (consumers keep a
/// key's messages in one lane: `outbox_consumer::KEY_HEADER`) and its
/// number among the key's messages as `x-outbox-seq` (consumers put a
/// key's messages back in order by it: `outbox_consumer::SEQ_HEADER`).
/// The relay owns every `x-outbox-*` header: a row's own are dropped, keyed
/// or not (a forged `x-outbox-seq` far ahead would pin its key's watermark
/// at the consumer, and later messages of the key would commit out of
/// order). Their names are logged at debug level, never their values.
fn field_headers(row: &Claimed, headers: &Value) -> FieldTable {
    let mut table = FieldTable::default();
    let mut dropped = Vec::new();
    if let Value::Object(map) = headers {
        for (name, value) in map {
            if is_reserved(name) {
                dropped.push(name.as_str());
            } else {
                table.insert(name.as_str().into(), amqp_value(value));
            }
        }
    }
    if !dropped.is_empty() {
        tracing::debug!(
            id = row.id,
            message_id = %row.message_id,
            headers = ?dropped,
            "dropped the row's own x-outbox-* headers: the relay sets those"
        );
    }
    if let Some(key) = &row.ordering_key {
        table.insert(
            KEY_HEADER.into(),
            AMQPValue::LongString(LongString::from(key.as_str())),
        );
        if let Some(seq) = row.key_seq {
            table.insert(SEQ_HEADER.into(), AMQPValue::LongLongInt(seq));
        }
    }
    table
}

/// JSON headers as an AMQP field table (objects nest, arrays become arrays).
pub(crate) fn field_table(headers: &Value) -> FieldTable {
    let mut table = FieldTable::default();
    if let Value::Object(map) = headers {
        for (key, value) in map {
            table.insert(key.as_str().into(), amqp_value(value));
        }
    }
    table
}

/// Why `headers` cannot be sent, if they cannot. AMQP field names are short
/// strings (at most 255 bytes): lapin would write a longer one with a
/// truncated length, a malformed frame on which the broker closes the whole
/// connection, so the row would fail every publish in flight and come back
/// forever. A content header must also fit in one frame. Both are the
/// message's fault, so they count as attempts.
pub(crate) fn header_problem(headers: &Value, budget: usize) -> Option<String> {
    if let Some(name) = long_field_name(headers) {
        let shown: String = name.chars().take(40).collect();
        return Some(format!(
            "header name `{shown}…` is {} bytes; AMQP allows 255",
            name.len()
        ));
    }
    let size = encoded_size(headers);
    (size > budget).then(|| {
        format!("headers take {size} bytes encoded, more than the {budget} a frame leaves them")
    })
}

fn long_field_name(value: &Value) -> Option<&str> {
    match value {
        Value::Object(map) => map.iter().find_map(|(name, inner)| {
            if name.len() > 255 {
                Some(name.as_str())
            } else {
                long_field_name(inner)
            }
        }),
        Value::Array(items) => items.iter().find_map(long_field_name),
        _ => None,
    }
}

/// Bytes `value` takes as an AMQP field value (type tag included), as
/// [`amqp_value`] converts it.
fn encoded_size(value: &Value) -> usize {
    1 + match value {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Number(_) => 8,
        Value::String(s) => 4 + s.len(),
        Value::Array(items) => 4 + items.iter().map(encoded_size).sum::<usize>(),
        Value::Object(map) => {
            4 + map
                .iter()
                .map(|(name, inner)| 1 + name.len() + encoded_size(inner))
                .sum::<usize>()
        }
    }
}

fn amqp_value(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(amqp_value).collect::<Vec<_>>(),
        )),
        Value::Object(_) => AMQPValue::FieldTable(field_table(value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_headers_become_a_field_table() {
        let table =
            field_table(&serde_json::json!({"a": 1, "b": "x", "c": [true], "d": {"e": 1.5}}));
        let inner = table.inner();
        assert_eq!(inner.get("a"), Some(&AMQPValue::LongLongInt(1)));
        assert_eq!(inner.get("b"), Some(&AMQPValue::LongString("x".into())));
        assert!(matches!(inner.get("c"), Some(AMQPValue::FieldArray(_))));
        assert!(matches!(inner.get("d"), Some(AMQPValue::FieldTable(_))));
    }

    #[test]
    fn a_rows_own_outbox_headers_are_dropped_keyed_or_not() {
        let forged = serde_json::json!({
            "x-outbox-seq": 1_000_000_000,
            "X-Outbox-Key": "other",
            "x-outbox-anything": true,
            "x-outboxed": 1,
            "tenant": "acme",
        });
        let mut keyless = Claimed::for_test(1);
        keyless.headers = forged.clone();
        let table = field_headers(&keyless, &keyless.headers);
        let names: Vec<&str> = table.inner().keys().map(|name| name.as_str()).collect();
        assert_eq!(names, ["tenant", "x-outboxed"]);

        let mut keyed = Claimed::for_test(2);
        keyed.headers = forged;
        keyed.ordering_key = Some("k".into());
        keyed.key_seq = Some(3);
        let table = field_headers(&keyed, &keyed.headers);
        let inner = table.inner();
        assert_eq!(inner.get(SEQ_HEADER), Some(&AMQPValue::LongLongInt(3)));
        assert_eq!(
            inner.get(KEY_HEADER),
            Some(&AMQPValue::LongString("k".into()))
        );
        assert_eq!(inner.len(), 4, "{inner:?}");
    }

    #[test]
    fn headers_that_cannot_be_framed_are_the_messages_fault() {
        let fine = serde_json::json!({"tenant": "acme", "n": [1, 2]});
        assert_eq!(header_problem(&fine, 1000), None);
        let long_name = serde_json::json!({"outer": {"k".repeat(256): 1}});
        let problem = header_problem(&long_name, 1_000_000).expect("name too long");
        assert!(problem.contains("256 bytes"), "{problem}");
        let big = serde_json::json!({"blob": "x".repeat(5000)});
        let problem = header_problem(&big, 4096).expect("too big");
        assert!(problem.contains("more than the 4096"), "{problem}");
    }
}
