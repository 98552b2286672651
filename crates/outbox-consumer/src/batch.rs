//! One lane's batch: the deliveries ready at once, handled in one
//! transaction and acked after its commit. One commit and one inbox insert
//! for many messages is what lets a consumer keep pace with the relay.
//!
//! A batch that fails is taken apart without blaming the innocent: when the
//! handler of message *k* fails, the transaction rolls back, the messages
//! before *k* commit as a batch of their own, *k* is tried alone and, if it
//! fails again, settled as its error says (see `worker`), and the rest form
//! the next batch, in that order, so a lane's effects keep their delivery
//! order. When the handler's `handle_batch` fails without naming the
//! message at fault, the batch is done again calling `handle` for each
//! message in turn, which names it. When the batch's own
//! statements fail (the inbox insert, the commit: a serialization failure,
//! say), each message gets a transaction of its own. An unavailable
//! database redoes the same batch after a backoff, counting nothing. A
//! keyed message that fails transiently is retried in place, after its
//! backoff, before the rest of the batch: its key's later messages must
//! not pass it (a copy through the retry queue would let them).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use outbox_service::backoff::Backoff;
use tracing::Instrument;

use crate::broker::{BrokerError, Publisher};
use crate::handler::{Handler, HandlerError, Incoming};
use crate::health;
use crate::inbox::{BatchFailure, Handled};
use crate::message::{ordering_key, span};
use crate::meters::Settled;
use crate::shared::Shared;
use crate::spans::Timeline;
use crate::worker::{Failed, Item, ack, admit, retry_delay, settle_failure};

/// What is left to do with a batch, in order.
enum Step {
    /// Handle these in one transaction (with the handler's `handle_batch`).
    Commit(Vec<Item>),
    /// The same, calling the handler's `handle` for each in turn: after
    /// `handle_batch` failed without naming the message at fault.
    CommitOneByOne(Vec<Item>),
    /// Settle this one failure.
    Settle(Box<Item>, Failed),
}

/// Handles `deliveries` (one lane's, in delivery order) until each is
/// settled, or given back at shutdown. `Err` means the broker failed: the
/// session reconnects, and whatever is unacked is redelivered.
pub(crate) async fn handle<H: Handler>(
    shared: &Shared<H>,
    publisher: &Publisher,
    deliveries: Vec<Delivery>,
) -> Result<(), BrokerError> {
    let mut items = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        if let Some(item) = admit(shared, publisher, delivery).await? {
            items.push(item);
        }
    }
    shared.meters.batch_size.record(items.len() as f64);
    let mut todo = VecDeque::from([Step::Commit(items)]);
    let mut outage = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    while let Some(step) = todo.pop_front() {
        let segment = match step {
            Step::Settle(item, Failed::Transient(reason))
                if ordering_key(&item.delivery).is_some()
                    && item.deliveries < shared.config.max_deliveries =>
            {
                let left = 1 + todo.iter().map(Step::len).sum::<usize>();
                match retry_in_place(shared, *item, &reason, left).await {
                    Some(item) => todo.push_front(Step::Commit(vec![item])),
                    None => return Ok(()),
                }
                continue;
            }
            Step::Settle(item, failed) => {
                settle_failure(shared, publisher, *item, failed).await?;
                continue;
            }
            Step::Commit(segment) | Step::CommitOneByOne(segment) if segment.is_empty() => {
                continue;
            }
            Step::Commit(segment) => (segment, false),
            Step::CommitOneByOne(segment) => (segment, true),
        };
        let (mut segment, one_by_one) = segment;
        let started = Instant::now();
        let messages: Vec<&Incoming> = segment.iter().map(|item| &item.message).collect();
        let mut steps = Timeline::default();
        let result = shared
            .inbox
            .handle(
                &shared.pool,
                &shared.handler,
                &messages,
                one_by_one,
                &mut steps,
            )
            .await;
        shared
            .meters
            .handle_seconds
            .record(started.elapsed().as_secs_f64());
        let failure = match result {
            Ok(handled) => {
                health::database_up(&shared.health);
                outage.reset();
                ack_all(shared, segment, handled, &steps).await?;
                continue;
            }
            Err(failure) => failure,
        };
        match failure {
            BatchFailure::Message(_, HandlerError::Unavailable(reason))
            | BatchFailure::Batch(HandlerError::Unavailable(reason))
            | BatchFailure::Somewhere(HandlerError::Unavailable(reason)) => {
                health::database_down(&shared.health, &reason);
                let left = segment.len() + todo.iter().map(Step::len).sum::<usize>();
                if !wait_or_give_back(shared, outage.next_delay(), left).await {
                    return Ok(());
                }
                todo.push_front(Step::Commit(segment));
            }
            BatchFailure::Message(_, error) if segment.len() == 1 => {
                if let Some(item) = segment.pop() {
                    todo.push_front(Step::Settle(Box::new(item), fault(error)));
                }
            }
            BatchFailure::Message(at, _) => {
                // The failing message is tried alone before it is blamed:
                // its failure may be an earlier one's doing (a handler
                // that swallowed a failed statement aborts the rest of
                // the transaction).
                let rest = segment.split_off(at + 1);
                todo.push_front(Step::Commit(rest));
                if let Some(failed) = segment.pop() {
                    todo.push_front(Step::Commit(vec![failed]));
                }
                todo.push_front(Step::Commit(segment));
            }
            BatchFailure::Batch(error) | BatchFailure::Somewhere(error) if segment.len() == 1 => {
                if let Some(item) = segment.pop() {
                    todo.push_front(Step::Settle(Box::new(item), fault(error)));
                }
            }
            BatchFailure::Somewhere(error) => {
                tracing::debug!(%error, size = segment.len(), "batch failed; handling it one by one");
                todo.push_front(Step::CommitOneByOne(segment));
            }
            BatchFailure::Batch(error) => {
                tracing::debug!(%error, size = segment.len(), "batch failed; one transaction each");
                for item in segment.into_iter().rev() {
                    todo.push_front(Step::Commit(vec![item]));
                }
            }
        }
    }
    Ok(())
}

/// A keyed message's transient failure, retried in place after its
/// backoff: a copy through the retry queue would let the key's later
/// messages pass it, so the lane waits. `None` when shutdown came first.
async fn retry_in_place<H: Handler>(
    shared: &Shared<H>,
    mut item: Item,
    reason: &str,
    left: usize,
) -> Option<Item> {
    let delay = retry_delay(&shared.config, item.deliveries);
    item.span.event("retried in place", reason);
    tracing::info!(
        message_id = %item.message.message_id,
        deliveries = item.deliveries,
        ?delay,
        %reason,
        "transient failure of a keyed message; retrying it in its lane"
    );
    if !wait_or_give_back(shared, delay, left).await {
        return None;
    }
    item.deliveries += 1;
    item.message.delivery = item.deliveries;
    shared.meters.retried_in_place.increment(1);
    Some(item)
}

/// Sleeps `delay`; false when shutdown came first, with the `left`
/// deliveries counted as given back (unacked, the broker redelivers them
/// when the channel closes).
async fn wait_or_give_back<H: Handler>(shared: &Shared<H>, delay: Duration, left: usize) -> bool {
    tokio::select! {
        _ = shared.shutdown.cancelled() => {
            shared.meters.settled(Settled::GivenBack).increment(left as u64);
            false
        }
        _ = tokio::time::sleep(delay) => true,
    }
}

impl Step {
    fn len(&self) -> usize {
        match self {
            Step::Commit(items) | Step::CommitOneByOne(items) => items.len(),
            Step::Settle(..) => 1,
        }
    }
}

/// The error of a handled message, an unavailable database ruled out.
fn fault(error: HandlerError) -> Failed {
    match error {
        HandlerError::Poison(reason) => Failed::Poison(reason),
        HandlerError::Transient(reason) | HandlerError::Unavailable(reason) => {
            Failed::Transient(reason)
        }
    }
}

/// Acks a committed batch, all at once (the frames go out in order).
async fn ack_all<H: Handler>(
    shared: &Shared<H>,
    mut segment: Vec<Item>,
    handled: Vec<Handled>,
    steps: &Timeline,
) -> Result<(), BrokerError> {
    let settled = |handled: &Handled| match handled {
        Handled::Committed => Settled::Processed,
        Handled::Duplicate => Settled::Duplicate,
    };
    let acks = segment.iter().zip(&handled).map(|(item, handled)| {
        // In the delivery's span: its log line names the message and trace.
        ack(&item.delivery, settled(handled), &shared.meters).instrument(span(&item.delivery))
    });
    let acked = futures::future::join_all(acks)
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()
        .map(|_| ());
    for (item, handled) in segment.iter_mut().zip(&handled) {
        match acked {
            Ok(()) => item.span.processed(settled(handled).label(), steps),
            // Committed, but redelivered: the inbox will know it.
            Err(_) => item
                .span
                .failed("ack_lost", "the channel closed before the ack"),
        }
    }
    acked
}
