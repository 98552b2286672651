//! Installs or upgrades the `dispatch` schema (`sql/dispatch/`) with
//! refinery, recording history in `dispatch.schema_history`. Consumers that
//! start together queue on an advisory lock instead of racing on DDL.

use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("../../sql/dispatch");
}

/// Where refinery records the applied migrations.
pub const MIGRATION_TABLE: &str = "dispatch.schema_history";

/// Applies what is not applied yet; returns the names applied now. The
/// error type is the outbox crate's: the same two things can fail.
pub async fn migrate(client: &mut Client) -> Result<Vec<String>, outbox::Error> {
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

/// `dispatch migrate`: install or upgrade, then say what changed.
pub async fn run(target: &outbox_relay::db::PgTarget) -> anyhow::Result<()> {
    let mut client = outbox_relay::db::connect(target).await?;
    let applied = migrate(&mut client).await.map_err(|e| failed(target, e))?;
    if applied.is_empty() {
        println!("dispatch schema is up to date on {}", target.describe());
    } else {
        println!("applied {} on {}", applied.join(", "), target.describe());
    }
    Ok(())
}

/// The error of a failed migration, naming the database.
pub fn failed(target: &outbox_relay::db::PgTarget, error: outbox::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot install the dispatch schema on {}: {error}",
        target.describe()
    )
}
