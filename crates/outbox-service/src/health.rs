//! What a service knows about the servers it depends on, for `/readyz` and
//! one `*_connected`-style gauge per server. Each link is set by whoever
//! last talked to its server; a change is logged once, not once per call.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics::{Gauge, gauge};

/// Why `/readyz` says no; the message is its answer's text.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The needed servers that are down, by name.
    #[error("{}", and_list(.0))]
    Disconnected(Vec<&'static str>),
    /// An active check failed (a probe's `SELECT 1`, say): `what` does not
    /// answer; the cause is kept for logs, not shown to the prober.
    #[error("{what}")]
    Probe {
        what: &'static str,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// "PostgreSQL is not connected", "PostgreSQL and RabbitMQ are not connected".
fn and_list(down: &[&str]) -> String {
    match down {
        [one] => format!("{one} is not connected"),
        [rest @ .., last] => format!("{} and {last} are not connected", rest.join(", ")),
        [] => "every server is connected".into(),
    }
}

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
    pub fn ready(&self) -> Result<(), NotReady> {
        let down: Vec<&'static str> = self
            .0
            .iter()
            .filter(|state| state.link.needed && !state.up.load(Ordering::Relaxed))
            .map(|state| state.link.server)
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(NotReady::Disconnected(down))
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
        let ready = || health.ready().map_err(|e| e.to_string());
        assert_eq!(
            ready(),
            Err("PostgreSQL and RabbitMQ are not connected".into())
        );
        assert!(health.set(0, true));
        assert!(!health.set(0, true), "no change the second time");
        assert_eq!(ready(), Err("RabbitMQ is not connected".into()));
        health.set(1, true);
        assert_eq!(ready(), Ok(()), "the listener is not needed");
        health.set(0, false);
        assert_eq!(ready(), Err("PostgreSQL is not connected".into()));
        assert!(!health.is_up(0) && health.is_up(1) && !health.is_up(2));
    }
}
