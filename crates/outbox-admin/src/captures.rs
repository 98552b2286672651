//! The tables whose changes are published (`outbox.captures`, V2): which
//! operations, to which exchange and routing key, keyed how, which columns.

use serde::Serialize;
use tokio_postgres::Client;

use crate::{Error, db};

#[derive(Debug, Serialize)]
pub struct Capture {
    /// `schema.table`.
    pub table: String,
    pub operations: Vec<String>,
    pub exchange: String,
    pub routing_key: String,
    pub ordering_key: Option<String>,
    /// The payload's columns; None: the whole row.
    pub columns: Option<Vec<String>>,
    /// False when someone disabled the capture's trigger.
    pub enabled: bool,
}

pub async fn list(client: &Client) -> Result<Vec<Capture>, Error> {
    let rows = client
        .query(
            "SELECT source, operations::text[], exchange, routing_key, ordering_key, \
                    columns::text[], enabled \
             FROM outbox.captures ORDER BY source",
            &[],
        )
        .await
        .map_err(db("list captures"))?;
    rows.iter()
        .map(|row| {
            Ok(Capture {
                table: row.try_get(0)?,
                operations: row.try_get(1)?,
                exchange: row.try_get(2)?,
                routing_key: row.try_get(3)?,
                ordering_key: row.try_get(4)?,
                columns: row.try_get(5)?,
                enabled: row.try_get(6)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(db("read captures"))
}
