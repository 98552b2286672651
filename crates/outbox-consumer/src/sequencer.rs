//! Puts a key's messages back in order by their sequence number
//! (`x-outbox-seq`, which the relay gives each keyed row, with no gaps per
//! key). A relay that pipelines a key (`OUTBOX_KEY_PIPELINE`) has several
//! of its rows in flight at once; when one of them is nacked or returned,
//! the ones behind it may be confirmed and reach the queue first, and the
//! failed row comes again after its retry. Such early messages wait here
//! until the missing one arrives, then go on in order.
//!
//! An early message waits only where its missing number can still come:
//! a relay that pipelines a key, or the broker giving deliveries back out
//! of order (a quorum queue returns a stopped consumer's deliveries in no
//! set order, so after a rolling restart a key's later message can come
//! before the earlier one given back), both to a consumer alone on its
//! queue or its single active consumer. While other consumers share the
//! queue (counted every few seconds, twice in a row: see `consumer`'s
//! `Sharing`) nothing waits: RabbitMQ hands each a
//! share of every key's numbers, and a number missing here went to
//! another one (such consumers cannot keep a key's order anyway). A queue
//! that sees only some of a key's numbers (a key used on several
//! exchanges, the numbers spanning them all) waits for each gap, metered:
//! give each exchange keys of its own, or set `key_gap_wait` to zero.
//!
//! Waiting is bounded: by time (`key_gap_wait`) and by count (half the
//! prefetch across the consumer, since held deliveries stay unacked and
//! a full prefetch window would keep the missing one from being
//! delivered at all). Past either bound the gap is accepted, logged and
//! metered (`consumer_key_gaps_total`): an operator who discarded a dead
//! row that rows behind it had been numbered after (`outbox-relay dead
//! discard`) leaves such a gap for good. Each wait is metered when it
//! begins (`consumer_key_waits_total`) and when it ends
//! (`consumer_key_wait_seconds`).
//!
//! A message below the key's next expected number is a copy or a late one
//! and goes on at once: the inbox recognises a copy. One sequencer serves
//! the consumer's lanes (a key is in one lane at a time, see `lanes`); it
//! learns a key's number from its watermark in the database
//! (`<inbox>_keys`, moved in the transaction of each effect) the first
//! time it sees the key, so a consumer that restarts, or takes a queue
//! over, expects what the last one committed. A key with no watermark
//! expects 1, the relay's first number. Past `MOST_KEYS` it forgets the
//! keys it holds nothing for, and learns them again when they come back.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use outbox::shown_key;
use tokio::time::Instant;

/// How long and how many keyed messages may wait for earlier ones.
#[derive(Debug, Clone)]
pub(crate) struct Bounds {
    /// Zero: nothing waits (see the module's header).
    pub wait: Duration,
    /// Other consumers share the queue: nothing waits, and what waits
    /// goes on.
    pub shared_queue: Arc<AtomicBool>,
    pub most_held: usize,
    /// Deliveries held right now.
    pub held: Arc<AtomicUsize>,
}

impl Bounds {
    /// Whether an early message waits at all.
    pub(crate) fn waits(&self) -> bool {
        !self.wait_now().is_zero()
    }

    /// Deliveries held right now.
    pub(crate) fn held_now(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// How long an early message waits now.
    fn wait_now(&self) -> Duration {
        if self.shared_queue.load(Ordering::Relaxed) {
            Duration::ZERO
        } else {
            self.wait
        }
    }
}

struct Held<T> {
    item: T,
    since: Instant,
}

/// A key's early messages, by number (copies of one number together).
struct Waiting<T> {
    /// When the key began to wait (its first early message), for the
    /// wait's length.
    since: Instant,
    by_seq: BTreeMap<i64, Vec<Held<T>>>,
}

/// Waits since the caller last asked: how many began, how long the ended
/// ones lasted.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Waits {
    pub begun: u64,
    pub ended: Vec<Duration>,
}

/// How many deliveries may wait for earlier ones with this prefetch. Held
/// deliveries stay unacked, and a prefetch window full of them would keep
/// the missing one from being delivered at all: half of it, and none with
/// a prefetch of 1 (waiting could only time out). Prefetch 0 is unbounded
/// at the broker: the bound is ours.
pub(crate) fn most_held(prefetch: u16) -> usize {
    match prefetch {
        0 => 10_000,
        prefetch => usize::from(prefetch / 2),
    }
}

/// Keys remembered before the idle ones are forgotten.
const MOST_KEYS: usize = 100_000;

/// The consumer's keys: the number each expects, and its early messages.
pub(crate) struct Sequencer<T> {
    bounds: Bounds,
    /// The number each key's next message should carry.
    next: HashMap<Vec<u8>, i64>,
    held: HashMap<Vec<u8>, Waiting<T>>,
    /// Keys whose early messages went back for want of room, since when.
    giving_back: HashMap<Vec<u8>, Instant>,
    /// Gaps accepted since the caller last asked.
    gaps: u64,
    waits: Waits,
}

impl<T> Sequencer<T> {
    pub(crate) fn new(bounds: Bounds) -> Sequencer<T> {
        Sequencer {
            bounds,
            next: HashMap::new(),
            held: HashMap::new(),
            giving_back: HashMap::new(),
            gaps: 0,
            waits: Waits::default(),
        }
    }

    /// Whether the key's next number is known (else [`Self::learn`] it
    /// before offering its messages).
    pub(crate) fn knows(&self, key: &[u8]) -> bool {
        self.next.contains_key(key)
    }

    /// The key's watermark from the database: the highest number that
    /// committed, or `None` for a key with no effect yet.
    pub(crate) fn learn(&mut self, key: &[u8], watermark: Option<i64>) {
        let next = watermark.map_or(1, |last| last.saturating_add(1));
        self.next.entry(key.to_vec()).or_insert(next);
    }

    /// Past `MOST_KEYS`, forgets the keys that hold nothing and that
    /// `keep` does not name (the keys of messages in a lane's hands: a
    /// key forgotten between learning and offering would take its message
    /// as it comes).
    pub(crate) fn forget_idle(&mut self, keep: impl Fn(&[u8]) -> bool) {
        if self.next.len() < MOST_KEYS {
            return;
        }
        let held = &self.held;
        self.next
            .retain(|key, _| held.contains_key(key) || keep(key));
        self.giving_back.retain(|key, _| keep(key));
    }

    /// Takes a keyed, numbered message; appends to `ready`, in order, what
    /// may be handled now (this one, and any it was the missing one for),
    /// or to `give_back` an early message for which there is no room: held
    /// deliveries fill the prefetch window, and the missing ones must still
    /// find room in it (see [`Sequencer::make_room`]).
    pub(crate) fn offer(
        &mut self,
        key: &[u8],
        seq: i64,
        item: T,
        now: Instant,
        ready: &mut Vec<T>,
        give_back: &mut Vec<T>,
    ) {
        let expected = self.next.get(key).copied();
        match expected {
            Some(next) if seq > next && self.bounds.waits() => {
                let full = self.bounds.held_now() >= self.bounds.most_held;
                if full && self.make_room(key, next, now) {
                    give_back.push(item);
                    return;
                }
                let held = Held { item, since: now };
                let waiting = self.held.entry(key.to_vec()).or_insert_with(|| {
                    self.waits.begun += 1;
                    Waiting {
                        since: now,
                        by_seq: BTreeMap::new(),
                    }
                });
                waiting.by_seq.entry(seq).or_default().push(held);
                self.bounds.held.fetch_add(1, Ordering::Relaxed);
                if full {
                    self.accept_gap(key, now, ready);
                }
            }
            // A copy, or one that came after its key moved past it.
            Some(next) if seq < next => ready.push(item),
            // Next, a key not learned, or one past a gap not waited for:
            // taken as it comes.
            _ => {
                self.giving_back.remove(key);
                ready.push(item);
                self.next.insert(key.to_vec(), seq.saturating_add(1));
                self.release(key, now, ready);
            }
        }
    }

    /// Gives up waiting for the keys `free` names whose oldest early
    /// message waited `key_gap_wait`: returns each one's messages that go
    /// on, in order.
    pub(crate) fn expire(
        &mut self,
        now: Instant,
        free: impl Fn(&[u8]) -> bool,
    ) -> Vec<(Vec<u8>, Vec<T>)> {
        let overdue: Vec<Vec<u8>> = self
            .held
            .iter()
            .filter(|(key, waiting)| {
                free(key)
                    && oldest(waiting).is_some_and(|since| now >= since + self.bounds.wait_now())
            })
            .map(|(key, _)| key.clone())
            .collect();
        let mut expired = Vec::with_capacity(overdue.len());
        for key in overdue {
            tracing::warn!(
                key = %shown_key(&key),
                missing = self.next.get(&key).copied().unwrap_or_default(),
                waited = ?self.bounds.wait_now(),
                "an earlier message of this key did not come; handling the later ones without it"
            );
            let mut ready = Vec::new();
            self.accept_gap(&key, now, &mut ready);
            expired.push((key, ready));
        }
        expired
    }

    /// When the next wait of a key `free` names runs out.
    pub(crate) fn deadline(&self, free: impl Fn(&[u8]) -> bool) -> Option<Instant> {
        self.held
            .iter()
            .filter(|(key, _)| free(key))
            .filter_map(|(_, waiting)| oldest(waiting))
            .min()
            .map(|since| since + self.bounds.wait_now())
    }

    /// With the held messages at their bound: whether an early message of
    /// `key` goes back to the queue (true), to come again once the missing
    /// ones had room, or its key takes its messages as they are (false).
    /// A quorum queue gives a stopped consumer's deliveries back after
    /// fresh ones, so after a restart many keys' later messages come
    /// first; taking them as they are inverted those keys. A key gives
    /// back for `key_gap_wait` at most, and not at all with no room to
    /// wait in (prefetch 1).
    fn make_room(&mut self, key: &[u8], missing: i64, now: Instant) -> bool {
        let wait = self.bounds.wait_now();
        let since = *self.giving_back.entry(key.to_vec()).or_insert(now);
        if self.bounds.most_held > 0 && now < since + wait {
            return true;
        }
        self.giving_back.remove(key);
        tracing::warn!(
            key = %shown_key(key),
            missing,
            held = self.bounds.held_now(),
            "too many messages wait for earlier ones of their key; taking this key's as they are"
        );
        false
    }

    /// Gaps accepted since the last call.
    pub(crate) fn take_gaps(&mut self) -> u64 {
        std::mem::take(&mut self.gaps)
    }

    /// Waits begun and ended since the last call.
    pub(crate) fn take_waits(&mut self) -> Waits {
        std::mem::take(&mut self.waits)
    }

    /// Messages held.
    pub(crate) fn holding(&self) -> usize {
        self.held
            .values()
            .flat_map(|waiting| waiting.by_seq.values())
            .map(Vec::len)
            .sum()
    }

    /// Moves the key on to its lowest held number and releases from there.
    fn accept_gap(&mut self, key: &[u8], now: Instant, ready: &mut Vec<T>) {
        let lowest = self
            .held
            .get(key)
            .and_then(|waiting| waiting.by_seq.keys().next().copied());
        if let Some(lowest) = lowest {
            self.gaps += 1;
            self.next.insert(key.to_vec(), lowest);
            self.release(key, now, ready);
        }
    }

    /// Releases the key's held messages that are now next, in order; the
    /// key's wait ends when none is left.
    fn release(&mut self, key: &[u8], now: Instant, ready: &mut Vec<T>) {
        let Some(waiting) = self.held.get_mut(key) else {
            return;
        };
        let Some(next) = self.next.get_mut(key) else {
            return;
        };
        while let Some(copies) = waiting.by_seq.remove(&*next) {
            self.bounds.held.fetch_sub(copies.len(), Ordering::Relaxed);
            ready.extend(copies.into_iter().map(|held| held.item));
            *next = next.saturating_add(1);
        }
        if waiting.by_seq.is_empty() {
            self.waits
                .ended
                .push(now.saturating_duration_since(waiting.since));
            self.held.remove(key);
        }
    }
}

/// When the key's oldest held message came.
fn oldest<T>(waiting: &Waiting<T>) -> Option<Instant> {
    waiting
        .by_seq
        .values()
        .flatten()
        .map(|held| held.since)
        .min()
}

impl<T> Drop for Sequencer<T> {
    /// Held deliveries go back to the broker with the channel; they no
    /// longer count against the bound.
    fn drop(&mut self) {
        self.bounds
            .held
            .fetch_sub(self.holding(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
