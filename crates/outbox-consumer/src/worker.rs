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

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tracing::Instrument;

use crate::broker::{BrokerError, Publisher};
use crate::config::ConsumerConfig;
use crate::handler::{Handler, Incoming};
use crate::message::{delivery_number, incoming, numbered, sent_message_id, span};
use crate::meters::{Meters, Settled};
use crate::shared::Shared;
use crate::spans::{DEAD_LETTERED, ProcessSpan};

/// A delivery fit for a handler.
pub(crate) struct Item {
    pub delivery: Delivery,
    pub message: Incoming,
    /// Which delivery of the message this is, from 1.
    pub deliveries: u32,
    /// Its trace span, ended where the delivery is settled.
    pub span: ProcessSpan,
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
    let queue = &shared.config.topology.queue;
    let deliveries = delivery_number(&delivery, queue);
    let mut process = ProcessSpan::start(&delivery, deliveries, queue);
    let reason = match incoming(&delivery, deliveries) {
        Err(bad) => bad.to_string(),
        Ok(message) => {
            return Ok(Some(Item {
                delivery,
                message,
                deliveries,
                span: process,
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
    process.failed(DEAD_LETTERED, &reason);
    Ok(None)
}

/// Settles an item whose handler failed: dead-lettered when poison or out
/// of deliveries, else copied to the retry queue; then acked.
pub(crate) async fn settle_failure<H: Handler>(
    shared: &Shared<H>,
    publisher: &Publisher,
    mut item: Item,
    failed: Failed,
) -> Result<(), BrokerError> {
    let span = span(&item.delivery);
    async {
        let (delivery, deliveries) = (&item.delivery, item.deliveries);
        let max = shared.config.max_deliveries;
        let meters = &shared.meters;
        let (outcome, reason, done) = match failed {
            Failed::Poison(reason) => {
                let done =
                    dead_letter_passing_key(shared, publisher, delivery, deliveries, &reason).await;
                (DEAD_LETTERED, reason, done)
            }
            Failed::Transient(reason) if deliveries >= max => {
                let reason = format!("failed on delivery {deliveries} of {max}: {reason}");
                let done =
                    dead_letter_passing_key(shared, publisher, delivery, deliveries, &reason).await;
                (DEAD_LETTERED, reason, done)
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
                let done = match publisher.retry(delivery, deliveries, delay, &reason).await {
                    Ok(_) => ack(delivery, Settled::Retried, meters).await,
                    Err(error) => Err(error),
                };
                ("retried", reason, done)
            }
        };
        // Once it happened: a failure here brings the delivery back.
        if done.is_ok() {
            item.span.failed(outcome, &reason);
        }
        done
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
        message_id = sent_message_id(delivery).unwrap_or(""),
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
}
