//! Installs or upgrades the `dispatch` schema (`sql/dispatch/`) with
//! refinery, recording history in `dispatch.schema_history`. Consumers that
//! start together queue on an advisory lock instead of racing on DDL.

use std::collections::HashSet;

use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("../../sql/dispatch");
}

/// Where refinery records the applied migrations.
pub const MIGRATION_TABLE: &str = "dispatch.schema_history";

/// Applies what is not applied yet; returns the names applied now. The
/// error type is the outbox crate's: the same two things can fail.
pub async fn migrate(client: &mut Client) -> Result<Vec<String>, outbox::Error> {
    if is_current(client).await? {
        return Ok(Vec::new());
    }
    // The history table's schema must exist before refinery creates it.
    client
        .batch_execute(
            "SELECT pg_advisory_lock(hashtext('dispatch.schema_history')); \
             CREATE SCHEMA IF NOT EXISTS dispatch",
        )
        .await?;
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name(MIGRATION_TABLE);
    let report = runner.run_async(client).await;
    // Unlock even after a failure, for a connection that lives on.
    client
        .batch_execute("SELECT pg_advisory_unlock(hashtext('dispatch.schema_history'))")
        .await?;
    Ok(report?
        .applied_migrations()
        .iter()
        .map(ToString::to_string)
        .collect())
}

/// Every embedded migration is recorded with its checksum. Then start-up
/// runs no DDL at all, so a consumer running as a role without CREATE
/// (`dispatch.grant_consumer`) starts on a schema its owner migrated; and
/// a changed file still goes to refinery, which reports it as divergent.
async fn is_current(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let recorded: bool = client
        .query_one(
            "SELECT to_regclass('dispatch.schema_history') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !recorded {
        return Ok(false);
    }
    let rows = client
        .query(
            "SELECT version::int8, checksum FROM dispatch.schema_history",
            &[],
        )
        .await?;
    let applied: HashSet<(i64, Option<String>)> =
        rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    Ok(embedded::migrations::runner()
        .get_migrations()
        .iter()
        .all(|m| applied.contains(&(i64::from(m.version()), Some(m.checksum().to_string())))))
}

/// `dispatch migrate`: install or upgrade, then say what changed.
pub async fn run(target: &outbox_service::db::PgTarget) -> anyhow::Result<()> {
    let mut client = outbox_service::db::connect(target).await?;
    let applied = migrate(&mut client).await.map_err(|e| failed(target, e))?;
    if applied.is_empty() {
        println!("dispatch schema is up to date on {}", target.describe());
    } else {
        println!("applied {} on {}", applied.join(", "), target.describe());
    }
    Ok(())
}

/// The error of a failed migration, naming the database.
pub fn failed(target: &outbox_service::db::PgTarget, error: outbox::Error) -> anyhow::Error {
    anyhow::Error::new(error).context(format!(
        "cannot install the dispatch schema on {}",
        target.describe()
    ))
}
