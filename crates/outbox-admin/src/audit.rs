//! The audit trail: every change made through the command line, the console
//! or the API, and every dry run, is a row of `outbox.admin_log` (V10):
//! when, who, through what, the action, its filter, how many rows matched
//! and how many changed. Only the table's owner may alter or delete rows.

use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::{Error, db, format_time};

/// Who acts, and through which door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// A token's name for the console and the API, the OS user for the CLI.
    pub name: String,
    pub via: Via,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Cli,
    Console,
    Api,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Cli => "cli",
            Via::Console => "console",
            Via::Api => "api",
        }
    }
}

impl Actor {
    /// The person at the command line: `$USER` (or `$LOGNAME`).
    pub fn os_user() -> Actor {
        let name = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "unknown".to_string());
        Actor {
            name,
            via: Via::Cli,
        }
    }
}

/// One row of the trail, as written.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub actor: &'a Actor,
    pub action: &'a str,
    pub dry_run: bool,
    pub filter: Value,
    pub matched: i64,
    /// None for a dry run.
    pub changed: Option<i64>,
    /// Set when the action stopped part way.
    pub error: Option<String>,
}

/// Fails, before anything changes, when the role may not write the trail:
/// a change nobody could trace is refused.
pub async fn check(client: &Client) -> Result<(), Error> {
    let allowed: bool = client
        .query_one(
            "SELECT to_regclass('outbox.admin_log') IS NOT NULL \
                    AND has_table_privilege('outbox.admin_log', 'INSERT')",
            &[],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(db("check the right to write outbox.admin_log"))?;
    if allowed {
        Ok(())
    } else {
        Err(Error::NotAllowed(
            "this role may not write the audit trail outbox.admin_log: run `outbox-relay migrate`, \
             then SELECT outbox.grant_console('role') (or grant_relay)"
                .into(),
        ))
    }
}

pub async fn record(client: &Client, entry: &Entry<'_>) -> Result<(), Error> {
    client
        .query_typed(
            "INSERT INTO outbox.admin_log (actor, via, action, dry_run, filter, matched, changed, error) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                (&entry.actor.name, Type::TEXT),
                (&entry.actor.via.as_str(), Type::TEXT),
                (&entry.action, Type::TEXT),
                (&entry.dry_run, Type::BOOL),
                (&entry.filter, Type::JSONB),
                (&entry.matched, Type::INT8),
                (&entry.changed, Type::INT8),
                (&entry.error, Type::TEXT),
            ],
        )
        .await
        .map_err(db("write the audit trail outbox.admin_log"))?;
    Ok(())
}

/// A row of the trail, as read.
#[derive(Debug, Serialize)]
pub struct Logged {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub via: String,
    pub action: String,
    pub dry_run: bool,
    pub filter: Value,
    pub matched: Option<i64>,
    pub changed: Option<i64>,
    pub error: Option<String>,
    pub db_role: String,
}

/// The latest `limit` entries, newest first.
pub async fn list(client: &Client, limit: i64) -> Result<Vec<Logged>, Error> {
    let rows = client
        .query_typed(
            "SELECT id, at, actor, via, action, dry_run, filter, matched, changed, error, db_role \
             FROM outbox.admin_log ORDER BY id DESC LIMIT $1",
            &[(&limit, Type::INT8)],
        )
        .await
        .map_err(db("read the audit trail"))?;
    rows.iter()
        .map(|row| {
            Ok(Logged {
                id: row.try_get(0)?,
                at: format_time(row.try_get::<_, SystemTime>(1)?),
                actor: row.try_get(2)?,
                via: row.try_get(3)?,
                action: row.try_get(4)?,
                dry_run: row.try_get(5)?,
                filter: row.try_get(6)?,
                matched: row.try_get(7)?,
                changed: row.try_get(8)?,
                error: row.try_get(9)?,
                db_role: row.try_get(10)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(db("read the audit trail"))
}
