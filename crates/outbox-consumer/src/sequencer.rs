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

/// A key as logs show it: a key is a row's value (a customer, an order),
/// so only its hash, unless row values are shown (`outbox::show_row_values`).
fn shown_key(key: &[u8]) -> String {
    if outbox::row_values_shown() {
        return String::from_utf8_lossy(key).into_owned();
    }
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(key, &mut hasher);
    format!("hash:{:016x}", std::hash::Hasher::finish(&hasher))
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
mod tests {
    use super::*;

    fn sequencer(most_held: usize) -> Sequencer<i64> {
        waiting_sequencer(Duration::from_secs(10), most_held)
    }

    fn waiting_sequencer(wait: Duration, most_held: usize) -> Sequencer<i64> {
        Sequencer::new(Bounds {
            wait,
            shared_queue: Arc::default(),
            most_held,
            held: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn offer(s: &mut Sequencer<i64>, key: &str, seqs: &[i64], now: Instant) -> Vec<i64> {
        let (ready, given_back) = offer_or_give_back(s, key, seqs, now);
        assert!(given_back.is_empty(), "gave back {given_back:?}");
        ready
    }

    fn offer_or_give_back(
        s: &mut Sequencer<i64>,
        key: &str,
        seqs: &[i64],
        now: Instant,
    ) -> (Vec<i64>, Vec<i64>) {
        let (mut ready, mut given_back) = (Vec::new(), Vec::new());
        for &seq in seqs {
            s.offer(key.as_bytes(), seq, seq, now, &mut ready, &mut given_back);
        }
        (ready, given_back)
    }

    #[test]
    fn keys_are_logged_as_hashes() {
        let shown = shown_key(b"customer-42");
        assert!(
            shown.starts_with("hash:") && !shown.contains("42"),
            "{shown}"
        );
        assert_eq!(
            shown,
            shown_key(b"customer-42"),
            "the same key, the same hash"
        );
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
        s.forget_idle(|key| key == b"coming");
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
        let all = |_: &[u8]| true;
        assert!(s.expire(now + Duration::from_secs(9), all).is_empty());
        assert_eq!(s.deadline(all), Some(now + Duration::from_secs(10)));
        assert!(
            s.expire(now + Duration::from_secs(10), |_| false)
                .is_empty(),
            "a key in a lane's hands is not expired under it"
        );
        assert_eq!(s.deadline(|_| false), None);
        let expired = s.expire(now + Duration::from_secs(10), all);
        assert_eq!(expired, [(b"a".to_vec(), vec![3, 4])]);
        assert_eq!(s.take_gaps(), 1);
        assert_eq!(s.deadline(all), None);
        // The missing one, late, still goes on: the inbox decides.
        assert_eq!(offer(&mut s, "a", &[2, 5], now), [2, 5]);
    }

    #[test]
    fn too_many_held_go_back_to_the_queue_until_the_wait_runs_out() {
        let bounds = Bounds {
            wait: Duration::from_secs(10),
            shared_queue: Arc::default(),
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
        // A third held across the lanes is one too many: it goes back, and
        // room is left for the missing ones.
        let later = now + Duration::from_secs(9);
        assert_eq!(
            offer_or_give_back(&mut other, "b", &[4], now),
            (vec![], vec![4])
        );
        assert_eq!(
            offer_or_give_back(&mut other, "b", &[4], later),
            (vec![], vec![4])
        );
        assert_eq!(bounds.held.load(Ordering::Relaxed), 2);
        assert_eq!(offer(&mut other, "b", &[2], later), [2, 3]);
        // Past the wait, a key that keeps finding no room goes on as it is.
        let past = now + Duration::from_secs(20);
        offer(&mut other, "b", &[5], past);
        assert_eq!(
            offer_or_give_back(&mut lane, "a", &[4], past),
            (vec![], vec![4])
        );
        assert_eq!(
            offer(&mut lane, "a", &[4], past + Duration::from_secs(11)),
            [3, 4]
        );
        assert_eq!(lane.take_gaps(), 1);
        drop(lane);
        drop(other);
        assert_eq!(bounds.held.load(Ordering::Relaxed), 0);
    }

    /// Two consumers on one queue each see a share of every key's
    /// numbers: the one missing here went to the other and never comes
    /// (44 of 66 keyed messages waited the default 15 s). Alone again, a
    /// consumer waits again.
    #[test]
    fn nothing_waits_while_the_queue_is_shared() {
        let mut s = sequencer(100);
        let now = Instant::now();
        s.learn(b"a", None);
        assert_eq!(offer(&mut s, "a", &[1, 3], now), [1]);
        assert_eq!(s.holding(), 1);
        s.bounds.shared_queue.store(true, Ordering::Relaxed);
        let free = |_: &[u8]| true;
        assert_eq!(s.deadline(free), Some(now), "what waits goes on now");
        let released: Vec<i64> = s
            .expire(now, free)
            .into_iter()
            .flat_map(|(_, m)| m)
            .collect();
        assert_eq!(released, [3]);
        assert_eq!(offer(&mut s, "a", &[5, 4], now), [5, 4], "nothing waits");
        s.bounds.shared_queue.store(false, Ordering::Relaxed);
        assert!(offer(&mut s, "a", &[7], now).is_empty(), "7 waits for 6");
    }

    /// A wait is counted when it begins and timed when it ends, however
    /// it ends: the missing one came, or the gap was accepted.
    #[test]
    fn waits_are_counted_and_timed() {
        let mut s = sequencer(100);
        let now = Instant::now();
        offer(&mut s, "a", &[1, 3], now);
        offer(&mut s, "b", &[1, 3], now);
        offer(&mut s, "a", &[4], now + Duration::from_secs(1));
        assert_eq!(s.take_waits().begun, 2, "one per key, not per message");
        offer(&mut s, "a", &[2], now + Duration::from_secs(2));
        let later = now + Duration::from_secs(10);
        s.expire(later, |_| true);
        let waits = s.take_waits();
        assert_eq!(waits.begun, 0);
        assert_eq!(
            waits.ended,
            [Duration::from_secs(2), Duration::from_secs(10)]
        );
    }
}
