//! The library's error type, and one-line rendering of error chains.
//!
//! Every error here keeps its cause as its `source()` and says only its own
//! part in `Display`, so a chain printer (anyhow's `{:#}`, [`chain_line`])
//! shows each part once. tokio-postgres errors need care: their own
//! `Display` says only "db error", and the server's message behind it spans
//! lines (`DETAIL`, `HINT`); [`PgError`] shows them in one line instead.

use std::error::Error as StdError;
use std::fmt;

/// What can go wrong when enqueuing or migrating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message breaks a rule the broker or the schema would reject later.
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The payload could not be serialized to JSON.
    #[error("payload is not serializable to JSON")]
    Serialize(#[from] serde_json::Error),
    /// The database refused or the connection failed.
    #[error("database")]
    Database(#[from] PgError),
    /// A migration failed to apply.
    #[error("migration failed")]
    Migration(#[from] refinery::Error),
}

impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Error {
        Error::Database(PgError(error))
    }
}

/// A tokio-postgres error that prints in one line: for an error the server
/// sent, its severity and message (not "db error", nor the `DETAIL` and
/// `HINT` lines); else the client's message, its cause (an I/O error, a
/// TLS alert) as `source()`. The error itself stays in `.0`, for its
/// SQLSTATE and the rest.
#[derive(Debug)]
pub struct PgError(pub tokio_postgres::Error);

impl From<tokio_postgres::Error> for PgError {
    fn from(error: tokio_postgres::Error) -> PgError {
        PgError(error)
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_db_error() {
            Some(db) => write!(f, "{}: {}", db.severity(), db.message()),
            None => fmt::Display::fmt(&self.0, f),
        }
    }
}

impl StdError for PgError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        // The server's error is the `Display` already.
        match self.0.as_db_error() {
            Some(_) => None,
            None => self.0.source(),
        }
    }
}

/// One line for a database error: the server's message when there is one,
/// else the client's and its causes (see [`PgError`]).
pub fn error_line(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => chain_line(error),
    }
}

/// An error and its causes in one line, joined by ": ". A cause whose text
/// already ends the line is skipped (lettre and refinery repeat their
/// causes in their own messages), and a tokio-postgres error among them is
/// shown as [`PgError`] shows it.
pub fn chain_line(error: &(dyn StdError + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(error);
    while let Some(error) = next {
        let (text, source) = match error.downcast_ref::<tokio_postgres::Error>() {
            Some(pg) if pg.as_db_error().is_some() => (error_line(pg), None),
            _ => (error.to_string(), error.source()),
        };
        if line.is_empty() {
            line = text;
        } else if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = source;
    }
    // A message of one cause may still span lines.
    line.lines().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot send")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot send: {0}")]
    struct Repeating(#[source] std::io::Error);

    #[test]
    fn causes_are_joined_once_in_one_line() {
        let io = || std::io::Error::other("connection reset\nby peer");
        assert_eq!(
            chain_line(&Outer(io())),
            "cannot send: connection reset by peer"
        );
        assert_eq!(
            chain_line(&Repeating(io())),
            "cannot send: connection reset by peer"
        );
    }
}
