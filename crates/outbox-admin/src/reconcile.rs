//! Which messages the broker confirmed but the consumer never processed.
//! The outbox knows what was published (`published_at`), the consumer's
//! inbox knows what was processed (`message_id` committed with its
//! writes); a message in the first and not the second was lost or
//! dead-lettered downstream, or is still queued. No broker-side tool can
//! tell this.

use std::collections::HashSet;
use std::time::SystemTime;

use serde::Serialize;
use tokio_postgres::Client;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::{Error, TimeArg, db, format_time};

/// Message ids per inbox query.
const CHUNK: usize = 5_000;

/// Where the consumer's inbox is.
#[derive(Debug)]
pub struct Inbox<'a> {
    pub client: &'a Client,
    /// For errors: the database, described without its password.
    pub described: String,
    /// `table` or `schema.table`, with a `message_id uuid` column.
    pub table: &'a str,
}

#[derive(Debug, Serialize)]
pub struct Unprocessed {
    pub id: i64,
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub published_at: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub since: String,
    pub until: String,
    /// Published messages in the window (still kept: see `OUTBOX_RETENTION`).
    pub checked: usize,
    pub unprocessed: Vec<Unprocessed>,
    /// Set when retention may have deleted part of the window: a clean
    /// report then covers only the rows still kept.
    pub warning: Option<String>,
}

const PUBLISHED: &str = "SELECT id, message_id, exchange, routing_key, published_at \
     FROM outbox.messages \
     WHERE published_at >= $1 AND published_at < $2 AND ($3::text IS NULL OR exchange = $3) \
     ORDER BY id";

/// Retention deletes published rows oldest first, so what is kept starts here.
const OLDEST_KEPT: &str =
    "SELECT min(published_at) FROM outbox.messages WHERE published_at IS NOT NULL";

/// Messages published in `[since, until)` (to `exchange`, if given) that
/// the inbox does not hold.
pub async fn reconcile(
    outbox: &Client,
    inbox: &Inbox<'_>,
    since: &TimeArg,
    until: &TimeArg,
    exchange: Option<&str>,
) -> Result<Report, Error> {
    let table = quote_table(inbox.table)?;
    let since = since.resolve(outbox).await?;
    let until = until.resolve(outbox).await?;
    if since >= until {
        return Err(Error::BadRequest(format!(
            "since ({}) must be before until ({}): the window is empty",
            format_time(since),
            format_time(until)
        )));
    }
    let oldest: Option<SystemTime> = outbox
        .query_one(OLDEST_KEPT, &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(db("read the oldest published message"))?;
    let warning = match oldest {
        None => Some(
            "no published message is kept (OUTBOX_RETENTION deletes them; 0 deletes them \
             once published), so there was nothing to check"
                .to_string(),
        ),
        Some(oldest) if oldest > since => Some(format!(
            "the window starts at {} but the oldest published message still kept is from {}: \
             anything published before was deleted by retention (OUTBOX_RETENTION) or never existed",
            format_time(since),
            format_time(oldest)
        )),
        Some(_) => None,
    };
    let rows = outbox
        .query_typed(
            PUBLISHED,
            &[
                (&since, Type::TIMESTAMPTZ),
                (&until, Type::TIMESTAMPTZ),
                (&exchange, Type::TEXT),
            ],
        )
        .await
        .map_err(db("read published messages"))?;
    let published = rows
        .iter()
        .map(|row| {
            Ok(Unprocessed {
                id: row.try_get(0)?,
                message_id: row.try_get(1)?,
                exchange: row.try_get(2)?,
                routing_key: row.try_get(3)?,
                published_at: format_time(row.try_get::<_, SystemTime>(4)?),
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(db("read published messages"))?;
    let lookup = format!("SELECT message_id FROM {table} WHERE message_id = ANY($1)");
    let mut processed = HashSet::with_capacity(published.len());
    for chunk in published.chunks(CHUNK) {
        let wanted: Vec<Uuid> = chunk.iter().map(|m| m.message_id).collect();
        let found = inbox
            .client
            .query_typed(&lookup, &[(&wanted, Type::UUID_ARRAY)])
            .await
            .map_err(|e| Error::Database {
                what: format!("read the inbox {} on {}", inbox.table, inbox.described),
                line: outbox::error_line(&e),
            })?;
        processed.extend(found.iter().map(|row| row.get::<_, Uuid>(0)));
    }
    let checked = published.len();
    let unprocessed = published
        .into_iter()
        .filter(|m| !processed.contains(&m.message_id))
        .collect();
    Ok(Report {
        since: format_time(since),
        until: format_time(until),
        checked,
        unprocessed,
        warning,
    })
}

/// `schema.table` as quoted identifiers: the name comes from a flag and
/// goes into SQL text, so it must not be able to carry anything else.
fn quote_table(name: &str) -> Result<String, Error> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.is_empty() || parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(Error::BadRequest(format!(
            "--inbox-table `{name}` must be `table` or `schema.table`"
        )));
    }
    Ok(parts
        .iter()
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join("."))
}

#[cfg(test)]
mod tests {
    use super::quote_table;

    #[test]
    fn inbox_table_names_are_quoted() {
        assert_eq!(
            quote_table("dispatch.inbox").ok().as_deref(),
            Some("\"dispatch\".\"inbox\"")
        );
        assert_eq!(
            quote_table("in\"box").ok().as_deref(),
            Some("\"in\"\"box\"")
        );
        assert!(quote_table("a.b.c").is_err());
        assert!(quote_table("a.").is_err());
    }
}
