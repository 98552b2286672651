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
//! one of its key may wait in the `sequencer` (when `key_gap_wait` is
//! set), which learns each key's watermark from the database the first
//! time the consumer sees the key.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use outbox_service::backoff::Backoff;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::batch;
use crate::broker::Publisher;
use crate::handler::Handler;
use crate::handler::HandlerError;
use crate::health;
use crate::meters::{Meters, Settled};
use crate::sequencer::Sequencer;
use crate::worker::{Outcome, Shared};

/// The header naming a message's ordering key.
pub const KEY_HEADER: &str = "x-outbox-key";
/// The header numbering a keyed message among its key's (from the relay's
/// `key_seq`): consecutive, with no gaps.
pub const SEQ_HEADER: &str = "x-outbox-seq";

/// A delivery and when it came (a count, for "oldest first").
type Arrived = (u64, Delivery);

/// Where the session hands deliveries; [`Lanes::close`] ends the lanes.
/// (Prefetch bounds what they hold.)
pub(crate) struct Lanes {
    work: Arc<Work>,
}

/// The work the lanes share.
struct Work {
    state: Mutex<State>,
    /// Something to take, or closed.
    changed: Notify,
}

struct State {
    arrivals: u64,
    keyless: VecDeque<Arrived>,
    /// Keys in a lane's hands (busy) or with messages waiting for a lane.
    keys: HashMap<Vec<u8>, Backlog>,
    /// Keys not busy whose messages wait, by their oldest one's arrival.
    free: BTreeMap<u64, Vec<u8>>,
    sequencer: Sequencer<Arrived>,
    closed: bool,
}

/// A key's messages not yet in a lane's hands, in delivery order.
#[derive(Default)]
struct Backlog {
    busy: bool,
    waiting: VecDeque<Arrived>,
}

/// What a lane took: deliveries, and the keys it now has in hand.
struct Taken {
    deliveries: Vec<Arrived>,
    keys: Vec<Vec<u8>>,
}

impl Lanes {
    /// Starts the lanes as tasks of `tasks`.
    pub(crate) fn start<H: Handler>(
        shared: &Arc<Shared<H>>,
        publisher: &Publisher,
        tasks: &mut JoinSet<Outcome>,
    ) -> Lanes {
        let work = Arc::new(Work {
            state: Mutex::new(State {
                arrivals: 0,
                keyless: VecDeque::new(),
                keys: HashMap::new(),
                free: BTreeMap::new(),
                sequencer: Sequencer::new(shared.bounds.clone()),
                closed: false,
            }),
            changed: Notify::new(),
        });
        for _ in 0..shared.config.lanes.max(1) {
            tasks.spawn(lane(shared.clone(), publisher.clone(), work.clone()));
        }
        Lanes { work }
    }

    pub(crate) fn send(&self, delivery: Delivery) {
        let mut state = self.work.lock();
        let arrived = (state.arrivals, delivery);
        state.arrivals += 1;
        match ordering_key(&arrived.1).map(<[u8]>::to_vec) {
            None => state.keyless.push_back(arrived),
            Some(key) => state.wait(key, [arrived]),
        }
        drop(state);
        self.work.changed.notify_one();
    }

    /// Lanes stop taking work: each ends after the batch in hand.
    pub(crate) fn close(&self) {
        self.work.lock().closed = true;
        self.work.changed.notify_waiters();
    }

    /// Deliveries no lane took (held by the sequencer, or waiting): once
    /// the lanes are gone they go back with the channel.
    pub(crate) fn left(&self) -> usize {
        let state = self.work.lock();
        state.keyless.len()
            + state.keys.values().map(|b| b.waiting.len()).sum::<usize>()
            + state.sequencer.holding()
    }
}

impl Work {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A lane that panicked holding the lock left nothing half-done
        // that matters more than going on: the session ends on its panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next batch, at most `limit`: waits until there is work, or a
    /// held message's wait runs out. `None` at shutdown or once closed.
    async fn take<H: Handler>(&self, shared: &Shared<H>, limit: usize) -> Option<Taken> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let deadline = {
                let mut state = self.lock();
                if state.closed {
                    return None;
                }
                if let Some(taken) = state.take(limit, Instant::now()) {
                    drop(state);
                    // There may be more than one lane's worth.
                    self.changed.notify_one();
                    return Some(taken);
                }
                state.deadline()
            };
            tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => return None,
                _ = &mut changed => {}
                _ = sleep_until(deadline) => {}
            }
        }
    }

    /// The lane is done with `keys`: their waiting messages are free.
    fn release(&self, keys: Vec<Vec<u8>>) {
        let mut state = self.lock();
        for key in keys {
            state.release(key);
        }
        drop(state);
        self.changed.notify_waiters();
    }
}

impl State {
    /// Queues `arrived` (in order) behind the key's.
    fn wait(&mut self, key: Vec<u8>, arrived: impl IntoIterator<Item = Arrived>) {
        let backlog = self.keys.entry(key.clone()).or_default();
        let was_free = !backlog.busy && backlog.waiting.is_empty();
        backlog.waiting.extend(arrived);
        if let (true, Some((first, _))) = (was_free, backlog.waiting.front()) {
            self.free.insert(*first, key);
        }
    }

    /// The oldest work, up to `limit`: keyless messages, and the waiting
    /// messages of keys no lane has (which become busy).
    fn take(&mut self, limit: usize, now: Instant) -> Option<Taken> {
        let keys = &self.keys;
        let expired = self.sequencer.expire(now, |key| !keys.contains_key(key));
        for (key, items) in expired {
            self.wait(key, items);
        }
        let mut taken = Taken {
            deliveries: Vec::new(),
            keys: Vec::new(),
        };
        while taken.deliveries.len() < limit {
            let keyless = self.keyless.front().map(|(n, _)| *n);
            let keyed = self.free.first_key_value().map(|(n, _)| *n);
            match (keyless, keyed) {
                (Some(keyless), Some(keyed)) if keyless < keyed => {
                    taken.deliveries.extend(self.keyless.pop_front());
                }
                (Some(_), None) => taken.deliveries.extend(self.keyless.pop_front()),
                (_, Some(_)) => {
                    let Some((_, key)) = self.free.pop_first() else {
                        break;
                    };
                    let backlog = self.keys.entry(key.clone()).or_default();
                    backlog.busy = true;
                    let room = limit - taken.deliveries.len();
                    let count = room.min(backlog.waiting.len());
                    taken.deliveries.extend(backlog.waiting.drain(..count));
                    taken.keys.push(key);
                }
                (None, None) => break,
            }
        }
        (!taken.deliveries.is_empty()).then_some(taken)
    }

    /// A lane is done with `key`.
    fn release(&mut self, key: Vec<u8>) {
        let Some(backlog) = self.keys.get_mut(&key) else {
            return;
        };
        backlog.busy = false;
        match backlog.waiting.front() {
            Some((first, _)) => {
                self.free.insert(*first, key);
            }
            None => {
                self.keys.remove(&key);
            }
        }
    }

    /// When the next held message's wait runs out (of keys no lane has:
    /// a busy key's comes up when it is released).
    fn deadline(&self) -> Option<Instant> {
        self.sequencer.deadline(|key| !self.keys.contains_key(key))
    }

    /// Keyed messages waiting for their key's batch in another lane.
    fn behind_busy_keys(&self) -> usize {
        self.keys
            .values()
            .filter(|backlog| backlog.busy)
            .map(|backlog| backlog.waiting.len())
            .sum()
    }
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

async fn lane<H: Handler>(
    shared: Arc<Shared<H>>,
    publisher: Publisher,
    work: Arc<Work>,
) -> Outcome {
    let limit = usize::from(shared.config.batch_size.max(1));
    loop {
        let Some(taken) = work.take(&shared, limit).await else {
            return Outcome::Settled;
        };
        shared
            .meters
            .key_backlog
            .set(work.lock().behind_busy_keys() as f64);
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
    let mut unknown: Vec<Vec<u8>> = {
        let mut state = work.lock();
        let State {
            sequencer, keys, ..
        } = &mut *state;
        // The keys of these deliveries are busy: in `keys`.
        sequencer.forget_idle(|key| keys.contains_key(key));
        deliveries
            .iter()
            .filter_map(|(_, delivery)| numbered(&delivery.properties))
            .map(|(key, _)| key)
            .filter(|key| !sequencer.knows(key))
            .map(<[u8]>::to_vec)
            .collect()
    };
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
                let mut state = work.lock();
                for key in &unknown {
                    state.sequencer.learn(key, found.get(key).copied());
                }
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

/// What of `deliveries` (and of the messages held before) may be handled
/// now, in order: a keyed, numbered message may wait in the sequencer
/// while an earlier one of its key is missing.
fn in_order(meters: &Meters, work: &Work, deliveries: Vec<Arrived>) -> Vec<Delivery> {
    let now = Instant::now();
    let mut ready = Vec::with_capacity(deliveries.len());
    let mut state = work.lock();
    for arrived in deliveries {
        let numbered = numbered(&arrived.1.properties).map(|(key, seq)| (key.to_vec(), seq));
        match numbered {
            Some((key, seq)) => state.sequencer.offer(&key, seq, arrived, now, &mut ready),
            None => ready.push(arrived),
        }
    }
    meters.key_gaps.increment(state.sequencer.take_gaps());
    let waits = state.sequencer.take_waits();
    meters.key_held.set(state.sequencer.holding() as f64);
    drop(state);
    meters.key_waits.increment(waits.begun);
    for waited in waits.ended {
        meters.key_wait_seconds.record(waited.as_secs_f64());
    }
    ready.into_iter().map(|(_, delivery)| delivery).collect()
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
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
}
