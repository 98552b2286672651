//! The relay as a library, so tests and the demo can start one in-process
//! and stop it through a cancellation token. `start` reaches the servers,
//! `relay` holds the life cycle; each step has its own module.

// Public: what the binary (`main.rs`), the demo, the benchmarks and the
// tests call. The steps of the life cycle stay inside.
pub(crate) mod alert;
pub(crate) mod amqp;
pub mod cli;
pub mod config;
mod cursor;
mod fault_policy;
pub(crate) mod gauges;
pub(crate) mod listener;
pub(crate) mod maintenance;
pub(crate) mod marker;
pub(crate) mod meters;
pub mod migrate;
pub(crate) mod nack_runs;
mod outage;
mod properties;
mod relay;
mod schedule;
mod spans;
mod start;
/// Public for the hostile tests, which drive a claim's marks by hand.
pub mod store;
mod wakeup;
mod window;

pub use config::{Config, Settings};
pub use start::run;
