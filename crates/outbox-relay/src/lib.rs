//! The relay as a library, so tests and the demo can start one in-process
//! and stop it through a cancellation token. `start` reaches the servers,
//! `relay` holds the life cycle; each step has its own module.

pub mod alert;
pub mod amqp;
pub mod capture;
pub mod cli;
pub mod commands;
pub mod config;
mod cursor;
pub mod gauges;
pub mod listener;
pub mod maintenance;
pub mod marker;
pub mod meters;
pub mod migrate;
mod outage;
mod relay;
mod start;
pub mod store;
mod wakeup;
mod window;

pub use config::{Config, Settings};
pub use start::run;
