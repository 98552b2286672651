//! When to give up on a channel that nacks everything sent to an exchange.
//!
//! RabbitMQ 3.10's quorum queues can nack, for good, every publish of a
//! channel opened while one of the queues it routes to was electing a
//! leader. Seen in the HA test: the relay reconnected 0.3 s after its node
//! was SIGKILLed, during the election of a queue led from there (over
//! 0.4 s later); every publish on that channel was nacked for the 60 s the
//! test watched, and 248 rows ran out of attempts, while a fresh channel
//! publishes at once. So a run of nacks for one exchange, with no ack for
//! it in between, asks for a new channel.
//!
//! A queue that really refuses (`x-overflow: reject-publish`, full) nacks
//! on the new channel too: its rows still count their attempts and back
//! off as before, and renewals stay as rare as the nacks that call for
//! them (each run must start again after one).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// Nacks in a row that call for a new channel at once (a window's worth
/// nacked together).
const NACKS_IN_A_ROW: u32 = 16;
/// Or two nacks at least this far apart (rows retried after their backoff,
/// nacked again).
const NACKED_FOR: Duration = Duration::from_secs(1);

/// The current run of nacks of each exchange (since its last ack).
#[derive(Debug, Default)]
pub(crate) struct NackRuns {
    runs: HashMap<String, Run>,
}

#[derive(Debug)]
struct Run {
    nacks: u32,
    since: Instant,
}

impl NackRuns {
    pub(crate) fn acked(&mut self, exchange: &str) {
        if !self.runs.is_empty() {
            self.runs.remove(exchange);
        }
    }

    pub(crate) fn nacked(&mut self, exchange: &str, now: Instant) {
        self.runs
            .entry(exchange.to_string())
            .or_insert(Run {
                nacks: 0,
                since: now,
            })
            .nacks += 1;
    }

    /// The exchange whose nacks call for a new channel, if any.
    pub(crate) fn renewal_due(&self, now: Instant) -> Option<&str> {
        self.runs
            .iter()
            .find(|(_, run)| {
                run.nacks >= NACKS_IN_A_ROW
                    || (run.nacks >= 2 && now.duration_since(run.since) >= NACKED_FOR)
            })
            .map(|(exchange, _)| exchange.as_str())
    }

    /// A new channel: every run starts again.
    pub(crate) fn renewed(&mut self) {
        self.runs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_nacked_together_calls_for_a_new_channel() {
        let mut runs = NackRuns::default();
        let now = Instant::now();
        for _ in 0..NACKS_IN_A_ROW - 1 {
            runs.nacked("orders", now);
        }
        assert_eq!(runs.renewal_due(now), None);
        runs.nacked("orders", now);
        assert_eq!(runs.renewal_due(now), Some("orders"));
        runs.renewed();
        assert_eq!(runs.renewal_due(now), None);
    }

    #[test]
    fn nacks_a_second_apart_call_for_one_but_a_single_nack_does_not() {
        let mut runs = NackRuns::default();
        let start = Instant::now();
        runs.nacked("orders", start);
        let later = start + NACKED_FOR;
        assert_eq!(runs.renewal_due(later), None);
        runs.nacked("orders", later);
        assert_eq!(runs.renewal_due(later), Some("orders"));
    }

    #[test]
    fn an_ack_ends_the_run_of_its_exchange_only() {
        let mut runs = NackRuns::default();
        let now = Instant::now();
        for _ in 0..NACKS_IN_A_ROW {
            runs.nacked("stuck", now);
            runs.nacked("orders", now);
            // Another exchange's acks do not clear it: one stuck queue
            // among healthy ones still gets its channel renewed.
            runs.acked("audit");
        }
        runs.acked("orders");
        assert_eq!(runs.renewal_due(now), Some("stuck"));
        runs.acked("stuck");
        assert_eq!(runs.renewal_due(now), None);
    }
}
