//! The library's error type.

/// What can go wrong when enqueuing or migrating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message breaks a rule the broker or the schema would reject later.
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The payload could not be serialized to JSON.
    #[error("payload is not serializable to JSON: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The database refused or the connection failed.
    #[error("database: {}", crate::error::error_line(.0))]
    Database(#[from] tokio_postgres::Error),
    /// A migration failed to apply.
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
}

/// One line for a database error: the server's message when there is one
/// (tokio-postgres' own `Display` says only "db error"), else the client's.
pub fn error_line(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}
