//! The dispatch center's own business: an order message becomes a delivery
//! with a rider (the seed's `kd_order` row), and the HTTP API reads it back.

use std::collections::HashSet;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde::{Deserialize, Serialize};
use tokio_postgres::Transaction;
use tokio_postgres::types::Type;
use uuid::Uuid;

use outbox_consumer::{BatchError, Handler, HandlerError, Incoming};

/// The order message the order service publishes through the outbox.
/// Only `orderId` is needed here; the rest is for people reading the queue,
/// read by serde alone: a message whose fields have other types is not an
/// order, and is dead-lettered.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Order {
    pub order_id: i64,
    #[serde(default)]
    pub user_name: Option<String>,
    #[serde(default)]
    pub context: Option<String>,
    #[serde(default)]
    pub num: Option<i64>,
}

/// The seed's demo of a slow dispatcher: one order takes this long.
#[derive(Debug, Clone, Copy)]
pub struct SlowOrder {
    pub order_id: i64,
    pub delay: Duration,
}

/// The handler: assigns a rider and inserts the delivery (status 0).
#[derive(Debug, Clone)]
pub struct Dispatcher {
    /// Picked by order id, so a repeated order gets the same rider.
    pub riders: Vec<String>,
    pub slow_order: Option<SlowOrder>,
}

/// A second message for an order that has a delivery (the order service
/// sent it twice) leaves the first delivery as it is.
const INSERT: &str = "INSERT INTO dispatch.deliveries (order_id, rider, message_id) \
     VALUES ($1, $2, $3) ON CONFLICT (order_id) DO NOTHING RETURNING id";

/// [`INSERT`] for a batch, in delivery order (so the deliveries' ids are).
const INSERT_MANY: &str = "INSERT INTO dispatch.deliveries (order_id, rider, message_id) \
     SELECT order_id, rider, message_id \
     FROM unnest($1::int8[], $2::text[], $3::uuid[]) WITH ORDINALITY AS t(order_id, rider, message_id, n) \
     ORDER BY n ON CONFLICT (order_id) DO NOTHING RETURNING message_id";

impl Handler for Dispatcher {
    async fn handle(&self, tx: &Transaction<'_>, message: &Incoming) -> Result<(), HandlerError> {
        let order = parse(message)?;
        self.slow_down(order.order_id).await;
        let rider = self.rider(order.order_id);
        let inserted = tx
            .query_typed(
                INSERT,
                &[
                    (&order.order_id, Type::INT8),
                    (&rider, Type::TEXT),
                    (&message.message_id, Type::UUID),
                ],
            )
            .await?;
        if inserted.is_empty() {
            tracing::info!(order_id = order.order_id, message_id = %message.message_id,
                "order already has a delivery; this message changes nothing");
        }
        Ok(())
    }

    /// One insert for the batch: one round trip instead of one a message.
    async fn handle_batch(
        &self,
        tx: &Transaction<'_>,
        messages: &[&Incoming],
    ) -> Result<(), BatchError> {
        let mut order_ids = Vec::with_capacity(messages.len());
        for (at, message) in messages.iter().enumerate() {
            let order = parse(message).map_err(|error| BatchError::at(at, error))?;
            self.slow_down(order.order_id).await;
            order_ids.push(order.order_id);
        }
        let riders: Vec<&str> = order_ids.iter().map(|&id| self.rider(id)).collect();
        let message_ids: Vec<Uuid> = messages.iter().map(|m| m.message_id).collect();
        let inserted = tx
            .query_typed(
                INSERT_MANY,
                &[
                    (&order_ids, Type::INT8_ARRAY),
                    (&riders, Type::TEXT_ARRAY),
                    (&message_ids, Type::UUID_ARRAY),
                ],
            )
            .await
            .map_err(|e| BatchError::somewhere(e.into()))?;
        if inserted.len() < messages.len() {
            let landed: HashSet<Uuid> = inserted.iter().map(|row| row.get(0)).collect();
            for (order_id, message_id) in order_ids.iter().zip(&message_ids) {
                if !landed.contains(message_id) {
                    tracing::info!(order_id, %message_id,
                        "order already has a delivery; this message changes nothing");
                }
            }
        }
        Ok(())
    }
}

impl Dispatcher {
    /// The seed's slow order takes its time.
    async fn slow_down(&self, order_id: i64) {
        if let Some(slow) = self.slow_order
            && slow.order_id == order_id
        {
            tokio::time::sleep(slow.delay).await;
        }
    }

    fn rider(&self, order_id: i64) -> &str {
        let count = i64::try_from(self.riders.len()).unwrap_or(i64::MAX).max(1);
        let index = usize::try_from(order_id.rem_euclid(count)).unwrap_or(0);
        self.riders.get(index).map_or("unassigned", String::as_str)
    }
}

/// The order in a message, or why the message is poison.
pub(crate) fn parse(message: &Incoming) -> Result<Order, HandlerError> {
    if let Some(kind) = message.content_type()
        && kind != "application/json"
    {
        return Err(HandlerError::Poison(format!(
            "content type `{kind}` is not application/json"
        )));
    }
    let order: Order = serde_json::from_slice(&message.body)
        .map_err(|e| HandlerError::Poison(format!("body is not an order: {e}")))?;
    if order.order_id <= 0 {
        return Err(HandlerError::Poison(format!(
            "orderId {} is not positive",
            order.order_id
        )));
    }
    Ok(order)
}

/// A delivery as the HTTP API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeliveryView {
    pub order_id: i64,
    pub rider: String,
    /// 0 delivering, 1 delivered, 2 cancelled (the seed's codes).
    pub status: i16,
    pub status_name: &'static str,
    pub message_id: Uuid,
    pub created_at: String,
}

const FIND: &str = "SELECT order_id, rider, status, message_id, \
     to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') \
     FROM dispatch.deliveries WHERE order_id = $1";

/// The delivery of `order_id`; `Err` is a one-line database error.
pub(crate) async fn find(pool: &Pool, order_id: i64) -> Result<Option<DeliveryView>, String> {
    let client = pool
        .get()
        .await
        .map_err(|e| outbox_service::db::pool_error(&e))?;
    let rows = client
        .query_typed(FIND, &[(&order_id, Type::INT8)])
        .await
        .map_err(|e| outbox::error_line(&e))?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let view = (|| {
        let status: i16 = row.try_get(2)?;
        Ok::<_, tokio_postgres::Error>(DeliveryView {
            order_id: row.try_get(0)?,
            rider: row.try_get(1)?,
            status,
            status_name: match status {
                0 => "delivering",
                1 => "delivered",
                _ => "cancelled",
            },
            message_id: row.try_get(3)?,
            created_at: row.try_get(4)?,
        })
    })();
    view.map(Some).map_err(|e| outbox::error_line(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::BasicProperties;

    fn message(body: &str, content_type: Option<&str>) -> Incoming {
        let mut properties = BasicProperties::default();
        if let Some(kind) = content_type {
            properties = properties.with_content_type(kind.into());
        }
        Incoming {
            message_id: Uuid::new_v4(),
            body: body.as_bytes().to_vec(),
            exchange: "ex".into(),
            routing_key: String::new(),
            delivery: 1,
            properties,
        }
    }

    #[test]
    fn the_seeds_order_parses() {
        let body = r#"{"orderId": 100001, "userName": "u", "context": "c", "num": 1}"#;
        let order = parse(&message(body, Some("application/json; charset=utf-8")));
        assert_eq!(order.map(|o| o.order_id).ok(), Some(100001));
    }

    #[test]
    fn bad_orders_are_poison() {
        for (body, kind, reason) in [
            ("not json", None, "body is not an order"),
            (r#"{"id": 1}"#, None, "orderId"),
            (r#"{"orderId": "1"}"#, None, "body is not an order"),
            (r#"{"orderId": 0}"#, None, "not positive"),
            (r#"{"orderId": 1}"#, Some("text/plain"), "content type"),
        ] {
            match parse(&message(body, kind)) {
                Err(HandlerError::Poison(text)) => assert!(text.contains(reason), "{body}: {text}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn riders_are_picked_by_order_id() {
        let dispatcher = Dispatcher {
            riders: vec!["a".into(), "b".into()],
            slow_order: None,
        };
        assert_eq!(dispatcher.rider(4), "a");
        assert_eq!(dispatcher.rider(5), "b");
        assert_eq!(dispatcher.rider(-1), "b");
    }
}
