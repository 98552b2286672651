//! What the consumer knows about its servers, for `/readyz` and the
//! `consumer_consuming` / `consumer_database_available` gauges: the shared
//! [`Health`] with the consumer's two links. Transitions are logged once,
//! not once per delivery.

use outbox_service::health::{Health, Link};

const LINKS: [Link; 2] = [
    Link {
        server: "RabbitMQ (not consuming)",
        gauge: "consumer_consuming",
        needed: true,
        initially_up: false,
    },
    // Proven at start: the pool connects once before anything runs.
    Link {
        server: "PostgreSQL",
        gauge: "consumer_database_available",
        needed: true,
        initially_up: true,
    },
];
const CONSUMING: usize = 0;
const DATABASE: usize = 1;

/// A consumer's health; create it after the metrics recorder.
pub fn new() -> Health {
    Health::new(&LINKS)
}

/// True while a consumer is subscribed to the queue.
pub fn consuming(health: &Health) -> bool {
    health.is_up(CONSUMING)
}

pub(crate) fn set_consuming(health: &Health, up: bool) {
    health.set(CONSUMING, up);
}

pub(crate) fn database_up(health: &Health) {
    if health.set(DATABASE, true) {
        tracing::info!("database available again; deliveries flow");
    }
}

pub(crate) fn database_down(health: &Health, reason: &str) {
    if health.set(DATABASE, false) {
        tracing::warn!(%reason, "database unavailable; holding deliveries unacked until it is back");
    }
}
