//! Inbox retention. The inbox needs a message's id only while a copy of it
//! can still arrive: a redelivery, a retry, a copy the relay published
//! twice. Rows older than `inbox_retention` are deleted in batches, every
//! tenth of it (at most a minute), so the table stays as big as that window
//! and not as big as history. It needs the inbox's `processed_at` column.
//!
//! The key table's rows of keys idle that long go too: a key's row is one
//! per key, but keys may be as many as messages (an order id). A key
//! forgotten so expects 1 again, so its next message waits
//! `key_gap_wait` once, unless it is number 1.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::inbox::Inbox;
use crate::meters::Meters;

/// Rows deleted per statement: short transactions, no long lock on the inbox.
const BATCH: i64 = 10_000;
/// SQLSTATE undefined_column: the inbox has no `processed_at`.
const UNDEFINED_COLUMN: &str = "42703";

/// Runs until `shutdown`. A failure is logged and tried again at the next
/// round, except a missing `processed_at`, which is logged once.
pub(crate) async fn run(
    pool: Pool,
    inbox: Inbox,
    retention: Duration,
    meters: Meters,
    shutdown: CancellationToken,
) {
    let every = (retention / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let client = match pool.get().await {
            Ok(client) => client,
            Err(error) => {
                let error = outbox_service::db::pool_error(&error);
                tracing::debug!(%error, "inbox retention waits for the database");
                continue;
            }
        };
        for keys in [false, true] {
            let deleted = if keys {
                &meters.key_watermarks_deleted
            } else {
                &meters.inbox_deleted
            };
            loop {
                match inbox
                    .delete_expired(&**client, keys, retention, BATCH)
                    .await
                {
                    Ok(rows) => {
                        deleted.increment(rows);
                        if rows < BATCH as u64 {
                            break;
                        }
                    }
                    Err(error) if error.code().map(|c| c.code()) == Some(UNDEFINED_COLUMN) => {
                        tracing::error!(
                            error = %outbox::error_line(&error),
                            "inbox retention needs a `processed_at timestamptz` column \
                             (and `updated_at` in the key table); it is off"
                        );
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(
                            error = %outbox::error_line(&error),
                            "inbox retention failed; trying again later"
                        );
                        break;
                    }
                }
            }
        }
    }
}
