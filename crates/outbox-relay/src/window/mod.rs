//! The confirm window: rows published and awaiting their broker confirm,
//! and acked rows waiting to learn whether the broker returned them.
//!
//! Why acked rows wait: lapin hands each `basic.return` to whichever
//! confirm it resolves next, not to the publish it belongs to (see
//! [`Returned`]), so a return is matched to its row by message_id. The
//! broker sends a row's return before its ack, so when the row's ack is
//! seen, the confirm carrying its return (if any) has resolved too, though
//! perhaps not been collected yet. A resolved confirm is woken, so it waits
//! in the ready queue of the `FuturesUnordered`: collecting until that
//! queue is empty (told apart from the set's cooperative yield by whether
//! it woke us) collects it. Rows acked during such a round are final at its
//! end, however long other confirms take, and only resolved confirms are
//! touched, never the whole window.
//!
//! A confirm that does not come within the deadline is given up on, so one
//! stuck queue holds one slot, never the window. Whose fault it is depends
//! on whether the broker still answers: it read every publish before the
//! latest one it acked or nacked (one channel, one TCP stream, in order),
//! so a row published before an answered one failed on its own (a queue
//! that stopped confirming: an attempt). Without such an answer the row is
//! [`Settled::Unanswered`]: the relay asks the broker (a probe on the
//! channel, [`Window::read_through`] on an answer) before it blames the
//! row; a broker that answers nothing is an outage, not N bad messages.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, Stream};
use tokio::time::Instant;

use crate::amqp::{Outcome, Returned};
use crate::fault_policy::BrokerError;
use crate::meters::Fault;
use crate::store::Claimed;

pub(crate) use outbox::NO_CONFIRM;

/// Most returns remembered for rows no longer in the window (their
/// confirm timed out): bounded, and cleared whenever the window empties.
const MAX_STRAY_RETURNS: usize = 10_000;

/// How one row left the window.
#[derive(Debug)]
pub(crate) enum Settled {
    /// Acked and not returned: mark it published.
    Published(Claimed),
    /// The row's own fault (nack, return, no confirm in time though the
    /// broker answered for a later publish): an attempt.
    Failed(Claimed, Fault, String),
    /// No confirm in time, and nothing shows that the broker read it: the
    /// broker itself may have stopped answering. Not yet anyone's fault.
    Unanswered(Claimed),
    /// Its channel or connection failed: not the row's fault.
    Lost(Claimed, BrokerError),
}

/// A confirm's answer, or `None` past the deadline.
type Answer = Option<(Outcome, Option<Returned>)>;

/// A confirm racing its deadline; yields its row's slot and the answer.
type Confirming = Pin<Box<dyn Future<Output = (u64, Answer)> + Send>>;

pub(crate) struct Window {
    in_flight: FuturesUnordered<Confirming>,
    /// The rows in flight and their payload bytes, by slot.
    rows: HashMap<u64, (Claimed, u64)>,
    next_slot: u64,
    /// Returns seen, by message_id, until their rows are final.
    returned: HashMap<String, String>,
    bytes: u64,
    deadline: Duration,
    /// The latest slot the broker is known to have read: it acked or
    /// nacked that publish or a later one, or answered a probe sent after.
    read_through: Option<u64>,
}

impl Window {
    pub(crate) fn new(deadline: Duration) -> Window {
        Window {
            in_flight: FuturesUnordered::new(),
            rows: HashMap::new(),
            next_slot: 0,
            returned: HashMap::new(),
            bytes: 0,
            deadline,
            read_through: None,
        }
    }

    /// Adds a published row; its payload is let go here (the publish holds
    /// it until its frames are written).
    pub(crate) fn push<C>(&mut self, mut row: Claimed, confirm: C)
    where
        C: Future<Output = (Outcome, Option<Returned>)> + Send + 'static,
    {
        let size = row.payload.len() as u64;
        row.payload = Bytes::new();
        self.bytes += size;
        let slot = self.next_slot;
        self.next_slot += 1;
        self.rows.insert(slot, (row, size));
        let deadline = Instant::now() + self.deadline;
        self.in_flight.push(Box::pin(async move {
            (slot, tokio::time::timeout_at(deadline, confirm).await.ok())
        }));
    }

    /// The ids of the keyed rows awaiting their confirms.
    pub(crate) fn keyed_ids(&self) -> Vec<i64> {
        self.rows
            .values()
            .filter(|(row, _)| row.ordering_key.is_some())
            .map(|(row, _)| row.id)
            .collect()
    }

    /// Confirms outstanding.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Payload bytes of the confirms outstanding.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// The slot of the latest publish, to pass to [`Window::read_through`]
    /// when a probe sent after it is answered.
    pub(crate) fn last_slot(&self) -> Option<u64> {
        self.next_slot.checked_sub(1)
    }

    /// The broker answered something sent after publish `slot`: it read
    /// every publish up to it.
    pub(crate) fn read_through(&mut self, slot: Option<u64>) {
        self.read_through = self.read_through.max(slot);
    }

    /// An unanswered row once the broker is known to have read it: the
    /// missing confirm is the row's (its queue's) fault.
    pub(crate) fn unconfirmed(&self, row: Claimed) -> Settled {
        let waited = self.deadline.as_millis();
        let why = format!("{NO_CONFIRM} {waited} ms");
        Settled::Failed(row, Fault::ConfirmTimeout, why)
    }

    /// Waits until at least one row is settled, and returns all that are.
    /// Outside tokio's cooperative budget: spent part-way through a round
    /// (each deadline is a timer), it would make ready confirms look
    /// pending, and a round must see every ready one (see above).
    pub(crate) async fn settled(&mut self) -> Vec<Settled> {
        tokio::task::unconstrained(std::future::poll_fn(|cx| self.poll_settled(cx))).await
    }

    /// What is settled right now, without waiting.
    #[cfg(test)]
    pub(crate) fn settled_now(&mut self) -> Vec<Settled> {
        use futures::FutureExt;
        self.settled().now_or_never().unwrap_or_default()
    }

    /// Everything still in the window, to be released (an outage, a
    /// shutdown): their outcomes are unknown, so they are published again.
    pub(crate) fn abandon(&mut self) -> Vec<Claimed> {
        self.bytes = 0;
        self.returned.clear();
        self.in_flight = FuturesUnordered::new();
        self.rows.drain().map(|(_, (row, _))| row).collect()
    }

    fn poll_settled(&mut self, cx: &mut Context<'_>) -> Poll<Vec<Settled>> {
        let woken = Arc::new(Flag {
            set: AtomicBool::new(false),
            inner: cx.waker().clone(),
        });
        let waker = Waker::from(woken.clone());
        let mut flagged = Context::from_waker(&waker);
        let mut acked = Vec::new();
        let mut timed_out = Vec::new();
        let mut settled = Vec::new();
        loop {
            woken.set.store(false, Ordering::Relaxed);
            match Pin::new(&mut self.in_flight).poll_next(&mut flagged) {
                Poll::Ready(Some((slot, answer))) => {
                    if let Some((row, size)) = self.rows.remove(&slot) {
                        self.bytes -= size;
                        match answer {
                            Some(answer) => self.take(slot, row, answer, &mut acked, &mut settled),
                            None => timed_out.push((slot, row)),
                        }
                    }
                }
                Poll::Ready(None) => break,
                // It woke us: it yielded with futures still ready.
                Poll::Pending if woken.set.load(Ordering::Relaxed) => {}
                Poll::Pending => break,
            }
        }
        // Judged after the whole round: an answer collected in it may be
        // for a publish later than a row that timed out.
        for (slot, row) in timed_out {
            if self.read_through.is_some_and(|read| read >= slot) {
                settled.push(self.unconfirmed(row));
            } else {
                settled.push(Settled::Unanswered(row));
            }
        }
        // Every confirm resolved before the last row here was acked has
        // been collected: the acked rows' returns are known.
        for row in acked {
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
        if self.in_flight.is_empty() {
            self.returned.clear();
        }
        if settled.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(settled)
        }
    }

    fn take(
        &mut self,
        slot: u64,
        row: Claimed,
        (outcome, returned): (Outcome, Option<Returned>),
        acked: &mut Vec<Claimed>,
        settled: &mut Vec<Settled>,
    ) {
        if outcome.answered_by_broker() {
            self.read_through(Some(slot));
        }
        if let Some(returned) = returned {
            if self.returned.len() >= MAX_STRAY_RETURNS {
                self.returned.clear();
            }
            self.returned.insert(returned.message_id, returned.reason);
        }
        match outcome {
            Outcome::Confirmed => acked.push(row),
            Outcome::Rejected(fault, why) => settled.push(Settled::Failed(row, fault, why)),
            Outcome::Lost(why) => settled.push(Settled::Lost(row, why)),
        }
    }
}

/// Records that the set woke its task while being polled, and passes the
/// wake on.
struct Flag {
    set: AtomicBool,
    inner: Waker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.set.store(true, Ordering::Relaxed);
        self.inner.wake_by_ref();
    }
}

#[cfg(test)]
mod tests;
