//! `outbox-relay migrate`: install or upgrade the schema, then say what changed.

use anyhow::Context;

use crate::cli::MigrateArgs;
use outbox_service::db;

pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let target = db::parse_url(&args.database_url, args.database_ca_file.as_deref())?
        .named("outbox-relay migrate");
    let mut client = db::connect(&target).await?;
    let applied = outbox::migrate(&mut client).await.with_context(|| {
        format!(
            "cannot install the outbox schema on {} (the role needs CREATE on the database)",
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
