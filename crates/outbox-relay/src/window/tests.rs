//! The confirm window's unit tests: confirms resolved by hand.

use super::*;
use tokio::sync::oneshot;
use uuid::Uuid;

type Answer = (Outcome, Option<Returned>);

/// A confirm the test resolves by hand.
struct Fake(oneshot::Receiver<Answer>);

impl Future for Fake {
    type Output = Answer;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or((Outcome::Lost(BrokerError::NotConnected), None)))
    }
}

fn row(id: i64) -> Claimed {
    Claimed::for_test(id)
}

fn publish(window: &mut Window, id: i64) -> (Uuid, oneshot::Sender<Answer>) {
    let (send, receive) = oneshot::channel();
    let row = row(id);
    let message_id = row.message_id;
    window.push(row, Fake(receive));
    (message_id, send)
}

fn returned(message_id: Uuid) -> Option<Returned> {
    Some(Returned {
        message_id: message_id.to_string(),
        reason: "unroutable".into(),
    })
}

fn ack(sender: oneshot::Sender<Answer>, carrying: Option<Returned>) {
    let _ = sender.send((Outcome::Confirmed, carrying));
}

fn names(settled: &[Settled]) -> Vec<(i64, &'static str)> {
    let mut names: Vec<_> = settled
        .iter()
        .map(|s| match s {
            Settled::Published(r) => (r.id, "published"),
            Settled::Failed(r, Fault::Returned, _) => (r.id, "returned"),
            Settled::Failed(r, Fault::ConfirmTimeout, _) => (r.id, "timeout"),
            Settled::Failed(r, _, _) => (r.id, "failed"),
            Settled::Unanswered(r) => (r.id, "unanswered"),
            Settled::Lost(r, _) => (r.id, "lost"),
        })
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn acked_rows_settle_without_waiting_for_the_rest() {
    let mut window = Window::new(Duration::from_secs(10));
    let (_, first) = publish(&mut window, 1);
    let (_, _stuck) = publish(&mut window, 2);
    assert_eq!(window.bytes(), 20);
    ack(first, None);
    let settled = window.settled().await;
    assert_eq!(names(&settled), [(1, "published")]);
    assert_eq!((window.in_flight(), window.bytes()), (1, 10));
}

#[tokio::test]
async fn a_multiple_ack_carrying_another_rows_return() {
    // lapin resolves 1 and 2 from one multiple ack and may attach 2's
    // return to 1's confirm: 2 must fail, 1 must be published.
    let mut window = Window::new(Duration::from_secs(10));
    let (_, first) = publish(&mut window, 1);
    let (second_id, second) = publish(&mut window, 2);
    ack(second, None);
    ack(first, returned(second_id));
    let mut settled = window.settled().await;
    while settled.len() < 2 {
        settled.extend(window.settled().await);
    }
    assert_eq!(names(&settled), [(1, "published"), (2, "returned")]);
    assert!(window.is_empty());
}

#[tokio::test]
async fn a_return_attached_before_its_rows_ack() {
    let mut window = Window::new(Duration::from_secs(10));
    let (_, first) = publish(&mut window, 1);
    let (second_id, second) = publish(&mut window, 2);
    let (_, _third) = publish(&mut window, 3);
    ack(first, returned(second_id));
    assert_eq!(names(&window.settled().await), [(1, "published")]);
    ack(second, None);
    assert_eq!(names(&window.settled().await), [(2, "returned")]);
    assert_eq!(window.in_flight(), 1);
}

#[tokio::test]
async fn many_acks_at_once_settle_in_one_round_past_the_sets_yield() {
    // FuturesUnordered yields after polling a few dozen ready futures;
    // the round must go on until none is ready, or row 0 would be
    // marked published before the confirm carrying its return is seen.
    let mut window = Window::new(Duration::from_secs(10));
    let confirms: Vec<_> = (0..200).map(|id| publish(&mut window, id)).collect();
    let first = confirms[0].0;
    for (n, (_, sender)) in confirms.into_iter().enumerate() {
        ack(sender, if n == 199 { returned(first) } else { None });
    }
    let settled = window.settled_now();
    assert_eq!(settled.len(), 200);
    let names = names(&settled);
    assert_eq!(names[0], (0, "returned"));
    assert!(names[1..].iter().all(|(_, what)| *what == "published"));
}

#[tokio::test]
async fn nacks_and_lost_confirms_are_reported_as_such() {
    let mut window = Window::new(Duration::from_secs(10));
    let (_, nacked) = publish(&mut window, 1);
    let (_, lost) = publish(&mut window, 2);
    let _ = nacked.send((Outcome::Rejected(Fault::Nacked, "nack".into()), None));
    drop(lost);
    let mut settled = window.settled().await;
    while settled.len() < 2 {
        settled.extend(window.settled().await);
    }
    assert_eq!(names(&settled), [(1, "failed"), (2, "lost")]);
}

#[tokio::test(start_paused = true)]
async fn a_confirm_past_its_deadline_fails_alone() {
    let mut window = Window::new(Duration::from_secs(10));
    let (_, _stuck) = publish(&mut window, 1);
    tokio::time::advance(Duration::from_secs(5)).await;
    let (_, young) = publish(&mut window, 2);
    // The broker answers for a publish after the stuck one: it read it.
    ack(young, None);
    assert_eq!(names(&window.settled().await), [(2, "published")]);
    let settled = window.settled().await;
    assert_eq!(names(&settled), [(1, "timeout")]);
    assert!(window.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_timeout_with_no_later_answer_is_nobodys_fault_yet() {
    let mut window = Window::new(Duration::from_secs(10));
    let (_, first) = publish(&mut window, 1);
    let (_, _stuck) = publish(&mut window, 2);
    let (_, _silent) = publish(&mut window, 3);
    // An answer for an earlier publish shows nothing about later ones.
    ack(first, None);
    assert_eq!(names(&window.settled().await), [(1, "published")]);
    let mut settled = window.settled().await;
    while settled.len() < 2 {
        settled.extend(window.settled().await);
    }
    assert_eq!(names(&settled), [(2, "unanswered"), (3, "unanswered")]);
}

#[tokio::test(start_paused = true)]
async fn an_answer_in_the_same_round_as_the_timeout_counts() {
    let mut window = Window::new(Duration::from_secs(10));
    let (_, _stuck) = publish(&mut window, 1);
    let (_, later) = publish(&mut window, 2);
    tokio::time::advance(Duration::from_secs(11)).await;
    // The later ack is collected in the round that finds 1 timed out.
    ack(later, None);
    let settled = window.settled().await;
    assert_eq!(names(&settled), [(1, "timeout"), (2, "published")]);
}

#[tokio::test(start_paused = true)]
async fn a_probe_answered_after_the_publish_blames_the_row() {
    let mut window = Window::new(Duration::from_secs(10));
    let (_, _stuck) = publish(&mut window, 1);
    let probed = window.last_slot();
    window.read_through(probed);
    // Published after the probe: not covered by it.
    let (_, _after) = publish(&mut window, 2);
    let mut settled = window.settled().await;
    while settled.len() < 2 {
        settled.extend(window.settled().await);
    }
    assert_eq!(names(&settled), [(1, "timeout"), (2, "unanswered")]);
    let row = settled
        .into_iter()
        .find_map(|s| match s {
            Settled::Unanswered(row) => Some(row),
            _ => None,
        })
        .expect("row 2 unanswered");
    assert_eq!(names(&[window.unconfirmed(row)]), [(2, "timeout")]);
}

#[tokio::test]
async fn a_local_refusal_is_no_answer_from_the_broker() {
    let mut window = Window::new(Duration::from_secs(10));
    let (_, refused) = publish(&mut window, 1);
    let _ = refused.send((Outcome::Rejected(Fault::Oversized, "big".into()), None));
    assert_eq!(names(&window.settled().await), [(1, "failed")]);
    assert_eq!(window.read_through, None);
    let (_, nacked) = publish(&mut window, 2);
    let _ = nacked.send((Outcome::Rejected(Fault::Nacked, "nack".into()), None));
    assert_eq!(names(&window.settled().await), [(2, "failed")]);
    assert_eq!(window.read_through, Some(1));
}

#[tokio::test]
async fn abandon_hands_back_everything_unsettled() {
    let mut window = Window::new(Duration::from_secs(10));
    let (_, _a) = publish(&mut window, 1);
    let (_, _b) = publish(&mut window, 2);
    let mut ids: Vec<i64> = window.abandon().into_iter().map(|r| r.id).collect();
    ids.sort();
    assert_eq!(ids, [1, 2]);
    assert!(window.is_empty());
    assert_eq!(window.bytes(), 0);
}
