//! Dead letters (`outbox.dead_letters`): list them by a filter, show one in
//! full, see the ordering keys a dead head blocks, give them a fresh set of
//! attempts once the cause is fixed (`outbox.retry_dead`), or delete them.

use serde::Serialize;
use serde_json::Value;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row};
use uuid::Uuid;

use crate::bulk::{self, Action};
use crate::filter::Bound;
use crate::{Bulk, Error, Filter, MessageRef, Outcome, Session, db, iso};

/// Dead and not published: the rows `outbox.dead_letters` shows.
const SCOPE: &str = "dead_at IS NOT NULL AND published_at IS NULL";

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub ordering_key: Option<String>,
    pub content_type: String,
    pub created_at: String,
    pub dead_at: String,
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// A page of dead letters and how many match in all.
#[derive(Debug, Serialize)]
pub struct DeadLetters {
    pub total: i64,
    pub dead_letters: Vec<DeadLetter>,
}

/// One dead letter and what it carries.
#[derive(Debug, Serialize)]
pub struct Detail {
    #[serde(flatten)]
    pub letter: DeadLetter,
    /// The headers; with payloads hidden, their names only (values `"…"`).
    pub headers: Value,
    pub payload_bytes: usize,
    /// The payload when it is UTF-8 text and payloads are shown.
    pub payload_text: Option<String>,
    pub payload_shown: bool,
}

fn columns() -> String {
    format!(
        "id, message_id, exchange, routing_key, ordering_key, content_type, {}, {}, \
         attempts, last_error",
        iso("created_at"),
        iso("dead_at")
    )
}

fn letter(row: &Row) -> Result<DeadLetter, tokio_postgres::Error> {
    Ok(DeadLetter {
        id: row.try_get(0)?,
        message_id: row.try_get(1)?,
        exchange: row.try_get(2)?,
        routing_key: row.try_get(3)?,
        ordering_key: row.try_get(4)?,
        content_type: row.try_get(5)?,
        created_at: row.try_get(6)?,
        dead_at: row.try_get(7)?,
        attempts: row.try_get(8)?,
        last_error: row.try_get(9)?,
    })
}

/// The oldest `limit` dead letters the filter matches (by death, then id).
pub async fn list(client: &Client, filter: &Filter, limit: i64) -> Result<DeadLetters, Error> {
    let bound = filter.bind(client).await?;
    let condition = format!("{SCOPE} AND {}", Bound::condition("dead_at"));
    let total: i64 = client
        .query_typed_one(
            &format!("SELECT count(*) FROM outbox.messages WHERE {condition}"),
            &bound.params(),
        )
        .await
        .map_err(db("count dead letters"))?
        .get(0);
    let mut params = bound.params().to_vec();
    params.push((&limit, Type::INT8));
    let rows = client
        .query_typed(
            &format!(
                "SELECT {} FROM outbox.messages WHERE {condition} \
                 ORDER BY dead_at, id LIMIT $9",
                columns()
            ),
            &params,
        )
        .await
        .map_err(db("list dead letters"))?;
    let dead_letters = rows
        .iter()
        .map(letter)
        .collect::<Result<_, _>>()
        .map_err(db("read dead letters"))?;
    Ok(DeadLetters {
        total,
        dead_letters,
    })
}

/// One dead letter; payload and header values only when `show_payloads`.
pub async fn show(
    client: &Client,
    which: MessageRef,
    show_payloads: bool,
) -> Result<Detail, Error> {
    let filter = Filter {
        ids: vec![which],
        ..Filter::default()
    };
    let bound = filter.bind(client).await?;
    let rows = client
        .query_typed(
            &format!(
                "SELECT {}, headers, payload FROM outbox.messages WHERE {SCOPE} AND {}",
                columns(),
                Bound::condition("dead_at")
            ),
            &bound.params(),
        )
        .await
        .map_err(db("read the dead letter"))?;
    let Some(row) = rows.first() else {
        return Err(Error::NotFound(format!("{which} is not a dead letter")));
    };
    let read = || -> Result<Detail, tokio_postgres::Error> {
        let headers: Value = row.try_get(10)?;
        let payload: Vec<u8> = row.try_get(11)?;
        Ok(Detail {
            letter: letter(row)?,
            headers: if show_payloads {
                headers
            } else {
                names_only(headers)
            },
            payload_bytes: payload.len(),
            payload_text: if show_payloads {
                String::from_utf8(payload).ok()
            } else {
                None
            },
            payload_shown: show_payloads,
        })
    };
    read().map_err(db("read the dead letter"))
}

/// Header values can carry what payloads do: with payloads hidden, only
/// the names are shown.
fn names_only(headers: Value) -> Value {
    match headers {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(name, _)| (name, Value::String("…".into())))
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// A key whose oldest unpublished row is dead: its later rows wait.
#[derive(Debug, Serialize)]
pub struct BlockedKey {
    pub ordering_key: String,
    pub dead_id: i64,
    pub dead_message_id: Uuid,
    pub dead_at: String,
    pub last_error: Option<String>,
    /// Pending rows of the key behind it.
    pub waiting: i64,
}

/// By the pending-by-key index (V1): for each dead keyed row, whether an
/// older unpublished row of its key exists, and how many pending rows wait
/// behind it (dead ones behind it are dead letters of their own).
fn blocked() -> String {
    format!(
        "
SELECT d.ordering_key, d.id, d.message_id,
       {},
       d.last_error,
       (SELECT count(*) FROM outbox.messages w
        WHERE w.ordering_key = d.ordering_key AND w.published_at IS NULL AND w.dead_at IS NULL
          AND w.id > d.id)
FROM outbox.messages d
WHERE d.dead_at IS NOT NULL AND d.published_at IS NULL AND d.ordering_key IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM outbox.messages e
                  WHERE e.ordering_key = d.ordering_key AND e.published_at IS NULL AND e.id < d.id)
ORDER BY d.dead_at, d.id
LIMIT $1",
        iso("d.dead_at")
    )
}

pub async fn blocked_keys(client: &Client, limit: i64) -> Result<Vec<BlockedKey>, Error> {
    let rows = client
        .query_typed(&blocked(), &[(&limit, Type::INT8)])
        .await
        .map_err(db("list blocked keys"))?;
    rows.iter()
        .map(|row| {
            Ok(BlockedKey {
                ordering_key: row.try_get(0)?,
                dead_id: row.try_get(1)?,
                dead_message_id: row.try_get(2)?,
                dead_at: row.try_get(3)?,
                last_error: row.try_get(4)?,
                waiting: row.try_get(5)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(db("read blocked keys"))
}

/// A fresh set of attempts (attempts 0, the lag clock restarted) through
/// `outbox.retry_dead`, the function any language can call.
const REQUEUE: &str = "SELECT b.id, outbox.retry_dead(b.message_id) FROM ({batch}) b";

/// Deletes dead letters. A key's numbers (`x-outbox-seq`) must stay
/// without gaps, or its consumer waits for the missing one: so when the
/// discarded rows hold a key's last numbers given out, the key takes them
/// back (`last` goes down to the highest number not discarded), and the
/// key's next row gets the first of them. Only numbers no consumer can
/// have seen are taken back: not a replayed row's (it was published
/// before), nor one whose last attempt timed out (`$12`: the broker may
/// have taken it), since a second message under a number already applied
/// would pass as a copy. A number not taken back stays a gap (as one below
/// a row already numbered does), and a consumer waits `key_gap_wait` once
/// for it. A claim numbering the key at the same moment may also write its
/// own `last` over the one taken back: a gap again, no worse.
const DISCARD: &str = "\
WITH discarded AS (
    DELETE FROM outbox.messages
    WHERE id IN (SELECT id FROM ({batch}) b)
    RETURNING id, message_id, ordering_key,
              CASE WHEN replayed_at IS NULL AND coalesce(last_error, '') NOT LIKE $12 || '%'
                   THEN key_seq END AS key_seq
), taken_back AS (
    UPDATE outbox.key_sequences s
    SET last = (SELECT max(n) FROM generate_series(greatest(s.last - k.count, 0), s.last) n
                WHERE n <> ALL (k.seqs))
    FROM (SELECT ordering_key, count(*) AS count, array_agg(key_seq) AS seqs
          FROM discarded WHERE key_seq IS NOT NULL GROUP BY ordering_key) k
    WHERE s.ordering_key = k.ordering_key
    RETURNING 1
)
SELECT id, true FROM discarded";

/// Requeues the dead letters `filter` matches (every one when empty).
pub async fn requeue(session: Session<'_>, filter: &Filter, bulk: Bulk) -> Result<Outcome, Error> {
    let action = Action {
        name: "requeue",
        scope: SCOPE,
        time_column: "dead_at",
        apply: REQUEUE,
        extra: &[],
    };
    bulk::run(session, &action, filter, bulk).await
}

/// Deletes the dead letters `filter` matches for good (a dead head then
/// stops blocking its key).
pub async fn discard(session: Session<'_>, filter: &Filter, bulk: Bulk) -> Result<Outcome, Error> {
    let no_confirm: &(dyn ToSql + Sync) = &outbox::NO_CONFIRM;
    let action = Action {
        name: "discard",
        scope: SCOPE,
        time_column: "dead_at",
        apply: DISCARD,
        extra: &[(no_confirm, Type::TEXT)],
    };
    bulk::run(session, &action, filter, bulk).await
}
