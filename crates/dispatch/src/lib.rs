//! The dispatch center: consumes order messages from RabbitMQ into its own
//! database, effectively once, never blocked by a bad message.
//!
//! Two layers:
//! - a reusable consumer (`consumer`, `worker`, `inbox`, `broker`,
//!   `topology`): any [`Handler`] gets one transaction per delivery that
//!   also records the message id in an inbox table; ack after commit;
//!   poison and exhausted retries go to a dead-letter queue with the reason;
//! - the dispatch service on top (`deliveries`, `http`, `service`): the
//!   handler that assigns a rider, and a small HTTP API.

pub mod broker;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod deliveries;
pub mod handler;
pub mod health;
pub mod http;
pub mod inbox;
pub mod meters;
pub mod migrate;
pub mod service;
pub mod topology;
pub mod worker;

pub use config::{Config, Settings};
pub use consumer::ConsumerConfig;
pub use handler::{Handler, HandlerError, Incoming};
pub use migrate::migrate;
pub use service::{run, serve};
pub use topology::{QueueType, Topology};
