//! The relay as a library, so tests and the demo can start one in-process
//! and stop it through a cancellation token.

pub mod cli;
pub mod db;
pub mod migrate;
pub mod telemetry;
