//! Operator commands (`status`, `dead`, `replay`, `reconcile`): short-lived
//! connections to the app database, plain SQL on `outbox.messages` and its
//! views, output for people or `--json` for scripts. They need no broker:
//! anything to publish again is handed back to the running relays.

pub mod dead;
pub mod reconcile;
pub mod replay;
pub mod status;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use tokio_postgres::Client;
use tokio_postgres::types::Type;
use uuid::Uuid;

use outbox_service::db::{self, PgTarget};

/// The app database, as for `run` and `migrate`.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL of the application database (`postgres://user@host/db?sslmode=require`).
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// PEM file of the CA that signed the PostgreSQL server certificate.
    #[arg(long, env = "OUTBOX_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
}

impl DatabaseArgs {
    /// Connects and checks that the outbox schema is there, so a wrong
    /// database is one clear line rather than "relation does not exist".
    pub async fn connect(&self) -> anyhow::Result<(Client, PgTarget)> {
        let target = db::parse_url(&self.database_url, self.database_ca_file.as_deref())?
            .named("outbox-relay command");
        let client = db::connect(&target).await?;
        let installed: bool = client
            .query_one("SELECT to_regclass('outbox.messages') IS NOT NULL", &[])
            .await
            .map_err(outbox::PgError)?
            .get(0);
        if !installed {
            anyhow::bail!(
                "the outbox schema is missing in {}: run `outbox-relay migrate` first",
                target.describe()
            );
        }
        Ok((client, target))
    }
}

/// A message named on the command line: its `message_id` (UUID) or its
/// row `id` (the number `dead list` and `outbox.pending` show).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageRef {
    Id(i64),
    MessageId(Uuid),
}

impl FromStr for MessageRef {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Ok(id) = text.parse::<i64>() {
            return Ok(MessageRef::Id(id));
        }
        text.parse::<Uuid>()
            .map(MessageRef::MessageId)
            .map_err(|_| format!("`{text}` is neither a message_id (UUID) nor a row id"))
    }
}

impl std::fmt::Display for MessageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MessageRef::Id(id) => write!(f, "{id}"),
            MessageRef::MessageId(uuid) => write!(f, "{uuid}"),
        }
    }
}

/// Splits references into the two arrays the queries take (`$ids`, `$message_ids`).
pub(crate) fn split_refs(refs: &[MessageRef]) -> (Vec<i64>, Vec<Uuid>) {
    let mut ids = Vec::new();
    let mut message_ids = Vec::new();
    for r in refs {
        match r {
            MessageRef::Id(id) => ids.push(*id),
            MessageRef::MessageId(uuid) => message_ids.push(*uuid),
        }
    }
    (ids, message_ids)
}

/// The references that match none of the rows `(id, message_id)` acted on.
pub(crate) fn unmatched(refs: &[MessageRef], rows: &[(i64, Uuid)]) -> Vec<String> {
    refs.iter()
        .filter(|r| {
            !rows.iter().any(|(id, uuid)| match r {
                MessageRef::Id(wanted) => wanted == id,
                MessageRef::MessageId(wanted) => wanted == uuid,
            })
        })
        .map(ToString::to_string)
        .collect()
}

/// A point in time on the command line: a duration ago (`90s`, `2h`,
/// `7d`) or a timestamp the server understands (`2026-11-27 03:00+00`).
#[derive(Debug, Clone, PartialEq)]
pub enum TimeArg {
    Ago(Duration),
    At(String),
}

impl FromStr for TimeArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() {
            return Err("a time is required, e.g. `2h` or `2026-11-27T03:00:00Z`".into());
        }
        if text == "0" {
            return Ok(TimeArg::Ago(Duration::ZERO));
        }
        Ok(match humantime::parse_duration(text) {
            Ok(ago) => TimeArg::Ago(ago),
            // Left to PostgreSQL, which knows more formats (and time zones).
            Err(_) => TimeArg::At(text.to_string()),
        })
    }
}

impl TimeArg {
    /// The instant, computed by the server so that "2h ago" and the rows'
    /// timestamps come from the same clock.
    pub async fn resolve(&self, client: &Client) -> anyhow::Result<SystemTime> {
        let row = match self {
            TimeArg::Ago(ago) => {
                let ms = ago.as_millis() as f64;
                client
                    .query_typed(
                        "SELECT now() - $1 * interval '1 millisecond'",
                        &[(&ms, Type::FLOAT8)],
                    )
                    .await
            }
            TimeArg::At(text) => {
                client
                    .query_typed("SELECT $1::text::timestamptz", &[(text, Type::TEXT)])
                    .await
            }
        }
        .map_err(outbox::PgError)
        .with_context(|| format!("`{self}` is not a time"))?;
        row.first()
            .map(|r| r.get(0))
            .ok_or_else(|| anyhow::anyhow!("the server returned no time"))
    }
}

impl std::fmt::Display for TimeArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TimeArg::Ago(ago) => write!(f, "{}", humantime::format_duration(*ago)),
            TimeArg::At(text) => f.write_str(text),
        }
    }
}

/// Wakes idle relays so handed-back rows go out now rather than at the
/// next sweep. A hint only: without a listening relay it changes nothing.
pub(crate) async fn wake_relays(client: &Client) -> anyhow::Result<()> {
    client
        .query_typed(
            "SELECT pg_notify($1, '')",
            &[(&outbox::WAKE_CHANNEL, Type::TEXT)],
        )
        .await
        .map_err(outbox::PgError)
        .context("cannot wake the relays")?;
    Ok(())
}

/// `2026-11-27T03:12:45Z`.
pub(crate) fn format_time(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// An age rounded for people: `850ms`, `12.3s`, `4m 5s`, `2h 3m`.
pub(crate) fn format_age(age: Duration) -> String {
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

/// A query error in one line, saying what could not be done, the
/// database's error kept as its source.
pub(crate) fn query_error(what: &str) -> impl Fn(tokio_postgres::Error) -> anyhow::Error + '_ {
    move |e| anyhow::Error::new(outbox::PgError(e)).context(format!("cannot {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_refs_are_row_ids_or_uuids() {
        assert_eq!("42".parse::<MessageRef>(), Ok(MessageRef::Id(42)));
        let uuid = Uuid::new_v4();
        assert_eq!(
            uuid.to_string().parse::<MessageRef>(),
            Ok(MessageRef::MessageId(uuid))
        );
        assert!("abc".parse::<MessageRef>().is_err());
    }

    #[test]
    fn times_are_durations_ago_or_timestamps() {
        assert_eq!(
            "2h".parse::<TimeArg>(),
            Ok(TimeArg::Ago(Duration::from_secs(7200)))
        );
        assert_eq!("0".parse::<TimeArg>(), Ok(TimeArg::Ago(Duration::ZERO)));
        assert_eq!(
            "2026-11-27T03:00:00Z".parse::<TimeArg>(),
            Ok(TimeArg::At("2026-11-27T03:00:00Z".into()))
        );
        assert!("".parse::<TimeArg>().is_err());
    }

    #[test]
    fn ages_read_well() {
        assert_eq!(format_age(Duration::from_millis(850)), "850ms");
        assert_eq!(format_age(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(format_age(Duration::from_secs(245)), "4m 5s");
        assert_eq!(format_age(Duration::from_secs(7380)), "2h 3m");
    }
}
