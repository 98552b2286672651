//! Each delivery's process span, when traces are exported
//! (`outbox_service::otel`; a consumer's binary calls `otel::init`).
//!
//! The span sits below the span the message's `traceparent` header names
//! (the relay's publish span) and runs from the delivery's arrival to its
//! ack. Its children are its batch's steps: the inbox insert, the handler
//! and the commit (shared by the batch's messages, so each message's trace
//! shows them). A redelivery shows as `outbox.delivery` above 1 and
//! `messaging.rabbitmq.redelivered`; a retry or a dead letter ends the span
//! with an error status and its reason. Attributes follow the
//! OpenTelemetry messaging conventions.
//!
//! Export off, nothing is made: one atomic load per delivery.

use std::time::SystemTime;

use lapin::message::Delivery;
use opentelemetry::global::{self, BoxedSpan};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use outbox_service::{otel, traceparent};

use crate::message::{header_text, numbered};

const TRACER: &str = "outbox-consumer";

/// The outcome of a delivery copied to the dead-letter queue.
pub(crate) const DEAD_LETTERED: &str = "dead_lettered";

/// A delivery's span, or nothing when export is off.
#[derive(Default)]
pub(crate) struct ProcessSpan(Option<BoxedSpan>);

/// When a batch's steps ended, for its messages' child spans.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Timeline {
    pub began: Option<SystemTime>,
    pub inserted: Option<SystemTime>,
    pub handled: Option<SystemTime>,
    pub committed: Option<SystemTime>,
}

impl Timeline {
    /// The time now, when spans are made.
    pub(crate) fn now() -> Option<SystemTime> {
        otel::enabled().then(SystemTime::now)
    }
}

impl ProcessSpan {
    /// Starts the span of `delivery` (its `deliveries`th) from `queue`.
    pub(crate) fn start(delivery: &Delivery, deliveries: u32, queue: &str) -> ProcessSpan {
        if !otel::enabled() {
            return ProcessSpan(None);
        }
        let properties = &delivery.properties;
        let parent = otel::parent(
            header_text(properties, traceparent::HEADER),
            header_text(properties, traceparent::STATE_HEADER),
        );
        let message_id = properties.message_id().as_ref().map(|id| id.to_string());
        let mut attributes = vec![
            KeyValue::new("messaging.system", "rabbitmq"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.operation.name", "process"),
            KeyValue::new("messaging.destination.name", exchange_name(delivery)),
            KeyValue::new("messaging.destination.subscription.name", queue.to_string()),
            KeyValue::new(
                "messaging.rabbitmq.destination.routing_key",
                delivery.routing_key.to_string(),
            ),
            KeyValue::new(
                "messaging.rabbitmq.message.delivery_tag",
                delivery.delivery_tag as i64,
            ),
            KeyValue::new("outbox.redelivered", delivery.redelivered),
            KeyValue::new("messaging.message.body.size", delivery.data.len() as i64),
            KeyValue::new("outbox.delivery", i64::from(deliveries)),
        ];
        if let Some(id) = message_id {
            attributes.push(KeyValue::new("messaging.message.id", id));
        }
        if let Some((key, seq)) = numbered(properties) {
            attributes.push(KeyValue::new("outbox.ordering_key", outbox::shown_key(key)));
            attributes.push(KeyValue::new("outbox.key_seq", seq));
        }
        let tracer = global::tracer(TRACER);
        let span = tracer
            .span_builder(format!("process {queue}"))
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent);
        ProcessSpan(Some(span))
    }

    /// An event on the span (a failure retried in place, say).
    pub(crate) fn event(&mut self, name: &'static str, reason: &str) {
        if let Some(span) = &mut self.0 {
            span.add_event(name, vec![KeyValue::new("reason", reason.to_string())]);
        }
    }

    /// Committed (or found in the inbox) and acked: the batch's steps
    /// become child spans.
    pub(crate) fn processed(&mut self, outcome: &'static str, steps: &Timeline) {
        let Some(span) = &mut self.0 else {
            return;
        };
        let parent = Context::new().with_remote_span_context(span.span_context().clone());
        let tracer = global::tracer(TRACER);
        let child = |name: &'static str, from: Option<SystemTime>, to: Option<SystemTime>| {
            if let (Some(from), Some(to)) = (from, to) {
                let mut step = tracer
                    .span_builder(name)
                    .with_start_time(from)
                    .start_with_context(&tracer, &parent);
                step.end_with_timestamp(to);
            }
        };
        child("inbox insert", steps.began, steps.inserted);
        child("handle", steps.inserted, steps.handled);
        child("commit", steps.handled, steps.committed);
        self.end(outcome, None);
    }

    /// Dead-lettered or sent to the retry queue: an error, with its reason.
    pub(crate) fn failed(&mut self, outcome: &'static str, reason: &str) {
        self.end(outcome, Some(reason));
    }

    fn end(&mut self, outcome: &'static str, error: Option<&str>) {
        // (The relay's spans end alike: see outbox-relay's `spans`.)
        let Some(mut span) = self.0.take() else {
            return;
        };
        span.set_attribute(KeyValue::new("outbox.outcome", outcome));
        if let Some(reason) = error {
            span.set_attribute(KeyValue::new("error.type", outcome));
            span.set_status(Status::error(reason.to_string()));
        }
        span.end();
    }
}

/// The exchange a delivery came through, the default one by the
/// conventions' name.
fn exchange_name(delivery: &Delivery) -> String {
    match delivery.exchange.as_str() {
        "" => "amq.default".into(),
        named => named.into(),
    }
}
