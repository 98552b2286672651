//! `outbox-relay replay --since TIME | --id ID…`: publish already-published
//! messages again, with the same `message_id`.
//!
//! How: the published rows are handed back to the relays, not published
//! from here. One UPDATE clears `published_at` (and the attempts), so the
//! rows are pending again and go out through the normal path: publisher
//! confirms, retries, dead letters, alerts, and per-key order, since a
//! pending row of a key holds back every later row of that key until it is
//! confirmed again (the claim takes only the oldest unpublished row of each
//! key, in id order). Publishing directly from this command would need its
//! own confirms, its own failure handling and would race the relays on
//! per-key order. Only rows still kept are replayable (`OUTBOX_RETENTION`).

use clap::{ArgGroup, Args};
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::{
    DatabaseArgs, MessageRef, TimeArg, format_time, query_error, split_refs, unmatched, wake_relays,
};

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["since", "id"])))]
pub struct ReplayArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Replay messages published at or after this time: a duration ago (`30m`, `2h`) or a timestamp (`2026-11-27T03:00:00Z`).
    #[arg(long)]
    pub since: Option<TimeArg>,

    /// Replay these messages (message_ids or row ids).
    #[arg(long, num_args = 1..)]
    pub id: Vec<MessageRef>,

    /// Only messages to this exchange.
    #[arg(long)]
    pub exchange: Option<String>,

    /// Say what would be replayed and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Which rows: published (and so still kept), matching `--since` or `--id`,
/// and `--exchange`.
const MATCH: &str = "published_at IS NOT NULL \
     AND ($1::timestamptz IS NULL OR published_at >= $1) \
     AND ($2::bigint[] IS NULL OR id = ANY($2) OR message_id = ANY($3)) \
     AND ($4::text IS NULL OR exchange = $4)";

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let (client, target) = args.database.connect().await?;
    let since = match &args.since {
        Some(time) => Some(time.resolve(&client).await?),
        None => None,
    };
    let (ids, message_ids) = split_refs(&args.id);
    // NULL (not an empty array) means "no --id filter".
    let ids = (!args.id.is_empty()).then_some(ids);
    let statement = if args.dry_run {
        format!("SELECT id, message_id FROM outbox.messages WHERE {MATCH} ORDER BY id")
    } else {
        format!(
            "UPDATE outbox.messages SET published_at = NULL, attempts = 0, last_error = NULL, \
                 next_attempt_at = now(), locked_by = NULL, locked_until = NULL, replayed_at = now() \
             WHERE {MATCH} RETURNING id, message_id"
        )
    };
    let rows = client
        .query_typed(
            &statement,
            &[
                (&since, Type::TIMESTAMPTZ),
                (&ids, Type::INT8_ARRAY),
                (&message_ids, Type::UUID_ARRAY),
                (&args.exchange, Type::TEXT),
            ],
        )
        .await
        .map_err(query_error("hand messages back for replay"))?;
    let mut replayed: Vec<(i64, Uuid)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    replayed.sort_unstable();
    if !args.dry_run && !replayed.is_empty() {
        wake_relays(&client).await?;
    }
    for (id, message_id) in &replayed {
        println!("{id} {message_id}");
    }
    let scope = match since {
        Some(at) => format!("published since {}", format_time(at)),
        None => "named".to_string(),
    };
    if args.dry_run {
        println!(
            "would replay {} message(s) {scope} on {} (dry run: nothing changed)",
            replayed.len(),
            target.describe()
        );
    } else {
        println!(
            "{} message(s) {scope} handed back to the relays; they publish them again with the same message_id",
            replayed.len()
        );
    }
    let missing = unmatched(&args.id, &replayed);
    if !missing.is_empty() {
        anyhow::bail!(
            "not published or no longer kept (pending, dead, or deleted by retention), left alone: {}",
            missing.join(", ")
        );
    }
    Ok(())
}
