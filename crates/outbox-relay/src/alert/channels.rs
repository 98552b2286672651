//! The two alert channels besides the log: a JSON POST to a webhook and a
//! mail, each built once (so a bad URL fails at start) and tried once per
//! alert. Their errors never carry a password, nor a webhook URL's path.

use std::sync::Arc;
use std::time::SystemTime;

use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use reqwest::Url;
use rustls_platform_verifier::BuilderVerifierExt;

use super::{AlertConfig, AlertError, CHANNEL_TIMEOUT, DeadLetter, Summary};

/// Why one alert did not go out on a channel. No variant holds a URL:
/// reqwest's are taken out (`without_url`), lettre's never have one.
#[derive(Debug, thiserror::Error)]
pub(super) enum ChannelError {
    #[error("POST to {host}")]
    Post {
        host: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot build the mail")]
    Build(#[source] lettre::error::Error),
    #[error("SMTP")]
    Smtp(#[source] lettre::transport::smtp::Error),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
}

pub(super) struct Webhook {
    client: reqwest::Client,
    url: Url,
}

pub(super) struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
}

/// The webhook's JSON body: the first dead letter's fields between a kind
/// (`outbox.dead_letter` for one, `outbox.dead_letters` for several), the
/// count, the ids listed and a timestamp.
#[derive(serde::Serialize)]
struct WebhookBody<'a> {
    kind: &'static str,
    #[serde(flatten)]
    dead: &'a DeadLetter,
    count: u64,
    message_ids: Vec<uuid::Uuid>,
    at: String,
}

impl Webhook {
    pub(super) fn new(url: &str) -> Result<Webhook, AlertError> {
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
            .map_err(|e| AlertError::WebhookClient(outbox::chain_line(&e)))?;
        Ok(Webhook { client, url })
    }

    pub(super) async fn post(&self, summary: &Summary, at: SystemTime) -> Result<(), ChannelError> {
        let Some(dead) = summary.sample.first() else {
            return Ok(());
        };
        let body = WebhookBody {
            kind: if summary.count == 1 {
                "outbox.dead_letter"
            } else {
                "outbox.dead_letters"
            },
            dead,
            count: summary.count,
            message_ids: summary.sample.iter().map(|d| d.message_id).collect(),
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
            .map_err(|e| ChannelError::Post {
                host: host.to_string(),
                source: e.without_url(),
            })
    }
}

impl Email {
    pub(super) fn new(url: &str, config: &AlertConfig) -> Result<Email, AlertError> {
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

    pub(super) async fn send(&self, summary: &Summary, at: SystemTime) -> Result<(), ChannelError> {
        let Some(dead) = summary.sample.first() else {
            return Ok(());
        };
        let subject = match summary.count {
            1 => format!(
                "outbox: message {} is dead after {} attempts",
                dead.message_id, dead.attempts
            ),
            n => format!("outbox: {n} messages are dead (first {})", dead.message_id),
        };
        let message = self
            .to
            .iter()
            .fold(Message::builder().from(self.from.clone()), |b, to| {
                b.to(to.clone())
            })
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(email_body(summary, at))
            .map_err(ChannelError::Build)?;
        self.transport
            .send(message)
            .await
            .map(drop)
            .map_err(ChannelError::Smtp)
    }
}

fn email_body(summary: &Summary, at: SystemTime) -> String {
    let mut body = match summary.count {
        1 => String::new(),
        n => format!(
            "{n} outbox messages died together; the first {} follow.\n\
             All of them are in the view outbox.dead_letters.\n\n",
            summary.sample.len()
        ),
    };
    for dead in &summary.sample {
        body.push_str(&one_dead_letter(dead, at));
        body.push('\n');
    }
    if summary.unlisted() > 0 {
        body.push_str(&format!(
            "... and {} more: SELECT * FROM outbox.dead_letters;\n",
            summary.unlisted()
        ));
    }
    body
}

fn one_dead_letter(dead: &DeadLetter, at: SystemTime) -> String {
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
