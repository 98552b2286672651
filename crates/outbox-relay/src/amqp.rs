//! The relay's RabbitMQ side: one confirm-mode channel on a connection
//! from `outbox_service::amqp`, and publishing a claimed row with the
//! properties consumers rely on.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use lapin::message::BasicReturnMessage;
use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Confirmation, Connection, ErrorKind, ExchangeKind, PublisherConfirm};

use crate::fault_policy::BrokerError;
use crate::meters::Fault;
use crate::properties::{header_problem, properties};
use crate::spans::TraceHeaders;
use crate::store::Claimed;

const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long closing a connection that stopped answering may take: its
/// close-ok will not come either.
const SILENT_CLOSE_TIMEOUT: Duration = Duration::from_millis(100);
/// Frame bytes kept for everything in a content header but the headers
/// (frame and class fields, message id, content type of at most 255 bytes,
/// delivery mode, timestamp).
const PROPERTIES_ROOM: usize = 1024;
/// How long an exchange checked to exist is trusted before checking again.
const EXCHANGE_CACHE_TTL: Duration = Duration::from_secs(60);

/// An open connection with a channel in confirm mode.
pub(crate) struct Broker {
    connection: Connection,
    channel: Channel,
    /// Exchanges known to exist. Publishing to a missing exchange closes the
    /// whole channel (404), failing every publish in flight; checking first
    /// on a throwaway channel turns it into a fault of that message alone.
    /// (An exchange deleted while cached still closes the channel once: that
    /// counts as an outage, and the reconnected broker starts a new cache.)
    known_exchanges: HashMap<String, Instant>,
    /// How long any round trip with the broker may take (the confirm
    /// timeout): past it the broker is silent, and nothing may wait on it
    /// for ever (a black-holed network answers nothing and closes nothing).
    answer_within: Duration,
}

/// What the broker said about one publish.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Acked. Safe to mark published only once no return can be its own
    /// (see [`Returned`]): the relay holds acked rows until every confirm
    /// in flight has answered.
    Confirmed,
    /// The message's own fault (nack, unroutable, oversized, no exchange):
    /// counts as an attempt.
    Rejected(Fault, String),
    /// The connection or channel failed: not the message's fault
    /// (`fault_policy` says what it means).
    Lost(BrokerError),
}

impl Outcome {
    /// The broker's own answer (an ack or a nack), not one the relay gave
    /// before publishing: it shows the broker read the publish.
    pub(crate) fn answered_by_broker(&self) -> bool {
        matches!(
            self,
            Outcome::Confirmed | Outcome::Rejected(Fault::Nacked, _)
        )
    }
}

impl Broker {
    /// Connects to the first node of `urls` that answers (see
    /// [`outbox_service::amqp`], bounded there) and opens the confirm-mode
    /// channel, each round trip within `answer_within`.
    pub(crate) async fn connect(
        urls: &str,
        ca_file: Option<&Path>,
        name: &str,
        answer_within: Duration,
    ) -> anyhow::Result<Broker> {
        let connection = outbox_service::amqp::connect(urls, ca_file, name).await?;
        let channel = match within(answer_within, confirm_channel(&connection)).await {
            Ok(channel) => channel,
            Err(error) => {
                let _ =
                    tokio::time::timeout(SILENT_CLOSE_TIMEOUT, connection.close(200, "".into()))
                        .await;
                return Err(error.into());
            }
        };
        Ok(Broker {
            connection,
            channel,
            known_exchanges: HashMap::new(),
            answer_within,
        })
    }

    /// Replaces the channel with a new one in confirm mode (see
    /// [`crate::nack_runs`]); call it with nothing in flight.
    pub(crate) async fn renew_channel(&mut self) -> Result<(), BrokerError> {
        let channel = within(self.answer_within, confirm_channel(&self.connection)).await?;
        let old = std::mem::replace(&mut self.channel, channel);
        let close = old.close(200, "renewed".into());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT.min(self.answer_within), close).await;
        Ok(())
    }

    /// A round trip on the publishing channel (a `basic.qos` that changes
    /// nothing, the channel consumes nothing) within `answer_within`. The
    /// broker handles a channel's frames in order, so an answer shows it
    /// read every publish sent before: a confirm missing for one of those
    /// is that message's (its queue's) fault, not the broker's.
    pub(crate) async fn probe(&self) -> Result<(), BrokerError> {
        let qos = self.channel.basic_qos(0, BasicQosOptions::default());
        within(self.answer_within, async { Ok(qos.await?) }).await
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Publishes `row` (mandatory, persistent) and returns the pending
    /// confirm. `Err` means the connection or channel failed, not the
    /// message (`fault_policy` tells a channel closed over one message).
    /// `broker_max` is the broker's `max_message_size` once learned (see
    /// `fault_policy::ChannelFault`).
    pub(crate) async fn publish(
        &mut self,
        row: &Claimed,
        trace: Option<&TraceHeaders>,
        max_payload: u32,
        broker_max: Option<u64>,
    ) -> Result<Pending, BrokerError> {
        if let Some(problem) = &row.problem {
            return Ok(Pending::Done(Outcome::Rejected(
                Fault::BadHeaders,
                problem.clone(),
            )));
        }
        if let Some(max) = broker_max.filter(|max| row.payload.len() as u64 > *max) {
            return Ok(Pending::Done(Outcome::Rejected(
                Fault::Oversized,
                format!(
                    "payload is {} bytes, more than the broker's max_message_size {max}",
                    row.payload.len()
                ),
            )));
        }
        if row.payload.len() > max_payload as usize {
            return Ok(Pending::Done(Outcome::Rejected(
                Fault::Oversized,
                format!(
                    "payload is {} bytes, more than OUTBOX_MAX_PAYLOAD_BYTES {max_payload}",
                    row.payload.len()
                ),
            )));
        }
        // The ordering key and its sequence number travel as headers of
        // their own.
        let key_room = row.ordering_key.as_ref().map_or(0, |key| key.len() + 64);
        let budget = self.header_budget().saturating_sub(key_room);
        if let Some(problem) = header_problem(&row.headers, budget) {
            return Ok(Pending::Done(Outcome::Rejected(Fault::BadHeaders, problem)));
        }
        // The relay's trace context takes the row's place only where the
        // frame still holds it: exporting spans must not fail a row that
        // publishes without.
        let traced = trace
            .map(|trace| trace.applied_to(&row.headers))
            .filter(|headers| header_problem(headers, budget).is_none());
        let headers = traced.as_ref().unwrap_or(&row.headers);
        if !within(self.answer_within, self.exchange_exists(&row.exchange)).await? {
            return Ok(Pending::Done(Outcome::Rejected(
                Fault::NoExchange,
                format!("exchange `{}` does not exist", row.exchange),
            )));
        }
        let channel = self.channel.clone();
        let (exchange, routing_key) = (row.exchange.as_str(), row.routing_key.as_str());
        let (exchange, routing_key) = (ShortString::from(exchange), ShortString::from(routing_key));
        // A reference to the claimed payload, not a copy.
        let (payload, properties) = (row.payload.clone(), properties(row, headers));
        let mut publish: Writing = Box::pin(async move {
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            channel
                .basic_publish(exchange, routing_key, options, &payload, properties)
                .await
        });
        // The first poll takes the delivery tag and queues the frames, so
        // publishes leave in the order they were made; the write itself is
        // awaited with the confirm, in the window, under its deadline (a
        // socket that stopped draining, a black-holed network, holds no
        // one). Awaiting each write here cost a hand-off to the connection's
        // task and back per row: 0.18 ms a row under load.
        match futures::poll!(publish.as_mut()) {
            Poll::Ready(written) => Ok(Pending::Confirm(written?)),
            Poll::Pending => Ok(Pending::Writing(publish)),
        }
    }

    /// Bytes the encoded headers may take: the content header must fit in
    /// one frame, and the other properties and the framing need some room.
    fn header_budget(&self) -> usize {
        match self.connection.configuration().frame_max() {
            0 => usize::MAX,
            frame_max => (frame_max as usize).saturating_sub(PROPERTIES_ROOM),
        }
    }

    async fn exchange_exists(&mut self, exchange: &str) -> Result<bool, BrokerError> {
        // The default exchange always exists (and may not be declared, even
        // passively). `amq.*` names are checked like any other: only the
        // broker's own exist, and a missing one closes the channel.
        if exchange.is_empty() {
            return Ok(true);
        }
        if let Some(checked) = self.known_exchanges.get(exchange)
            && checked.elapsed() < EXCHANGE_CACHE_TTL
        {
            return Ok(true);
        }
        let probe = self.connection.create_channel().await?;
        let options = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        match probe
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Direct,
                options,
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => {
                let _ = probe.close(200, "ok".into()).await;
                self.known_exchanges
                    .insert(exchange.to_string(), Instant::now());
                Ok(true)
            }
            Err(error) if is_not_found(&error) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Bounded: a broker that stopped answering must not hold up shutdown.
    pub(crate) async fn close(&self) {
        let close = self.connection.close(200, "relay stopping".into());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT.min(self.answer_within), close).await;
    }

    /// Closes a connection that stopped answering without waiting for its
    /// close-ok (lapin's heartbeat, or the kernel, ends the socket).
    pub(crate) async fn abandon(&self) {
        let close = self
            .connection
            .close(200, "the broker stopped answering".into());
        let _ = tokio::time::timeout(SILENT_CLOSE_TIMEOUT, close).await;
    }
}

/// A new channel in confirm mode.
async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// `work`, or [`BrokerError::Silent`] past `limit`.
async fn within<T>(
    limit: Duration,
    work: impl Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or(Err(BrokerError::Silent(limit)))
}

/// A publish whose outcome is either known already or awaits the broker.
pub(crate) enum Pending {
    Done(Outcome),
    /// Frames queued, not written yet.
    Writing(Writing),
    Confirm(PublisherConfirm),
}

/// A publish whose frames are queued on the connection.
pub(crate) type Writing = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

/// A message the broker returned as unroutable, named by its message_id.
///
/// lapin queues each basic.return and hands it to whichever confirm it
/// resolves next, not to the publish it belongs to: with a multiple ack
/// (or an ack of an earlier publish arriving after the return) an
/// unroutable row's confirm looks like a clean ack while a routed row's
/// carries the return. Trusting that marked unroutable rows published
/// (lost) and charged attempts to good ones. So a return is matched to its
/// row by message_id; the broker sends it before the ack of its publish,
/// so once every confirm in flight has answered, every return is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Returned {
    pub message_id: String,
    pub reason: String,
}

impl Pending {
    /// The outcome of this publish, and the returned message (anyone's)
    /// that lapin attached to its confirm.
    pub(crate) async fn outcome(self) -> (Outcome, Option<Returned>) {
        let confirm = match self {
            Pending::Done(outcome) => return (outcome, None),
            Pending::Writing(writing) => match writing.await {
                Ok(confirm) => confirm,
                Err(error) => return (Outcome::Lost(error.into()), None),
            },
            Pending::Confirm(confirm) => confirm,
        };
        let returned = |message: BasicReturnMessage| Returned {
            message_id: message
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default(),
            reason: format!(
                "unroutable: returned by the broker ({} {})",
                message.reply_code, message.reply_text
            ),
        };
        match confirm.await {
            Ok(Confirmation::Ack(message)) => (Outcome::Confirmed, message.map(returned)),
            Ok(Confirmation::Nack(message)) => (
                Outcome::Rejected(Fault::Nacked, "nacked by the broker".into()),
                message.map(returned),
            ),
            Ok(Confirmation::NotRequested) => (Outcome::Lost(BrokerError::NotConfirming), None),
            Err(error) => (Outcome::Lost(error.into()), None),
        }
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(e)
        if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}
