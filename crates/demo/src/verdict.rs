//! Checking the outcome across both databases: every order has exactly one
//! delivery, nothing is missing or extra, and how long commit → delivery took.

use std::collections::HashMap;
use std::time::SystemTime;

use tokio_postgres::Client;

#[derive(Debug)]
pub struct Verdict {
    pub orders: usize,
    pub delivered_once: usize,
    pub missing: Vec<i64>,
    pub extra: Vec<i64>,
    /// Milliseconds from the order's insert to its delivery's insert.
    pub latencies_ms: Vec<f64>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.delivered_once == self.orders
    }

    /// The `q` quantile (0..=1) of commit → delivery, in milliseconds.
    pub fn latency(&self, q: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return f64::NAN;
        }
        let rank = ((self.latencies_ms.len() - 1) as f64 * q).round() as usize;
        self.latencies_ms[rank]
    }
}

pub async fn check(orders_db: &Client, dispatch_db: &Client) -> anyhow::Result<Verdict> {
    let orders: HashMap<i64, SystemTime> = orders_db
        .query("SELECT id, created_at FROM orders", &[])
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let deliveries = dispatch_db
        .query(
            "SELECT order_id, min(created_at), count(*) FROM dispatch.deliveries GROUP BY order_id",
            &[],
        )
        .await?;
    let mut verdict = Verdict {
        orders: orders.len(),
        delivered_once: 0,
        missing: Vec::new(),
        extra: Vec::new(),
        latencies_ms: Vec::new(),
    };
    let mut delivered = HashMap::new();
    for row in &deliveries {
        let (order_id, at, count): (i64, SystemTime, i64) = (row.get(0), row.get(1), row.get(2));
        delivered.insert(order_id, ());
        match orders.get(&order_id) {
            None => verdict.extra.push(order_id),
            Some(_) if count != 1 => verdict.extra.push(order_id),
            Some(committed) => {
                verdict.delivered_once += 1;
                if let Ok(latency) = at.duration_since(*committed) {
                    verdict.latencies_ms.push(latency.as_secs_f64() * 1000.0);
                }
            }
        }
    }
    verdict.missing = orders
        .keys()
        .filter(|id| !delivered.contains_key(id))
        .copied()
        .collect();
    verdict.latencies_ms.sort_by(f64::total_cmp);
    Ok(verdict)
}
