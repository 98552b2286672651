//! Puts a key's messages back in order by their sequence number
//! (`x-outbox-seq`, which the relay gives each keyed row, with no gaps per
//! key). A relay that pipelines a key (`OUTBOX_KEY_PIPELINE`) has several
//! of its rows in flight at once; when one of them is nacked or returned,
//! the ones behind it may be confirmed and reach the queue first, and the
//! failed row comes again after its retry. Such early messages wait here
//! until the missing one arrives, then go on in order.
//!
//! Waiting is bounded: by time (`key_gap_wait`) and by count (half the
//! prefetch across the consumer, since held deliveries stay unacked and
//! a full prefetch window would keep the missing one from being
//! delivered at all). Past either bound the gap is accepted, logged and
//! metered (`consumer_key_gaps_total`): an operator who discarded a dead
//! row that rows behind it had been numbered after (`outbox-relay dead
//! discard`) leaves such a gap for good.
//!
//! A message below the key's next expected number is a copy or a late one
//! and goes on at once: the inbox recognises a copy. The expected numbers
//! are kept per lane (a key always takes the same lane); the lane learns a
//! key's from its watermark in the database (`<inbox>_keys`, moved in the
//! transaction of each effect) the first time it sees the key, so a
//! consumer that restarts, or takes a queue over, expects what the last
//! one committed. A key with no watermark expects 1, the relay's first
//! number. Past `MOST_KEYS` a lane forgets the keys it holds nothing for,
//! and learns them again when they come back.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Bounds shared by every lane's sequencer.
#[derive(Debug, Clone)]
pub(crate) struct Bounds {
    pub wait: Duration,
    pub most_held: usize,
    /// Deliveries held across all lanes.
    pub held: Arc<AtomicUsize>,
}

impl Bounds {
    /// Deliveries held across all lanes right now.
    pub(crate) fn held_now(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

struct Held<T> {
    item: T,
    since: Instant,
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

/// Keys a lane remembers before it forgets the idle ones.
const MOST_KEYS: usize = 100_000;

/// One lane's keys.
pub(crate) struct Sequencer<T> {
    bounds: Bounds,
    /// The number each key's next message should carry.
    next: HashMap<Vec<u8>, i64>,
    /// Early messages, by key and number (copies of one number together).
    held: HashMap<Vec<u8>, BTreeMap<i64, Vec<Held<T>>>>,
    /// Gaps accepted since the caller last asked.
    gaps: u64,
}

impl<T> Sequencer<T> {
    pub(crate) fn new(bounds: Bounds) -> Sequencer<T> {
        Sequencer {
            bounds,
            next: HashMap::new(),
            held: HashMap::new(),
            gaps: 0,
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

    /// Past `MOST_KEYS`, forgets the keys that hold nothing and are not
    /// among `coming` (the keys of the messages about to be offered: a key
    /// forgotten between learning and offering would take its message as
    /// it comes).
    pub(crate) fn forget_idle(&mut self, coming: &[&[u8]]) {
        if self.next.len() < MOST_KEYS {
            return;
        }
        let held = &self.held;
        self.next
            .retain(|key, _| held.contains_key(key) || coming.contains(&key.as_slice()));
    }

    /// Takes a keyed, numbered message; appends to `ready`, in order, what
    /// may be handled now (this one, and any it was the missing one for).
    pub(crate) fn offer(
        &mut self,
        key: &[u8],
        seq: i64,
        item: T,
        now: Instant,
        ready: &mut Vec<T>,
    ) {
        let expected = self.next.get(key).copied();
        match expected {
            Some(next) if seq > next => {
                let held = Held { item, since: now };
                self.held
                    .entry(key.to_vec())
                    .or_default()
                    .entry(seq)
                    .or_default()
                    .push(held);
                let total = self.bounds.held.fetch_add(1, Ordering::Relaxed) + 1;
                if total > self.bounds.most_held {
                    tracing::warn!(
                        key = %String::from_utf8_lossy(key),
                        missing = next,
                        held = total,
                        "too many messages wait for earlier ones of their key; taking this key's as they are"
                    );
                    self.accept_gap(key, ready);
                }
            }
            // A copy, or one that came after its key moved past it.
            Some(next) if seq < next => ready.push(item),
            // Next, or a key not learned (taken as it comes).
            _ => {
                ready.push(item);
                self.next.insert(key.to_vec(), seq.saturating_add(1));
                self.release(key, ready);
            }
        }
    }

    /// Gives up waiting for keys whose oldest early message waited
    /// `key_gap_wait`: their held messages go on, in order.
    pub(crate) fn expire(&mut self, now: Instant, ready: &mut Vec<T>) {
        let overdue: Vec<Vec<u8>> = self
            .held
            .iter()
            .filter(|(_, by_seq)| {
                self.oldest(by_seq)
                    .is_some_and(|since| now >= since + self.bounds.wait)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in overdue {
            tracing::warn!(
                key = %String::from_utf8_lossy(&key),
                missing = self.next.get(&key).copied().unwrap_or_default(),
                waited = ?self.bounds.wait,
                "an earlier message of this key did not come; handling the later ones without it"
            );
            self.accept_gap(&key, ready);
        }
    }

    /// When the next early message's wait runs out.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.held
            .values()
            .filter_map(|by_seq| self.oldest(by_seq))
            .min()
            .map(|since| since + self.bounds.wait)
    }

    /// Gaps accepted since the last call.
    pub(crate) fn take_gaps(&mut self) -> u64 {
        std::mem::take(&mut self.gaps)
    }

    /// Messages held (this lane's).
    pub(crate) fn holding(&self) -> usize {
        self.held
            .values()
            .flat_map(BTreeMap::values)
            .map(Vec::len)
            .sum()
    }

    fn oldest(&self, by_seq: &BTreeMap<i64, Vec<Held<T>>>) -> Option<Instant> {
        by_seq.values().flatten().map(|held| held.since).min()
    }

    /// Moves the key on to its lowest held number and releases from there.
    fn accept_gap(&mut self, key: &[u8], ready: &mut Vec<T>) {
        let lowest = self
            .held
            .get(key)
            .and_then(|by_seq| by_seq.keys().next().copied());
        if let Some(lowest) = lowest {
            self.gaps += 1;
            self.next.insert(key.to_vec(), lowest);
            self.release(key, ready);
        }
    }

    /// Releases the key's held messages that are now next, in order.
    fn release(&mut self, key: &[u8], ready: &mut Vec<T>) {
        let Some(by_seq) = self.held.get_mut(key) else {
            return;
        };
        let Some(next) = self.next.get_mut(key) else {
            return;
        };
        while let Some(copies) = by_seq.remove(&*next) {
            self.bounds.held.fetch_sub(copies.len(), Ordering::Relaxed);
            ready.extend(copies.into_iter().map(|held| held.item));
            *next = next.saturating_add(1);
        }
        if by_seq.is_empty() {
            self.held.remove(key);
        }
    }
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
mod tests {
    use super::*;

    fn sequencer(most_held: usize) -> Sequencer<i64> {
        Sequencer::new(Bounds {
            wait: Duration::from_secs(10),
            most_held,
            held: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn offer(s: &mut Sequencer<i64>, key: &str, seqs: &[i64], now: Instant) -> Vec<i64> {
        let mut ready = Vec::new();
        for &seq in seqs {
            s.offer(key.as_bytes(), seq, seq, now, &mut ready);
        }
        ready
    }

    #[test]
    fn early_messages_wait_for_the_missing_one() {
        let mut s = sequencer(100);
        let now = Instant::now();
        assert_eq!(offer(&mut s, "a", &[1, 2], now), [1, 2]);
        assert_eq!(offer(&mut s, "a", &[4, 5], now), Vec::<i64>::new());
        assert_eq!(
            offer(&mut s, "b", &[7], now),
            [7],
            "another key is not held up"
        );
        assert_eq!(s.holding(), 2);
        assert_eq!(offer(&mut s, "a", &[3], now), [3, 4, 5]);
        assert_eq!(s.holding(), 0);
        assert_eq!(s.take_gaps(), 0);
    }

    #[test]
    fn copies_and_late_ones_go_on_and_copies_of_an_early_one_wait_together() {
        let mut s = sequencer(100);
        let now = Instant::now();
        assert_eq!(offer(&mut s, "a", &[1, 2, 1], now), [1, 2, 1]);
        assert_eq!(offer(&mut s, "a", &[5, 5], now), Vec::<i64>::new());
        assert_eq!(offer(&mut s, "a", &[3, 4], now), [3, 4, 5, 5]);
    }

    #[test]
    fn a_learned_watermark_holds_what_comes_after_the_next_number() {
        let mut s = sequencer(100);
        let now = Instant::now();
        assert!(!s.knows(b"a"));
        s.learn(b"a", Some(4));
        s.learn(b"new", None);
        assert!(s.knows(b"a") && s.knows(b"new"));
        assert_eq!(offer(&mut s, "a", &[6, 4], now), [4], "6 waits for 5");
        assert_eq!(offer(&mut s, "a", &[5], now), [5, 6]);
        assert!(offer(&mut s, "new", &[2], now).is_empty(), "2 waits for 1");
        assert_eq!(offer(&mut s, "new", &[1], now), [1, 2]);
        s.learn(b"a", Some(1));
        assert_eq!(
            offer(&mut s, "a", &[7], now),
            [7],
            "known keys are not relearned"
        );
    }

    #[test]
    fn a_full_lane_forgets_keys_it_holds_nothing_for_unless_they_are_coming() {
        let mut s = sequencer(usize::MAX);
        let now = Instant::now();
        s.learn(b"held", Some(0));
        offer(&mut s, "held", &[2], now);
        s.learn(b"coming", Some(4));
        for n in 2..MOST_KEYS {
            s.learn(n.to_string().as_bytes(), Some(1));
        }
        s.forget_idle(&[b"coming"]);
        assert_eq!(s.next.len(), 2, "the held key and the coming one");
        assert!(s.knows(b"coming"));
        assert!(
            offer(&mut s, "coming", &[6], now).is_empty(),
            "6 still waits for 5"
        );
        assert_eq!(offer(&mut s, "held", &[1], now), [1, 2]);
    }

    #[test]
    fn numbers_at_the_ends_of_the_range_do_not_overflow() {
        let mut s = sequencer(100);
        let now = Instant::now();
        assert_eq!(
            offer(&mut s, "a", &[i64::MAX, i64::MAX, 3], now),
            [i64::MAX, i64::MAX, 3]
        );
        s.learn(b"b", Some(i64::MAX));
        assert_eq!(offer(&mut s, "b", &[i64::MIN, 1], now), [i64::MIN, 1]);
    }

    /// With prefetch 1 the one delivery in hand cannot wait for the one
    /// missing (the broker delivers nothing more until it is acked): it
    /// waited `key_gap_wait` for nothing.
    #[test]
    fn nothing_waits_when_the_prefetch_has_no_room_for_the_missing_one() {
        assert_eq!(most_held(1), 0);
        assert_eq!(most_held(3), 1);
        assert_eq!(most_held(256), 128);
        assert_eq!(most_held(0), 10_000, "unbounded at the broker");
        let mut s = sequencer(most_held(1));
        let now = Instant::now();
        offer(&mut s, "a", &[1], now);
        assert_eq!(offer(&mut s, "a", &[3], now), [3], "taken at once");
    }

    #[test]
    fn a_gap_is_accepted_after_the_wait() {
        let mut s = sequencer(100);
        let now = Instant::now();
        offer(&mut s, "a", &[1], now);
        offer(&mut s, "a", &[3, 4], now);
        let mut ready = Vec::new();
        s.expire(now + Duration::from_secs(9), &mut ready);
        assert!(ready.is_empty());
        assert_eq!(s.deadline(), Some(now + Duration::from_secs(10)));
        s.expire(now + Duration::from_secs(10), &mut ready);
        assert_eq!(ready, [3, 4]);
        assert_eq!(s.take_gaps(), 1);
        assert_eq!(s.deadline(), None);
        // The missing one, late, still goes on: the inbox decides.
        assert_eq!(offer(&mut s, "a", &[2, 5], now), [2, 5]);
    }

    #[test]
    fn too_many_held_accepts_the_gap_of_the_key_that_overflowed() {
        let bounds = Bounds {
            wait: Duration::from_secs(10),
            most_held: 2,
            held: Arc::new(AtomicUsize::new(0)),
        };
        let mut lane = Sequencer::new(bounds.clone());
        let mut other = Sequencer::new(bounds.clone());
        let now = Instant::now();
        offer(&mut lane, "a", &[1], now);
        assert!(offer(&mut lane, "a", &[3], now).is_empty());
        offer(&mut other, "b", &[1], now);
        assert!(offer(&mut other, "b", &[3], now).is_empty());
        assert_eq!(bounds.held.load(Ordering::Relaxed), 2);
        // A third held across the lanes is one too many.
        assert_eq!(offer(&mut other, "b", &[4], now), [3, 4]);
        assert_eq!(bounds.held.load(Ordering::Relaxed), 1);
        drop(lane);
        assert_eq!(bounds.held.load(Ordering::Relaxed), 0);
    }
}
