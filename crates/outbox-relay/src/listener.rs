//! The wake-up listener: a dedicated connection (never a pooled one) that
//! LISTENs on `outbox_wake` and holds the drain lock while the relay drains,
//! which is what keeps writers from notifying a busy relay.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};

use crate::db::PgTarget;

/// How long `begin_drain` waits for writers that are sending a wake-up
/// right now (they hold the lock exclusively through their commit).
const DRAIN_LOCK_TIMEOUT_MS: u32 = 200;
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why `wait` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Woken {
    Notified,
    TimedOut,
    /// The connection is gone; reconnect.
    Lost,
}

pub struct Listener {
    client: Client,
    wakes: mpsc::UnboundedReceiver<()>,
    draining: bool,
}

impl Listener {
    /// Connects and LISTENs. The caller drains right after, so nothing
    /// committed while no one was listening is missed.
    pub async fn connect(target: &PgTarget) -> Result<Listener, String> {
        let (client, mut connection) = target
            .config
            .connect(target.tls.clone())
            .await
            .map_err(|e| outbox::error_line(&e))?;
        let (sender, wakes) = mpsc::unbounded_channel();
        // Notifications only surface through poll_message: drive the
        // connection here and forward them.
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => {
                        if sender.send(()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(error = %error, "wake-up listener connection failed");
                        break;
                    }
                }
            }
        });
        client
            .batch_execute(&format!(
                "LISTEN {}; SELECT outbox.announce_listener(); SET lock_timeout = {DRAIN_LOCK_TIMEOUT_MS}",
                outbox::WAKE_CHANNEL
            ))
            .await
            .map_err(|e| outbox::error_line(&e))?;
        Ok(Listener {
            client,
            wakes,
            draining: false,
        })
    }

    /// Waits up to `timeout` for a wake-up; several queued ones count once.
    pub async fn wait(&mut self, timeout: Duration) -> Woken {
        let woken = match tokio::time::timeout(timeout, self.wakes.recv()).await {
            Ok(Some(())) => Woken::Notified,
            Ok(None) => return Woken::Lost,
            Err(_) => Woken::TimedOut,
        };
        while let Ok(()) = self.wakes.try_recv() {}
        woken
    }

    /// Takes the drain lock (shared among relays) so committing writers skip
    /// NOTIFY. If a writer holds it longer than the lock timeout (say a
    /// transaction that fired the trigger early with SET CONSTRAINTS
    /// IMMEDIATE), drain without it: writers then keep notifying, nothing
    /// else changes.
    pub async fn begin_drain(&mut self) -> Result<(), String> {
        if self.draining {
            return Ok(());
        }
        let begin = self.client.batch_execute("SELECT outbox.begin_drain()");
        match tokio::time::timeout(PROBE_TIMEOUT, begin)
            .await
            .map_err(|_| "wake-up listener did not answer".to_string())?
        {
            Ok(()) => {
                self.draining = true;
                Ok(())
            }
            Err(error)
                if error.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
            {
                Ok(())
            }
            Err(error) => Err(outbox::error_line(&error)),
        }
    }

    pub async fn end_drain(&mut self) -> Result<(), String> {
        if !self.draining {
            return Ok(());
        }
        self.draining = false;
        let end = self.client.batch_execute("SELECT outbox.end_drain()");
        tokio::time::timeout(PROBE_TIMEOUT, end)
            .await
            .map_err(|_| "wake-up listener did not answer".to_string())?
            .map_err(|e| outbox::error_line(&e))
    }

    /// A round trip, to find a connection that died without a word.
    pub async fn probe(&self) -> bool {
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, self.client.batch_execute("SELECT 1")).await,
            Ok(Ok(()))
        )
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}
