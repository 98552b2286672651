//! Installs or upgrades the `outbox` schema with refinery.
//!
//! The history table lives inside our schema too, so the app's `public`
//! schema gains nothing. Concurrent callers (several relays starting at
//! once) queue on an advisory lock instead of racing on DDL.

use tokio_postgres::Client;

use crate::Error;

mod embedded {
    refinery::embed_migrations!("../../sql/outbox");
}

/// Where refinery records the applied migrations.
pub const MIGRATION_TABLE: &str = "outbox.schema_history";

/// Serializes concurrent migrations of one database.
const MIGRATION_LOCK: &str = "SELECT pg_advisory_lock(1869968482, 0)";
const MIGRATION_UNLOCK: &str = "SELECT pg_advisory_unlock(1869968482, 0)";

/// Applies every migration not yet applied; returns the names applied now
/// (empty when the schema was already current).
pub async fn migrate(client: &mut Client) -> Result<Vec<String>, Error> {
    client.batch_execute(MIGRATION_LOCK).await?;
    let result = run(client).await;
    // The lock dies with the session anyway; unlock so a pooled or reused
    // connection does not keep it.
    let unlocked = client.batch_execute(MIGRATION_UNLOCK).await;
    let applied = result?;
    unlocked?;
    Ok(applied)
}

async fn run(client: &mut Client) -> Result<Vec<String>, Error> {
    // refinery creates its history table before running V1, so the schema
    // that holds it must exist first.
    client
        .batch_execute("CREATE SCHEMA IF NOT EXISTS outbox")
        .await?;
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name(MIGRATION_TABLE);
    let report = runner.run_async(client).await?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect())
}
