//! The seed's order service, done with an outbox: `POST /orders` writes the
//! order and its message to `order_confirm_fanoutExchange` in one
//! transaction, so an order exists exactly when its message does.

pub mod api;
pub mod db;
pub mod order;

pub use api::{AppState, router, serve};
pub use db::migrate;

/// Where order messages go: the seed's fanout exchange.
pub const DEFAULT_EXCHANGE: &str = "order_confirm_fanoutExchange";
