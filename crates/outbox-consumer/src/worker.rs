//! How one delivery ends. Each ends in exactly one of: ack after its
//! batch committed (or after finding the message in the inbox), a
//! confirmed copy in the retry or the dead-letter queue and then the ack,
//! or no ack at all (given back at shutdown, or lost with the connection)
//! so that it is redelivered. Batches are in `batch`.
//!
//! ```text
//! parse ─ bad ──────────────────────────────────────────► dead-letter
//!   └─ inbox + handler, in its batch's transaction ─ ok ► ack
//!        ├─ poison ─────────────────────────────────────► dead-letter
//!        ├─ transient ─ deliveries left ─► retry queue (backoff as TTL)
//!        │             └─ none left ────────────────────► dead-letter
//!        └─ unavailable ─► wait, same batch again (counts nothing)
//! ```
//! A bad message leaves the queue at once (to the dead-letter or the retry
//! queue), so it never occupies a prefetch slot while good ones wait.
//! Only failures count towards the delivery limit, and only once the inbox
//! has had its say: a message already applied is acked as a duplicate
//! however often it came.

use std::time::Duration;

use deadpool_postgres::Pool;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;
use outbox_service::traceparent;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::broker::{BrokerError, Publisher, delivery_number};
use crate::consumer::ConsumerConfig;
use crate::handler::{Handler, Incoming};
use crate::inbox::Inbox;
use crate::lanes::numbered;
use crate::meters::{Meters, Settled};
use crate::sequencer::Bounds;
use outbox_service::health::Health;

/// What the lanes of all sessions share.
pub(crate) struct Shared<H> {
    pub handler: H,
    pub pool: Pool,
    pub inbox: Inbox,
    pub config: ConsumerConfig,
    pub health: Health,
    pub meters: Meters,
    pub shutdown: CancellationToken,
    /// How long and how many keyed messages may wait for earlier ones.
    pub bounds: Bounds,
}

/// How a lane ended, for the session.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Shutdown, or the session dropped it: nothing for the session to do.
    Settled,
    /// The broker failed under us: the session must reconnect.
    BrokerFailed(BrokerError),
}

/// A delivery fit for a handler.
pub(crate) struct Item {
    pub delivery: Delivery,
    pub message: Incoming,
    /// Which delivery of the message this is, from 1.
    pub deliveries: u32,
}

/// Why a handled message failed, once an unavailable database is ruled out.
#[derive(Debug)]
pub(crate) enum Failed {
    Poison(String),
    Transient(String),
}

/// An [`Item`] for `delivery`, or `None` once it is dead-lettered (no
/// usable message id). How often it came counts for nothing here: the
/// limit applies when it fails (`settle_failure`), after the inbox.
pub(crate) async fn admit<H: Handler>(
    shared: &Shared<H>,
    publisher: &Publisher,
    delivery: Delivery,
) -> Result<Option<Item>, BrokerError> {
    shared.meters.received.increment(1);
    let deliveries = delivery_number(&delivery, &shared.config.topology.queue);
    let reason = match incoming(&delivery, deliveries) {
        Err(bad) => bad.to_string(),
        Ok(message) => {
            return Ok(Some(Item {
                delivery,
                message,
                deliveries,
            }));
        }
    };
    // Its key's watermark stays: the messages before it in the batch have
    // not committed yet, and a consumer that starts later waits
    // `key_gap_wait` for this one at most.
    let span = span(&delivery);
    dead_letter(publisher, &delivery, deliveries, &reason, &shared.meters)
        .instrument(span)
        .await?;
    Ok(None)
}

/// Settles an item whose handler failed: dead-lettered when poison or out
/// of deliveries, else copied to the retry queue; then acked.
pub(crate) async fn settle_failure<H: Handler>(
    shared: &Shared<H>,
    publisher: &Publisher,
    item: Item,
    failed: Failed,
) -> Result<(), BrokerError> {
    let span = span(&item.delivery);
    async {
        let (delivery, deliveries) = (&item.delivery, item.deliveries);
        let max = shared.config.max_deliveries;
        let meters = &shared.meters;
        match failed {
            Failed::Poison(reason) => {
                dead_letter_passing_key(shared, publisher, delivery, deliveries, &reason).await
            }
            Failed::Transient(reason) if deliveries >= max => {
                let reason = format!("failed on delivery {deliveries} of {max}: {reason}");
                dead_letter_passing_key(shared, publisher, delivery, deliveries, &reason).await
            }
            Failed::Transient(reason) => {
                let delay = retry_delay(&shared.config, deliveries);
                tracing::info!(
                    message_id = %item.message.message_id,
                    deliveries,
                    ?delay,
                    %reason,
                    "transient failure; retrying later"
                );
                publisher
                    .retry(delivery, deliveries, delay, &reason)
                    .await?;
                ack(delivery, Settled::Retried, meters).await
            }
        }
    }
    .instrument(span)
    .await
}

/// Moves a dead-lettered keyed message's watermark past it, so that a
/// consumer that starts later does not wait for it. At worst (the database
/// does not answer) that consumer waits `key_gap_wait` once.
async fn pass_key<H: Handler>(shared: &Shared<H>, delivery: &Delivery) {
    let Some((key, seq)) = numbered(&delivery.properties) else {
        return;
    };
    if let Err(reason) = shared
        .inbox
        .keys
        .advance_alone(&shared.pool, key, seq)
        .await
    {
        tracing::warn!(
            %reason,
            seq,
            "cannot move the key's watermark past a dead-lettered message"
        );
    }
}

/// The span every log line about this delivery is in: its message id and,
/// when the publisher sent a valid W3C `traceparent` header (the relay
/// copies it from the outbox row), the trace id and the header itself.
pub(crate) fn span(delivery: &Delivery) -> tracing::Span {
    let properties = &delivery.properties;
    let message_id = properties.message_id().as_ref().map(|id| id.as_str());
    let traceparent = properties.headers().as_ref().and_then(|headers| {
        match headers.inner().get(traceparent::HEADER)? {
            AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok(),
            AMQPValue::ShortString(text) => Some(text.as_str()),
            _ => None,
        }
    });
    let trace_id = traceparent.and_then(traceparent::trace_id);
    tracing::info_span!(
        "message",
        message_id,
        trace_id,
        traceparent = trace_id.and(traceparent)
    )
}

/// Why a delivery is poison before any handler sees it; the message is the
/// reason in its dead letter's `x-consumer-error`.
#[derive(Debug, thiserror::Error)]
enum BadDelivery {
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
fn incoming(delivery: &Delivery, deliveries: u32) -> Result<Incoming, BadDelivery> {
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

/// `retry_base` doubled per earlier delivery, at most `retry_max`.
pub(crate) fn retry_delay(config: &ConsumerConfig, deliveries: u32) -> Duration {
    let doublings = deliveries.saturating_sub(1).min(20);
    config
        .retry_base
        .saturating_mul(1 << doublings)
        .min(config.retry_max)
}

async fn dead_letter(
    publisher: &Publisher,
    delivery: &Delivery,
    deliveries: u32,
    reason: &str,
    meters: &Meters,
) -> Result<(), BrokerError> {
    copy_to_dead_letters(publisher, delivery, deliveries, reason).await?;
    ack(delivery, Settled::DeadLettered, meters).await
}

/// [`dead_letter`] that also moves a keyed message's watermark past it,
/// between the confirmed copy and the ack: a consumer that takes over
/// after the ack then does not wait for it.
async fn dead_letter_passing_key<H: Handler>(
    shared: &Shared<H>,
    publisher: &Publisher,
    delivery: &Delivery,
    deliveries: u32,
    reason: &str,
) -> Result<(), BrokerError> {
    copy_to_dead_letters(publisher, delivery, deliveries, reason).await?;
    pass_key(shared, delivery).await;
    ack(delivery, Settled::DeadLettered, &shared.meters).await
}

async fn copy_to_dead_letters(
    publisher: &Publisher,
    delivery: &Delivery,
    deliveries: u32,
    reason: &str,
) -> Result<(), BrokerError> {
    tracing::warn!(
        message_id = delivery.properties.message_id().as_ref().map_or("", |m| m.as_str()),
        deliveries,
        %reason,
        "dead-lettering message"
    );
    publisher.dead_letter(delivery, deliveries, reason).await
}

pub(crate) async fn ack(
    delivery: &Delivery,
    outcome: Settled,
    meters: &Meters,
) -> Result<(), BrokerError> {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {
            meters.settled(outcome).increment(1);
            tracing::debug!(outcome = outcome.label(), "message settled");
            Ok(())
        }
        // The channel closed under us: the broker redelivers the message,
        // and the inbox (or the copy already made) absorbs the repeat.
        Ok(false) => Err(BrokerError::AckLost),
        Err(error) => Err(BrokerError::Ack(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Topology;
    use lapin::BasicProperties;

    fn config() -> ConsumerConfig {
        ConsumerConfig {
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_millis(700),
            ..ConsumerConfig::new("amqp://localhost", Topology::named("ex", "q"), "inbox")
        }
    }

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        let delays: Vec<u64> = (1..=5)
            .map(|n| retry_delay(&config(), n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 700, 700]);
        assert_eq!(retry_delay(&config(), u32::MAX).as_millis(), 700);
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
