//! The library's error type, and one-line rendering of error chains.
//!
//! Every error here keeps its cause as its `source()` and says only its own
//! part in `Display`, so a chain printer (anyhow's `{:#}`, [`chain_line`])
//! shows each part once. tokio-postgres errors need care: their own
//! `Display` says only "db error", and the server's message behind it spans
//! lines (`DETAIL`, `HINT`); [`PgError`] shows them in one line instead.
//! A server's error can quote a row's values (a failing row, a duplicate
//! key, a trigger's own text): by default none of that is shown, only the
//! SQLSTATE and the names of what failed (see [`db_error_line`]).

use std::error::Error as StdError;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_postgres::error::DbError;

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
            Some(db) => f.write_str(&db_error_line(db, row_values_shown())),
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

/// One line for a database error: for an error the server sent, what
/// [`db_error_line`] makes of it (no row values unless
/// [`show_row_values`] was turned on); else the client's message and its
/// causes (see [`PgError`]).
pub fn error_line(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => db_error_line(db, row_values_shown()),
        None => chain_line(error),
    }
}

static ROW_VALUES: AtomicBool = AtomicBool::new(false);

/// Whether database errors rendered by this crate ([`error_line`],
/// [`PgError`], [`chain_line`]) may quote row values: the server's own
/// message and its `DETAIL`. Off by default, and meant for debugging only:
/// those lines go to logs, dead letters' headers and alerts. Process-wide.
pub fn show_row_values(shown: bool) {
    ROW_VALUES.store(shown, Ordering::Relaxed);
}

/// See [`show_row_values`].
pub fn row_values_shown() -> bool {
    ROW_VALUES.load(Ordering::Relaxed)
}

/// An ordering key as logs and trace spans show it: a key is a row's
/// value (a customer, an order), so only its hash (the same in every
/// process of one build, so the relay's and the consumer's agree), unless
/// row values are shown ([`show_row_values`]).
pub fn shown_key(key: &[u8]) -> String {
    if row_values_shown() {
        return String::from_utf8_lossy(key).into_owned();
    }
    let mut hasher = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(key, &mut hasher);
    format!("hash:{:016x}", std::hash::Hasher::finish(&hasher))
}

/// One line for an error the server sent. By default it names what went
/// wrong without quoting any row: the severity, the SQLSTATE and its
/// condition name, and the constraint, table, column and type the server
/// names; the server's message only for the classes whose messages quote
/// no data (connection, authorization, resources, access rules, locks,
/// conflicts...), and never a `RAISE`'s, whose text is anyone's. A check
/// violation's `DETAIL` ("Failing row contains (...)"), a unique
/// violation's ("Key (id)=(42) already exists"), invalid input ("invalid
/// input syntax for type integer: \"abc\"") or a trigger's own message
/// would otherwise carry the values into logs and dead letters. With
/// `row_values` the message and its `DETAIL` are shown as well.
pub fn db_error_line(db: &DbError, row_values: bool) -> String {
    Fields {
        severity: db.severity(),
        code: db.code().code(),
        message: db.message(),
        detail: db.detail(),
        constraint: db.constraint(),
        schema: db.schema(),
        table: db.table(),
        column: db.column(),
        datatype: db.datatype(),
        routine: db.routine(),
        context: db.where_(),
    }
    .line(row_values)
}

/// What [`db_error_line`] reads of a server's error.
struct Fields<'a> {
    severity: &'a str,
    code: &'a str,
    message: &'a str,
    detail: Option<&'a str>,
    constraint: Option<&'a str>,
    schema: Option<&'a str>,
    table: Option<&'a str>,
    column: Option<&'a str>,
    datatype: Option<&'a str>,
    routine: Option<&'a str>,
    /// Where it was raised (`PL/pgSQL function outbox.capture(...) line 9
    /// at RAISE`), innermost first.
    context: Option<&'a str>,
}

impl Fields<'_> {
    fn line(&self, row_values: bool) -> String {
        let code = self.code;
        let mut line = format!("{} {code} {}", self.severity, condition_name(code));
        let mut named = Vec::new();
        if let Some(constraint) = self.constraint {
            named.push(format!("constraint \"{constraint}\""));
        }
        match (self.schema, self.table) {
            (Some(schema), Some(table)) => named.push(format!("table \"{schema}\".\"{table}\"")),
            (None, Some(table)) => named.push(format!("table \"{table}\"")),
            _ => {}
        }
        if let Some(column) = self.column {
            named.push(format!("column \"{column}\""));
        }
        if let Some(datatype) = self.datatype {
            named.push(format!("type \"{datatype}\""));
        }
        if !named.is_empty() {
            line.push_str(" (");
            line.push_str(&named.join(", "));
            line.push(')');
        }
        if row_values {
            line.push_str(": ");
            line.push_str(self.message);
            if let Some(detail) = self.detail {
                line.push_str(" DETAIL: ");
                line.push_str(detail);
            }
        } else if self.message_quotes_no_data() {
            line.push_str(": ");
            line.push_str(self.message);
        } else {
            line.push_str(": the server's message is withheld, as it may quote row values");
        }
        line.lines().collect::<Vec<_>>().join(" ")
    }

    /// Whether the server's message can be trusted to quote no row values:
    /// the classes about the connection, the server or the statement (not
    /// the data), unless a `RAISE` wrote it (PL/pgSQL may raise any
    /// SQLSTATE with any text).
    fn message_quotes_no_data(&self) -> bool {
        const CLASSES: [&str; 14] = [
            "08", "0A", "25", "28", "3D", "3F", "40", "42", "53", "54", "55", "57", "58", "XX",
        ];
        let raised = self.routine == Some("exec_stmt_raise") || self.code.starts_with("P0");
        if raised {
            return self.raised_by_the_outbox();
        }
        CLASSES.iter().any(|class| self.code.starts_with(class))
    }

    /// A `RAISE` of the outbox's own functions: their messages (all
    /// `outbox.…: `) name tables, roles and settings, never a row's values,
    /// and tell an operator what to do.
    fn raised_by_the_outbox(&self) -> bool {
        let innermost = self.context.and_then(|context| context.lines().next());
        self.message.starts_with("outbox.")
            && innermost.is_some_and(|frame| frame.starts_with("PL/pgSQL function outbox."))
    }
}

/// The condition name PostgreSQL gives `code` (Appendix A), for the common
/// ones; else its class's.
pub fn condition_name(code: &str) -> &'static str {
    let known = match code {
        "23000" => "integrity_constraint_violation",
        "23001" => "restrict_violation",
        "23502" => "not_null_violation",
        "23503" => "foreign_key_violation",
        "23505" => "unique_violation",
        "23514" => "check_violation",
        "23P01" => "exclusion_violation",
        "22001" => "string_data_right_truncation",
        "22003" => "numeric_value_out_of_range",
        "22007" => "invalid_datetime_format",
        "22008" => "datetime_field_overflow",
        "22012" => "division_by_zero",
        "22021" => "character_not_in_repertoire",
        "22023" => "invalid_parameter_value",
        "22P02" => "invalid_text_representation",
        "22P05" => "untranslatable_character",
        "25006" => "read_only_sql_transaction",
        "40001" => "serialization_failure",
        "40P01" => "deadlock_detected",
        "42501" => "insufficient_privilege",
        "42601" => "syntax_error",
        "42703" => "undefined_column",
        "42P01" => "undefined_table",
        "53300" => "too_many_connections",
        "54000" => "program_limit_exceeded",
        "55P03" => "lock_not_available",
        "57014" => "query_canceled",
        "57P01" => "admin_shutdown",
        "57P02" => "crash_shutdown",
        "57P03" => "cannot_connect_now",
        "P0001" => "raise_exception",
        "P0002" => "no_data_found",
        "P0003" => "too_many_rows",
        "P0004" => "assert_failure",
        _ => "",
    };
    if !known.is_empty() {
        return known;
    }
    match code.get(..2).unwrap_or("") {
        "08" => "connection_exception",
        "0A" => "feature_not_supported",
        "21" => "cardinality_violation",
        "22" => "data_exception",
        "23" => "integrity_constraint_violation",
        "25" => "invalid_transaction_state",
        "27" => "triggered_data_change_violation",
        "28" => "invalid_authorization_specification",
        "38" => "external_routine_exception",
        "39" => "external_routine_invocation_exception",
        "3D" => "invalid_catalog_name",
        "3F" => "invalid_schema_name",
        "40" => "transaction_rollback",
        "42" => "syntax_error_or_access_rule_violation",
        "44" => "with_check_option_violation",
        "53" => "insufficient_resources",
        "54" => "program_limit_exceeded",
        "55" => "object_not_in_prerequisite_state",
        "57" => "operator_intervention",
        "58" => "system_error",
        "P0" => "plpgsql_error",
        "XX" => "internal_error",
        _ => "error",
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

    fn server_error<'a>(code: &'a str, message: &'a str) -> Fields<'a> {
        Fields {
            severity: "ERROR",
            code,
            message,
            detail: None,
            constraint: None,
            schema: None,
            table: None,
            column: None,
            datatype: None,
            routine: None,
            context: None,
        }
    }

    #[test]
    fn row_values_stay_out_of_database_error_lines() {
        let check = Fields {
            detail: Some("Failing row contains (7, secret-rider)."),
            constraint: Some("deliveries_order_check"),
            schema: Some("dispatch"),
            table: Some("deliveries"),
            routine: Some("ExecConstraints"),
            ..server_error(
                "23514",
                "new row for relation \"deliveries\" violates check constraint \"deliveries_order_check\"",
            )
        };
        assert_eq!(
            check.line(false),
            "ERROR 23514 check_violation (constraint \"deliveries_order_check\", \
             table \"dispatch\".\"deliveries\"): the server's message is withheld, as it may \
             quote row values"
        );
        let shown = check.line(true);
        assert!(
            shown.contains("DETAIL: Failing row contains (7, secret-rider)."),
            "{shown}"
        );

        let unique = Fields {
            detail: Some("Key (id)=(42) already exists."),
            constraint: Some("orders_pkey"),
            ..server_error(
                "23505",
                "duplicate key value violates unique constraint \"orders_pkey\"",
            )
        };
        let line = unique.line(false);
        assert!(
            line.starts_with("ERROR 23505 unique_violation (constraint \"orders_pkey\")"),
            "{line}"
        );
        assert!(!line.contains("42"), "{line}");

        let bad_input = Fields {
            datatype: Some("integer"),
            ..server_error("22P02", "invalid input syntax for type integer: \"s3cret\"")
        };
        let line = bad_input.line(false);
        assert!(
            line.contains("22P02 invalid_text_representation (type \"integer\")"),
            "{line}"
        );
        assert!(!line.contains("s3cret"), "{line}");

        // A trigger may raise any SQLSTATE with any text.
        let raised = Fields {
            column: Some("order_id"),
            routine: Some("exec_stmt_raise"),
            ..server_error("42501", "order 7 of rider secret-rider refused")
        };
        let line = raised.line(false);
        assert!(
            line.starts_with("ERROR 42501 insufficient_privilege (column \"order_id\")"),
            "{line}"
        );
        assert!(!line.contains("secret"), "{line}");
        let line = server_error("P0001", "order 7 refused").line(false);
        assert!(line.starts_with("ERROR P0001 raise_exception: "), "{line}");
        assert!(!line.contains("order 7"), "{line}");
        // Only the outbox's own functions' messages are trusted, and only
        // when raised there (a user's trigger may borrow the prefix).
        let ours = Fields {
            routine: Some("exec_stmt_raise"),
            context: Some("PL/pgSQL function outbox.capture(regclass,text) line 9 at RAISE"),
            ..server_error(
                "22023",
                "outbox.capture: table orders has no column \"nope\"",
            )
        };
        assert!(ours.line(false).ends_with("has no column \"nope\""));
        let borrowed = Fields {
            context: Some("PL/pgSQL function public.audit() line 3 at RAISE"),
            ..ours
        };
        assert!(!borrowed.line(false).contains("nope"));
    }

    #[test]
    fn messages_that_quote_no_data_are_kept() {
        for (code, message) in [
            ("42P01", "relation \"outbox.messages\" does not exist"),
            (
                "55P03",
                "could not obtain lock on row in relation \"messages\"",
            ),
            (
                "57P01",
                "terminating connection due to administrator command",
            ),
            (
                "54000",
                "index row size 9000 exceeds btree version 4 maximum 2704 for index \"k\"",
            ),
            (
                "40001",
                "could not serialize access due to concurrent update",
            ),
        ] {
            let line = server_error(code, message).line(false);
            assert!(line.ends_with(&format!(": {message}")), "{line}");
        }
        assert_eq!(condition_name("57P03"), "cannot_connect_now");
        assert_eq!(condition_name("22999"), "data_exception");
        assert_eq!(condition_name("ZZ000"), "error");
    }

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
