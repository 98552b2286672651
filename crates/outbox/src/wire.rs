//! The wire contract between the relay and its consumers: what an AMQP
//! message published from an outbox row carries, in one place that both
//! sides read. Changing a name here changes it on both sides at once;
//! consumers in other languages read the same names (docs/consumer.md).
//!
//! Properties of every message:
//! - `message_id`: the row's `message_id` (a UUID), the same on every
//!   copy, so an inbox recognises a copy;
//! - `content_type`, as enqueued; `delivery_mode` 2 (persistent);
//!   `timestamp`: when it was published (seconds);
//! - `headers`: the row's own `headers` (objects nest, arrays stay
//!   arrays), except any whose name starts with [`RESERVED_PREFIX`] (in
//!   any case): those are the relay's alone, and a writer's are dropped;
//!   a `traceparent` among them passes through untouched, unless the
//!   relay exports spans: then `traceparent` names the relay's publish
//!   span (a child of the span the row named when valid, else a new
//!   trace) and `tracestate` is the parent's, where the frame holds them.
//!
//! Headers the relay sets on a keyed row (one with an `ordering_key`):
//! [`KEY_HEADER`] and [`SEQ_HEADER`].

/// The row's `ordering_key` (a long string).
pub const KEY_HEADER: &str = "x-outbox-key";

/// The row's number among its key's messages (a long long integer): 1
/// for a key's first, one more for each next, no gaps but where an
/// operator discarded a dead row. A consumer holds a key's message that
/// comes before an earlier number, and knows a copy by a number it has
/// passed.
pub const SEQ_HEADER: &str = "x-outbox-seq";

/// The prefix of every header the relay sets itself.
pub const RESERVED_PREFIX: &str = "x-outbox-";

/// Whether header `name` is the relay's to set: [`RESERVED_PREFIX`] in
/// any case (a consumer that matched names loosely must not be fooled
/// either).
pub fn is_reserved(name: &str) -> bool {
    name.get(..RESERVED_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(RESERVED_PREFIX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relays_headers_are_reserved_in_any_case() {
        for name in [KEY_HEADER, SEQ_HEADER, "X-Outbox-Key", "x-outbox-anything"] {
            assert!(is_reserved(name), "{name}");
        }
        for name in ["x-outboxed", "tenant", "traceparent", "x-outbo"] {
            assert!(!is_reserved(name), "{name}");
        }
    }
}
