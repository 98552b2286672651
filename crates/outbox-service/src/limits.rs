//! The allowed range of every numeric setting, checked once at start.
//!
//! Without upper bounds a typo is accepted and fails later, forever: a lease
//! or retry delay beyond what a PostgreSQL interval holds
//! (`now() + $ms * interval '1 millisecond'`) fails every claim or retry,
//! a retention of `100000000y` every delete. The bounds are generous for
//! any real use and far below those limits; the settings table of
//! docs/configuration.md lists them.

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::time::Duration;

use anyhow::bail;

const SECOND: u64 = 1000;
const HOUR: u64 = 3600 * SECOND;
const DAY: u64 = 24 * HOUR;
const MIB: u64 = 1 << 20;

/// Rows per claim: one query's worth, its ids passed back as arrays.
pub const BATCH_SIZE: RangeInclusive<u32> = 1..=10_000;
/// Rows of one ordering key published after its head, per claim.
pub const KEY_PIPELINE: RangeInclusive<u32> = 0..=10_000;
/// Unconfirmed publishes: delivery tags are per channel, and RabbitMQ's
/// own windows (prefetch, credit) stop at a 16-bit count.
pub const MAX_IN_FLIGHT: RangeInclusive<u32> = 1..=65_535;
pub const SWEEP_INTERVAL_MS: RangeInclusive<u64> = 1..=HOUR;
/// Above a second (shorter lets relays steal each other's rows), at most a
/// day (a crashed relay's rows wait that long).
pub const LEASE_MS: RangeInclusive<u64> = 1001..=DAY;
pub const MAX_ATTEMPTS: RangeInclusive<u32> = 1..=10_000;
/// Retry delays, also the dispatch consumer's: below RabbitMQ's per-message
/// TTL limit (2^32 - 1 ms, about 49 days).
pub const RETRY_MS: RangeInclusive<u64> = 1..=30 * DAY;
/// Longest `OUTBOX_RETENTION` (zero is allowed: delete once confirmed).
pub const MAX_RETENTION: Duration = Duration::from_secs(3650 * 24 * 3600);
/// RabbitMQ refuses messages over 512 MiB whatever `max_message_size` says.
pub const MAX_PAYLOAD_BYTES: RangeInclusive<u32> = 1..=512 * MIB as u32;
/// Below the longest lease, which it must stay under.
pub const CONFIRM_TIMEOUT_MS: RangeInclusive<u64> = 1..=DAY - 1;
/// At least one large message's worth, at most what a relay process
/// should ever hold in memory for payloads.
pub const MAX_IN_FLIGHT_BYTES: RangeInclusive<u64> = MIB..=4096 * MIB;
/// Zero: stop without waiting for confirms.
pub const SHUTDOWN_TIMEOUT_MS: RangeInclusive<u64> = 0..=HOUR;
/// Dispatch: idle queues expire after this (RabbitMQ's `x-expires`).
pub const QUEUE_EXPIRES_MS: RangeInclusive<u64> = 1..=30 * DAY;
/// Dispatch: deliveries of a failing message before it is dead-lettered.
pub const MAX_DELIVERIES: RangeInclusive<u32> = 1..=10_000;
/// Dispatch: the seed's slow order (a demo knob).
pub const SLOW_ORDER_MS: RangeInclusive<u64> = 1..=HOUR;
/// Consumer: how long an early keyed message waits for an earlier one;
/// 0 does not wait.
pub const KEY_GAP_WAIT_MS: RangeInclusive<u64> = 0..=HOUR;
/// Consumer inbox retention; 0 keeps every row.
pub const INBOX_RETENTION_MS: RangeInclusive<u64> = 0..=3650 * DAY;

/// `value` or, when unset, `default`; refused outside `range` with one line
/// naming the setting and the range.
pub fn check<T: PartialOrd + Display + Copy>(
    name: &str,
    value: Option<T>,
    default: T,
    range: RangeInclusive<T>,
) -> anyhow::Result<T> {
    let value = value.unwrap_or(default);
    let (min, max) = (*range.start(), *range.end());
    if value < min {
        bail!("{name} must be at least {min} (allowed: {min} to {max}), not {value}");
    }
    if value > max {
        bail!("{name} must be at most {max} (allowed: {min} to {max}), not {value}");
    }
    Ok(value)
}

/// [`check`] for a setting in milliseconds.
pub fn millis(
    name: &str,
    value: Option<u64>,
    default: u64,
    range: RangeInclusive<u64>,
) -> anyhow::Result<Duration> {
    check(name, value, default, range).map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_setting_and_the_range() {
        let error = check("OUTBOX_BATCH_SIZE", Some(0), 500, BATCH_SIZE).expect_err("zero");
        assert_eq!(
            error.to_string(),
            "OUTBOX_BATCH_SIZE must be at least 1 (allowed: 1 to 10000), not 0"
        );
        let error = check("OUTBOX_LEASE_MS", Some(u64::MAX), 1, LEASE_MS).expect_err("max");
        assert_eq!(
            error.to_string(),
            format!(
                "OUTBOX_LEASE_MS must be at most 86400000 (allowed: 1001 to 86400000), not {}",
                u64::MAX
            )
        );
        assert_eq!(check("X", None, 7, 1..=9).expect("default"), 7);
        assert!(
            check("X", None, 70, 1..=9).is_err(),
            "a default is checked too"
        );
    }

    #[test]
    fn limits_fit_what_they_guard() {
        // A PostgreSQL interval holds about 178 million years; f64 ms are exact to 2^53.
        for ms in [*LEASE_MS.end(), *RETRY_MS.end(), *CONFIRM_TIMEOUT_MS.end()] {
            assert!(ms < 1 << 53);
        }
        assert!(*RETRY_MS.end() < u64::from(u32::MAX));
        assert!(*QUEUE_EXPIRES_MS.end() < u64::from(u32::MAX));
        assert_eq!(*MAX_PAYLOAD_BYTES.end(), 536_870_912);
    }
}
