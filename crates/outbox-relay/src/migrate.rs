//! `outbox-relay migrate`: install or upgrade the schema, then say what changed.

use crate::cli::MigrateArgs;
use crate::db;

pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let config = db::parse_url(&args.database_url)?;
    let mut client = db::connect(&config).await?;
    let applied = outbox::migrate(&mut client).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot install the outbox schema on {} (the role needs CREATE on the database): {e}",
            db::describe(&config)
        )
    })?;
    if applied.is_empty() {
        println!("outbox schema is up to date on {}", db::describe(&config));
    } else {
        println!(
            "applied {} on {}",
            applied.join(", "),
            db::describe(&config)
        );
    }
    Ok(())
}
