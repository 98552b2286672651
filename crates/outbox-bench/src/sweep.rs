//! `latency --rates`: the relay against the bare bridge rate by rate,
//! printed as one table (latency, the ratios the relay is judged by, CPU
//! per message, the relay's claims) or as JSON.

use serde_json::{Value, json};

use crate::cost::Cost;
use crate::figures::{Percentiles, Table, machine, millis};
use crate::latency::{LatencyResult, Publisher};

/// One rate: the relay's result and the bridge's.
pub struct Point<'a> {
    pub rate: f64,
    pub relay: &'a LatencyResult,
    pub bridge: &'a LatencyResult,
}

/// Pairs each rate's relay run with its bridge run, in the order they ran.
pub fn points(results: &[LatencyResult]) -> Vec<Point<'_>> {
    let relays = results
        .iter()
        .filter(|r| matches!(r.publisher, Publisher::Relay { .. }));
    let bridges = results
        .iter()
        .filter(|r| matches!(r.publisher, Publisher::Bridge));
    relays
        .zip(bridges)
        .map(|(relay, bridge)| Point {
            rate: relay.load.rate,
            relay,
            bridge,
        })
        .collect()
}

impl Point<'_> {
    fn received(&self) -> (Percentiles, Percentiles) {
        (
            Percentiles::of(&self.relay.commit_to_received),
            Percentiles::of(&self.bridge.commit_to_received),
        )
    }

    fn delivered(&self) -> (Percentiles, Percentiles) {
        (
            Percentiles::of(&self.relay.commit_to_delivered),
            Percentiles::of(&self.bridge.commit_to_delivered),
        )
    }
}

/// CPU µs per message sent: the relay's threads, the publisher's backends.
fn cpu_per_message(result: &LatencyResult) -> [f64; 2] {
    let cost = &result.cost;
    [cost.relay, cost.pg_publisher].map(|cpu| Cost::micros_per_message(cpu, result.sent))
}

fn ratio(relay: f64, bridge: f64) -> f64 {
    relay / bridge.max(1e-3)
}

pub fn print(results: &[LatencyResult], as_json: bool) {
    let points = points(results);
    if as_json {
        let rows: Vec<Value> = points.iter().map(to_json).collect();
        println!("{:#}", Value::Array(rows));
        return;
    }
    if let Some(first) = results.first() {
        println!(
            "latency sweep: relay (notify mode) then bare bridge at each rate, {} s each, {} writers; {}",
            first.load.duration.as_secs(),
            first.load.writers,
            machine()
        );
    }
    println!(
        "ms from the writer's commit to the bench consumer's receipt (recv) and to the dispatch \
         row's commit (deliv); CPU in µs per message: the relay's threads / the PostgreSQL \
         backends serving the publisher (the bridge runs in the bench: its own CPU is not told)"
    );
    let mut table = Table::new(&[
        "rate",
        "relay p50",
        "p99",
        "bridge p50",
        "p99",
        "x p50",
        "x p99",
        "deliv relay",
        "bridge",
        "x",
        "relay cpu",
        "bridge cpu",
        "claims/s",
        "rows/claim",
        "empty",
    ]);
    for point in &points {
        let (relay, bridge) = point.received();
        let (relay_delivered, bridge_delivered) = point.delivered();
        let cpu = |result| {
            let [threads, backends] = cpu_per_message(result);
            format!("{threads:.0}/{backends:.0}")
        };
        let cost = &point.relay.cost;
        table.row(vec![
            format!("{}", point.rate),
            millis(relay.p50),
            millis(relay.p99),
            millis(bridge.p50),
            millis(bridge.p99),
            format!("{:.2}", ratio(relay.p50, bridge.p50)),
            format!("{:.2}", ratio(relay.p99, bridge.p99)),
            millis(relay_delivered.p50),
            millis(bridge_delivered.p50),
            format!("{:.2}", ratio(relay_delivered.p50, bridge_delivered.p50)),
            cpu(point.relay),
            cpu(point.bridge),
            format!("{:.0}", cost.claims_per_second()),
            format!("{:.1}", cost.rows_per_claim()),
            format!("{}", cost.claims.empty),
        ]);
    }
    print!("{}", table.render());
    for point in &points {
        let lost = |r: &LatencyResult| r.sent - r.received.min(r.sent);
        if lost(point.relay) + lost(point.bridge) > 0 {
            println!(
                "at {}/s not every message arrived: relay {} of {}, bridge {} of {}",
                point.rate,
                point.relay.received,
                point.relay.sent,
                point.bridge.received,
                point.bridge.sent
            );
        }
    }
}

fn to_json(point: &Point<'_>) -> Value {
    let (relay, bridge) = point.received();
    let (relay_delivered, bridge_delivered) = point.delivered();
    let side = |result: &LatencyResult, received: Percentiles, delivered: Percentiles| {
        let [threads, backends] = cpu_per_message(result);
        json!({
            "sent": result.sent, "received": result.received, "delivered": result.delivered,
            "received_p50_ms": received.p50, "received_p99_ms": received.p99,
            "delivered_p50_ms": delivered.p50, "delivered_p99_ms": delivered.p99,
            "cpu_us_per_msg": {"relay_threads": threads, "pg_backends": backends},
        })
    };
    let cost = &point.relay.cost;
    json!({
        "rate": point.rate,
        "relay": side(point.relay, relay, relay_delivered),
        "bridge": side(point.bridge, bridge, bridge_delivered),
        "ratio_p50": ratio(relay.p50, bridge.p50),
        "ratio_p99": ratio(relay.p99, bridge.p99),
        "ratio_delivered_p50": ratio(relay_delivered.p50, bridge_delivered.p50),
        "claims_per_s": cost.claims_per_second(),
        "rows_per_claim": cost.rows_per_claim(),
        "empty_claims": cost.claims.empty,
        "wakeups_notified": cost.claims.notified,
        "wakeups_other": cost.claims.other_wakeups,
    })
}
