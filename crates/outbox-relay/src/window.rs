//! The confirm window: rows published and awaiting their broker confirm,
//! and acked rows waiting to learn whether the broker returned them.
//!
//! Why acked rows wait: lapin hands each `basic.return` to whichever
//! confirm it resolves next, not to the publish it belongs to (see
//! [`Returned`]), so a return is matched to its row by message_id. The
//! broker sends a row's return before its ack, so when the row's ack is
//! seen, the confirm carrying its return (if any) has resolved too, though
//! perhaps not been polled yet. Every pass polls every confirm in the
//! window; a pass that *starts* after a row's ack was seen therefore
//! collects its return. So a row acked in pass k is final after pass k+1,
//! however long other confirms take.
//!
//! A confirm that does not come within the deadline is given up on: the
//! row is handed back as a failure (its attempt is counted and it is
//! retried later), so one stuck queue holds one slot, never the window.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::amqp::{Outcome, Returned};
use crate::meters::Fault;
use crate::store::Claimed;

/// Most returns remembered for rows no longer in the window (their
/// confirm timed out): bounded, and cleared whenever the window empties.
const MAX_STRAY_RETURNS: usize = 10_000;

/// How one row left the window.
#[derive(Debug)]
pub(crate) enum Settled {
    /// Acked and not returned: mark it published.
    Published(Claimed),
    /// The row's own fault (nack, return, no confirm in time): an attempt.
    Failed(Claimed, Fault, String),
    /// Its channel or connection failed: not the row's fault.
    Lost(Claimed, String),
}

struct Entry<C> {
    row: Claimed,
    /// Payload bytes it was published with (the payload itself is dropped
    /// once handed to the broker).
    size: u64,
    sent: Instant,
    confirm: C,
}

pub(crate) struct Window<C> {
    entries: Vec<Entry<C>>,
    /// Acked rows, with the pass in which their ack was seen.
    acked: Vec<(Claimed, u64)>,
    /// Returns seen, by message_id, until their rows are final.
    returned: HashMap<String, String>,
    pass: u64,
    bytes: u64,
    deadline: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<C> Window<C>
where
    C: Future<Output = (Outcome, Option<Returned>)> + Unpin,
{
    pub(crate) fn new(deadline: Duration) -> Window<C> {
        Window {
            entries: Vec::new(),
            acked: Vec::new(),
            returned: HashMap::new(),
            pass: 0,
            bytes: 0,
            deadline,
            timer: Box::pin(tokio::time::sleep(deadline)),
        }
    }

    /// Adds a published row; its payload is dropped here, the broker has it.
    pub(crate) fn push(&mut self, mut row: Claimed, confirm: C) {
        let size = row.payload.len() as u64;
        row.payload = Vec::new();
        self.bytes += size;
        self.entries.push(Entry {
            row,
            size,
            sent: Instant::now(),
            confirm,
        });
    }

    /// Confirms outstanding.
    pub(crate) fn in_flight(&self) -> usize {
        self.entries.len()
    }

    /// Payload bytes of the confirms outstanding.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Nothing outstanding and nothing held.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.acked.is_empty()
    }

    /// Waits until at least one row is settled, and returns all that are.
    pub(crate) async fn settled(&mut self) -> Vec<Settled> {
        std::future::poll_fn(|cx| self.poll_settled(cx)).await
    }

    /// What is settled right now, without waiting.
    #[cfg(test)]
    pub(crate) fn settled_now(&mut self) -> Vec<Settled> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.poll_settled(&mut cx) {
            Poll::Ready(settled) => settled,
            Poll::Pending => Vec::new(),
        }
    }

    /// Everything still in the window, to be released (an outage, a
    /// shutdown): their outcomes are unknown, so they are published again.
    pub(crate) fn abandon(&mut self) -> Vec<Claimed> {
        self.bytes = 0;
        self.returned.clear();
        let mut rows: Vec<Claimed> = self.entries.drain(..).map(|e| e.row).collect();
        rows.extend(self.acked.drain(..).map(|(row, _)| row));
        rows
    }

    fn poll_settled(&mut self, cx: &mut Context<'_>) -> Poll<Vec<Settled>> {
        let mut settled = Vec::new();
        loop {
            self.pass += 1;
            self.poll_confirms(cx, &mut settled);
            self.finish_acked(&mut settled);
            if !settled.is_empty() {
                return Poll::Ready(settled);
            }
            if !self.acked.is_empty() {
                // Acked in this pass: one more pass makes them final.
                continue;
            }
            let Some(oldest) = self.entries.iter().map(|e| e.sent).min() else {
                return Poll::Pending;
            };
            self.timer.as_mut().reset(oldest + self.deadline);
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Polls every outstanding confirm once; past the deadline, gives up.
    fn poll_confirms(&mut self, cx: &mut Context<'_>, settled: &mut Vec<Settled>) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.entries.len() {
            let entry = &mut self.entries[i];
            let answer = Pin::new(&mut entry.confirm).poll(cx);
            let overdue = now.duration_since(entry.sent) >= self.deadline;
            if answer.is_pending() && !overdue {
                i += 1;
                continue;
            }
            let entry = self.entries.swap_remove(i);
            self.bytes -= entry.size;
            let (outcome, returned) = match answer {
                Poll::Ready(answer) => answer,
                Poll::Pending => {
                    let waited = self.deadline.as_millis();
                    let why = format!("no confirm from the broker within {waited} ms");
                    settled.push(Settled::Failed(entry.row, Fault::ConfirmTimeout, why));
                    continue;
                }
            };
            if let Some(returned) = returned {
                if self.returned.len() >= MAX_STRAY_RETURNS {
                    self.returned.clear();
                }
                self.returned.insert(returned.message_id, returned.reason);
            }
            match outcome {
                Outcome::Confirmed => self.acked.push((entry.row, self.pass)),
                Outcome::Rejected(fault, why) => {
                    settled.push(Settled::Failed(entry.row, fault, why));
                }
                Outcome::Lost(why) => settled.push(Settled::Lost(entry.row, why)),
            }
        }
    }

    /// Rows acked before this pass began: their returns are known now.
    fn finish_acked(&mut self, settled: &mut Vec<Settled>) {
        let pass = self.pass;
        let mut i = 0;
        while i < self.acked.len() {
            if self.acked[i].1 >= pass {
                i += 1;
                continue;
            }
            let (row, _) = self.acked.swap_remove(i);
            // Returns are rare: no key to build for the common case.
            let returned = if self.returned.is_empty() {
                None
            } else {
                self.returned.remove(&row.message_id.to_string())
            };
            settled.push(match returned {
                Some(reason) => Settled::Failed(row, Fault::Returned, reason),
                None => Settled::Published(row),
            });
        }
        if self.is_empty() {
            self.returned.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;
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
                .map(|r| r.unwrap_or((Outcome::Lost("dropped".into()), None)))
        }
    }

    fn row(id: i64) -> Claimed {
        Claimed {
            id,
            message_id: Uuid::new_v4(),
            lease: "test#1".into(),
            exchange: "x".into(),
            routing_key: String::new(),
            payload: vec![0; 10],
            content_type: "application/json".into(),
            headers: serde_json::json!({}),
            problem: None,
            ordering_key: None,
            attempts: 0,
            pending_since: SystemTime::now(),
        }
    }

    fn publish(window: &mut Window<Fake>, id: i64) -> (Uuid, oneshot::Sender<Answer>) {
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
        assert!(window.settled_now().is_empty());
        let settled = window.settled().await;
        assert_eq!(names(&settled), [(1, "timeout")]);
        assert_eq!(window.in_flight(), 1);
        ack(young, None);
        assert_eq!(names(&window.settled().await), [(2, "published")]);
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
}
