//! The fault suite (issue 7): the whole pipeline (order writes → relay →
//! RabbitMQ → dispatch consumer → dispatch database) under 10,000 orders
//! at a steady rate while a fault repeats, then the books (harness
//! `books`). Scenarios that stop the broker or close every broker
//! connection are `serial_*`; the rest fault only their own processes and
//! databases and run alongside other tests. `ha` runs the pipeline on a
//! RabbitMQ cluster and a replicated PostgreSQL (issue 16).

mod bad_input;
mod broker;
mod consumer;
mod database;
mod ha;
mod hostile;
mod long_transaction;
mod poison;
mod relays;
mod silent_broker;
