//! Escalation when an outbox message becomes dead.
//!
//! A message that runs out of attempts is never published again by itself,
//! and a dead head can block the rest of its ordering key, so a person has to
//! look. [`Alerter::raise`] queues a dead letter without waiting; the
//! alerter's worker (see `queue`) coalesces what arrives together into one
//! [`Summary`] and [`Alerter::send_summary`] escalates it: `error!` log
//! lines (the channel that cannot fail) and, when configured, a JSON POST to
//! a webhook and a mail to the operators.
//!
//! Webhook and mail are best effort: each is tried once per alert, the two
//! run side by side, and each gets 10 seconds. A failure is logged with
//! `warn!` and reported in [`AlertOutcome`], never raised: an outage of the
//! alerting path must not stop the relay.
//!
//! TLS for both channels is rustls with the ring provider, checked against
//! the system's trust store. No error or log line here carries a password,
//! nor a webhook URL's path (chat webhooks keep their token there).

mod channels;
mod queue;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use channels::{ChannelError, Email, Webhook};
use queue::Queue;
#[cfg(test)]
use queue::SAMPLE;
pub(crate) use queue::{DEFAULT_INTERVAL, Summary};

/// How long one channel (webhook or mail) may take for one alert.
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where alerts go besides the log. Everything is optional: the default
/// config only logs.
#[derive(Debug, Clone, Default)]
pub struct AlertConfig {
    /// POST a JSON alert here when set (http:// or https://).
    pub webhook_url: Option<String>,
    /// SMTP server URL in lettre's format: `smtp://host:port` (plain text, no
    /// TLS), `smtp://host:port?tls=required` (STARTTLS), `smtps://host`
    /// (implicit TLS); credentials as `user:pass@`, which a plain `smtp://`
    /// URL sends in clear.
    pub smtp_url: Option<String>,
    /// Sender address, e.g. `outbox-relay@localhost`.
    pub smtp_from: String,
    /// Recipients; mail is sent only when `smtp_url` is set and this is not
    /// empty.
    pub smtp_to: Vec<String>,
}

/// What is known about a message that just died.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct DeadLetter {
    pub message_id: uuid::Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub ordering_key: Option<String>,
    pub attempts: i32,
    pub last_error: String,
    /// `user@host:port/db`, never a password.
    pub database: String,
}

/// A configuration the alerter cannot work with. The message names the
/// setting and the reason, never a password.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AlertError {
    #[error("invalid webhook URL: {0}")]
    WebhookUrl(String),
    #[error("cannot set up the webhook client: {0}")]
    WebhookClient(String),
    #[error(
        "invalid SMTP URL (want smtp://host:port, smtp://host?tls=required or smtps://host): {0}"
    )]
    SmtpUrl(String),
    #[error("invalid {field} address {address:?}: {reason}")]
    Address {
        field: &'static str,
        address: String,
        reason: String,
    },
}

/// How each channel fared for one alert; `None` means not configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AlertOutcome {
    pub webhook_ok: Option<bool>,
    pub email_ok: Option<bool>,
}

/// Sends dead-letter alerts. Cheap to clone: clones share one HTTP client,
/// one SMTP transport and one queue with its worker.
#[derive(Clone)]
pub(crate) struct Alerter {
    inner: Arc<Channels>,
    raiser: Arc<Raiser>,
}

/// The queue's sending side. When the last alerter goes, so does this, and
/// the worker sends what is left and ends.
struct Raiser {
    queue: Arc<Queue>,
    interval: Duration,
    /// Started on the first raise, inside the caller's runtime (and after
    /// the metrics recorder is installed, which `new` may precede).
    worker: OnceLock<()>,
}

impl Drop for Raiser {
    fn drop(&mut self) {
        self.queue.close();
    }
}

struct Channels {
    webhook: Option<Webhook>,
    email: Option<Email>,
}

impl Alerter {
    /// Validates the config and builds the clients, so a bad URL or address
    /// fails at startup rather than when the first message dies.
    pub(crate) fn new(config: &AlertConfig) -> Result<Alerter, AlertError> {
        let webhook = config
            .webhook_url
            .as_deref()
            .map(Webhook::new)
            .transpose()?;
        let email = match &config.smtp_url {
            Some(url) if !config.smtp_to.is_empty() => Some(Email::new(url, config)?),
            Some(_) => {
                tracing::warn!("an SMTP URL is set but no recipients: alerts will not be mailed");
                None
            }
            None => None,
        };
        Ok(Alerter {
            inner: Arc::new(Channels { webhook, email }),
            raiser: Arc::new(Raiser {
                queue: Arc::default(),
                interval: DEFAULT_INTERVAL,
                worker: OnceLock::new(),
            }),
        })
    }

    /// The same alerter with another shortest time between two alerts
    /// (tests; the default is [`DEFAULT_INTERVAL`]). Call it before the
    /// first raise: it starts a new queue.
    #[cfg(test)]
    pub fn with_interval(self, interval: Duration) -> Alerter {
        Alerter {
            raiser: Arc::new(Raiser {
                queue: Arc::default(),
                interval,
                worker: OnceLock::new(),
            }),
            ..self
        }
    }

    /// Queues `dead` for escalation and returns at once: never waits for a
    /// channel, and holds at most [`queue::SAMPLE`] dead letters however many
    /// arrive. Must be called inside a tokio runtime (it starts the worker).
    pub(crate) fn raise(&self, dead: DeadLetter) {
        self.raiser.queue.push(dead);
        self.raiser
            .worker
            .get_or_init(|| match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let worker = Worker {
                        channels: self.inner.clone(),
                        queue: self.raiser.queue.clone(),
                        interval: self.raiser.interval,
                    };
                    drop(runtime.spawn(worker.run()));
                }
                Err(_) => tracing::error!(
                    "dead-letter alerts raised outside a tokio runtime are only counted, never sent"
                ),
            });
    }

    /// Dead letters raised and not yet escalated.
    #[cfg(test)]
    pub fn waiting(&self) -> u64 {
        self.raiser.queue.waiting()
    }

    /// Escalates one dead letter at once, bypassing the queue.
    #[cfg(test)]
    pub async fn send(&self, dead: &DeadLetter) -> AlertOutcome {
        self.send_summary(&Summary::one(dead.clone())).await
    }

    /// Escalates a summary: logs each dead letter listed (and the count of
    /// the others), then tries the webhook and the mail once each. Never
    /// fails; see the outcome for how the channels did.
    #[cfg(test)]
    pub async fn send_summary(&self, summary: &Summary) -> AlertOutcome {
        self.inner.escalate(summary).await
    }
}

impl Channels {
    async fn escalate(&self, summary: &Summary) -> AlertOutcome {
        let Some(first) = summary.sample.first() else {
            return AlertOutcome::default();
        };
        for dead in &summary.sample {
            tracing::error!(
                message_id = %dead.message_id,
                exchange = %dead.exchange,
                routing_key = %dead.routing_key,
                ordering_key = dead.ordering_key.as_deref().unwrap_or(""),
                attempts = dead.attempts,
                last_error = %dead.last_error,
                database = %dead.database,
                "outbox message is dead after {} attempts",
                dead.attempts,
            );
        }
        if summary.count > 1 {
            tracing::error!(
                count = summary.count,
                listed = summary.sample.len(),
                "{} outbox messages died together; their alerts are coalesced into one, \
                 the {} not listed are in outbox.dead_letters",
                summary.count,
                summary.unlisted(),
            );
        }
        let at = SystemTime::now();
        let webhook = async {
            let webhook = self.webhook.as_ref()?;
            Some(deliver("webhook", first, webhook.post(summary, at)).await)
        };
        let email = async {
            let email = self.email.as_ref()?;
            Some(deliver("email", first, email.send(summary, at)).await)
        };
        // Side by side, so a hanging webhook does not hold up the mail.
        let (webhook_ok, email_ok) = tokio::join!(webhook, email);
        AlertOutcome {
            webhook_ok,
            email_ok,
        }
    }
}

/// Sends the queue's summaries, one at a time and at most one per interval.
struct Worker {
    channels: Arc<Channels>,
    queue: Arc<Queue>,
    interval: Duration,
}

impl Worker {
    async fn run(self) {
        // By name, once per alert: the alerter may be built before the recorder.
        let coalesced = metrics::counter!("outbox_alerts_coalesced_total");
        while let Some(summary) = self.queue.next().await {
            coalesced.increment(summary.count - 1);
            self.channels.escalate(&summary).await;
            self.queue.pause(self.interval).await;
        }
    }
}

/// Runs one channel within its time limit and logs a failure.
async fn deliver(
    channel: &'static str,
    dead: &DeadLetter,
    attempt: impl Future<Output = Result<(), ChannelError>>,
) -> bool {
    let error = match tokio::time::timeout(CHANNEL_TIMEOUT, attempt).await {
        Ok(Ok(())) => return true,
        Ok(Err(error)) => error,
        Err(_) => ChannelError::Timeout(CHANNEL_TIMEOUT),
    };
    // reqwest's and lettre's own top lines ("error sending request") do
    // not say what went wrong: their causes do.
    let error = outbox::chain_line(&error);
    tracing::warn!(channel, message_id = %dead.message_id, %error, "dead-letter alert not delivered");
    false
}

#[cfg(test)]
#[path = "../../../tests/harness/receivers.rs"]
mod receivers;

#[cfg(test)]
mod tests;
