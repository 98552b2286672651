//! Each row's publish span, when traces are exported (`outbox_service::otel`).
//!
//! The span continues the trace the row's `traceparent` header names (the
//! app's span, when the app put one there; a new root otherwise) and the
//! AMQP message carries the relay's span as its `traceparent` (and the
//! `tracestate` that goes with it), so the consumer's spans sit below it;
//! the row's own pair is kept where the relay's would not fit the frame. It runs from the claim to the broker's
//! answer, so its length is the relay's and the broker's share; the time
//! the row waited in the outbox before its claim is `outbox.wait_ms`.
//! Attributes follow the OpenTelemetry messaging conventions.
//!
//! Export off, [`PublishSpans::start`] is one atomic load and nothing else.

use std::collections::HashMap;
use std::time::SystemTime;

use opentelemetry::global::{self, BoxedSpan};
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _};
use opentelemetry::{KeyValue, Value as Attribute};
use outbox_service::otel;
use outbox_service::traceparent::{HEADER as TRACEPARENT, STATE_HEADER as TRACESTATE};
use serde_json::Value;
use tokio::time::Instant;

use crate::meters::Fault;
use crate::store::Claimed;

/// The spans of the rows in flight, by row id.
#[derive(Default)]
pub(crate) struct PublishSpans {
    spans: HashMap<i64, BoxedSpan>,
}

/// The relay's span as W3C headers, to send in place of the row's.
#[derive(Debug)]
pub(crate) struct TraceHeaders {
    traceparent: String,
    /// The parent's, when the row named a valid parent; else none.
    tracestate: String,
}

impl TraceHeaders {
    /// `headers` with these in place of the row's own.
    pub(crate) fn applied_to(&self, headers: &Value) -> Value {
        let mut headers = headers.clone();
        if let Value::Object(map) = &mut headers {
            map.insert(TRACEPARENT.into(), self.traceparent.clone().into());
            match self.tracestate.is_empty() {
                true => map.remove(TRACESTATE),
                false => map.insert(TRACESTATE.into(), self.tracestate.clone().into()),
            };
        }
        headers
    }
}

impl PublishSpans {
    /// Starts `row`'s publish span (claimed at `claimed_at`); the headers
    /// that name it, to send with the row.
    pub(crate) fn start(&mut self, row: &Claimed, claimed_at: Instant) -> Option<TraceHeaders> {
        if !otel::enabled() {
            return None;
        }
        let claimed = SystemTime::now() - claimed_at.elapsed();
        let header = |name| row.headers.get(name).and_then(Value::as_str);
        let parent = otel::parent(header(TRACEPARENT), header(TRACESTATE));
        let wait = claimed
            .duration_since(row.pending_since)
            .unwrap_or_default();
        // The conventions' name for the default exchange.
        let exchange = match row.exchange.as_str() {
            "" => "amq.default",
            named => named,
        };
        let mut attributes = vec![
            KeyValue::new("messaging.system", "rabbitmq"),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("messaging.operation.name", "publish"),
            KeyValue::new("messaging.destination.name", exchange.to_string()),
            KeyValue::new("messaging.message.id", row.message_id.to_string()),
            KeyValue::new("messaging.message.body.size", row.payload.len() as i64),
            KeyValue::new("outbox.id", row.id),
            KeyValue::new("outbox.attempt", i64::from(row.attempts) + 1),
            KeyValue::new("outbox.wait_ms", wait.as_secs_f64() * 1000.0),
        ];
        if !row.routing_key.is_empty() {
            attributes.push(KeyValue::new(
                "messaging.rabbitmq.destination.routing_key",
                row.routing_key.clone(),
            ));
        }
        if let Some(key) = &row.ordering_key {
            let key = outbox::shown_key(key.as_bytes());
            attributes.push(KeyValue::new("outbox.ordering_key", key));
        }
        if let Some(seq) = row.key_seq {
            attributes.push(KeyValue::new("outbox.key_seq", seq));
        }
        if row.scheduled {
            attributes.push(KeyValue::new("outbox.scheduled", true));
        }
        let tracer = global::tracer("outbox-relay");
        let span = tracer
            .span_builder(format!("publish {exchange}"))
            .with_kind(SpanKind::Producer)
            .with_start_time(claimed)
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent);
        let context = span.span_context();
        let trace = context.is_valid().then(|| TraceHeaders {
            traceparent: otel::traceparent(context),
            tracestate: context.trace_state().header(),
        });
        self.spans.insert(row.id, span);
        trace
    }

    /// The broker confirmed the row.
    pub(crate) fn published(&mut self, id: i64) {
        self.end(id, "published", None);
    }

    /// The row's own fault: an attempt.
    pub(crate) fn failed(&mut self, id: i64, fault: Fault, error: &str) {
        let status = Status::error(error.to_string());
        self.end(id, fault.label(), Some(status));
    }

    /// Given back unpublished or its outcome unknown (a lost channel, an
    /// outage, shutdown): it is published again.
    pub(crate) fn given_back(&mut self, id: i64) {
        self.end(id, "given_back", None);
    }

    /// Ends every span left (none should be once the window is empty).
    pub(crate) fn clear(&mut self) {
        for (_, mut span) in self.spans.drain() {
            span.end();
        }
    }

    fn end(&mut self, id: i64, outcome: &'static str, status: Option<Status>) {
        // Export off, every row passes here: no hashing of its id for nothing.
        if self.spans.is_empty() {
            return;
        }
        let Some(mut span) = self.spans.remove(&id) else {
            return;
        };
        span.set_attribute(KeyValue::new("outbox.outcome", Attribute::from(outcome)));
        if let Some(status) = status {
            span.set_attribute(KeyValue::new("error.type", outcome));
            span.set_status(status);
        }
        span.end();
    }
}
