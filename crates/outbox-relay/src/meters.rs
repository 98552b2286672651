//! The relay's metrics, registered once at start so the publish path
//! only touches ready handles (a `counter!` by name hashes its key on every
//! call). docs/operations.md § "Metrics, health and logs" lists each with
//! its meaning and the alert to set.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use outbox_service::health::Link;

/// Why a publish did not end in a confirm; the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The broker nacked it (e.g. a queue with `x-overflow: reject-publish` is full).
    Nacked,
    /// Unroutable: the broker returned the mandatory publish.
    Returned,
    /// Its exchange does not exist.
    NoExchange,
    /// Its payload is over `OUTBOX_MAX_PAYLOAD_BYTES`.
    Oversized,
    /// Its headers cannot be framed: a field name over 255 bytes, or more
    /// than a frame holds.
    BadHeaders,
    /// No confirm within `OUTBOX_CONFIRM_TIMEOUT_MS` though the broker
    /// still answers (a queue that stopped confirming): counts an attempt,
    /// the row is retried later. A broker that answers nothing is an
    /// outage instead (`ConnectionLost`).
    ConfirmTimeout,
    /// The connection or channel failed, or stopped answering, before the
    /// confirm (not the message's fault: no attempt is counted, the row is
    /// published again).
    ConnectionLost,
}

impl Fault {
    const ALL: [Fault; 7] = [
        Fault::Nacked,
        Fault::Returned,
        Fault::NoExchange,
        Fault::Oversized,
        Fault::BadHeaders,
        Fault::ConfirmTimeout,
        Fault::ConnectionLost,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Fault::Nacked => "nack",
            Fault::Returned => "returned",
            Fault::NoExchange => "no_exchange",
            Fault::Oversized => "oversized",
            Fault::BadHeaders => "bad_headers",
            Fault::ConfirmTimeout => "confirm_timeout",
            Fault::ConnectionLost => "connection_lost",
        }
    }
}

/// What started a drain; the `cause` label of `outbox_wakeups_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A NOTIFY from a committing writer.
    Notify,
    /// The periodic sweep.
    Sweep,
    /// A quick re-check after a drain that found work (see `relay`).
    Recheck,
    /// The listener (re)connected, or was lost: drain whatever was missed.
    Reconnect,
    /// A scheduled row's time (V9).
    Schedule,
}

impl Wake {
    const ALL: [Wake; 5] = [
        Wake::Notify,
        Wake::Sweep,
        Wake::Recheck,
        Wake::Reconnect,
        Wake::Schedule,
    ];

    fn label(self) -> &'static str {
        match self {
            Wake::Notify => "notify",
            Wake::Sweep => "sweep",
            Wake::Recheck => "recheck",
            Wake::Reconnect => "reconnect",
            Wake::Schedule => "schedule",
        }
    }
}

/// Handles to every metric; cheap to clone (each is an `Arc`).
#[derive(Clone)]
pub(crate) struct Meters {
    pub published: Counter,
    failures: [Counter; Fault::ALL.len()],
    pub dead_letters: Counter,
    /// `[cause][found_work]`
    wakeups: [[Counter; 2]; Wake::ALL.len()],
    pub broker_outages: Counter,
    pub database_outages: Counter,
    pub retention_deleted: Counter,
    /// VACUUMs of `outbox.messages` the relay ran (autovacuum off).
    pub vacuums: Counter,
    /// Channels replaced because an exchange's publishes were all nacked.
    pub channel_renewals: Counter,
    pub in_flight: Gauge,
    pub in_flight_bytes: Gauge,
    /// Outcomes the database refused to record, row by row.
    pub mark_failures: Counter,
    /// Sessions other than listening relays holding the wake-up locks.
    pub wake_lock_foreign_holders: Gauge,
    pub pending: Gauge,
    pub oldest_pending: Gauge,
    pub dead_messages: Gauge,
    pub notification_queue_usage: Gauge,
    pub xmin_horizon_age: Gauge,
    pub xmin_horizon_xids: Gauge,
    pub dead_tuple_ratio: Gauge,
    pub scheduled: Gauge,
    pub scheduled_next_due: Gauge,
    pub scheduled_cancelled: Gauge,
    pub scheduled_released: Counter,
    pub scheduled_refused: Counter,
    pub cancelled_deleted: Counter,
    pub claim_batch: Histogram,
    pub enqueue_to_confirm: Histogram,
    /// From a scheduled row's `deliver_at` to its confirm.
    pub schedule_lateness: Histogram,
}

impl Meters {
    /// Registers with the installed recorder (see `telemetry::prometheus`);
    /// without one every handle is a no-op.
    pub(crate) fn new() -> Meters {
        describe();
        // Served as 0 from the start; the alert worker counts by name (the
        // alerter may be built before the recorder exists).
        drop(counter!("outbox_alerts_coalesced_total"));
        Meters {
            published: counter!("outbox_published_total"),
            failures: Fault::ALL
                .map(|f| counter!("outbox_publish_failures_total", "reason" => f.label())),
            dead_letters: counter!("outbox_dead_letters_total"),
            wakeups: Wake::ALL.map(|w| {
                ["false", "true"].map(|found| {
                    counter!("outbox_wakeups_total", "cause" => w.label(), "found_work" => found)
                })
            }),
            broker_outages: counter!("outbox_outages_total", "server" => "rabbitmq"),
            database_outages: counter!("outbox_outages_total", "server" => "postgresql"),
            retention_deleted: counter!("outbox_retention_deleted_total"),
            vacuums: counter!("outbox_vacuums_total"),
            channel_renewals: counter!("outbox_channel_renewals_total"),
            in_flight: gauge!("outbox_in_flight"),
            in_flight_bytes: gauge!("outbox_in_flight_bytes"),
            mark_failures: counter!("outbox_mark_failures_total"),
            wake_lock_foreign_holders: gauge!("outbox_wake_lock_foreign_holders"),
            pending: gauge!("outbox_pending_messages"),
            oldest_pending: gauge!("outbox_oldest_pending_seconds"),
            dead_messages: gauge!("outbox_dead_messages"),
            notification_queue_usage: gauge!("outbox_notification_queue_usage"),
            xmin_horizon_age: gauge!("outbox_xmin_horizon_age_seconds"),
            xmin_horizon_xids: gauge!("outbox_xmin_horizon_age_xids"),
            dead_tuple_ratio: gauge!("outbox_dead_tuple_ratio"),
            scheduled: gauge!("outbox_scheduled_messages"),
            scheduled_next_due: gauge!("outbox_scheduled_next_due_seconds"),
            scheduled_cancelled: gauge!("outbox_scheduled_cancelled_messages"),
            scheduled_released: counter!("outbox_scheduled_released_total"),
            scheduled_refused: counter!("outbox_scheduled_refused_total"),
            cancelled_deleted: counter!("outbox_scheduled_cancelled_deleted_total"),
            claim_batch: histogram!("outbox_claim_batch_size"),
            enqueue_to_confirm: histogram!("outbox_enqueue_to_confirm_seconds"),
            schedule_lateness: histogram!("outbox_schedule_lateness_seconds"),
        }
    }

    pub(crate) fn failure(&self, fault: Fault) -> &Counter {
        &self.failures[fault as usize]
    }

    pub(crate) fn wakeup(&self, cause: Wake, found_work: bool) -> &Counter {
        &self.wakeups[cause as usize][usize::from(found_work)]
    }
}

/// `# HELP` lines, so `/metrics` explains itself (docs/operations.md has the alerts).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("outbox_published_total", "Publishes the broker confirmed.");
    describe_counter!(
        "outbox_publish_failures_total",
        "Failed publishes by reason; all but connection_lost count an attempt."
    );
    describe_counter!(
        "outbox_dead_letters_total",
        "Messages this relay declared dead (out of attempts)."
    );
    describe_counter!(
        "outbox_alerts_coalesced_total",
        "Dead letters reported inside another's alert rather than alone."
    );
    describe_counter!(
        "outbox_wakeups_total",
        "Drains by what started them, and whether they found work."
    );
    describe_counter!(
        "outbox_outages_total",
        "Pauses because PostgreSQL or RabbitMQ was lost."
    );
    describe_counter!(
        "outbox_retention_deleted_total",
        "Published rows deleted by retention."
    );
    describe_counter!(
        "outbox_vacuums_total",
        "VACUUMs of outbox.messages run by the relay because autovacuum is off."
    );
    describe_counter!(
        "outbox_channel_renewals_total",
        "Publishing channels replaced because every publish to an exchange was nacked."
    );
    describe_gauge!("outbox_in_flight", "Publishes awaiting a broker confirm.");
    describe_gauge!(
        "outbox_in_flight_bytes",
        "Payload bytes of the publishes awaiting a broker confirm."
    );
    describe_counter!(
        "outbox_mark_failures_total",
        "Outcomes PostgreSQL refused to record for a row (its lease expires, it is published again)."
    );
    describe_gauge!(
        "outbox_wake_lock_foreign_holders",
        "Sessions that are not listening relays holding the wake-up advisory locks (wake-ups suppressed: the relay polls fast)."
    );
    describe_gauge!(
        "outbox_pending_messages",
        "Messages waiting to be published (counted up to 1,000,000)."
    );
    describe_gauge!(
        "outbox_oldest_pending_seconds",
        "Age of the oldest message waiting to be published: the lag."
    );
    describe_gauge!("outbox_dead_messages", "Rows in outbox.dead_letters.");
    describe_gauge!(
        "outbox_notification_queue_usage",
        "pg_notification_queue_usage() of the cluster, 0 to 1."
    );
    describe_gauge!(
        "outbox_xmin_horizon_age_seconds",
        "How long the oldest snapshot VACUUM must keep (a session, a prepared transaction) has been held."
    );
    describe_gauge!(
        "outbox_xmin_horizon_age_xids",
        "Age in transactions of the xmin horizon (sessions, replication slots, prepared transactions)."
    );
    describe_gauge!(
        "outbox_dead_tuple_ratio",
        "Dead row versions in outbox.messages, 0 to 1 (table statistics)."
    );
    describe_gauge!("outbox_database_connected", "1 while PostgreSQL answers.");
    describe_gauge!("outbox_broker_connected", "1 while RabbitMQ is connected.");
    describe_gauge!(
        "outbox_listener_connected",
        "1 while the LISTEN connection for wake-ups is up."
    );
    describe_gauge!(
        "outbox_scheduled_messages",
        "Messages waiting in outbox.scheduled for their deliver_at (counted up to 1,000,000)."
    );
    describe_gauge!(
        "outbox_scheduled_next_due_seconds",
        "Seconds until the next scheduled message falls due (negative: overdue; absent: none)."
    );
    describe_gauge!(
        "outbox_scheduled_cancelled_messages",
        "Cancelled rows in outbox.scheduled, kept until retention deletes them."
    );
    describe_counter!(
        "outbox_scheduled_released_total",
        "Scheduled messages this relay moved into outbox.messages when they fell due."
    );
    describe_counter!(
        "outbox_scheduled_refused_total",
        "Scheduled messages that fell due with a message_id already in outbox.messages (kept as refused)."
    );
    describe_counter!(
        "outbox_scheduled_cancelled_deleted_total",
        "Cancelled (or refused) scheduled messages deleted by retention."
    );
    describe_histogram!(
        "outbox_schedule_lateness_seconds",
        metrics::Unit::Seconds,
        "From a scheduled message's deliver_at to the broker's confirm."
    );
    describe_histogram!(
        "outbox_claim_batch_size",
        "Rows per claim query (0: found nothing)."
    );
    describe_histogram!(
        "outbox_enqueue_to_confirm_seconds",
        metrics::Unit::Seconds,
        "From the enqueuing transaction's now() to the broker's confirm."
    );
}

impl Default for Meters {
    fn default() -> Meters {
        Meters::new()
    }
}

/// The relay's servers, for `/readyz` and the `outbox_*_connected`
/// gauges: set by whoever last talked to the server (the drain every sweep
/// at least, the upkeep task every 5 s). Everything is down until proven up.
pub(crate) const LINKS: [Link; 3] = [
    Link {
        server: "PostgreSQL",
        gauge: "outbox_database_connected",
        needed: true,
        initially_up: false,
    },
    Link {
        server: "RabbitMQ",
        gauge: "outbox_broker_connected",
        needed: true,
        initially_up: false,
    },
    // The wake-up listener: not needed for readiness (the sweep covers it).
    Link {
        server: "the wake-up listener",
        gauge: "outbox_listener_connected",
        needed: false,
        initially_up: false,
    },
];
pub(crate) const DATABASE: usize = 0;
pub(crate) const BROKER: usize = 1;
pub(crate) const LISTENER: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct() {
        let faults: std::collections::HashSet<_> = Fault::ALL.iter().map(|f| f.label()).collect();
        assert_eq!(faults.len(), Fault::ALL.len());
        assert!(Fault::ALL.iter().enumerate().all(|(i, f)| *f as usize == i));
        assert!(Wake::ALL.iter().enumerate().all(|(i, w)| *w as usize == i));
    }
}
