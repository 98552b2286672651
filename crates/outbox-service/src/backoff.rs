//! Reconnect backoff for outages: doubles from `initial` to `max`, with
//! jitter so several relays do not hammer a recovering server in step.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The delay to wait now; the next one will be about twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.current.mul_f64(rand::rng().random_range(0.75..1.25));
        self.current = (self.current * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}
