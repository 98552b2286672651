//! The dispatch center of the seed: consumes order messages from RabbitMQ
//! into its own database with the `outbox-consumer` library. What is left
//! here is the seed's own business: the [`Dispatcher`] handler that turns
//! an order into a delivery with a rider (`deliveries`), the `dispatch`
//! schema (`migrate`), the `DISPATCH_*` settings (`config`, `cli`) and the
//! HTTP API that reads deliveries back (`http`), wired by `service`.
//!
//! [`Dispatcher`]: deliveries::Dispatcher

// Public: what the binary, the demo, the benchmarks and the tests call.
pub mod cli;
pub mod config;
mod deliveries;
mod http;
pub mod migrate;
mod service;

pub use config::{Config, Settings};
pub use migrate::migrate;
pub use service::{run, serve};
