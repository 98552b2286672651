//! Transactional outbox for PostgreSQL.
//!
//! An application writes its business rows and an outbox message in one
//! transaction; `outbox-relay` publishes the message to RabbitMQ afterwards.
//! This crate holds what both sides share: the schema (refinery migrations
//! embedded from `sql/outbox/`) and a typed [`enqueue`] over any
//! [`tokio_postgres::GenericClient`], so a `Transaction` works as well as a
//! plain `Client`.
//!
//! ```no_run
//! # async fn example(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let tx = client.transaction().await?;
//! tx.execute("INSERT INTO orders (id) VALUES ($1)", &[&42_i64]).await?;
//! let message = outbox::Message::json("order_confirm_fanoutExchange", "", &serde_json::json!({"orderId": 42}))?;
//! let message_id = outbox::enqueue(&tx, &message).await?;
//! tx.commit().await?;
//! # let _ = message_id; Ok(()) }
//! ```

mod enqueue;
mod error;
mod migrate;
pub mod wire;

pub use enqueue::{Message, cancel, enqueue};
pub use error::{
    Error, PgError, chain_line, condition_name, db_error_line, error_line, row_values_shown,
    show_row_values, shown_key,
};
pub use migrate::{MIGRATION_TABLE, migrate};

/// How a row's `last_error` starts when its confirm did not come in time:
/// the broker may have taken it (discarding such a dead letter tells by it).
pub const NO_CONFIRM: &str = "no confirm from the broker within";

/// The channel the wake-up trigger notifies and relays LISTEN on.
pub const WAKE_CHANNEL: &str = "outbox_wake";
/// The payload of a wake-up sent for a scheduled row due within 2 s
/// (`outbox.schedule_check`, V9): the relay looks at its schedule again.
pub const SCHEDULE_WAKE_PAYLOAD: &str = "schedule";
