//! When things fail: a probe for confirms that did not come, a channel
//! renewed after a run of nacks, rows given back, outages waited out (a
//! channel closed over one message reconnects at once), and the stop.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Relay;
use crate::amqp::Broker;
use crate::fault_policy::{BrokerDirective, BrokerError, ChannelFault, broker_directive};
use crate::marker::Mark;
use crate::meters::{BROKER, Fault};
use crate::outage::Outage;
use crate::store::Claimed;

impl Relay {
    /// Rows whose confirms did not come, with no answer from the broker
    /// since they were published: a probe on the channel tells a queue that
    /// stopped confirming (the broker answers: each row's fault, an
    /// attempt) from a broker that stopped answering (an outage: they are
    /// given back, no attempt counted, and the connection is replaced).
    pub(super) async fn ask_the_broker(&mut self, rows: Vec<Claimed>) -> Result<(), Outage> {
        let through = self.window.last_slot();
        let answer = match self.broker.as_ref() {
            Some(broker) => broker.probe().await,
            None => Err(BrokerError::NotConnected),
        };
        match answer {
            Ok(()) => {
                self.window.read_through(through);
                let failed = rows.into_iter().map(|row| self.window.unconfirmed(row));
                let failed: Vec<_> = failed.collect();
                self.settle(failed).map(drop)
            }
            Err(error) => {
                self.meters
                    .failure(Fault::ConnectionLost)
                    .increment(rows.len() as u64);
                self.give_back(rows);
                Err(Outage::from(error))
            }
        }
    }

    /// Opens a new channel once an exchange's run of nacks calls for one
    /// ([`crate::nack_runs`]) and nothing is in flight; true while one is
    /// due but confirms are outstanding.
    pub(super) async fn renew_channel_when_idle(&mut self) -> Result<bool, Outage> {
        let Some(exchange) = self.nack_runs.renewal_due(Instant::now()) else {
            return Ok(false);
        };
        if !self.window.is_empty() {
            return Ok(true);
        }
        tracing::warn!(
            exchange,
            "every recent publish to this exchange was nacked; opening a new channel"
        );
        self.nack_runs.renewed();
        if let Some(broker) = self.broker.as_mut() {
            broker.renew_channel().await.map_err(Outage::from)?;
            self.meters.channel_renewals.increment(1);
        }
        Ok(false)
    }

    /// Remembers the size of a row whose publish the broker's failure took
    /// down: the likeliest culprit of a channel closed as too large.
    pub(super) fn note_lost(&mut self, row: &Claimed) {
        let size = row.payload.len() as u64;
        self.largest_lost = Some(self.largest_lost.map_or(size, |largest| largest.max(size)));
    }

    /// Releases rows unpublished or of unknown outcome; claims scan from
    /// the start again to find them.
    pub(super) fn give_back(&mut self, rows: impl IntoIterator<Item = Claimed>) {
        let rows: Vec<_> = rows
            .into_iter()
            .inspect(|row| self.spans.given_back(row.id))
            .map(Claimed::held)
            .collect();
        if rows.is_empty() {
            return;
        }
        self.marker.send(Mark::Release(rows));
        self.cursor.rewind();
    }

    /// Waits up to `limit` for the window to settle, then gives back what
    /// has not (its outcome unknown: published again, at least once), the
    /// unanswered rows too: no probe is made on the way out.
    pub(super) async fn settle_in_flight(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.window.is_empty() {
            let Ok(settled) = tokio::time::timeout_at(deadline, self.window.settled()).await else {
                break;
            };
            if let Ok(unanswered) = self.settle(settled) {
                self.give_back(unanswered);
            }
        }
        let unanswered = self.window.abandon();
        self.give_back(unanswered);
        self.show_window();
    }

    pub(super) fn show_window(&self) {
        self.meters.in_flight.set(self.window.in_flight() as f64);
        self.meters.in_flight_bytes.set(self.window.bytes() as f64);
    }

    pub(super) async fn ensure_broker(&mut self) -> Result<(), Outage> {
        if self.broker.as_ref().is_some_and(Broker::is_connected) {
            return Ok(());
        }
        if let Some(broker) = self.broker.take() {
            broker.close().await;
        }
        let broker = Broker::connect(
            &self.config.amqp_url,
            self.config.amqp_ca_file.as_deref(),
            self.store.relay_id(),
            self.config.confirm_timeout,
        )
        .await
        .map_err(|e| BrokerError::Connect(format!("{e:#}")))?;
        tracing::info!("connected to RabbitMQ");
        self.broker = Some(broker);
        self.nack_runs.renewed();
        self.health.set(BROKER, true);
        Ok(())
    }

    pub(super) async fn wait_out(&mut self, outage: Outage, shutdown: &CancellationToken) {
        self.cursor.rewind();
        let Outage::Broker(error) = &outage else {
            self.outages.pause(&outage, shutdown).await;
            return;
        };
        let directive = broker_directive(error);
        if directive == BrokerDirective::Abandon {
            // Nothing more will come on this connection: everything in
            // flight goes back at once, and the close is not waited for.
            let unanswered = self.window.abandon();
            self.give_back(unanswered);
            self.show_window();
            if let Some(broker) = self.broker.take() {
                broker.abandon().await;
            }
        } else {
            self.settle_in_flight(Duration::from_secs(1)).await;
            if let Some(broker) = self.broker.take() {
                broker.close().await;
            }
        }
        let largest_lost = self.largest_lost.take();
        if let BrokerDirective::Reconnect(fault) = directive {
            // One message's fault: reconnect now (the new connection
            // checks exchanges afresh); claimed again, that message
            // alone fails (the others are published again).
            if let ChannelFault::TooLarge { broker_max } = fault {
                let unstated = largest_lost.map(|largest| largest.saturating_sub(1));
                self.broker_max = broker_max.or(unstated).or(self.broker_max);
            }
            tracing::warn!(%error, broker_max = self.broker_max, "the broker closed the channel over one message; reconnecting");
            return;
        }
        self.outages.pause(&outage, shutdown).await;
    }

    /// Shutdown: no new claims; bounded wait for confirms; give back the rest.
    pub(crate) async fn stop(self) {
        let mut relay = self;
        let timeout = relay.config.shutdown_timeout;
        // Confirms may take up to their deadline; the shutdown timeout
        // bounds the wait.
        relay.settle_in_flight(timeout).await;
        relay.wakeup.end_drain().await;
        relay.marker.finish(timeout).await;
        if let Some(broker) = relay.broker.take() {
            broker.close().await;
        }
    }
}
