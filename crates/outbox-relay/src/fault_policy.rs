//! What an error of the broker or of the database means for the relay,
//! decided here and nowhere else, from the error's kind (lapin's error
//! kinds and the AMQP reply code, the SQLSTATE class), never from its
//! text: a reworded message must not turn one message's fault into an
//! outage loop. Errors keep their kind on the whole way here (`Outcome`,
//! `Settled`, `Outage` carry them), and each table below is unit-tested.
//!
//! A message's own faults that need no error to tell them (a nack, a
//! return, an oversized payload, bad headers, a missing exchange found by
//! the check before publishing) are `meters::Fault`s, decided where they
//! are seen.

use std::time::Duration;

use lapin::ErrorKind;
use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};

use crate::store::StoreError;

/// A failed round trip with the broker: the connection's or the
/// channel's fault, never the row's (see [`broker_directive`]).
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum BrokerError {
    #[error("not connected")]
    NotConnected,
    /// No answer within the deadline: the broker (or the network to it)
    /// stopped answering without closing anything.
    #[error("no answer from the broker within {} ms", .0.as_millis())]
    Silent(Duration),
    /// Connecting failed, on every node of the URL list.
    #[error("{0}")]
    Connect(String),
    /// A confirm came back as "not requested": the channel lost confirm
    /// mode, which only a new channel restores.
    #[error("channel is not in confirm mode")]
    NotConfirming,
    #[error(transparent)]
    Lapin(#[from] lapin::Error),
}

/// A channel the broker closed because of one message: the relay
/// reconnects at once, learns, and the message alone fails when it is
/// claimed again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ChannelFault {
    /// PRECONDITION_FAILED on a publish: a message over the broker's
    /// `max_message_size` (not told at connect; learned here). The limit
    /// is the number in the broker's reply, when it has one; otherwise
    /// the largest payload the failure took down is taken as over it.
    TooLarge { broker_max: Option<u64> },
    /// NOT_FOUND on a publish: its exchange deleted after it was checked.
    NoExchange,
}

/// What the relay does about a [`BrokerError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BrokerDirective {
    /// One message's fault: settle what can be, reconnect now.
    Reconnect(ChannelFault),
    /// An outage: settle what can be, close, back off; no attempt counts.
    Pause,
    /// The broker stopped answering: give everything in flight back at
    /// once, drop the connection without waiting for its close, back off.
    Abandon,
}

/// The broker's table.
pub(crate) fn broker_directive(error: &BrokerError) -> BrokerDirective {
    match error {
        BrokerError::Silent(_) => BrokerDirective::Abandon,
        BrokerError::Lapin(error) => match error.kind() {
            ErrorKind::ProtocolError(reply) => match channel_fault(reply) {
                Some(fault) => BrokerDirective::Reconnect(fault),
                None => BrokerDirective::Pause,
            },
            _ => BrokerDirective::Pause,
        },
        BrokerError::NotConnected | BrokerError::Connect(_) | BrokerError::NotConfirming => {
            BrokerDirective::Pause
        }
    }
}

/// The one-message faults among the broker's replies, by reply code.
fn channel_fault(reply: &AMQPError) -> Option<ChannelFault> {
    match reply.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => Some(ChannelFault::TooLarge {
            broker_max: stated_limit(reply.get_message().as_str()),
        }),
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Some(ChannelFault::NoExchange),
        _ => None,
    }
}

/// The limit a PRECONDITION_FAILED reply states, as RabbitMQ words it
/// (`message size 9 is larger than configured max size 8`): the last
/// number in it. Only a detail: the reply code classified the fault.
fn stated_limit(reply_text: &str) -> Option<u64> {
    reply_text
        .split(|c: char| !c.is_ascii_digit())
        .rfind(|digits| !digits.is_empty())
        .and_then(|digits| digits.parse().ok())
}

/// What the relay does about a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreDirective {
    /// The server is away, going away or out of resources: wait, then
    /// try the same again.
    RetryLater,
    /// The server refused this statement (a constraint, a trigger, bad
    /// data, a row lock held past the lock timeout, a privilege): the same
    /// statement may well fail again.
    Refused,
}

/// The database's table, by SQLSTATE class: connection exception (08),
/// insufficient resources (53) and operator intervention (57: shutdown,
/// cancel) are "not now"; any other code is a refusal; no code at all
/// (the socket failed, no connection, no answer) is "not now".
pub(crate) fn store_directive(error: &StoreError) -> StoreDirective {
    match error {
        StoreError::Postgres(error) => sqlstate_directive(error.code().map(|code| code.code())),
        StoreError::NoConnection(_) | StoreError::NoAnswer(_) => StoreDirective::RetryLater,
    }
}

fn sqlstate_directive(code: Option<&str>) -> StoreDirective {
    match code {
        Some(code)
            if !["08", "53", "57"]
                .iter()
                .any(|class| code.starts_with(class)) =>
        {
            StoreDirective::Refused
        }
        _ => StoreDirective::RetryLater,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPHardError;

    fn replied(kind: AMQPErrorKind, text: &str) -> BrokerError {
        BrokerError::Lapin(ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into())
    }

    #[test]
    fn each_broker_error_has_its_directive() {
        use BrokerDirective::*;
        let too_large = replied(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "message size 134217729 is larger than configured max size 134217728",
        );
        let reworded = replied(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "payload too big",
        );
        let no_exchange = replied(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "no exchange 'x' in vhost '/'",
        );
        let refused = replied(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED), "no");
        let forced = replied(AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED), "bye");
        let reset: BrokerError =
            lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset)).into();
        let heartbeat: BrokerError = lapin::Error::from(ErrorKind::MissingHeartbeatError).into();
        let table = [
            (
                too_large,
                Reconnect(ChannelFault::TooLarge {
                    broker_max: Some(134_217_728),
                }),
            ),
            (
                reworded,
                Reconnect(ChannelFault::TooLarge { broker_max: None }),
            ),
            (no_exchange, Reconnect(ChannelFault::NoExchange)),
            (refused, Pause),
            (forced, Pause),
            (reset, Pause),
            (heartbeat, Pause),
            (BrokerError::NotConnected, Pause),
            (BrokerError::Connect("refused".into()), Pause),
            (BrokerError::NotConfirming, Pause),
            (BrokerError::Silent(Duration::from_secs(10)), Abandon),
        ];
        for (error, expected) in table {
            assert_eq!(broker_directive(&error), expected, "{error}");
        }
    }

    #[test]
    fn a_stated_limit_is_the_replys_last_number() {
        assert_eq!(
            stated_limit("message size 9 is larger than configured max size 8"),
            Some(8)
        );
        assert_eq!(stated_limit("too large"), None);
    }

    #[test]
    fn sqlstate_classes_say_wait_or_refused() {
        use StoreDirective::*;
        assert_eq!(
            store_directive(&StoreError::NoAnswer(Duration::from_secs(1))),
            RetryLater
        );
        assert_eq!(
            store_directive(&StoreError::NoConnection("pool closed".into())),
            RetryLater
        );
        for (code, expected) in [
            (None, RetryLater),
            (Some("08006"), RetryLater),
            (Some("53300"), RetryLater),
            (Some("57P01"), RetryLater),
            (Some("23505"), Refused),
            (Some("55P03"), Refused),
            (Some("42501"), Refused),
            (Some("P0001"), Refused),
        ] {
            assert_eq!(sqlstate_directive(code), expected, "{code:?}");
        }
    }
}
