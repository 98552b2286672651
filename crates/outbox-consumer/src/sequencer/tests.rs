//! The sequencer's unit tests, in a file of their own to keep
//! `sequencer.rs` to the sequencer itself.

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
