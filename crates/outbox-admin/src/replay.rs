//! Replay: publish already-published messages again, with the same
//! `message_id`.
//!
//! The published rows are handed back to the relays, not published from
//! here: clearing `published_at` (and the attempts) makes them pending
//! again, and they go out through the normal path: publisher confirms,
//! retries, dead letters, alerts, and per-key order, since a pending row of
//! a key holds back every later row of that key until it is confirmed
//! again. Publishing from here would need its own confirms and failure
//! handling and would race the relays on per-key order. Only rows still
//! kept are replayable (`OUTBOX_RETENTION`).

use crate::bulk::{self, Action};
use crate::{Bulk, Error, Filter, Outcome, Session};

const REPLAY: &str = "UPDATE outbox.messages SET published_at = NULL, attempts = 0, \
     last_error = NULL, next_attempt_at = now(), locked_by = NULL, locked_until = NULL, \
     replayed_at = now() \
     WHERE id IN (SELECT id FROM ({batch}) b) RETURNING id, true";

/// Hands back the published rows `filter` matches; `since` and `until`
/// apply to when they were published. The filter must name `since` or
/// `ids`, as the command line's must.
pub async fn replay(session: Session<'_>, filter: &Filter, bulk: Bulk) -> Result<Outcome, Error> {
    if filter.since.is_none() && filter.ids.is_empty() {
        return Err(Error::BadRequest(
            "a replay needs `since` or `ids`: it publishes again, and every message still kept is \
             rarely what is meant"
                .into(),
        ));
    }
    let action = Action {
        name: "replay",
        scope: "published_at IS NOT NULL",
        time_column: "published_at",
        apply: REPLAY,
        extra: &[],
    };
    bulk::run(session, &action, filter, bulk).await
}
