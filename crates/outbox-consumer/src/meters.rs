//! The consumer's metrics, registered once so a delivery only touches
//! ready handles. The ops endpoint's `/metrics` shows them;
//! docs/operations.md § "Metrics, health and logs" lists each with the
//! alert to set.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// How a delivery left the consumer's hands; the `outcome` label of
/// `consumer_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Handled and committed, then acked.
    Processed,
    /// Its message id was in the inbox already: acked, nothing written.
    Duplicate,
    /// Failed transiently: a copy went to the retry queue, then acked.
    Retried,
    /// Poison or out of deliveries: a copy went to the dead-letter queue.
    DeadLettered,
    /// Unacked at shutdown: the broker delivers it again.
    GivenBack,
}

impl Settled {
    const ALL: [Settled; 5] = [
        Settled::Processed,
        Settled::Duplicate,
        Settled::Retried,
        Settled::DeadLettered,
        Settled::GivenBack,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Settled::Processed => "processed",
            Settled::Duplicate => "duplicate",
            Settled::Retried => "retried",
            Settled::DeadLettered => "dead_lettered",
            Settled::GivenBack => "given_back",
        }
    }
}

/// Handles to every per-delivery metric; cheap to clone.
#[derive(Clone)]
pub(crate) struct Meters {
    pub received: Counter,
    settled: [Counter; Settled::ALL.len()],
    pub handle_seconds: Histogram,
    pub batch_size: Histogram,
    pub in_flight: Gauge,
    pub inbox_deleted: Counter,
    /// Key table rows of keys idle past the retention.
    pub key_watermarks_deleted: Counter,
    /// Transient failures of keyed messages, retried in their lane.
    pub retried_in_place: Counter,
    /// Keys moved past a missing message (see `sequencer`).
    pub key_gaps: Counter,
    /// Early keyed messages waiting for an earlier one of their key.
    pub key_held: Gauge,
    /// Retried messages the queue would not take back yet (see `retrier`).
    pub retries_refused: Counter,
    /// Keys that began to wait for a missing earlier message.
    pub key_waits: Counter,
    /// How long each such wait lasted.
    pub key_wait_seconds: Histogram,
    /// Keyed messages waiting for their key's batch in another lane.
    pub key_backlog: Gauge,
}

impl Meters {
    /// Registers with the installed recorder; without one, all are no-ops.
    pub(crate) fn new() -> Meters {
        describe();
        Meters {
            received: counter!("consumer_received_total"),
            settled: Settled::ALL
                .map(|s| counter!("consumer_messages_total", "outcome" => s.label())),
            handle_seconds: histogram!("consumer_handle_seconds"),
            batch_size: histogram!("consumer_batch_size"),
            in_flight: gauge!("consumer_in_flight"),
            inbox_deleted: counter!("consumer_inbox_deleted_total"),
            key_watermarks_deleted: counter!("consumer_key_watermarks_deleted_total"),
            retried_in_place: counter!("consumer_retried_in_place_total"),
            key_gaps: counter!("consumer_key_gaps_total"),
            key_held: gauge!("consumer_key_held"),
            retries_refused: counter!("consumer_retries_refused_total"),
            key_waits: counter!("consumer_key_waits_total"),
            key_wait_seconds: histogram!("consumer_key_wait_seconds"),
            key_backlog: gauge!("consumer_key_backlog"),
        }
    }

    pub(crate) fn settled(&self, outcome: Settled) -> &Counter {
        &self.settled[outcome as usize]
    }
}

/// `# HELP` lines, so `/metrics` explains itself (docs/operations.md has the alerts).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "consumer_received_total",
        "Deliveries received, redeliveries included."
    );
    describe_counter!(
        "consumer_messages_total",
        "How deliveries ended: processed, duplicate, retried, dead_lettered, given_back."
    );
    describe_histogram!(
        "consumer_handle_seconds",
        metrics::Unit::Seconds,
        "One transaction: a batch's inbox rows and handlers."
    );
    describe_histogram!(
        "consumer_batch_size",
        "Deliveries handled in one transaction (before any is taken apart)."
    );
    describe_gauge!("consumer_in_flight", "Deliveries in hand.");
    describe_counter!(
        "consumer_retried_in_place_total",
        "Transient failures of keyed messages retried in their lane (not through the retry queue)."
    );
    describe_counter!(
        "consumer_key_gaps_total",
        "Keys whose later messages were handled without a missing earlier one they waited for (key_gap_wait passed, or too many held)."
    );
    describe_gauge!(
        "consumer_key_held",
        "Keyed messages that came before an earlier one of their key, waiting for it."
    );
    describe_counter!(
        "consumer_retries_refused_total",
        "Times the queue refused a retried message back (missing, or full with reject-publish); it stays in the retry queue and is offered again."
    );
    describe_counter!(
        "consumer_key_waits_total",
        "Keys that began to hold messages for a missing earlier one (not while other consumers share the queue)."
    );
    describe_histogram!(
        "consumer_key_wait_seconds",
        metrics::Unit::Seconds,
        "How long a key held messages for a missing earlier one, until it came or the gap was accepted."
    );
    describe_gauge!(
        "consumer_key_backlog",
        "Keyed messages in hand waiting for their key's batch in another lane (a slow key's own)."
    );
    describe_counter!(
        "consumer_inbox_deleted_total",
        "Inbox rows deleted by retention (older than inbox_retention)."
    );
    describe_counter!(
        "consumer_key_watermarks_deleted_total",
        "Key table rows deleted by retention (keys idle longer than inbox_retention)."
    );
    describe_gauge!("consumer_consuming", "1 while subscribed to the queue.");
    describe_gauge!(
        "consumer_database_available",
        "1 while the consumer's database answers."
    );
}

impl Default for Meters {
    fn default() -> Meters {
        Meters::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_index_their_counters() {
        assert!(
            Settled::ALL
                .iter()
                .enumerate()
                .all(|(i, s)| *s as usize == i)
        );
    }
}
