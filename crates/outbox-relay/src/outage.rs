//! Outages of the broker or the database: they pause the relay with
//! backoff and show on `/readyz` and the outage counters; they never count
//! as a message's attempt.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::meters::{BROKER, DATABASE, Meters};
use outbox_service::backoff::Backoff;
use outbox_service::health::Health;

/// Why a drain stopped early.
#[derive(Debug)]
pub(crate) enum Outage {
    Broker(String),
    Database(String),
}

pub(crate) struct Outages {
    backoff: Backoff,
    meters: Meters,
    health: Health,
}

impl Outages {
    pub(crate) fn new(meters: Meters, health: Health) -> Outages {
        Outages {
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            meters,
            health,
        }
    }

    /// A drain went through: the next outage starts from the shortest delay.
    pub(crate) fn over(&mut self) {
        self.backoff.reset();
    }

    /// Logs and meters the outage, marks the server down, and waits out the
    /// backoff (or shutdown).
    pub(crate) async fn pause(&mut self, outage: &Outage, shutdown: &CancellationToken) {
        let delay = self.backoff.next_delay();
        let retry_in_ms = delay.as_millis() as u64;
        match outage {
            Outage::Broker(error) => {
                self.health.set(BROKER, false);
                self.meters.broker_outages.increment(1);
                tracing::warn!(%error, retry_in_ms, "RabbitMQ unavailable; pausing")
            }
            Outage::Database(error) => {
                self.health.set(DATABASE, false);
                self.meters.database_outages.increment(1);
                tracing::warn!(%error, retry_in_ms, "PostgreSQL unavailable; pausing")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
