//! The work the lanes share: keyless deliveries, and each key's backlog,
//! taken oldest first. A key a lane has in hand is busy: its later
//! deliveries wait in its backlog and no other lane takes them until that
//! lane is done with it, so a key is in one lane at a time while the
//! other lanes take everything else. The `sequencer` lives here too,
//! under the same lock: a key's held messages go back to its backlog when
//! their wait runs out, and only while no lane has the key.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use lapin::message::Delivery;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::message::ordering_key;
use crate::sequencer::{Bounds, Sequencer};

/// A delivery and when it came (a count, for "oldest first").
pub(crate) type Arrived = (u64, Delivery);

/// The work the lanes share.
pub(crate) struct Work {
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
pub(crate) struct Taken {
    pub deliveries: Vec<Arrived>,
    pub keys: Vec<Vec<u8>>,
}

impl Work {
    pub(crate) fn new(bounds: Bounds) -> Work {
        Work {
            state: Mutex::new(State::new(bounds)),
            changed: Notify::new(),
        }
    }

    /// Queues a delivery from the broker.
    pub(crate) fn send(&self, delivery: Delivery) {
        self.lock().push(delivery);
        self.changed.notify_one();
    }

    /// Lanes stop taking work: each ends after the batch in hand.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_waiters();
    }

    /// Wakes the lanes to look again (a held message's wait changed).
    pub(crate) fn recheck(&self) {
        self.changed.notify_waiters();
    }

    /// Deliveries no lane took (held by the sequencer, or waiting).
    pub(crate) fn left(&self) -> usize {
        let state = self.lock();
        state.keyless.len()
            + state.keys.values().map(|b| b.waiting.len()).sum::<usize>()
            + state.sequencer.holding()
    }

    /// Keyed deliveries waiting for their key's batch in another lane.
    pub(crate) fn behind_busy_keys(&self) -> usize {
        self.lock().behind_busy_keys()
    }

    /// Runs `f` on the sequencer, with what says whether a key is in a
    /// lane's hands or waiting for one.
    pub(crate) fn sequencer<R>(
        &self,
        f: impl FnOnce(&mut Sequencer<Arrived>, &dyn Fn(&[u8]) -> bool) -> R,
    ) -> R {
        let mut state = self.lock();
        let State {
            sequencer, keys, ..
        } = &mut *state;
        f(sequencer, &|key| keys.contains_key(key))
    }
    fn lock(&self) -> MutexGuard<'_, State> {
        // A lane that panicked holding the lock left nothing half-done
        // that matters more than going on: the session ends on its panic.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next batch, at most `limit`: waits until there is work, or a
    /// held message's wait runs out. `None` at shutdown or once closed.
    pub(crate) async fn take(&self, shutdown: &CancellationToken, limit: usize) -> Option<Taken> {
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
                _ = shutdown.cancelled() => return None,
                _ = &mut changed => {}
                _ = sleep_until(deadline) => {}
            }
        }
    }

    /// The lane is done with `keys`: their waiting messages are free.
    pub(crate) fn release(&self, keys: Vec<Vec<u8>>) {
        let mut state = self.lock();
        for key in keys {
            state.release(key);
        }
        drop(state);
        self.changed.notify_waiters();
    }
}

impl State {
    fn new(bounds: Bounds) -> State {
        State {
            arrivals: 0,
            keyless: VecDeque::new(),
            keys: HashMap::new(),
            free: BTreeMap::new(),
            sequencer: Sequencer::new(bounds),
            closed: false,
        }
    }

    fn push(&mut self, delivery: Delivery) {
        let arrived = (self.arrivals, delivery);
        self.arrivals += 1;
        match ordering_key(&arrived.1).map(<[u8]>::to_vec) {
            None => self.keyless.push_back(arrived),
            Some(key) => self.wait(key, [arrived]),
        }
    }

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
    use crate::message::{KEY_HEADER, SEQ_HEADER};
    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, FieldTable};
    use std::sync::Arc;
    use std::time::Duration;

    fn state(wait: Duration) -> State {
        State::new(Bounds {
            wait,
            shared_queue: Arc::default(),
            most_held: 100,
            held: Arc::default(),
        })
    }

    /// A delivery tagged `tag`, of `key` (numbered `seq`) or keyless.
    fn delivery(tag: u64, key: Option<(&str, i64)>) -> Delivery {
        let mut delivery = Delivery::mock(tag, "ex".into(), "".into(), false, Vec::new());
        if let Some((key, seq)) = key {
            let mut headers = FieldTable::default();
            headers.insert(KEY_HEADER.into(), AMQPValue::LongString(key.into()));
            headers.insert(SEQ_HEADER.into(), AMQPValue::LongLongInt(seq));
            delivery.properties = BasicProperties::default().with_headers(headers);
        }
        delivery
    }

    fn tags(taken: &Option<Taken>) -> Vec<u64> {
        taken
            .iter()
            .flat_map(|t| &t.deliveries)
            .map(|(_, d)| d.delivery_tag)
            .collect()
    }

    /// The lane with key `a` in hand does not stop the others: they take
    /// the keyless messages and the other keys, oldest first, and `a`'s
    /// later messages wait for it, then go on in order.
    #[test]
    fn a_busy_key_waits_and_everything_else_goes_on() {
        let mut s = state(Duration::ZERO);
        s.push(delivery(1, Some(("a", 1))));
        let first = s.take(10, Instant::now());
        assert_eq!(tags(&first), [1]);
        s.push(delivery(2, Some(("a", 2))));
        s.push(delivery(3, None));
        s.push(delivery(4, Some(("b", 1))));
        s.push(delivery(5, Some(("a", 3))));
        s.push(delivery(6, Some(("b", 2))));
        assert_eq!(s.behind_busy_keys(), 2);
        let second = s.take(2, Instant::now());
        assert_eq!(tags(&second), [3, 4], "oldest first, at most the limit");
        let third = s.take(10, Instant::now());
        assert_eq!(tags(&third), Vec::<u64>::new(), "b is in hand, a too");
        for taken in [first, second].into_iter().flatten() {
            for key in taken.keys {
                s.release(key);
            }
        }
        let fourth = s.take(10, Instant::now());
        assert_eq!(tags(&fourth), [2, 5, 6], "each key's in order");
        assert!(s.keys.values().all(|backlog| backlog.busy));
    }

    /// Messages held for a missing number go back to their key's backlog
    /// when their wait runs out, but not while a lane has the key.
    #[test]
    fn held_messages_come_back_when_their_key_is_free() {
        let wait = Duration::from_secs(10);
        let mut s = state(wait);
        let now = Instant::now();
        s.sequencer.learn(b"a", None);
        let (mut ready, mut given_back) = (Vec::new(), Vec::new());
        let early = (0, delivery(7, Some(("a", 3))));
        s.sequencer
            .offer(b"a", 3, early, now, &mut ready, &mut given_back);
        assert!(given_back.is_empty());
        assert!(ready.is_empty(), "3 waits for 1");
        s.push(delivery(8, Some(("a", 4))));
        let in_hand = s.take(10, now);
        assert_eq!(tags(&in_hand), [8]);
        assert_eq!(s.deadline(), None, "a is in a lane's hands");
        assert_eq!(tags(&s.take(10, now + wait)), Vec::<u64>::new());
        s.release(b"a".to_vec());
        assert_eq!(s.deadline(), Some(now + wait));
        assert_eq!(tags(&s.take(10, now + wait)), [7]);
    }
}
