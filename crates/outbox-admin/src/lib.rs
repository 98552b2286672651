//! Operating the outbox, as a library: what it holds (`status`), dead
//! letters (list, show, requeue, discard, the keys they block), replay,
//! reconcile against a consumer's inbox, scheduled messages, captures and
//! the audit trail of every change (`outbox.admin_log`).
//!
//! Two front ends call it and nothing else: the `outbox-relay` commands
//! (`cli`) and the web console with its JSON API (`console`). Each change
//! takes a [`Filter`] and a dry run, acts in batches at a bounded rate
//! (`bulk`), and answers what it matched and changed ([`Outcome`]).

pub mod audit;
pub mod bulk;
pub mod captures;
pub mod cli;
pub mod console;
pub mod dead;
pub mod filter;
pub mod history;
pub mod reconcile;
pub mod replay;
pub mod scheduled;
pub mod state;
pub mod status;

use std::time::{Duration, SystemTime};

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

pub use audit::Actor;
pub use bulk::{Bulk, Outcome, Session};
pub use filter::{Filter, MessageRef, TimeArg};

/// What an operation can fail with; each is one line for a person.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The filter or a parameter is wrong (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// No such row (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The database role lacks a right (HTTP 403).
    #[error("{0}")]
    NotAllowed(String),
    /// The database failed (HTTP 500).
    #[error("cannot {what}: {line}")]
    Database { what: String, line: String },
    /// A change stopped part way: interrupted, or a batch failed (HTTP 500).
    #[error("{0}")]
    Stopped(String),
}

impl Error {
    /// This error, saying how far the change `action` got.
    pub fn stopped(self, action: &str, changed: i64, matched: i64) -> Error {
        Error::Stopped(format!(
            "{action} stopped after {changed} of {matched} row(s): {self}"
        ))
    }
}

/// Maps a database error to [`Error`], saying what could not be done; a
/// missing right names the grant that gives it.
pub fn db(what: &str) -> impl Fn(tokio_postgres::Error) -> Error + '_ {
    move |e| {
        let line = outbox::error_line(&e);
        // Class 22, data exception: a value the caller gave (a NUL in a
        // filter, say) that PostgreSQL refuses.
        if e.code().is_some_and(|code| code.code().starts_with("22")) {
            return Error::BadRequest(format!("cannot {what}: {line}"));
        }
        if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
            Error::NotAllowed(format!(
                "cannot {what}: {line} (grant the role its rights: SELECT outbox.grant_console('role'))"
            ))
        } else {
            Error::Database {
                what: what.to_string(),
                line,
            }
        }
    }
}

/// Wakes idle relays so handed-back rows go out now rather than at the
/// next sweep. A hint only: without a listening relay it changes nothing.
pub async fn wake_relays(client: &Client) -> Result<(), Error> {
    client
        .query_typed(
            "SELECT pg_notify($1, '')",
            &[(&outbox::WAKE_CHANNEL, Type::TEXT)],
        )
        .await
        .map_err(db("wake the relays"))?;
    Ok(())
}

/// `2026-11-27T03:12:45Z`: for times the server computed or the relay
/// wrote. A time a writer may have set goes through [`iso`] instead.
pub fn format_time(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// SQL for `column` as `2026-11-27T03:12:45Z`, formatted by the server:
/// a writer may set a row's times to any timestamp (`infinity`, 1969), and
/// those neither convert to a `SystemTime` nor print.
pub fn iso(column: &str) -> String {
    format!(
        "coalesce(to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
         {column}::text)"
    )
}

/// An age rounded for people: `850ms`, `12.3s`, `4m 5s`, `2h 3m`.
pub fn format_age(age: Duration) -> String {
    let secs = age.as_secs();
    if age < Duration::from_secs(1) {
        format!("{}ms", age.as_millis())
    } else if secs < 60 {
        format!("{:.1}s", age.as_secs_f64())
    } else if secs < 3600 {
        format!("{}m {}s", secs / 60, secs % 60)
    } else {
        format!("{}h {}m", secs / 3600, secs % 3600 / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_well() {
        assert_eq!(format_age(Duration::from_millis(850)), "850ms");
        assert_eq!(format_age(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(format_age(Duration::from_secs(245)), "4m 5s");
        assert_eq!(format_age(Duration::from_secs(7380)), "2h 3m");
    }
}
