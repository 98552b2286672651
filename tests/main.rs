//! The integration suite: one test binary, one module per capability.
//! Everything here talks to the real PostgreSQL and RabbitMQ; the harness
//! (`harness/`) gives each test its own database and broker names.

mod alerts;
mod capture;
mod commands;
mod console;
mod consumer_example;
mod consumer_library;
mod dispatch;
mod docker;
mod docs;
mod enqueue;
mod examples;
mod faults;
mod migrate;
mod orders;
mod relay;
mod retries;
mod roles;
mod schedule;
mod secrets;
mod telemetry;
mod wake;
