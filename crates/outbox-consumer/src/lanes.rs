//! Deliveries in lanes. A lane is a task that handles one batch at a time
//! (see `batch`), so `lanes` transactions run at once. A keyed message
//! (header `x-outbox-key`, which the relay sets from the row's
//! `ordering_key`) always goes to its key's lane, so one consumer commits a
//! key's effects in delivery order. A keyless one goes to a queue all lanes
//! take from when they are free, so a slow message holds up only its own
//! batch and its lane's keys, never the others. Before its batch, a keyed
//! message that came before an earlier one of its key waits in the lane's
//! `sequencer`, which learns each key's watermark from the database the
//! first time the lane sees the key.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use outbox_service::backoff::Backoff;
use tokio::sync::Mutex;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::batch;
use crate::broker::Publisher;
use crate::handler::Handler;
use crate::handler::HandlerError;
use crate::health;
use crate::meters::Settled;
use crate::sequencer::Sequencer;
use crate::worker::{Outcome, Shared};

/// The header naming a message's ordering key.
pub const KEY_HEADER: &str = "x-outbox-key";
/// The header numbering a keyed message among its key's (from the relay's
/// `key_seq`): consecutive, with no gaps.
pub const SEQ_HEADER: &str = "x-outbox-seq";

type Keyless = Arc<Mutex<UnboundedReceiver<Delivery>>>;

/// Where the session hands deliveries; dropping it ends the lanes once
/// their queues are empty. (Prefetch bounds what the queues hold.)
pub(crate) struct Lanes {
    keyed: Vec<UnboundedSender<Delivery>>,
    keyless: UnboundedSender<Delivery>,
}

impl Lanes {
    /// Starts the lanes as tasks of `tasks`.
    pub(crate) fn start<H: Handler>(
        shared: &Arc<Shared<H>>,
        publisher: &Publisher,
        tasks: &mut JoinSet<Outcome>,
    ) -> Lanes {
        let (keyless, keyless_queue) = unbounded_channel();
        let keyless_queue: Keyless = Arc::new(Mutex::new(keyless_queue));
        let keyed = (0..shared.config.lanes.max(1))
            .map(|_| {
                let (sender, own) = unbounded_channel();
                tasks.spawn(lane(
                    shared.clone(),
                    publisher.clone(),
                    own,
                    keyless_queue.clone(),
                ));
                sender
            })
            .collect();
        Lanes { keyed, keyless }
    }

    pub(crate) fn send(&self, delivery: Delivery) {
        let lane = match ordering_key(&delivery) {
            Some(key) => {
                let mut hasher = DefaultHasher::new();
                key.hash(&mut hasher);
                &self.keyed[(hasher.finish() % self.keyed.len() as u64) as usize]
            }
            None => &self.keyless,
        };
        // A lane gone means the session is ending: the delivery goes back
        // to the queue with the channel.
        let _ = lane.send(delivery);
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
    mut own: UnboundedReceiver<Delivery>,
    keyless: Keyless,
) -> Outcome {
    let mut sequencer = Sequencer::new(shared.bounds.clone());
    let outcome = loop {
        let Some(deliveries) = next_batch(&shared, &mut own, &keyless, sequencer.deadline()).await
        else {
            break Outcome::Settled;
        };
        if !learn_keys(&shared, &mut sequencer, &deliveries).await {
            given_back(&shared, deliveries.len());
            break Outcome::Settled;
        }
        let ready = in_order(&shared, &mut sequencer, deliveries);
        if ready.is_empty() {
            continue;
        }
        let taken = ready.len();
        let handled = batch::handle(&shared, &publisher, ready).await;
        shared.meters.in_flight.decrement(taken as f64);
        if let Err(error) = handled {
            break Outcome::BrokerFailed(error);
        }
    };
    given_back(&shared, sequencer.holding());
    outcome
}

/// Counts deliveries the lane leaves unacked: they come again with the
/// next channel.
fn given_back<H: Handler>(shared: &Shared<H>, count: usize) {
    shared
        .meters
        .settled(Settled::GivenBack)
        .increment(count as u64);
    shared.meters.in_flight.decrement(count as f64);
}

/// Learns the watermark of each key among `deliveries` that the lane does
/// not know yet. While the database cannot answer it tries again (the
/// deliveries stay unacked); false when shutdown came first.
async fn learn_keys<H: Handler>(
    shared: &Shared<H>,
    sequencer: &mut Sequencer<Delivery>,
    deliveries: &[Delivery],
) -> bool {
    let coming: Vec<&[u8]> = deliveries
        .iter()
        .filter_map(|delivery| numbered(&delivery.properties))
        .map(|(key, _)| key)
        .collect();
    sequencer.forget_idle(&coming);
    let mut unknown: Vec<Vec<u8>> = coming
        .into_iter()
        .filter(|key| !sequencer.knows(key))
        .map(<[u8]>::to_vec)
        .collect();
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
                for key in &unknown {
                    sequencer.learn(key, found.get(key).copied());
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
/// now, in order: a keyed, numbered message waits in the sequencer while
/// an earlier one of its key is missing.
fn in_order<H: Handler>(
    shared: &Shared<H>,
    sequencer: &mut Sequencer<Delivery>,
    deliveries: Vec<Delivery>,
) -> Vec<Delivery> {
    let now = Instant::now();
    let mut ready = Vec::with_capacity(deliveries.len());
    sequencer.expire(now, &mut ready);
    for delivery in deliveries {
        let numbered = numbered(&delivery.properties).map(|(key, seq)| (key.to_vec(), seq));
        match numbered {
            Some((key, seq)) => sequencer.offer(&key, seq, delivery, now, &mut ready),
            None => ready.push(delivery),
        }
    }
    shared.meters.key_gaps.increment(sequencer.take_gaps());
    shared.meters.key_held.set(shared.bounds.held_now() as f64);
    ready
}

/// The next batch: waits for one delivery (the lane's own first), then
/// takes what else is ready, up to `batch_size`. Empty when `deadline`
/// (a held message's) comes first; `None` at shutdown or once the session
/// dropped the lanes.
async fn next_batch<H: Handler>(
    shared: &Shared<H>,
    own: &mut UnboundedReceiver<Delivery>,
    keyless: &Keyless,
    deadline: Option<Instant>,
) -> Option<Vec<Delivery>> {
    let first = tokio::select! {
        biased;
        _ = shared.shutdown.cancelled() => return None,
        first = own.recv() => first?,
        first = async { keyless.lock().await.recv().await } => first?,
        _ = sleep_until(deadline) => return Some(Vec::new()),
    };
    let limit = usize::from(shared.config.batch_size.max(1));
    let mut batch = vec![first];
    while batch.len() < limit {
        match own.try_recv() {
            Ok(delivery) => batch.push(delivery),
            Err(_) => break,
        }
    }
    if let Ok(mut queue) = keyless.try_lock() {
        while batch.len() < limit {
            match queue.try_recv() {
                Ok(delivery) => batch.push(delivery),
                Err(_) => break,
            }
        }
    }
    Some(batch)
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
