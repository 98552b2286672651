//! `outbox-relay migrate`: install or upgrade the schema, then say what changed.

use crate::cli::MigrateArgs;
use outbox_service::db;

pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let target = db::parse_url(&args.database_url, args.database_ca_file.as_deref())?;
    let mut client = db::connect(&target).await?;
    let applied = outbox::migrate(&mut client).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot install the outbox schema on {} (the role needs CREATE on the database): {e}",
            target.describe()
        )
    })?;
    if applied.is_empty() {
        println!("outbox schema is up to date on {}", target.describe());
    } else {
        println!("applied {} on {}", applied.join(", "), target.describe());
    }
    Ok(())
}
