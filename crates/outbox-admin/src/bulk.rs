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

use tokio_util::sync::CancellationToken;

use crate::audit::{self, Entry};
use crate::filter::Bound;
use crate::{Actor, Error, Filter, MessageRef, db};

/// Where a change runs: its statements on `work`, its audit row on `trail`,
/// a second connection, so that a change cut off part way (its connection
/// killed, say) is still logged with how far it got. `stop` ends it between
/// two batches (the command line's Ctrl-C), logged as such.
#[derive(Debug, Clone, Copy)]
pub struct Session<'a> {
    pub work: &'a Client,
    pub trail: &'a Client,
    pub actor: &'a Actor,
    pub stop: &'a CancellationToken,
}

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
    /// whether the row changed. `$12` on are `extra`.
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
    session: Session<'_>,
    action: &Action<'_>,
    filter: &Filter,
    bulk: Bulk,
) -> Result<Outcome, Error> {
    let client = session.work;
    audit::check(session.trail).await?;
    let bound = filter.bind(client).await?;
    let condition = action.condition();
    let what = format!("{} (counting)", action.name);
    // The rows matching now, up to the highest id among them: a row that
    // dies while the change runs is not taken, so `changed` <= `matched`.
    let counted = client
        .query_typed_one(
            &format!("SELECT count(*), max(id) FROM outbox.messages WHERE {condition}"),
            &bound.params(),
        )
        .await
        .map_err(db(&what))?;
    let matched: i64 = counted.get(0);
    let last: Option<i64> = counted.get(1);
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
        let upto = last.unwrap_or(i64::MIN);
        let done = batches(
            session,
            action,
            &bound,
            bulk,
            upto,
            &mut outcome,
            &mut changed,
        )
        .await;
        if let Err(error) = done {
            failure = Some(error.stopped(action.name, changed, matched));
        }
        outcome.changed = Some(changed);
    }
    let logged = Entry {
        actor: session.actor,
        action: action.name,
        dry_run: bulk.dry_run,
        filter: serde_json::to_value(filter).unwrap_or(Value::Null),
        matched,
        changed: outcome.changed,
        error: failure.as_ref().map(ToString::to_string),
    };
    if let Err(unlogged) = audit::record(session.trail, &logged).await {
        // Both said: the change's own failure is the one to act on.
        return Err(match failure {
            Some(error) => Error::Stopped(format!(
                "{error}; and its audit row could not be written: {unlogged}"
            )),
            None => unlogged,
        });
    }
    if outcome.changed > Some(0) {
        // A hint: without it, relays find the rows at their next sweep.
        if let Err(error) = crate::wake_relays(client).await {
            tracing::warn!(%error, "cannot wake the relays; they find the rows at their next sweep");
        }
    }
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
    session: Session<'_>,
    action: &Action<'_>,
    bound: &Bound,
    bulk: Bulk,
    upto: i64,
    outcome: &mut Outcome,
    changed: &mut i64,
) -> Result<(), Error> {
    let batch = format!(
        "SELECT id, message_id FROM outbox.messages WHERE {} AND id > $9 AND id <= $11 \
         ORDER BY id LIMIT $10 FOR UPDATE",
        action.condition()
    );
    let statement = action.apply.replace("{batch}", &batch);
    let size = bulk.batch.max(1);
    let started = Instant::now();
    let mut after = i64::MIN;
    loop {
        if session.stop.is_cancelled() {
            return Err(Error::Stopped("interrupted".into()));
        }
        let mut params = bound.params().to_vec();
        params.push((&after, Type::INT8));
        params.push((&size, Type::INT8));
        params.push((&upto, Type::INT8));
        params.extend_from_slice(action.extra);
        let rows = session
            .work
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
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = session.stop.cancelled() => {}
            }
        }
    }
}
