//! A reusable, effectively-once RabbitMQ consumer into PostgreSQL. Bring a
//! [`Handler`]; the consumer's life cycle is:
//!
//! ```text
//! connect ─► declare topology ─► consume (manual acks, prefetch N) ─►
//! lanes, each handling a batch at a time in one transaction (see `lanes`,
//! `batch`); the retry queue's copies back into the queue when due (see
//! `retrier`) ─► on a lost connection: stop every lane (their deliveries go
//! back to the queue with the channel), back off, reconnect ─► on
//! shutdown: stop consuming, let the batches in progress finish for a
//! while, close (unacked deliveries go back)
//! ```
//! A session's lanes never outlive it, so no delivery tag from before a
//! reconnect is ever used on the new channel.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use outbox_service::backoff::Backoff;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::ConsumerConfig;
use crate::handler::Handler;
use crate::health;
use crate::inbox::Inbox;
use crate::lanes::Lanes;
use crate::meters::Meters;
use crate::sequencer::{Bounds, most_held};
use crate::shared::{Outcome, Shared};
use outbox_service::health::Health;

/// Why a session ended.
enum Ended {
    Shutdown,
    Lost(anyhow::Error),
}

/// Consumes until `shutdown` is cancelled. Fails only when the first
/// connection fails (bad URL, unreachable broker, conflicting topology);
/// later outages are waited out.
pub async fn run<H: Handler>(
    config: ConsumerConfig,
    pool: Pool,
    handler: H,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let inbox = Inbox::new(&config.inbox_table)?;
    inbox.check(&pool).await?;
    let bounds = Bounds {
        wait: config.key_gap_wait,
        shared_queue: Arc::default(),
        most_held: most_held(config.prefetch),
        held: Arc::default(),
    };
    let shared = Arc::new(Shared {
        handler,
        pool,
        inbox,
        config,
        health,
        meters: Meters::new(),
        shutdown,
        bounds,
    });
    let config = &shared.config;
    // Stops with the consumer, however `run` returns.
    let retention_stop = shared.shutdown.child_token();
    let _stop_retention = retention_stop.clone().drop_guard();
    if let Some(retention) = config.inbox_retention {
        tokio::spawn(crate::retention::run(
            shared.pool.clone(),
            shared.inbox.clone(),
            retention,
            shared.meters.clone(),
            retention_stop,
        ));
    }
    let topology = Arc::new(config.topology.clone());
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut connected_once = false;
    loop {
        let opened = tokio::select! {
            _ = shared.shutdown.cancelled() => return Ok(()),
            opened = Broker::open(
                &config.amqp_url,
                config.amqp_ca_file.as_deref(),
                &config.name,
                config.prefetch,
                topology.clone(),
            ) => opened,
        };
        let reason = match opened {
            Err(error) if !connected_once => return Err(error),
            Err(error) => error,
            Ok(broker) => {
                connected_once = true;
                backoff.reset();
                let ended = session(&shared, broker).await;
                health::set_consuming(&shared.health, false);
                match ended {
                    Ended::Shutdown => return Ok(()),
                    Ended::Lost(reason) => reason,
                }
            }
        };
        let delay = backoff.next_delay();
        let reason = outbox::chain_line(reason.as_ref());
        tracing::warn!(%reason, ?delay, "broker connection lost; reconnecting");
        tokio::select! {
            _ = shared.shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// How often a session counts its queue's consumers (see `Sharing`).
const CONSUMERS_CHECK: Duration = Duration::from_secs(2);
/// How soon a count above one is checked again: much longer than a
/// departing consumer stays counted (milliseconds), and short enough
/// that consumers which do share the queue stop waiting soon.
const SHARING_CONFIRM: Duration = Duration::from_secs(1);

/// Whether other consumers share the queue: a key's missing number then
/// most likely went to one of them and never comes here, so no early
/// message waits for it. A single-active-consumer queue delivers to one
/// consumer at a time, so it is never shared in that sense.
///
/// Shared only after two counts in a row above one ([`SHARING_CONFIRM`]
/// apart at least): a consumer that stopped just before this one started
/// can still be counted for a moment, holding deliveries the broker gives
/// back once it notices, and taking it for a sharer let this one handle a
/// key's later messages before the earlier ones coming back (a rolling
/// restart inverted keys).
#[derive(Default)]
struct Sharing {
    counts_above_one: u32,
}

impl Sharing {
    /// Notes a count of the queue's consumers; true when the queue's
    /// being shared changed.
    fn note<H: Handler>(&mut self, shared: &Shared<H>, consumers: u32) -> bool {
        self.counts_above_one = if consumers > 1 {
            self.counts_above_one.saturating_add(1)
        } else {
            0
        };
        let now_shared =
            self.counts_above_one >= 2 && !shared.config.topology.single_active_consumer;
        let was_shared = shared
            .bounds
            .shared_queue
            .swap(now_shared, std::sync::atomic::Ordering::Relaxed);
        if now_shared != was_shared {
            tracing::info!(
                consumers,
                "{}",
                if now_shared {
                    "other consumers share the queue: keyed messages no longer wait for missing earlier ones"
                } else {
                    "alone on the queue: keyed messages wait for missing earlier ones again"
                }
            );
        }
        now_shared != was_shared
    }

    /// Whether the last count, above one, awaits its confirmation.
    fn unconfirmed(&self) -> bool {
        self.counts_above_one == 1
    }
}

/// Consumes on one connection until it fails or shutdown.
async fn session<H: Handler>(shared: &Arc<Shared<H>>, broker: Broker) -> Ended {
    let tag = format!("{}-{}", shared.config.name, uuid::Uuid::new_v4().simple());
    let retries_tag = format!("{tag}-retries");
    let subscribed = match broker.consume(&tag).await {
        Ok(deliveries) => broker
            .consume_retries(&retries_tag)
            .await
            .map(|retries| (deliveries, retries)),
        Err(error) => Err(error),
    };
    let (mut deliveries, mut retries) = match subscribed {
        Ok(both) => both,
        Err(error) => {
            broker.close().await;
            return Ended::Lost(anyhow::Error::new(error).context("cannot consume"));
        }
    };
    health::set_consuming(&shared.health, true);
    let config = &shared.config;
    tracing::info!(
        queue = %config.topology.queue,
        prefetch = config.prefetch,
        lanes = config.lanes,
        batch_size = config.batch_size,
        "consuming"
    );
    let publisher = broker.publisher();
    let mut consumers_check = tokio::time::interval(CONSUMERS_CHECK);
    let mut sharing = Sharing::default();
    let mut tasks = JoinSet::new();
    let lanes = Lanes::start(shared, &publisher, &mut tasks);
    let ended = loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break Ended::Shutdown,
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => {
                    shared.meters.in_flight.increment(1.0);
                    lanes.send(delivery);
                }
                Some(Err(error)) => break Ended::Lost(error.into()),
                None => break Ended::Lost(anyhow::anyhow!("the broker cancelled the consumer")),
            },
            _ = consumers_check.tick() => match broker.consumers().await {
                Ok(consumers) => {
                    if sharing.note(shared, consumers) {
                        lanes.recheck();
                    }
                    if sharing.unconfirmed() {
                        consumers_check.reset_after(SHARING_CONFIRM);
                    }
                }
                Err(error) => break Ended::Lost(anyhow::Error::new(error).context("cannot count the queue's consumers")),
            },
            next = retries.next() => match next {
                Some(Ok(copy)) => {
                    tasks.spawn(crate::retrier::bring_back(shared.clone(), publisher.clone(), copy));
                }
                Some(Err(error)) => break Ended::Lost(error.into()),
                None => break Ended::Lost(anyhow::anyhow!("the broker cancelled the retry queue's consumer")),
            },
            Some(done) = tasks.join_next() => match done {
                Ok(Outcome::Settled) => {}
                Ok(Outcome::BrokerFailed(error)) => break Ended::Lost(error.into()),
                // A bug of ours; closing the channel gives its deliveries back.
                Err(error) => break Ended::Lost(anyhow::Error::new(error).context("a lane failed")),
            },
        }
    };
    lanes.close();
    if let Ended::Shutdown = ended {
        broker.cancel(&tag, &retries_tag).await;
        // Lanes finish the batch in hand and stop; what no lane took goes
        // back with the channel.
        let finish = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(shared.config.shutdown_timeout, finish)
            .await
            .is_err()
        {
            tracing::warn!(
                lanes = tasks.len(),
                "handlers still running at the shutdown timeout; giving their deliveries back"
            );
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    crate::lanes::given_back(shared, lanes.left());
    shared.meters.in_flight.set(0.0);
    broker.close().await;
    ended
}
