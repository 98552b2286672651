//! Brings copies back from the retry queue once their backoff is over.
//!
//! RabbitMQ's own way, a TTL that dead-letters the copy back into the
//! queue, moves a message at most once: if the queue refuses it at that
//! moment (a length limit with `reject-publish`, the queue deleted to be
//! declared again with other arguments) the message is gone, from every
//! queue. Here a copy stays unacked in the retry queue until the queue has
//! confirmed taking it back. Refused, it waits and is offered again; with
//! a lost connection or a stopped consumer it stays in the retry queue for
//! the next session. A copy brought back twice (the ack lost after the
//! confirm) is one more delivery of a message the inbox recognises.
//!
//! The retry queue's prefetch bounds the copies waiting at once: beyond it,
//! a copy due sooner waits behind ones due later, by `retry_max` at most.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use outbox_service::backoff::Backoff;
use tracing::Instrument;

use crate::broker::{BrokerError, Publisher};
use crate::handler::Handler;
use crate::message::{retry_at, span};
use crate::shared::{Outcome, Shared};

/// Waits until `copy` is due, puts it back in the queue with a confirm,
/// then acks it in the retry queue. At shutdown it stays where it is.
pub(crate) async fn bring_back<H: Handler>(
    shared: Arc<Shared<H>>,
    publisher: Publisher,
    copy: Delivery,
) -> Outcome {
    let span = span(&copy);
    async {
        // A copy from an older consumer has a TTL instead and no due time:
        // it is due now. A due time past `retry_max` (a clock far off) is
        // cut, so that no copy holds a prefetch slot for long.
        let due_in = retry_at(&copy)
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or_default()
            .min(shared.config.retry_max);
        let mut wait = due_in;
        let mut refused = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => return Outcome::Settled,
                _ = tokio::time::sleep(wait) => {}
            }
            match publisher.send_back(&copy).await {
                Ok(()) => break,
                Err(error) if error.refused() => {
                    wait = refused.next_delay();
                    shared.meters.retries_refused.increment(1);
                    tracing::warn!(
                        %error,
                        queue = %shared.config.topology.queue,
                        ?wait,
                        "the queue refused a retried message; it stays in the retry queue"
                    );
                }
                Err(error) => return Outcome::BrokerFailed(error),
            }
        }
        match copy.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Outcome::Settled,
            Ok(false) => Outcome::BrokerFailed(BrokerError::AckLost),
            Err(error) => Outcome::BrokerFailed(BrokerError::Ack(error)),
        }
    }
    .instrument(span)
    .await
}
