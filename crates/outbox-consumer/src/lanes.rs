//! Deliveries in lanes. A lane is a task that handles one batch at a time
//! (see `batch`), so `lanes` transactions run at once. A free lane takes
//! the oldest work there is, keyless or keyed, up to `batch_size`. A keyed
//! message (header `x-outbox-key`, which the relay sets from the row's
//! `ordering_key`) is never in two lanes at once: while a lane has one of
//! a key's messages in hand the key is busy, and the key's later messages
//! wait in its backlog until that batch is done; they are then the next
//! lane's, in delivery order. So one consumer commits a key's effects in
//! order, and a slow message holds up its own batch and its own key's
//! later messages, nothing else: the other keys and the keyless messages
//! go to the other lanes. (Keys used to be pinned to a lane by hash: a
//! stuck lane's queue filled with the keys that hash there until the
//! prefetch window was full of them, and the broker delivered nothing
//! more.) Before its batch, a keyed message that came before an earlier
//! one of its key may wait in the `sequencer` (unless other consumers
//! share the queue), which learns each key's watermark from the database the first
//! time the consumer sees the key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::BasicNackOptions;
use outbox_service::backoff::Backoff;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::batch;
use crate::broker::Publisher;
use crate::handler::Handler;
use crate::handler::HandlerError;
use crate::health;
use crate::message::numbered;
use crate::meters::{Meters, Settled};
use crate::shared::{Outcome, Shared};
use crate::work::{Arrived, Work};

/// Where the session hands deliveries; [`Lanes::close`] ends the lanes.
/// (Prefetch bounds what they hold.)
pub(crate) struct Lanes {
    work: Arc<Work>,
}

impl Lanes {
    /// Starts the lanes as tasks of `tasks`.
    pub(crate) fn start<H: Handler>(
        shared: &Arc<Shared<H>>,
        publisher: &Publisher,
        tasks: &mut JoinSet<Outcome>,
    ) -> Lanes {
        let work = Arc::new(Work::new(shared.bounds.clone()));
        for _ in 0..shared.config.lanes.max(1) {
            tasks.spawn(lane(shared.clone(), publisher.clone(), work.clone()));
        }
        Lanes { work }
    }

    pub(crate) fn send(&self, delivery: Delivery) {
        self.work.send(delivery);
    }

    /// Lanes stop taking work: each ends after the batch in hand.
    pub(crate) fn close(&self) {
        self.work.close();
    }

    /// Deliveries no lane took (held by the sequencer, or waiting): once
    /// the lanes are gone they go back with the channel.
    pub(crate) fn left(&self) -> usize {
        self.work.left()
    }

    /// Has the lanes look at their held messages again (their wait
    /// changed: other consumers came to share the queue).
    pub(crate) fn recheck(&self) {
        self.work.recheck();
    }
}

async fn lane<H: Handler>(
    shared: Arc<Shared<H>>,
    publisher: Publisher,
    work: Arc<Work>,
) -> Outcome {
    let limit = usize::from(shared.config.batch_size.max(1));
    loop {
        let Some(taken) = work.take(&shared.shutdown, limit).await else {
            return Outcome::Settled;
        };
        shared
            .meters
            .key_backlog
            .set(work.behind_busy_keys() as f64);
        if !learn_keys(&shared, &work, &taken.deliveries).await {
            given_back(&shared, taken.deliveries.len());
            return Outcome::Settled;
        }
        let ready = in_order(&shared.meters, &work, taken.deliveries);
        let handled = if ready.is_empty() {
            Ok(())
        } else {
            let count = ready.len();
            let handled = batch::handle(&shared, &publisher, ready).await;
            shared.meters.in_flight.decrement(count as f64);
            handled
        };
        if let Err(error) = handled {
            // The session ends; the keys stay busy with it.
            return Outcome::BrokerFailed(error);
        }
        work.release(taken.keys);
    }
}

/// Counts deliveries left unacked: they come again with the next channel.
pub(crate) fn given_back<H: Handler>(shared: &Shared<H>, count: usize) {
    shared
        .meters
        .settled(Settled::GivenBack)
        .increment(count as u64);
    shared.meters.in_flight.decrement(count as f64);
}

/// Learns the watermark of each key among `deliveries` that the
/// sequencer does not know yet. While the database cannot answer it tries
/// again (the deliveries stay unacked); false when shutdown came first.
async fn learn_keys<H: Handler>(shared: &Shared<H>, work: &Work, deliveries: &[Arrived]) -> bool {
    let mut unknown: Vec<Vec<u8>> = work.sequencer(|sequencer, in_hand| {
        // The keys of these deliveries are in this lane's hands.
        sequencer.forget_idle(in_hand);
        deliveries
            .iter()
            .filter_map(|(_, delivery)| numbered(&delivery.properties))
            .map(|(key, _)| key)
            .filter(|key| !sequencer.knows(key))
            .map(<[u8]>::to_vec)
            .collect()
    });
    if unknown.is_empty() {
        return true;
    }
    unknown.sort_unstable();
    unknown.dedup();
    let mut outage = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let reason = match shared.inbox.keys.watermarks(&shared.pool, &unknown).await {
            Ok(found) => {
                health::database_up(&shared.health);
                let found: HashMap<Vec<u8>, i64> = found.into_iter().collect();
                work.sequencer(|sequencer, _| {
                    for key in &unknown {
                        sequencer.learn(key, found.get(key).copied());
                    }
                });
                return true;
            }
            Err(HandlerError::Unavailable(reason)) => {
                health::database_down(&shared.health, &reason);
                reason
            }
            Err(other) => other.to_string(),
        };
        let delay = outage.next_delay();
        tracing::warn!(%reason, ?delay, "cannot read the keys' watermarks; trying again");
        tokio::select! {
            _ = shared.shutdown.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// How long an early message with no room to wait in stays before it goes
/// back to the queue: it comes straight back when nothing is ahead of it,
/// and this keeps that from spinning.
const GIVE_BACK_AFTER: Duration = Duration::from_millis(100);

/// Puts an early message back in the queue (`nack`, requeued: no failure
/// of the message, and RabbitMQ 4.3 does not count it either), so that
/// the missing ones, behind it in the prefetch window, can come.
fn give_back_later(meters: &Meters, delivery: Delivery) {
    meters.settled(Settled::GivenBack).increment(1);
    meters.in_flight.decrement(1.0);
    tokio::spawn(async move {
        tokio::time::sleep(GIVE_BACK_AFTER).await;
        let requeue = BasicNackOptions {
            requeue: true,
            multiple: false,
        };
        // A closed channel gave it back already.
        let _ = delivery.acker.nack(requeue).await;
    });
}

/// What of `deliveries` (and of the messages held before) may be handled
/// now, in order: a keyed, numbered message may wait in the sequencer
/// while an earlier one of its key is missing.
fn in_order(meters: &Meters, work: &Work, deliveries: Vec<Arrived>) -> Vec<Delivery> {
    let now = Instant::now();
    let mut ready = Vec::with_capacity(deliveries.len());
    let mut given_back = Vec::new();
    let (gaps, waits, held) = work.sequencer(|sequencer, _| {
        for arrived in deliveries {
            let numbered = numbered(&arrived.1.properties).map(|(key, seq)| (key.to_vec(), seq));
            match numbered {
                Some((key, seq)) => {
                    sequencer.offer(&key, seq, arrived, now, &mut ready, &mut given_back);
                }
                None => ready.push(arrived),
            }
        }
        (
            sequencer.take_gaps(),
            sequencer.take_waits(),
            sequencer.holding(),
        )
    });
    for (_, delivery) in given_back {
        give_back_later(meters, delivery);
    }
    meters.key_gaps.increment(gaps);
    meters.key_held.set(held as f64);
    meters.key_waits.increment(waits.begun);
    for waited in waits.ended {
        meters.key_wait_seconds.record(waited.as_secs_f64());
    }
    ready.into_iter().map(|(_, delivery)| delivery).collect()
}
