//! The RabbitMQ side of a consumer: one connection with a consuming channel
//! (manual acks, bounded prefetch) and a confirm-mode channel that moves a
//! message to the retry or the dead-letter queue. A message leaves its queue
//! only after its copy is confirmed, so nothing is lost between the two.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer};

use anyhow::Context;

use crate::message::{
    DELIVERIES_HEADER, DELIVERY_COUNT_HEADER, ERROR_HEADER, LAST_ERROR_HEADER, RETRIES_HEADER,
    RETRY_AT_HEADER,
};
use crate::topology::Topology;

pub(crate) struct Broker {
    connection: Connection,
    consuming: Channel,
    /// Takes copies from the retry queue (see `retrier`); a channel of its
    /// own so that its prefetch does not share the queue's.
    retrying: Channel,
    publisher: Publisher,
}

impl Broker {
    /// Connects (bounded: lapin can hang on a rejected `connection.open`),
    /// opens both channels and declares the topology.
    pub(crate) async fn open(
        url: &str,
        ca_file: Option<&Path>,
        name: &str,
        prefetch: u16,
        topology: Arc<Topology>,
    ) -> anyhow::Result<Broker> {
        let connection = outbox_service::amqp::connect(url, ca_file, name).await?;
        let consuming = connection.create_channel().await?;
        consuming
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let retrying = connection.create_channel().await?;
        retrying
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let publishing = connection.create_channel().await?;
        publishing
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        topology.declare(&connection).await.with_context(|| {
            format!(
                "cannot declare queue `{}` and its exchanges (one may exist with other \
                 arguments: queue type, dead-letter exchange or expiry)",
                topology.queue
            )
        })?;
        Ok(Broker {
            connection,
            consuming,
            retrying,
            publisher: Publisher {
                channel: publishing,
                topology,
            },
        })
    }

    pub(crate) async fn consume(&self, tag: &str) -> Result<Consumer, lapin::Error> {
        subscribe(&self.consuming, &self.publisher.topology.queue, tag).await
    }

    /// Copies waiting in the retry queue, for the `retrier` to bring back.
    pub(crate) async fn consume_retries(&self, tag: &str) -> Result<Consumer, lapin::Error> {
        subscribe(&self.retrying, &self.publisher.topology.retry_queue, tag).await
    }

    /// Consumers on the queue now, this one included.
    pub(crate) async fn consumers(&self) -> Result<u32, lapin::Error> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let queue = self.publisher.topology.queue.as_str();
        self.consuming
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .map(|declared| declared.consumer_count())
    }

    /// Stops new deliveries of both queues; those in hand can still be acked.
    pub(crate) async fn cancel(&self, tag: &str, retries_tag: &str) {
        let _ = self
            .consuming
            .basic_cancel(tag.into(), Default::default())
            .await;
        let _ = self
            .retrying
            .basic_cancel(retries_tag.into(), Default::default())
            .await;
    }

    pub(crate) fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Closing gives every unacked delivery back to the queue.
    pub(crate) async fn close(&self) {
        let _ = self.connection.close(200, "consumer stopping".into()).await;
    }
}

async fn subscribe(channel: &Channel, queue: &str, tag: &str) -> Result<Consumer, lapin::Error> {
    channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Why the broker failed under a delivery: the session must reconnect.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BrokerError {
    #[error("cannot publish a copy to `{exchange}`")]
    Publish {
        exchange: String,
        #[source]
        source: lapin::Error,
    },
    /// Our own retry or dead-letter queue is missing.
    #[error("copy to `{exchange}` returned as unroutable: {reply}")]
    Returned { exchange: String, reply: String },
    #[error("copy to `{exchange}` nacked by the broker")]
    Nacked { exchange: String },
    #[error("publish channel is not in confirm mode")]
    NotConfirming,
    /// The broker redelivers the message; the inbox (or the copy already
    /// made) absorbs the repeat.
    #[error("channel closed before the ack")]
    AckLost,
    #[error("ack failed")]
    Ack(#[source] lapin::Error),
}

impl BrokerError {
    /// The broker works but its queue would not take the copy: it is
    /// missing (returned) or full with `reject-publish` (nacked).
    pub(crate) fn refused(&self) -> bool {
        matches!(
            self,
            BrokerError::Returned { .. } | BrokerError::Nacked { .. }
        )
    }
}

/// Moves deliveries to the retry or the dead-letter queue.
#[derive(Clone)]
pub(crate) struct Publisher {
    channel: Channel,
    topology: Arc<Topology>,
}

impl Publisher {
    /// Puts a copy in the retry queue, due back in the queue after `delay`
    /// (`x-consumer-retry-at`), counting `deliveries` so far. `Err` means
    /// the broker failed. The copy has no TTL: RabbitMQ dead-letters an
    /// expired message at most once, and one that the queue refuses at
    /// that moment (a length limit, the queue deleted and declared again)
    /// would be gone. The `retrier` brings it back with a confirm instead.
    pub(crate) async fn retry(
        &self,
        delivery: &Delivery,
        deliveries: u32,
        delay: Duration,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut headers = copied_headers(delivery);
        headers.insert(RETRIES_HEADER.into(), AMQPValue::LongUInt(deliveries));
        headers.insert(LAST_ERROR_HEADER.into(), long_string(reason));
        let due = SystemTime::now() + delay;
        let due_ms = due.duration_since(UNIX_EPOCH).map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        });
        headers.insert(RETRY_AT_HEADER.into(), AMQPValue::LongLongInt(due_ms));
        let properties = copied_properties(delivery, headers);
        self.publish("", &self.topology.retry_queue, delivery, properties)
            .await
    }

    /// Puts a copy from the retry queue back in the queue, through the
    /// default exchange (what `delivery_number` trusts). `Err` with
    /// [`BrokerError::refused`] means the queue would not take it now.
    pub(crate) async fn send_back(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        let mut headers = copied_headers(delivery);
        headers.remove(RETRY_AT_HEADER);
        let properties = copied_properties(delivery, headers);
        self.publish("", &self.topology.queue, delivery, properties)
            .await
    }

    /// Puts a copy, with the reason, in the dead-letter queue.
    pub(crate) async fn dead_letter(
        &self,
        delivery: &Delivery,
        deliveries: u32,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut headers = copied_headers(delivery);
        headers.insert(ERROR_HEADER.into(), long_string(reason));
        headers.insert(DELIVERIES_HEADER.into(), AMQPValue::LongUInt(deliveries));
        headers.insert("x-consumer-queue".into(), long_string(&self.topology.queue));
        let properties = copied_properties(delivery, headers);
        let routing_key = delivery.routing_key.as_str().to_string();
        self.publish(
            &self.topology.dead_letter_exchange,
            &routing_key,
            delivery,
            properties,
        )
        .await
    }

    /// Publishes (mandatory, persistent) and waits for the broker's confirm.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        delivery: &Delivery,
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let failed = |source| BrokerError::Publish {
            exchange: exchange.to_string(),
            source,
        };
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                properties,
            )
            .await
            .map_err(failed)?;
        // lapin reports an unroutable mandatory publish as an Ack carrying
        // the returned message: our own queue is missing, a broker fault.
        match confirm.await.map_err(failed)? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(BrokerError::Returned {
                exchange: exchange.into(),
                reply: returned.reply_text.to_string(),
            }),
            Confirmation::Nack(_) => Err(BrokerError::Nacked {
                exchange: exchange.into(),
            }),
            Confirmation::NotRequested => Err(BrokerError::NotConfirming),
        }
    }
}

/// The delivery's headers without the quorum queue's count: it is folded
/// into `x-consumer-retries`, and a stale copy would count twice.
fn copied_headers(delivery: &Delivery) -> BTreeMap<ShortString, AMQPValue> {
    let mut headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    headers.remove(DELIVERY_COUNT_HEADER);
    headers
}

/// The properties a copy keeps. Not `expiration` (a dead letter must not
/// expire) and not `user_id` (the broker refuses one that is not ours).
fn copied_properties(
    delivery: &Delivery,
    headers: BTreeMap<ShortString, AMQPValue>,
) -> BasicProperties {
    let original = &delivery.properties;
    let mut copy = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(FieldTable::from(headers));
    if let Some(v) = original.content_type() {
        copy = copy.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        copy = copy.with_content_encoding(v.clone());
    }
    if let Some(v) = original.message_id() {
        copy = copy.with_message_id(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        copy = copy.with_correlation_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        copy = copy.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        copy = copy.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        copy = copy.with_app_id(v.clone());
    }
    copy
}

/// Reasons go into headers, which must fit in one frame with the rest of
/// the properties: a handler's long error is cut.
fn long_string(value: &str) -> AMQPValue {
    const MAX: usize = 2048;
    let mut end = value.len().min(MAX);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    AMQPValue::LongString(LongString::from(&value[..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let reason = "é".repeat(5000);
        let AMQPValue::LongString(cut) = long_string(&reason) else {
            panic!("not a string");
        };
        assert_eq!(cut.as_bytes().len(), 2048);
        assert!(std::str::from_utf8(cut.as_bytes()).is_ok());
    }

    #[test]
    fn copies_drop_the_quorum_count_and_the_expiration() {
        let mut headers = FieldTable::default();
        headers.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongLongInt(1));
        headers.insert("app".into(), long_string("kept"));
        let original = crate::message::retried_delivery(headers);
        let copy = copied_properties(&original, copied_headers(&original));
        let copied = copy.headers().clone().unwrap_or_default();
        assert!(!copied.contains_key(DELIVERY_COUNT_HEADER));
        assert!(copied.contains_key("app"));
        assert!(copy.expiration().is_none());
        assert_eq!(copy.message_id().as_ref().map(|m| m.as_str()), Some("m"));
    }
}
