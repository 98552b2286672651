//! Escalation when an outbox message becomes dead.
//!
//! A message that runs out of attempts is never published again by itself,
//! and a dead head can block the rest of its ordering key, so a person has to
//! look. [`Alerter::send`] always writes an `error!` log line (the channel
//! that cannot fail) and, when configured, also POSTs a JSON alert to a
//! webhook and mails the operators.
//!
//! Webhook and mail are best effort: each is tried once per call, the two run
//! side by side, and each gets 10 seconds. A failure is logged with
//! `warn!` and reported in [`AlertOutcome`], never raised: an outage of the
//! alerting path must not stop the relay. Retrying later is the caller's call.
//!
//! TLS for both channels is rustls with the ring provider, checked against
//! the system's trust store. No error or log line here carries a password,
//! nor a webhook URL's path (chat webhooks keep their token there).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use reqwest::Url;
use rustls_platform_verifier::BuilderVerifierExt;

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
pub struct DeadLetter {
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
pub enum AlertError {
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
pub struct AlertOutcome {
    pub webhook_ok: Option<bool>,
    pub email_ok: Option<bool>,
}

/// Sends dead-letter alerts. Cheap to clone: clones share one HTTP client
/// and one SMTP transport.
#[derive(Clone)]
pub struct Alerter {
    inner: Arc<Channels>,
}

struct Channels {
    webhook: Option<Webhook>,
    email: Option<Email>,
}

struct Webhook {
    client: reqwest::Client,
    url: Url,
}

struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
}

/// The webhook's JSON body: the dead letter's fields between a kind and a
/// timestamp.
#[derive(serde::Serialize)]
struct WebhookBody<'a> {
    kind: &'static str,
    #[serde(flatten)]
    dead: &'a DeadLetter,
    at: String,
}

impl Alerter {
    /// Validates the config and builds the clients, so a bad URL or address
    /// fails at startup rather than when the first message dies.
    pub fn new(config: &AlertConfig) -> Result<Alerter, AlertError> {
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
        })
    }

    /// Escalates one dead letter: logs it, then tries the webhook and the
    /// mail once each. Never fails; see the outcome for how the channels did.
    pub async fn send(&self, dead: &DeadLetter) -> AlertOutcome {
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
        let at = SystemTime::now();
        let webhook = async {
            let webhook = self.inner.webhook.as_ref()?;
            Some(deliver("webhook", dead, webhook.post(dead, at)).await)
        };
        let email = async {
            let email = self.inner.email.as_ref()?;
            Some(deliver("email", dead, email.send(dead, at)).await)
        };
        // Side by side, so a hanging webhook does not hold up the mail.
        let (webhook_ok, email_ok) = tokio::join!(webhook, email);
        AlertOutcome {
            webhook_ok,
            email_ok,
        }
    }
}

/// Runs one channel within its time limit and logs a failure.
async fn deliver(
    channel: &'static str,
    dead: &DeadLetter,
    attempt: impl Future<Output = Result<(), String>>,
) -> bool {
    let error = match tokio::time::timeout(CHANNEL_TIMEOUT, attempt).await {
        Ok(Ok(())) => return true,
        Ok(Err(error)) => error,
        Err(_) => format!("timed out after {CHANNEL_TIMEOUT:?}"),
    };
    tracing::warn!(channel, message_id = %dead.message_id, %error, "dead-letter alert not delivered");
    false
}

impl Webhook {
    fn new(url: &str) -> Result<Webhook, AlertError> {
        // The parse error never quotes the input, which may hold a password.
        let url = Url::parse(url).map_err(|e| AlertError::WebhookUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(AlertError::WebhookUrl(format!(
                "scheme must be http or https, not {:?}",
                url.scheme()
            )));
        }
        // Our own rustls config pins the ring provider; left to itself
        // reqwest would look for a process-wide provider and panic without one.
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .and_then(|builder| builder.with_platform_verifier())
        .map_err(|e| AlertError::WebhookClient(e.to_string()))?
        .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|e| AlertError::WebhookClient(error_chain(&e)))?;
        Ok(Webhook { client, url })
    }

    async fn post(&self, dead: &DeadLetter, at: SystemTime) -> Result<(), String> {
        let body = WebhookBody {
            kind: "outbox.dead_letter",
            dead,
            at: humantime::format_rfc3339_millis(at).to_string(),
        };
        let host = self.url.host_str().unwrap_or_default();
        // `without_url`: reqwest's errors quote the full URL, secrets and all.
        self.client
            .post(self.url.clone())
            .json(&body)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map(drop)
            .map_err(|e| format!("POST to {host}: {}", error_chain(&e.without_url())))
    }
}

impl Email {
    fn new(url: &str, config: &AlertConfig) -> Result<Email, AlertError> {
        // lettre's errors name the scheme or the parse problem, never the
        // URL's userinfo.
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| AlertError::SmtpUrl(e.to_string()))?
            .timeout(Some(CHANNEL_TIMEOUT))
            .build();
        let from = mailbox("smtp_from", &config.smtp_from)?;
        let to = config
            .smtp_to
            .iter()
            .map(|address| mailbox("smtp_to", address))
            .collect::<Result<_, _>>()?;
        Ok(Email {
            transport,
            from,
            to,
        })
    }

    async fn send(&self, dead: &DeadLetter, at: SystemTime) -> Result<(), String> {
        let subject = format!(
            "outbox: message {} is dead after {} attempts",
            dead.message_id, dead.attempts
        );
        let message = self
            .to
            .iter()
            .fold(Message::builder().from(self.from.clone()), |b, to| {
                b.to(to.clone())
            })
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(email_body(dead, at))
            .map_err(|e| format!("cannot build the mail: {e}"))?;
        self.transport
            .send(message)
            .await
            .map(drop)
            .map_err(|e| error_chain(&e))
    }
}

fn email_body(dead: &DeadLetter, at: SystemTime) -> String {
    let id = dead.message_id;
    format!(
        "The outbox relay gave up on a message after {attempts} attempts.\n\
         It will not be published unless someone retries it.\n\
         \n\
         message_id:   {id}\n\
         exchange:     {exchange}\n\
         routing_key:  {routing_key}\n\
         ordering_key: {ordering_key}\n\
         attempts:     {attempts}\n\
         last_error:   {last_error}\n\
         database:     {database}\n\
         at:           {at}\n\
         \n\
         Inspect it in the view outbox.dead_letters. Once the cause is fixed,\n\
         SELECT outbox.retry_dead('{id}');\n",
        attempts = dead.attempts,
        exchange = dead.exchange,
        routing_key = dead.routing_key,
        ordering_key = dead.ordering_key.as_deref().unwrap_or("(none)"),
        last_error = dead.last_error,
        database = dead.database,
        at = humantime::format_rfc3339_seconds(at),
    )
}

fn mailbox(field: &'static str, address: &str) -> Result<Mailbox, AlertError> {
    address
        .parse()
        .map_err(|e: lettre::address::AddressError| AlertError::Address {
            field,
            address: address.to_owned(),
            reason: e.to_string(),
        })
}

/// An error and its causes on one line: the top-level messages of reqwest
/// and lettre alone ("error sending request") do not say what went wrong.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause = cause.to_string();
        // lettre already appends its source to its own message.
        if !line.ends_with(&cause) {
            line = format!("{line}: {cause}");
        }
        source = source.and_then(std::error::Error::source);
    }
    line
}

#[cfg(test)]
#[path = "../../../tests/harness/receivers.rs"]
mod receivers;

#[cfg(test)]
mod tests {
    use super::*;
    use receivers::{http_receiver, smtp_receiver};
    use tokio::time::timeout;

    const WAIT: Duration = Duration::from_secs(5);

    fn dead_letter() -> DeadLetter {
        DeadLetter {
            message_id: uuid::Uuid::new_v4(),
            exchange: "orders".into(),
            routing_key: "order.created".into(),
            ordering_key: Some("order-42".into()),
            attempts: 5,
            last_error: "exchange not found".into(),
            database: "relay@127.0.0.1:5432/shop".into(),
        }
    }

    #[tokio::test]
    async fn alerts_reach_webhook_and_mailbox() {
        let (webhook_url, mut hooks) = http_receiver().await;
        let (smtp_url, mut mails) = smtp_receiver().await;
        let alerter = Alerter::new(&AlertConfig {
            webhook_url: Some(webhook_url),
            smtp_url: Some(smtp_url),
            smtp_from: "outbox-relay@localhost".into(),
            smtp_to: vec!["ops@example.com".into()],
        })
        .expect("valid config");

        // Twice: the receivers and the alerter each serve more than one alert.
        for _ in 0..2 {
            let dead = dead_letter();
            let outcome = alerter.send(&dead).await;
            assert_eq!(
                outcome,
                AlertOutcome {
                    webhook_ok: Some(true),
                    email_ok: Some(true)
                }
            );

            let hook = timeout(WAIT, hooks.recv()).await.expect("webhook in time");
            let hook = hook.expect("webhook body");
            assert_eq!(hook["kind"], "outbox.dead_letter");
            assert_eq!(hook["message_id"], dead.message_id.to_string());
            assert_eq!(hook["ordering_key"], "order-42");
            assert_eq!(hook["attempts"], 5);
            let at = hook["at"].as_str().expect("at is a string");
            assert!(humantime::parse_rfc3339(at).is_ok(), "at: {at}");

            let mail = timeout(WAIT, mails.recv()).await.expect("mail in time");
            let mail = mail.expect("mail data");
            assert!(mail.contains(&dead.message_id.to_string()), "{mail}");
            assert!(mail.contains("To: ops@example.com"), "{mail}");
            assert!(mail.contains("From: outbox-relay@localhost"), "{mail}");
            assert!(mail.contains("exchange not found"), "{mail}");
        }
    }

    #[tokio::test]
    async fn bad_urls_are_rejected_without_the_password() {
        let webhook = |url: &str| AlertConfig {
            webhook_url: Some(url.into()),
            ..AlertConfig::default()
        };
        let smtp = |url: &str| AlertConfig {
            smtp_url: Some(url.into()),
            smtp_from: "relay@localhost".into(),
            smtp_to: vec!["ops@example.com".into()],
            ..AlertConfig::default()
        };
        for config in [
            webhook("ftp://alice:s3cret@example.com/hook"),
            webhook("http://alice:s3cret@exa mple.com/hook"),
            webhook("alice:s3cret@example.com"),
            smtp("smtpx://alice:s3cret@mail.example.com"),
            smtp("smtp://alice:s3cret@mail.example.com?tls=sometimes"),
            smtp("smtp://alice:s3cret@[::1"),
        ] {
            let error = Alerter::new(&config).err().expect("rejected");
            let text = error.to_string();
            assert!(!text.contains("s3cret"), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
    }

    #[tokio::test]
    async fn bad_addresses_are_rejected() {
        let config = AlertConfig {
            smtp_url: Some("smtp://127.0.0.1:2525".into()),
            smtp_from: "relay@localhost".into(),
            smtp_to: vec!["not an address".into()],
            ..AlertConfig::default()
        };
        let error = Alerter::new(&config).err().expect("rejected");
        assert!(
            matches!(
                error,
                AlertError::Address {
                    field: "smtp_to",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn unreachable_webhook_fails_quickly() {
        // A port that was just free: nothing listens there.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        drop(listener);

        let alerter = Alerter::new(&AlertConfig {
            webhook_url: Some(format!("http://127.0.0.1:{port}/hook")),
            ..AlertConfig::default()
        })
        .expect("valid config");
        let outcome = timeout(WAIT, alerter.send(&dead_letter()))
            .await
            .expect("send does not hang");
        assert_eq!(
            outcome,
            AlertOutcome {
                webhook_ok: Some(false),
                email_ok: None
            }
        );
    }

    #[tokio::test]
    async fn log_only_by_default() {
        let alerter = Alerter::new(&AlertConfig::default()).expect("valid config");
        assert_eq!(alerter.send(&dead_letter()).await, AlertOutcome::default());
    }
}
