//! The wake-up listener: a dedicated connection (never a pooled one) that
//! LISTENs on `outbox_wake` and holds the drain lock while the relay drains,
//! which is what keeps writers from notifying a busy relay.
//!
//! No other session can stall it: every lock it takes is tried or bounded
//! by `lock_timeout`, and the drain lock is a transaction lock of a
//! transaction the server ends when the relay stops talking
//! (`idle_in_transaction_session_timeout`): a relay frozen mid-drain gives
//! the lock back, and writers wake the other relays again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};

use outbox_service::db::{HANDSHAKE_TIMEOUT, PgTarget};

/// How long announcing waits for the listener lock (a writer that found
/// no listener holds it exclusively through its commit).
const LOCK_TIMEOUT_MS: u32 = 200;
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A drain's transaction is ended by the server after this long without a
/// word from the relay, which talks every [`KEEP_DRAINING_EVERY`].
const DRAIN_IDLE_TIMEOUT_MS: u32 = 5_000;
pub const KEEP_DRAINING_EVERY: Duration = Duration::from_secs(1);
/// What listening relays call themselves, so that the sweep can tell
/// their hold on the wake-up locks from anyone else's.
pub const APPLICATION_NAME: &str = "outbox-relay";

const BEGIN_DRAIN: &str = "BEGIN; SELECT pg_try_advisory_xact_lock_shared(1869968482, 1)";
/// Waits for the drain lock, briefly: a writer sending a wake-up holds it
/// exclusively for one commit, and our queued request makes the writers
/// behind it skip their NOTIFY (a try would leave them all notifying, one
/// at a time, until a try wins: 901 NOTIFYs per 8 s run instead of 39).
const PATIENT_BEGIN_DRAIN: &str = "BEGIN; SET LOCAL lock_timeout = 20; \
     SELECT pg_advisory_xact_lock_shared(1869968482, 1)";
const TRY_DRAIN_LOCK: &str = "SELECT pg_try_advisory_xact_lock_shared(1869968482, 1)";
/// While the drain lock could not be had, how often a drain tries again:
/// a writer mid-wake-up holds it for one commit, and until we hold it
/// every committing writer pays for a NOTIFY.
const DRAIN_LOCK_RETRY: Duration = Duration::from_millis(2);
/// Commits the drain's transaction and starts another: the transaction
/// never grows old, and the lock is tried again if it was taken.
const KEEP_DRAINING: &str = "COMMIT; BEGIN; SELECT pg_try_advisory_xact_lock_shared(1869968482, 1)";

/// Why the listener failed: the relay drops it and connects another.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("wake-up listener did not answer within {} s", PROBE_TIMEOUT.as_secs())]
    Silent,
    #[error("wake-up listener could not connect within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    ConnectTimeout,
    #[error("{}", outbox::error_line(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

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
    /// In a drain's transaction.
    draining: bool,
    /// The drain lock is held (false while someone holds it exclusively:
    /// then writers keep notifying, which is harmless).
    holds_drain_lock: bool,
    /// Holds the listener lock, so writers know someone listens.
    announced: bool,
    /// When a drain without the lock may try for it again.
    next_lock_try: tokio::time::Instant,
}

impl Listener {
    /// Connects and LISTENs. The caller drains right after, so nothing
    /// committed while no one was listening is missed. A wake-up saying a
    /// scheduled row falls due soon (V9) also raises `schedule_changed`.
    pub async fn connect(
        target: &PgTarget,
        schedule_changed: Arc<AtomicBool>,
    ) -> Result<Listener, ListenerError> {
        // The connect timeout covers the TCP connect only: a server that
        // accepts and then says nothing would hold the handshake forever.
        let connect = target.config.connect(target.tls.clone());
        let (client, mut connection) = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
            .await
            .map_err(|_| ListenerError::ConnectTimeout)??;
        let (sender, wakes) = mpsc::unbounded_channel();
        // Notifications only surface through poll_message: drive the
        // connection here and forward them.
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(notification)) => {
                        if notification.payload() == outbox::SCHEDULE_WAKE_PAYLOAD {
                            schedule_changed.store(true, Ordering::Relaxed);
                        }
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
        // The timeouts first: nothing below may wait on another session.
        let setup = format!(
            "SET lock_timeout = {LOCK_TIMEOUT_MS}; \
             SET idle_in_transaction_session_timeout = {DRAIN_IDLE_TIMEOUT_MS}; \
             SET application_name = '{APPLICATION_NAME}'; LISTEN {}",
            outbox::WAKE_CHANNEL
        );
        tokio::time::timeout(PROBE_TIMEOUT, client.batch_execute(&setup))
            .await
            .map_err(|_| ListenerError::Silent)??;
        let mut listener = Listener {
            client,
            wakes,
            draining: false,
            holds_drain_lock: false,
            announced: false,
            next_lock_try: tokio::time::Instant::now(),
        };
        listener.announce().await?;
        Ok(listener)
    }

    /// Takes the listener lock (shared among relays). Another session
    /// holding it exclusively only makes writers notify: listen anyway,
    /// and try again at the next probe.
    async fn announce(&mut self) -> Result<(), ListenerError> {
        let announce = self
            .client
            .batch_execute("SELECT outbox.announce_listener()");
        match tokio::time::timeout(PROBE_TIMEOUT, announce)
            .await
            .map_err(|_| ListenerError::Silent)?
        {
            Ok(()) => {
                self.announced = true;
                Ok(())
            }
            Err(error) if is_lock_timeout(&error) => {
                tracing::warn!(
                    "another session holds the listener lock (1869968482, 2) exclusively; listening without it"
                );
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// True from [`Listener::begin_drain`] to [`Listener::end_drain`].
    pub fn draining(&self) -> bool {
        self.draining
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

    /// Opens a drain: a transaction holding the drain lock (shared among
    /// relays) so committing writers skip NOTIFY. `patient` waits up to
    /// 20 ms for it (see [`PATIENT_BEGIN_DRAIN`]); otherwise, and while
    /// someone holds it longer (a transaction that fired the trigger
    /// early), the lock is only tried, again every [`DRAIN_LOCK_RETRY`]:
    /// without it writers keep notifying, which costs them, not us.
    pub async fn begin_drain(&mut self, patient: bool) -> Result<(), ListenerError> {
        if !self.draining {
            self.draining = true;
            if !patient {
                return self.try_drain_lock(BEGIN_DRAIN).await;
            }
            let begin = self.client.batch_execute(PATIENT_BEGIN_DRAIN);
            let began = tokio::time::timeout(PROBE_TIMEOUT, begin)
                .await
                .map_err(|_| ListenerError::Silent)?;
            self.next_lock_try = tokio::time::Instant::now() + DRAIN_LOCK_RETRY;
            return match began {
                Ok(()) => {
                    self.holds_drain_lock = true;
                    Ok(())
                }
                Err(error) if is_lock_timeout(&error) => {
                    // The timeout aborted the transaction: start a clean one.
                    self.holds_drain_lock = false;
                    self.client
                        .batch_execute("ROLLBACK; BEGIN")
                        .await
                        .map_err(ListenerError::from)
                }
                Err(error) => Err(error.into()),
            };
        }
        if self.holds_drain_lock || tokio::time::Instant::now() < self.next_lock_try {
            return Ok(());
        }
        self.try_drain_lock(TRY_DRAIN_LOCK).await
    }

    /// Keeps a long drain's transaction young (see [`KEEP_DRAINING_EVERY`]).
    pub async fn keep_draining(&mut self) -> Result<(), ListenerError> {
        if !self.draining {
            return Ok(());
        }
        self.try_drain_lock(KEEP_DRAINING).await
    }

    async fn try_drain_lock(&mut self, sql: &str) -> Result<(), ListenerError> {
        let answer = tokio::time::timeout(PROBE_TIMEOUT, self.client.simple_query(sql))
            .await
            .map_err(|_| ListenerError::Silent)??;
        self.holds_drain_lock = answer.iter().any(|message| {
            matches!(message, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("t"))
        });
        self.next_lock_try = tokio::time::Instant::now() + DRAIN_LOCK_RETRY;
        Ok(())
    }

    pub async fn end_drain(&mut self) -> Result<(), ListenerError> {
        if !self.draining {
            return Ok(());
        }
        self.draining = false;
        self.holds_drain_lock = false;
        let end = self.client.batch_execute("COMMIT");
        tokio::time::timeout(PROBE_TIMEOUT, end)
            .await
            .map_err(|_| ListenerError::Silent)?
            .map_err(ListenerError::from)
    }

    /// A round trip, to find a connection that died without a word; also
    /// announces a listener that could not yet.
    pub async fn probe(&mut self) -> bool {
        if !self.announced {
            return self.announce().await.is_ok();
        }
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, self.client.batch_execute("SELECT 1")).await,
            Ok(Ok(()))
        )
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

fn is_lock_timeout(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}
