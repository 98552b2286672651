//! W3C Trace Context. A `traceparent` key in an outbox row's `headers`
//! travels to the AMQP message as a header of the same name (headers are
//! copied as they are; with spans exported it names the relay's publish
//! span, a child of the row's when that was valid), so a trace started by
//! the enqueuing request continues in the consumer. This module reads its trace id for log
//! lines; `otel` turns it into a span's parent.

/// The header's name, in the outbox row and on the AMQP message.
pub const HEADER: &str = "traceparent";
/// Its companion's, vendors' own trace data, valid only beside it.
pub const STATE_HEADER: &str = "tracestate";

/// The trace id of a valid `traceparent`
/// (`version-traceid-parentid-flags`, e.g.
/// `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`); `None` for
/// anything malformed, which is then ignored as the spec asks.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent_id = parts.next()?;
    let flags = parts.next()?;
    let valid = is_hex(version, 2)
        && version != "ff"
        // Version 00 has exactly four fields; later versions may add more.
        && (version != "00" || parts.next().is_none())
        && is_hex(trace_id, 32)
        && is_hex(parent_id, 16)
        && is_hex(flags, 2)
        && trace_id.bytes().any(|b| b != b'0')
        && parent_id.bytes().any(|b| b != b'0');
    valid.then_some(trace_id)
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The trace id in JSON headers (an outbox row's), if any.
pub fn from_json(headers: &serde_json::Value) -> Option<&str> {
    headers.get(HEADER)?.as_str().and_then(trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_trace_id_of_valid_headers_only() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(valid), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(trace_id(bad), None, "{bad}");
        }
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future";
        assert!(trace_id(later).is_some());
        let headers = serde_json::json!({"traceparent": valid, "tenant": "acme"});
        assert_eq!(from_json(&headers), trace_id(valid));
    }
}
