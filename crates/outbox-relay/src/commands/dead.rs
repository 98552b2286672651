//! `outbox-relay dead list|show|requeue|discard`: the dead letters
//! (`outbox.dead_letters`), one in full, a fresh set of attempts once the
//! cause is fixed (`outbox.retry_dead`), or deletion for good.

use std::time::SystemTime;

use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::window::NO_CONFIRM;

use super::{
    DatabaseArgs, MessageRef, format_time, query_error, split_refs, unmatched, wake_relays,
};

#[derive(Debug, Args)]
pub struct DeadArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(subcommand)]
    pub action: DeadAction,
}

#[derive(Debug, Subcommand)]
pub enum DeadAction {
    /// One line per dead letter, oldest first, with its last error.
    List {
        /// Print JSON lines instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one dead letter, payload and headers included.
    Show {
        /// Its message_id, or its row id.
        id: MessageRef,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Give dead letters a fresh set of attempts (attempts reset to 0) once the cause is fixed.
    Requeue {
        /// message_ids or row ids.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<MessageRef>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters for good (a dead head then stops blocking its ordering key).
    Discard {
        /// message_ids or row ids.
        #[arg(required = true)]
        ids: Vec<MessageRef>,
    },
}

#[derive(Debug, Serialize)]
pub(crate) struct DeadLetter {
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

/// `dead show`: the row and what it carries.
#[derive(Debug, Serialize)]
pub(crate) struct DeadLetterDetail {
    #[serde(flatten)]
    pub letter: DeadLetter,
    pub headers: Value,
    pub payload_bytes: usize,
    /// The payload when it is UTF-8 text; null otherwise.
    pub payload_text: Option<String>,
}

const LIST: &str = "SELECT id, message_id, exchange, routing_key, ordering_key, content_type, \
     created_at, dead_at, attempts, last_error FROM outbox.dead_letters ORDER BY dead_at, id";

const SHOW: &str = "SELECT d.id, d.message_id, d.exchange, d.routing_key, d.ordering_key, \
     d.content_type, d.created_at, d.dead_at, d.attempts, d.last_error, m.headers, m.payload \
     FROM outbox.dead_letters d JOIN outbox.messages m USING (id) \
     WHERE d.id = ANY($1) OR d.message_id = ANY($2)";

/// `outbox.retry_dead` for each named row; false for rows that are not dead.
const REQUEUE: &str = "SELECT id, message_id, outbox.retry_dead(message_id) FROM outbox.messages \
     WHERE id = ANY($1) OR message_id = ANY($2)";

const REQUEUE_ALL: &str =
    "SELECT id, message_id, outbox.retry_dead(message_id) FROM outbox.dead_letters";

/// Deletes the named dead letters. A key's numbers (`x-outbox-seq`) must
/// stay without gaps, or its consumer waits for the missing one: so when
/// the discarded rows hold a key's last numbers given out, the key takes
/// them back (`last` goes down to the highest number not discarded), and
/// the key's next row gets the first of them. Only numbers no consumer
/// can have seen are taken back: not a replayed row's (it was published
/// before), nor one whose last attempt timed out (`$3`: the broker may
/// have taken it), since a second message under a number already applied
/// would pass as a copy. A number not taken back stays a gap (as one
/// below a row already numbered does), and a consumer waits
/// `key_gap_wait` once for it. A claim numbering the key at the same
/// moment may also write its own `last` over the one taken back: a gap
/// again, no worse.
const DISCARD: &str = "\
WITH discarded AS (
    DELETE FROM outbox.messages
    WHERE dead_at IS NOT NULL AND published_at IS NULL AND (id = ANY($1) OR message_id = ANY($2))
    RETURNING id, message_id, ordering_key,
              CASE WHEN replayed_at IS NULL AND coalesce(last_error, '') NOT LIKE $3 || '%'
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
SELECT id, message_id FROM discarded";

pub async fn run(args: DeadArgs) -> anyhow::Result<()> {
    let (client, _) = args.database.connect().await?;
    match args.action {
        DeadAction::List { json } => list(&client, json).await,
        DeadAction::Show { id, json } => show(&client, id, json).await,
        DeadAction::Requeue { ids, all } => requeue(&client, &ids, all).await,
        DeadAction::Discard { ids } => discard(&client, &ids).await,
    }
}

fn letter(row: &tokio_postgres::Row) -> Result<DeadLetter, tokio_postgres::Error> {
    Ok(DeadLetter {
        id: row.try_get(0)?,
        message_id: row.try_get(1)?,
        exchange: row.try_get(2)?,
        routing_key: row.try_get(3)?,
        ordering_key: row.try_get(4)?,
        content_type: row.try_get(5)?,
        created_at: format_time(row.try_get::<_, SystemTime>(6)?),
        dead_at: format_time(row.try_get::<_, SystemTime>(7)?),
        attempts: row.try_get(8)?,
        last_error: row.try_get(9)?,
    })
}

async fn list(client: &tokio_postgres::Client, json: bool) -> anyhow::Result<()> {
    let rows = client
        .query(LIST, &[])
        .await
        .map_err(query_error("list dead letters"))?;
    let letters = rows
        .iter()
        .map(letter)
        .collect::<Result<Vec<_>, _>>()
        .map_err(query_error("read dead letters"))?;
    if json {
        for l in &letters {
            println!("{}", serde_json::to_string(l)?);
        }
        return Ok(());
    }
    if letters.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    println!(
        "{:>8}  {:<36}  {:<20}  {:<20}  {:>8}  last error",
        "id", "message_id", "dead at", "exchange", "attempts"
    );
    for l in &letters {
        println!(
            "{:>8}  {:<36}  {:<20}  {:<20}  {:>8}  {}",
            l.id,
            l.message_id,
            l.dead_at,
            l.exchange,
            l.attempts,
            l.last_error.as_deref().unwrap_or("")
        );
    }
    println!(
        "{} dead letter(s); `outbox-relay dead show ID` for one, `dead requeue ID…|--all` once the cause is fixed",
        letters.len()
    );
    Ok(())
}

async fn show(client: &tokio_postgres::Client, id: MessageRef, json: bool) -> anyhow::Result<()> {
    let (ids, message_ids) = split_refs(&[id]);
    let rows = client
        .query_typed(
            SHOW,
            &[(&ids, Type::INT8_ARRAY), (&message_ids, Type::UUID_ARRAY)],
        )
        .await
        .map_err(query_error("read the dead letter"))?;
    let Some(row) = rows.first() else {
        anyhow::bail!("{id} is not a dead letter (see `outbox-relay dead list`)");
    };
    let read = || -> Result<DeadLetterDetail, tokio_postgres::Error> {
        let payload: Vec<u8> = row.try_get(11)?;
        Ok(DeadLetterDetail {
            letter: letter(row)?,
            headers: row.try_get(10)?,
            payload_bytes: payload.len(),
            payload_text: String::from_utf8(payload).ok(),
        })
    };
    let detail = read().map_err(query_error("read the dead letter"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&detail)?);
        return Ok(());
    }
    let l = &detail.letter;
    println!("id            {}", l.id);
    println!("message_id    {}", l.message_id);
    println!("exchange      {}", l.exchange);
    println!("routing_key   {}", l.routing_key);
    println!("ordering_key  {}", l.ordering_key.as_deref().unwrap_or("-"));
    println!("created_at    {}", l.created_at);
    println!("dead_at       {}", l.dead_at);
    println!("attempts      {}", l.attempts);
    println!("last_error    {}", l.last_error.as_deref().unwrap_or("-"));
    println!("content_type  {}", l.content_type);
    println!("headers       {}", detail.headers);
    match &detail.payload_text {
        Some(text) => println!("payload       {text}"),
        None => println!(
            "payload       {} bytes, not UTF-8 (SELECT payload FROM outbox.messages WHERE id = {})",
            detail.payload_bytes, l.id
        ),
    }
    Ok(())
}

async fn requeue(
    client: &tokio_postgres::Client,
    refs: &[MessageRef],
    all: bool,
) -> anyhow::Result<()> {
    let rows = if all {
        client.query(REQUEUE_ALL, &[]).await
    } else {
        let (ids, message_ids) = split_refs(refs);
        client
            .query_typed(
                REQUEUE,
                &[(&ids, Type::INT8_ARRAY), (&message_ids, Type::UUID_ARRAY)],
            )
            .await
    }
    .map_err(query_error("requeue dead letters"))?;
    let requeued: Vec<(i64, Uuid)> = rows
        .iter()
        .filter(|row| row.get::<_, bool>(2))
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    if !requeued.is_empty() {
        wake_relays(client).await?;
    }
    for (id, message_id) in &requeued {
        println!("requeued {id} {message_id}");
    }
    println!(
        "{} dead letter(s) requeued with a fresh set of attempts",
        requeued.len()
    );
    let missing = unmatched(refs, &requeued);
    if !missing.is_empty() {
        anyhow::bail!("not dead letters, left alone: {}", missing.join(", "));
    }
    Ok(())
}

async fn discard(client: &tokio_postgres::Client, refs: &[MessageRef]) -> anyhow::Result<()> {
    let (ids, message_ids) = split_refs(refs);
    let rows = client
        .query_typed(
            DISCARD,
            &[
                (&ids, Type::INT8_ARRAY),
                (&message_ids, Type::UUID_ARRAY),
                (&NO_CONFIRM, Type::TEXT),
            ],
        )
        .await
        .map_err(query_error("discard dead letters"))?;
    let discarded: Vec<(i64, Uuid)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    for (id, message_id) in &discarded {
        println!("discarded {id} {message_id}");
    }
    println!("{} dead letter(s) deleted", discarded.len());
    if !discarded.is_empty() {
        // A discarded dead head may have been blocking its ordering key.
        wake_relays(client).await?;
    }
    let missing = unmatched(refs, &discarded);
    if !missing.is_empty() {
        anyhow::bail!("not dead letters, left alone: {}", missing.join(", "));
    }
    Ok(())
}
