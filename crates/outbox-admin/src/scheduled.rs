//! Messages waiting for their `deliver_at` (V9), soonest first, with the
//! cancelled and refused ones as such (`outbox.scheduled_messages`).

use std::time::SystemTime;

use serde::Serialize;
use tokio_postgres::Client;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::{Error, db, format_time};

#[derive(Debug, Serialize)]
pub struct Scheduled {
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub ordering_key: Option<String>,
    pub deliver_at: String,
    /// `scheduled`, `cancelled` or `refused`.
    pub state: String,
}

pub async fn list(client: &Client, limit: i64) -> Result<Vec<Scheduled>, Error> {
    let rows = client
        .query_typed(
            "SELECT message_id, exchange, routing_key, ordering_key, deliver_at, state \
             FROM outbox.scheduled_messages ORDER BY deliver_at, message_id LIMIT $1",
            &[(&limit, Type::INT8)],
        )
        .await
        .map_err(db("list scheduled messages"))?;
    rows.iter()
        .map(|row| {
            Ok(Scheduled {
                message_id: row.try_get(0)?,
                exchange: row.try_get(1)?,
                routing_key: row.try_get(2)?,
                ordering_key: row.try_get(3)?,
                deliver_at: format_time(row.try_get::<_, SystemTime>(4)?),
                state: row.try_get(5)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(db("read scheduled messages"))
}
