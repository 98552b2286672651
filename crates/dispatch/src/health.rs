//! What the consumer knows about its servers, shared with `/readyz` and
//! the metrics. Transitions are logged once, not once per delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Clone)]
pub struct Health(Arc<Flags>);

#[derive(Debug)]
struct Flags {
    broker: AtomicBool,
    database: AtomicBool,
}

impl Default for Health {
    fn default() -> Health {
        metrics::gauge!("dispatch_consuming").set(0.0);
        metrics::gauge!("dispatch_database_available").set(1.0);
        Health(Arc::new(Flags {
            broker: AtomicBool::new(false),
            // Proven at start (the pool connects once before anything runs).
            database: AtomicBool::new(true),
        }))
    }
}

impl Health {
    /// True while a consumer is subscribed to the queue.
    pub fn consuming(&self) -> bool {
        self.0.broker.load(Ordering::Relaxed)
    }

    pub fn set_consuming(&self, up: bool) {
        self.0.broker.store(up, Ordering::Relaxed);
        metrics::gauge!("dispatch_consuming").set(f64::from(u8::from(up)));
    }

    pub fn database_up(&self) {
        if !self.0.database.swap(true, Ordering::Relaxed) {
            tracing::info!("database available again; deliveries flow");
            metrics::gauge!("dispatch_database_available").set(1.0);
        }
    }

    pub fn database_down(&self, reason: &str) {
        if self.0.database.swap(false, Ordering::Relaxed) {
            tracing::warn!(%reason, "database unavailable; holding deliveries unacked until it is back");
            metrics::gauge!("dispatch_database_available").set(0.0);
        }
    }
}
