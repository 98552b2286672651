//! What a service knows about the servers it depends on, for `/readyz` and
//! one `*_connected`-style gauge per server. Each link is set by whoever
//! last talked to its server; a change is logged once, not once per call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics::{Gauge, gauge};

/// One server a service depends on.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Names the server in `/readyz` and the logs ("PostgreSQL").
    pub server: &'static str,
    /// The gauge that is 1 while the link is up.
    pub gauge: &'static str,
    /// Whether `/readyz` needs it (a relay's wake-up listener does not:
    /// the sweep covers for it).
    pub needed: bool,
    /// The state before anything is known (a pool proven at start is up).
    pub initially_up: bool,
}

/// Cheap to clone: every clone sees the same links.
#[derive(Clone)]
pub struct Health(Arc<[State]>);

struct State {
    link: Link,
    up: AtomicBool,
    gauge: Gauge,
}

impl Health {
    /// Registers the gauges: create it after the metrics recorder.
    pub fn new(links: &[Link]) -> Health {
        let states = links.iter().map(|&link| {
            let gauge = gauge!(link.gauge);
            gauge.set(f64::from(u8::from(link.initially_up)));
            State {
                link,
                up: AtomicBool::new(link.initially_up),
                gauge,
            }
        });
        Health(states.collect())
    }

    /// Sets link number `index` (its place in [`Health::new`]'s list);
    /// true when that changed it.
    pub fn set(&self, index: usize, up: bool) -> bool {
        let Some(state) = self.0.get(index) else {
            return false;
        };
        let changed = state.up.swap(up, Ordering::Relaxed) != up;
        if changed {
            state.gauge.set(f64::from(u8::from(up)));
        }
        changed
    }

    pub fn is_up(&self, index: usize) -> bool {
        self.0
            .get(index)
            .is_some_and(|state| state.up.load(Ordering::Relaxed))
    }

    /// `Err` names every needed server that is down.
    pub fn ready(&self) -> Result<(), String> {
        let down: Vec<&str> = self
            .0
            .iter()
            .filter(|state| state.link.needed && !state.up.load(Ordering::Relaxed))
            .map(|state| state.link.server)
            .collect();
        match down.as_slice() {
            [] => Ok(()),
            [one] => Err(format!("{one} is not connected")),
            [rest @ .., last] => Err(format!("{} and {last} are not connected", rest.join(", "))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINKS: [Link; 3] = [
        Link {
            server: "PostgreSQL",
            gauge: "test_database_connected",
            needed: true,
            initially_up: false,
        },
        Link {
            server: "RabbitMQ",
            gauge: "test_broker_connected",
            needed: true,
            initially_up: false,
        },
        Link {
            server: "the listener",
            gauge: "test_listener_connected",
            needed: false,
            initially_up: false,
        },
    ];

    #[test]
    fn ready_only_with_the_needed_servers() {
        let health = Health::new(&LINKS);
        assert_eq!(
            health.ready(),
            Err("PostgreSQL and RabbitMQ are not connected".into())
        );
        assert!(health.set(0, true));
        assert!(!health.set(0, true), "no change the second time");
        assert_eq!(health.ready(), Err("RabbitMQ is not connected".into()));
        health.set(1, true);
        assert_eq!(health.ready(), Ok(()), "the listener is not needed");
        health.set(0, false);
        assert_eq!(health.ready(), Err("PostgreSQL is not connected".into()));
        assert!(!health.is_up(0) && health.is_up(1) && !health.is_up(2));
    }
}
