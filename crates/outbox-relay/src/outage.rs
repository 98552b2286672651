//! Outages of the broker or the database: they pause the relay with
//! backoff and show on `/readyz` and the outage counters; they never count
//! as a message's attempt. The first pause of an outage is logged as a
//! warning, the retries that follow at debug level, and its end once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::fault_policy::{BrokerDirective, BrokerError, broker_directive};
use crate::meters::{BROKER, DATABASE, Meters};
use crate::store::StoreError;
use outbox_service::backoff::Backoff;
use outbox_service::health::Health;

/// Why a drain stopped early (`fault_policy` says what each means).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Outage {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Database(#[from] StoreError),
}

pub(crate) struct Outages {
    backoff: Backoff,
    meters: Meters,
    health: Health,
    /// Pauses since the last drain that went through, by server
    /// ([`DATABASE`], [`BROKER`]).
    pauses: [u32; 2],
}

impl Outages {
    pub(crate) fn new(meters: Meters, health: Health) -> Outages {
        Outages {
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            meters,
            health,
            pauses: [0; 2],
        }
    }

    /// A drain went through: the next outage starts from the shortest delay.
    pub(crate) fn over(&mut self) {
        self.backoff.reset();
        for (server, pauses) in [("PostgreSQL", DATABASE), ("RabbitMQ", BROKER)]
            .map(|(server, index)| (server, std::mem::take(&mut self.pauses[index])))
        {
            if pauses > 0 {
                tracing::info!(server, pauses, "outage over; relaying again");
            }
        }
    }

    /// Logs and meters the outage, marks the server down, and waits out the
    /// backoff (or shutdown).
    pub(crate) async fn pause(&mut self, outage: &Outage, shutdown: &CancellationToken) {
        let delay = self.backoff.next_delay();
        let retry_in_ms = delay.as_millis() as u64;
        let server = match outage {
            Outage::Broker(_) => BROKER,
            Outage::Database(_) => DATABASE,
        };
        self.pauses[server] += 1;
        let pauses = self.pauses[server];
        let first = pauses == 1;
        macro_rules! report {
            ($($field:tt)*) => {
                if first {
                    tracing::warn!($($field)*)
                } else {
                    tracing::debug!(pauses, $($field)*)
                }
            };
        }
        match outage {
            Outage::Broker(error) => {
                self.health.set(BROKER, false);
                self.meters.broker_outages.increment(1);
                if broker_directive(error) == BrokerDirective::Abandon {
                    // Its rows in flight were given back, no attempt counted.
                    report!(%error, retry_in_ms, "RabbitMQ stopped answering; pausing")
                } else {
                    report!(%error, retry_in_ms, "RabbitMQ unavailable; pausing")
                }
            }
            Outage::Database(error) => {
                self.health.set(DATABASE, false);
                self.meters.database_outages.increment(1);
                report!(%error, retry_in_ms, "PostgreSQL unavailable; pausing")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
