//! What every long-running service of the project shares, and nothing
//! else: PostgreSQL connections (URL parsing, TLS, redaction), RabbitMQ
//! connections (a cluster's several URLs), the ops endpoint (`/metrics`,
//! `/healthz`, `/readyz`) with its [`health::Health`], reconnect backoff,
//! shutdown on signals, tracing and metrics set-up, OpenTelemetry export,
//! `traceparent`, range checks of settings and the check of environment
//! variables.
//!
//! The relay, the consumer library and the demo services build on it; it
//! knows nothing of the outbox table or of any consumer's business.

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod backoff;
pub mod db;
pub mod endpoint;
pub mod environment;
pub mod health;
pub mod limits;
pub mod otel;
pub mod pg_tls;
pub(crate) mod secrets;
pub mod shutdown;
pub mod telemetry;
pub mod traceparent;
