//! The order database: our migrations and the outbox's.

use outbox_service::db::PgTarget;

mod embedded {
    refinery::embed_migrations!("../../sql/orders");
}

/// Installs the `orders` table and the outbox schema; idempotent.
pub async fn migrate(target: &PgTarget) -> anyhow::Result<()> {
    let mut client = outbox_service::db::connect(target).await?;
    outbox::migrate(&mut client).await?;
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name("public.orders_schema_history");
    runner.run_async(&mut client).await?;
    Ok(())
}
