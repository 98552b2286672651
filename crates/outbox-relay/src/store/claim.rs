//! The claim: which pending rows a relay takes next, under a lease of
//! its own, and each keyed row's number among its key's. The statement
//! is `claim.sql`, beside this file; its parameters are named there.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio_postgres::types::{ToSql, Type};

use super::{Claimed, Store, StoreError};

/// What one claim took.
#[derive(Debug)]
pub struct Claim {
    pub rows: Vec<Claimed>,
    /// Fewer rows were claimable than asked for (not merely cut by the
    /// byte budget): nothing more to claim right now.
    pub exhausted: bool,
    /// The key the next claim's scan of keys starts from: the last one
    /// this claim looked at, or "" once the scan reached the last key.
    pub next_key: String,
    /// Some key had unpublished rows (claimed or not).
    pub keys_pending: bool,
}

/// What a claim asks for; see [`CLAIM`].
#[derive(Debug, Clone, Copy)]
pub struct ClaimLimits<'a> {
    /// Keyless rows are taken above this id (see `cursor`).
    pub after: i64,
    /// Keys are looked at from this one on ("": from the first).
    pub keys_from: &'a str,
    pub rows: u32,
    /// Payload bytes (the first row whatever its size).
    pub bytes: u64,
    pub lease: Duration,
    pub block_on_dead_head: bool,
    /// Rows of a key taken after its head.
    pub followers: u32,
    /// Ids of the keyed rows published and not yet marked (awaiting
    /// their confirms, or confirmed lately): with `followers` above 0
    /// they do not hold their keys back.
    pub in_flight: &'a [i64],
    /// No key had rows pending at the last claim: try [`CLAIM_KEYLESS`]
    /// first.
    pub keyless_only: bool,
}

impl ClaimLimits<'static> {
    /// Up to `rows` rows from the start, heads only, any payload size.
    pub fn from_start(rows: u32, lease: Duration) -> ClaimLimits<'static> {
        ClaimLimits {
            after: 0,
            keys_from: "",
            rows,
            bytes: u64::MAX,
            lease,
            block_on_dead_head: true,
            followers: 0,
            in_flight: &[],
            keyless_only: false,
        }
    }
}

/// What a claim takes: keyless pending rows in id order after $6, and the
/// head (its first unpublished row) of each key with pending rows, the
/// keys taken in order from $7 on, at most $1 of them (the next claim
/// goes on from the last, so every key gets its turn). $3 says whether a
/// dead head blocks its key. After a head come up to $8 of its key's next
/// rows (fewer when the claim's $1 rows are shared among many heads), up
/// to the first that cannot go now (leased, waiting for a retry, dead):
/// published together on one channel, they reach a queue in order. With
/// $8 above 0, the rows in $9 (those this relay has published and
/// awaits confirms for) do not count as a key's head: the next rows go
/// out behind them on the same channel without waiting for their
/// confirms. Only rows truly in flight: one given back unpublished, or
/// failed, is still leased until its mark lands, and a key must wait for
/// it (matching "leased by this relay" instead let a later row of the key
/// pass one given back when its lease ran short). $5 bounds the payload
/// bytes taken (the first row is always taken).
///
/// Heads are found key by key on the pending-by-key index (a skip scan:
/// one probe per key; comparing `(ordering_key, id)` as a row keeps the
/// planner off the primary key, which it took with the statistics of a
/// keyed backlog, walking 83,000 pages for 50 heads), never by walking
/// the backlog in id order and
/// asking of each row whether an earlier one of its key is pending: on a
/// keyed backlog of 150,000 rows over 51 keys that walk took 2.8 s a claim
/// for 51 heads. Keyless rows have an index of their own (V8) for the same
/// reason: filtering the pending index walked every keyed row (45 ms).
///
/// A keyed row gets its key's next sequence number (V8) the first time it
/// is claimed: the claim takes a prefix of the key's pending rows, so
/// numbers follow id order with no gaps.
/// `octet_length` reads a TOASTed value's size without fetching it.
/// Headers come as text and are parsed per row, so one row that serde
/// cannot decode is that row's problem, not a failed claim.
pub const CLAIM: &str = include_str!("claim.sql");

/// [`CLAIM`] without its keys: while no key has rows pending, the walk of
/// keys, their heads, followers and numbers find nothing, and cost the
/// claim's round trip a third of its time at low rates. Its fourth count
/// says whether some key has unpublished rows; then, or when it finds no
/// row, the whole claim runs.
pub const CLAIM_KEYLESS: &str = include_str!("claim_keyless.sql");

/// The types of [`CLAIM`]'s parameters.
pub const CLAIM_TYPES: [Type; 9] = [
    Type::INT8,
    Type::TEXT,
    Type::BOOL,
    Type::FLOAT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::INT8,
    Type::INT8_ARRAY,
];

impl Store {
    /// Claims up to `limits.rows` rows holding at most `limits.bytes` of
    /// payload between them, under a lease token of their own.
    pub async fn claim(&self, limits: ClaimLimits<'_>) -> Result<Claim, StoreError> {
        if limits.keyless_only && limits.keys_from.is_empty() {
            let claim = self.claim_with(CLAIM_KEYLESS, limits).await?;
            if !claim.rows.is_empty() {
                return Ok(Claim {
                    // A key's rows are taken by the whole claim, next.
                    exhausted: claim.exhausted && !claim.keys_pending,
                    ..claim
                });
            }
        }
        self.claim_with(CLAIM, limits).await
    }

    async fn claim_with(
        &self,
        statement: &'static str,
        limits: ClaimLimits<'_>,
    ) -> Result<Claim, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            let lease_ms = limits.lease.as_millis() as f64;
            let limit = i64::from(limits.rows);
            let bytes = i64::try_from(limits.bytes).unwrap_or(i64::MAX);
            let followers = i64::from(limits.followers);
            let token = self.next_lease();
            let params: [&(dyn ToSql + Sync); 9] = [
                &limit,
                &token,
                &limits.block_on_dead_head,
                &lease_ms,
                &bytes,
                &limits.after,
                &limits.keys_from,
                &followers,
                &limits.in_flight,
            ];
            let rows = if self.prepared {
                let statement = client
                    .prepare_typed_cached(statement, &CLAIM_TYPES)
                    .await
                    .map_err(StoreError::from)?;
                client.query(&statement, &params).await
            } else {
                let typed: Vec<_> = params.iter().copied().zip(CLAIM_TYPES).collect();
                client.query_typed(statement, &typed).await
            }
            .map_err(StoreError::from)?;
            let mut claimed = rows
                .iter()
                .map(|row| {
                    let headers: String = row.try_get(6)?;
                    let (headers, problem) = match serde_json::from_str(&headers) {
                        Ok(headers) => (headers, None),
                        Err(error) => (
                            Value::Object(Default::default()),
                            Some(format!("headers cannot be decoded: {error}")),
                        ),
                    };
                    Ok(Claimed {
                        id: row.try_get(0)?,
                        message_id: row.try_get(1)?,
                        lease: token.clone(),
                        exchange: row.try_get(2)?,
                        routing_key: row.try_get(3)?,
                        payload: Bytes::from(row.try_get::<_, Vec<u8>>(4)?),
                        content_type: row.try_get(5)?,
                        headers,
                        problem,
                        ordering_key: row.try_get(7)?,
                        attempts: row.try_get(8)?,
                        pending_since: row.try_get(9)?,
                        key_seq: row.try_get(10)?,
                        scheduled: row.try_get(15)?,
                    })
                })
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                .map_err(StoreError::from)?;
            // UPDATE ... RETURNING does not keep the CTE's order.
            claimed.sort_unstable_by_key(|row| row.id);
            let (found, keyless, keys, last_key) = match rows.first() {
                Some(row) => (|| {
                    Ok::<_, tokio_postgres::Error>((
                        row.try_get::<_, i64>(11)?,
                        row.try_get::<_, i64>(12)?,
                        row.try_get::<_, i64>(13)?,
                        row.try_get::<_, Option<String>>(14)?,
                    ))
                })()
                .map_err(StoreError::from)?,
                None => (0, 0, 0, None),
            };
            let keys_done = keys < limit;
            Ok(Claim {
                rows: claimed,
                // Keys before `keys_from` are yet to be looked at.
                exhausted: found < limit
                    && keyless < limit
                    && keys_done
                    && limits.keys_from.is_empty(),
                next_key: match last_key {
                    Some(key) if !keys_done => key,
                    _ => String::new(),
                },
                keys_pending: keys > 0,
            })
        })
        .await
    }
}
