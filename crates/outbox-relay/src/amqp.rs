//! The relay's RabbitMQ side: one confirm-mode channel on a connection
//! from `outbox_service::amqp`, and publishing a claimed row with the
//! properties consumers rely on.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::message::BasicReturnMessage;
use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ErrorKind, ExchangeKind, PublisherConfirm,
};
use serde_json::Value;

use crate::fault_policy::BrokerError;
use crate::meters::Fault;
use crate::store::Claimed;

const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long closing a connection that stopped answering may take: its
/// close-ok will not come either.
const SILENT_CLOSE_TIMEOUT: Duration = Duration::from_millis(100);
/// Frame bytes kept for everything in a content header but the headers
/// (frame and class fields, message id, content type of at most 255 bytes,
/// delivery mode, timestamp).
const PROPERTIES_ROOM: usize = 1024;
/// How long an exchange checked to exist is trusted before checking again.
const EXCHANGE_CACHE_TTL: Duration = Duration::from_secs(60);
/// The header carrying a row's `ordering_key`.
pub(crate) const KEY_HEADER: &str = "x-outbox-key";
/// The header carrying a keyed row's `key_seq`.
pub(crate) const SEQ_HEADER: &str = "x-outbox-seq";

/// An open connection with a channel in confirm mode.
pub(crate) struct Broker {
    connection: Connection,
    channel: Channel,
    /// Exchanges known to exist. Publishing to a missing exchange closes the
    /// whole channel (404), failing every publish in flight; checking first
    /// on a throwaway channel turns it into a fault of that message alone.
    /// (An exchange deleted while cached still closes the channel once: that
    /// counts as an outage, and the reconnected broker starts a new cache.)
    known_exchanges: HashMap<String, Instant>,
    /// How long any round trip with the broker may take (the confirm
    /// timeout): past it the broker is silent, and nothing may wait on it
    /// for ever (a black-holed network answers nothing and closes nothing).
    answer_within: Duration,
}

/// What the broker said about one publish.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Acked. Safe to mark published only once no return can be its own
    /// (see [`Returned`]): the relay holds acked rows until every confirm
    /// in flight has answered.
    Confirmed,
    /// The message's own fault (nack, unroutable, oversized, no exchange):
    /// counts as an attempt.
    Rejected(Fault, String),
    /// The connection or channel failed: not the message's fault
    /// (`fault_policy` says what it means).
    Lost(BrokerError),
}

impl Outcome {
    /// The broker's own answer (an ack or a nack), not one the relay gave
    /// before publishing: it shows the broker read the publish.
    pub(crate) fn answered_by_broker(&self) -> bool {
        matches!(
            self,
            Outcome::Confirmed | Outcome::Rejected(Fault::Nacked, _)
        )
    }
}

impl Broker {
    /// Connects to the first node of `urls` that answers (see
    /// [`outbox_service::amqp`], bounded there) and opens the confirm-mode
    /// channel, each round trip within `answer_within`.
    pub(crate) async fn connect(
        urls: &str,
        ca_file: Option<&Path>,
        name: &str,
        answer_within: Duration,
    ) -> anyhow::Result<Broker> {
        let connection = outbox_service::amqp::connect(urls, ca_file, name).await?;
        let channel = match within(answer_within, confirm_channel(&connection)).await {
            Ok(channel) => channel,
            Err(error) => {
                let _ =
                    tokio::time::timeout(SILENT_CLOSE_TIMEOUT, connection.close(200, "".into()))
                        .await;
                return Err(error.into());
            }
        };
        Ok(Broker {
            connection,
            channel,
            known_exchanges: HashMap::new(),
            answer_within,
        })
    }

    /// Replaces the channel with a new one in confirm mode (see
    /// [`crate::nack_runs`]); call it with nothing in flight.
    pub(crate) async fn renew_channel(&mut self) -> Result<(), BrokerError> {
        let channel = within(self.answer_within, confirm_channel(&self.connection)).await?;
        let old = std::mem::replace(&mut self.channel, channel);
        let close = old.close(200, "renewed".into());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT.min(self.answer_within), close).await;
        Ok(())
    }

    /// A round trip on the publishing channel (a `basic.qos` that changes
    /// nothing, the channel consumes nothing) within `answer_within`. The
    /// broker handles a channel's frames in order, so an answer shows it
    /// read every publish sent before: a confirm missing for one of those
    /// is that message's (its queue's) fault, not the broker's.
    pub(crate) async fn probe(&self) -> Result<(), BrokerError> {
        let qos = self.channel.basic_qos(0, BasicQosOptions::default());
        within(self.answer_within, async { Ok(qos.await?) }).await
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Publishes `row` (mandatory, persistent) and returns the pending
    /// confirm. `Err` means the connection or channel failed, not the
    /// message (`fault_policy` tells a channel closed over one message).
    /// `broker_max` is the broker's `max_message_size` once learned (see
    /// `fault_policy::ChannelFault`).
    pub(crate) async fn publish(
        &mut self,
        row: &Claimed,
        max_payload: u32,
        broker_max: Option<u64>,
    ) -> Result<Pending, BrokerError> {
        if let Some(problem) = &row.problem {
            return Ok(Pending::Done(Outcome::Rejected(
                Fault::BadHeaders,
                problem.clone(),
            )));
        }
        if let Some(max) = broker_max.filter(|max| row.payload.len() as u64 > *max) {
            return Ok(Pending::Done(Outcome::Rejected(
                Fault::Oversized,
                format!(
                    "payload is {} bytes, more than the broker's max_message_size {max}",
                    row.payload.len()
                ),
            )));
        }
        if row.payload.len() > max_payload as usize {
            return Ok(Pending::Done(Outcome::Rejected(
                Fault::Oversized,
                format!(
                    "payload is {} bytes, more than OUTBOX_MAX_PAYLOAD_BYTES {max_payload}",
                    row.payload.len()
                ),
            )));
        }
        // The ordering key and its sequence number travel as headers of
        // their own.
        let key_room = row.ordering_key.as_ref().map_or(0, |key| key.len() + 64);
        let budget = self.header_budget().saturating_sub(key_room);
        if let Some(problem) = header_problem(&row.headers, budget) {
            return Ok(Pending::Done(Outcome::Rejected(Fault::BadHeaders, problem)));
        }
        if !within(self.answer_within, self.exchange_exists(&row.exchange)).await? {
            return Ok(Pending::Done(Outcome::Rejected(
                Fault::NoExchange,
                format!("exchange `{}` does not exist", row.exchange),
            )));
        }
        let channel = self.channel.clone();
        let (exchange, routing_key) = (row.exchange.as_str(), row.routing_key.as_str());
        let (exchange, routing_key) = (ShortString::from(exchange), ShortString::from(routing_key));
        // A reference to the claimed payload, not a copy.
        let (payload, properties) = (row.payload.clone(), properties(row));
        let mut publish: Writing = Box::pin(async move {
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            channel
                .basic_publish(exchange, routing_key, options, &payload, properties)
                .await
        });
        // The first poll takes the delivery tag and queues the frames, so
        // publishes leave in the order they were made; the write itself is
        // awaited with the confirm, in the window, under its deadline (a
        // socket that stopped draining, a black-holed network, holds no
        // one). Awaiting each write here cost a hand-off to the connection's
        // task and back per row: 0.18 ms a row under load.
        match futures::poll!(publish.as_mut()) {
            Poll::Ready(written) => Ok(Pending::Confirm(written?)),
            Poll::Pending => Ok(Pending::Writing(publish)),
        }
    }

    /// Bytes the encoded headers may take: the content header must fit in
    /// one frame, and the other properties and the framing need some room.
    fn header_budget(&self) -> usize {
        match self.connection.configuration().frame_max() {
            0 => usize::MAX,
            frame_max => (frame_max as usize).saturating_sub(PROPERTIES_ROOM),
        }
    }

    async fn exchange_exists(&mut self, exchange: &str) -> Result<bool, BrokerError> {
        // The default exchange always exists (and may not be declared, even
        // passively). `amq.*` names are checked like any other: only the
        // broker's own exist, and a missing one closes the channel.
        if exchange.is_empty() {
            return Ok(true);
        }
        if let Some(checked) = self.known_exchanges.get(exchange)
            && checked.elapsed() < EXCHANGE_CACHE_TTL
        {
            return Ok(true);
        }
        let probe = self.connection.create_channel().await?;
        let options = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        match probe
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Direct,
                options,
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => {
                let _ = probe.close(200, "ok".into()).await;
                self.known_exchanges
                    .insert(exchange.to_string(), Instant::now());
                Ok(true)
            }
            Err(error) if is_not_found(&error) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Bounded: a broker that stopped answering must not hold up shutdown.
    pub(crate) async fn close(&self) {
        let close = self.connection.close(200, "relay stopping".into());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT.min(self.answer_within), close).await;
    }

    /// Closes a connection that stopped answering without waiting for its
    /// close-ok (lapin's heartbeat, or the kernel, ends the socket).
    pub(crate) async fn abandon(&self) {
        let close = self
            .connection
            .close(200, "the broker stopped answering".into());
        let _ = tokio::time::timeout(SILENT_CLOSE_TIMEOUT, close).await;
    }
}

/// A new channel in confirm mode.
async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// `work`, or [`BrokerError::Silent`] past `limit`.
async fn within<T>(
    limit: Duration,
    work: impl Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or(Err(BrokerError::Silent(limit)))
}

/// A publish whose outcome is either known already or awaits the broker.
pub(crate) enum Pending {
    Done(Outcome),
    /// Frames queued, not written yet.
    Writing(Writing),
    Confirm(PublisherConfirm),
}

/// A publish whose frames are queued on the connection.
pub(crate) type Writing = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

/// A message the broker returned as unroutable, named by its message_id.
///
/// lapin queues each basic.return and hands it to whichever confirm it
/// resolves next, not to the publish it belongs to: with a multiple ack
/// (or an ack of an earlier publish arriving after the return) an
/// unroutable row's confirm looks like a clean ack while a routed row's
/// carries the return. Trusting that marked unroutable rows published
/// (lost) and charged attempts to good ones. So a return is matched to its
/// row by message_id; the broker sends it before the ack of its publish,
/// so once every confirm in flight has answered, every return is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Returned {
    pub message_id: String,
    pub reason: String,
}

impl Pending {
    /// The outcome of this publish, and the returned message (anyone's)
    /// that lapin attached to its confirm.
    pub(crate) async fn outcome(self) -> (Outcome, Option<Returned>) {
        let confirm = match self {
            Pending::Done(outcome) => return (outcome, None),
            Pending::Writing(writing) => match writing.await {
                Ok(confirm) => confirm,
                Err(error) => return (Outcome::Lost(error.into()), None),
            },
            Pending::Confirm(confirm) => confirm,
        };
        let returned = |message: BasicReturnMessage| Returned {
            message_id: message
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default(),
            reason: format!(
                "unroutable: returned by the broker ({} {})",
                message.reply_code, message.reply_text
            ),
        };
        match confirm.await {
            Ok(Confirmation::Ack(message)) => (Outcome::Confirmed, message.map(returned)),
            Ok(Confirmation::Nack(message)) => (
                Outcome::Rejected(Fault::Nacked, "nacked by the broker".into()),
                message.map(returned),
            ),
            Ok(Confirmation::NotRequested) => (Outcome::Lost(BrokerError::NotConfirming), None),
            Err(error) => (Outcome::Lost(error.into()), None),
        }
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(e)
        if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

fn properties(row: &Claimed) -> BasicProperties {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    BasicProperties::default()
        .with_message_id(row.message_id.to_string().into())
        .with_content_type(row.content_type.as_str().into())
        .with_delivery_mode(2)
        .with_timestamp(timestamp)
        .with_headers(headers(row))
}

/// The row's headers, its ordering key as `x-outbox-key` (consumers keep a
/// key's messages in one lane: `outbox_consumer::KEY_HEADER`) and its
/// number among the key's messages as `x-outbox-seq` (consumers put a
/// key's messages back in order by it: `outbox_consumer::SEQ_HEADER`).
/// The relay owns every `x-outbox-*` header: a row's own are dropped, keyed
/// or not (a forged `x-outbox-seq` far ahead would pin its key's watermark
/// at the consumer, and later messages of the key would commit out of
/// order). Their names are logged at debug level, never their values.
fn headers(row: &Claimed) -> FieldTable {
    let mut table = FieldTable::default();
    let mut dropped = Vec::new();
    if let Value::Object(map) = &row.headers {
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

/// The prefix of the headers the relay sets itself.
const RESERVED_PREFIX: &str = "x-outbox-";

/// Whether header `name` is the relay's to set (any case: a consumer that
/// matched names loosely must not be fooled either).
fn is_reserved(name: &str) -> bool {
    name.get(..RESERVED_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(RESERVED_PREFIX))
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
        let table = headers(&keyless);
        let names: Vec<&str> = table.inner().keys().map(|name| name.as_str()).collect();
        assert_eq!(names, ["tenant", "x-outboxed"]);

        let mut keyed = Claimed::for_test(2);
        keyed.headers = forged;
        keyed.ordering_key = Some("k".into());
        keyed.key_seq = Some(3);
        let table = headers(&keyed);
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
