//! Changes to many rows, in batches at a bounded rate: requeueing 100,000
//! dead letters must not hold locks or flood the pending index in one
//! statement, nor starve the relays' claims. Each batch is its own
//! transaction, the next batch starts after the last id done (keyset), and
//! the rows changed per second stay under [`Bulk::rate`]. A dry run counts
//! and samples the matching rows, changes nothing, and is logged too.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::audit::{self, Entry};
use crate::filter::Bound;
use crate::{Actor, Error, Filter, MessageRef, db};

/// How a change runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bulk {
    /// Say what would change, change nothing.
    pub dry_run: bool,
    /// Rows per statement.
    pub batch: i64,
    /// Rows changed per second at most; `None`: as fast as the database goes.
    pub rate: Option<f64>,
}

impl Default for Bulk {
    fn default() -> Bulk {
        Bulk {
            dry_run: false,
            batch: 1_000,
            rate: Some(5_000.0),
        }
    }
}

/// What a change did, or would do.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub action: &'static str,
    pub dry_run: bool,
    /// Rows matching the filter when the action started.
    pub matched: i64,
    /// Rows changed; null for a dry run.
    pub changed: Option<i64>,
    /// Statements it took (0 for a dry run).
    pub batches: u64,
    /// The first matching rows (at most [`SAMPLE`]).
    pub sample: Vec<Sampled>,
    /// Ids or message_ids of the filter that matched no row in scope.
    pub unmatched: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sampled {
    pub id: i64,
    pub message_id: Uuid,
}

/// Rows shown in an outcome.
pub const SAMPLE: usize = 20;

/// One kind of change.
#[derive(Debug)]
pub(crate) struct Action<'a> {
    pub name: &'static str,
    /// Which rows the action may touch at all, e.g. dead letters only.
    pub scope: &'static str,
    /// The column `since` and `until` apply to.
    pub time_column: &'static str,
    /// The statement for one batch: `{batch}` stands for a subquery giving
    /// `id, message_id` of the batch's rows, locked; it returns `id` and
    /// whether the row changed. `$11` on are `extra`.
    pub apply: &'static str,
    pub extra: &'a [(&'a (dyn ToSql + Sync), Type)],
}

impl Action<'_> {
    fn condition(&self) -> String {
        format!("{} AND {}", self.scope, Bound::condition(self.time_column))
    }
}

/// Runs `action` over the rows `filter` matches, logs it, and wakes the
/// relays when rows changed.
pub(crate) async fn run(
    client: &Client,
    action: &Action<'_>,
    filter: &Filter,
    bulk: Bulk,
    actor: &Actor,
) -> Result<Outcome, Error> {
    audit::check(client).await?;
    let bound = filter.bind(client).await?;
    let condition = action.condition();
    let what = format!("{} (counting)", action.name);
    let matched: i64 = client
        .query_typed_one(
            &format!("SELECT count(*) FROM outbox.messages WHERE {condition}"),
            &bound.params(),
        )
        .await
        .map_err(db(&what))?
        .get(0);
    let sample = sample(client, &condition, &bound, filter).await?;
    let unmatched = unmatched(&filter.ids, &sample);
    let mut outcome = Outcome {
        action: action.name,
        dry_run: bulk.dry_run,
        matched,
        changed: None,
        batches: 0,
        sample: sample.into_iter().take(SAMPLE).collect(),
        unmatched,
    };
    let mut failure = None;
    if !bulk.dry_run {
        let mut changed = 0;
        if let Err(error) = batches(client, action, &bound, bulk, &mut outcome, &mut changed).await
        {
            failure = Some(error);
        }
        outcome.changed = Some(changed);
        if changed > 0 {
            crate::wake_relays(client).await?;
        }
    }
    let logged = Entry {
        actor,
        action: action.name,
        dry_run: bulk.dry_run,
        filter: serde_json::to_value(filter).unwrap_or(Value::Null),
        matched,
        changed: outcome.changed,
        error: failure.as_ref().map(ToString::to_string),
    };
    audit::record(client, &logged).await?;
    match failure {
        Some(error) => Err(error),
        None => Ok(outcome),
    }
}

/// The matching rows in id order: all of them when the filter names ids
/// (to tell which matched nothing), else the first few.
async fn sample(
    client: &Client,
    condition: &str,
    bound: &Bound,
    filter: &Filter,
) -> Result<Vec<Sampled>, Error> {
    let limit = if filter.ids.is_empty() {
        SAMPLE
    } else {
        filter.ids.len()
    } as i64;
    let mut params = bound.params().to_vec();
    params.push((&limit, Type::INT8));
    let rows = client
        .query_typed(
            &format!(
                "SELECT id, message_id FROM outbox.messages WHERE {condition} ORDER BY id LIMIT $9"
            ),
            &params,
        )
        .await
        .map_err(db("read the matching rows"))?;
    Ok(rows
        .iter()
        .map(|row| Sampled {
            id: row.get(0),
            message_id: row.get(1),
        })
        .collect())
}

fn unmatched(refs: &[MessageRef], rows: &[Sampled]) -> Vec<String> {
    refs.iter()
        .filter(|r| {
            !rows.iter().any(|row| match r {
                MessageRef::Id(id) => *id == row.id,
                MessageRef::MessageId(uuid) => *uuid == row.message_id,
            })
        })
        .map(ToString::to_string)
        .collect()
}

async fn batches(
    client: &Client,
    action: &Action<'_>,
    bound: &Bound,
    bulk: Bulk,
    outcome: &mut Outcome,
    changed: &mut i64,
) -> Result<(), Error> {
    let batch = format!(
        "SELECT id, message_id FROM outbox.messages WHERE {} AND id > $9 \
         ORDER BY id LIMIT $10 FOR UPDATE",
        action.condition()
    );
    let statement = action.apply.replace("{batch}", &batch);
    let size = bulk.batch.max(1);
    let started = Instant::now();
    let mut after = i64::MIN;
    loop {
        let mut params = bound.params().to_vec();
        params.push((&after, Type::INT8));
        params.push((&size, Type::INT8));
        params.extend_from_slice(action.extra);
        let rows = client
            .query_typed(&statement, &params)
            .await
            .map_err(db(action.name))?;
        let Some(last) = rows.iter().map(|row| row.get::<_, i64>(0)).max() else {
            return Ok(());
        };
        after = last;
        outcome.batches += 1;
        *changed += rows.iter().filter(|row| row.get::<_, bool>(1)).count() as i64;
        if let Some(rate) = bulk.rate.filter(|rate| *rate > 0.0) {
            let due = started + Duration::from_secs_f64(*changed as f64 / rate);
            tokio::time::sleep_until(due).await;
        }
    }
}
