//! `outbox-relay replay --since TIME | --id ID…`: publish already-published
//! messages again, with the same `message_id` (see [`crate::replay`]).

use clap::{ArgGroup, Args};

use super::{BulkArgs, DatabaseArgs, FilterArgs, Operator, report};
use crate::{MessageRef, TimeArg};

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).multiple(true).args(["since", "id"])))]
pub struct ReplayArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Replay these messages (message_ids or row ids).
    #[arg(long, num_args = 1..)]
    pub id: Vec<MessageRef>,

    /// `--since` and `--until` are publication times.
    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub bulk: BulkArgs,
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let operator = Operator::connect(&args.database).await?;
    let target = args.database.target("outbox-relay replay")?;
    let filter = args.filter.filter(&args.id);
    let outcome = crate::replay::replay(operator.session(), &filter, args.bulk.bulk()).await?;
    let scope = match &filter.since {
        Some(TimeArg::Ago(ago)) => {
            format!("published since {} ago", humantime::format_duration(*ago))
        }
        Some(TimeArg::At(at)) => format!("published since {at}"),
        None => "named".to_string(),
    };
    let summary = match outcome.changed {
        None => format!(
            "would replay {} message(s) {scope} on {} (dry run: nothing changed)",
            outcome.matched,
            target.describe()
        ),
        Some(changed) => format!(
            "{changed} message(s) {scope} handed back to the relays; they publish them again with the same message_id"
        ),
    };
    report(
        &outcome,
        "replayed",
        &summary,
        "not published or no longer kept (pending, dead, or deleted by retention)",
    )
}
