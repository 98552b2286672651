//! Printing results: aligned plain-text tables by default, JSON with `--json`.

use serde_json::{Value, json};

use crate::drain::{DrainResult, Timed};
use crate::figures::{Percentiles, Table, machine, millis};
use crate::latency::LatencyResult;
use crate::soak::{Sample, SoakResult};

pub fn print_drain(result: &DrainResult, as_json: bool) {
    let rate = |seconds: f64| result.backlog as f64 / seconds;
    let third = |seconds: f64| rate(seconds) / 3.0;
    let held_ratio = result
        .held
        .as_ref()
        .map(|held| result.relay.seconds / held.seconds);
    let bare_ratio = result.bare.map(|(bare, _)| bare / result.relay.seconds);
    if as_json {
        let timed = |timed: &Timed| {
            json!({
                "seconds": timed.seconds,
                "msgs_per_s": rate(timed.seconds),
                "thirds_msgs_per_s": timed.thirds.map(third),
            })
        };
        let value = json!({
            "backlog": result.backlog,
            "window": result.window,
            "batch": result.batch,
            "payload_bytes": result.payload_bytes,
            "insert_seconds": result.insert_seconds,
            "relay": timed(&result.relay),
            "relay_queued": result.relay_queued,
            "held_horizon": result.held.as_ref().map(timed),
            "held_to_free": held_ratio,
            "bare": result.bare.map(|(seconds, queued)| json!({
                "seconds": seconds, "msgs_per_s": rate(seconds), "queued": queued,
            })),
            "relay_to_bare": bare_ratio,
        });
        println!("{value:#}");
        return;
    }
    println!(
        "drain: {} rows of {} B, window {}, batch {}; backlog inserted in {:.1} s; {}",
        result.backlog,
        result.payload_bytes,
        result.window,
        result.batch,
        result.insert_seconds,
        machine()
    );
    let mut table = Table::new(&["phase", "seconds", "msgs/s", "1st third", "2nd", "3rd"]);
    let phases = [
        ("relay", Some(&result.relay)),
        ("relay, xmin held", result.held.as_ref()),
    ];
    for (phase, timed) in phases {
        let Some(timed) = timed else { continue };
        let mut row = vec![
            phase.into(),
            format!("{:.2}", timed.seconds),
            format!("{:.0}", rate(timed.seconds)),
        ];
        row.extend(timed.thirds.map(|s| format!("{:.0}", third(s))));
        table.row(row);
    }
    if let Some((seconds, _)) = result.bare {
        let mut row = vec!["bare lapin".into(), format!("{seconds:.2}")];
        row.push(format!("{:.0}", rate(seconds)));
        row.extend(["", "", ""].map(String::from));
        table.row(row);
    }
    print!("{}", table.render());
    println!("relay queued {} of {}", result.relay_queued, result.backlog);
    if let Some(ratio) = held_ratio {
        println!("held / free: {ratio:.2}");
    }
    if let Some(ratio) = bare_ratio {
        println!("relay / bare: {ratio:.2}");
    }
}

pub fn print_latency(results: &[LatencyResult], as_json: bool) {
    if as_json {
        let rows: Vec<Value> = results
            .iter()
            .map(|r| {
                let [received, delivered, confirm] = r.percentiles();
                json!({
                    "publisher": r.publisher.name(),
                    "sweep_ms": r.publisher.sweep_ms(),
                    "rate": r.load.rate,
                    "seconds": r.load.duration.as_secs(),
                    "writers": r.load.writers,
                    "sent": r.sent,
                    "received": r.received,
                    "delivered": r.delivered,
                    "duplicates": r.duplicates,
                    "commit_to_received": received.to_json(),
                    "commit_to_delivered": delivered.to_json(),
                    "enqueue_to_confirm": confirm.to_json(),
                })
            })
            .collect();
        println!("{:#}", Value::Array(rows));
        return;
    }
    if let Some(first) = results.first() {
        println!(
            "latency: {} msgs/s for {} s per publisher, {} writers; {}",
            first.load.rate,
            first.load.duration.as_secs(),
            first.load.writers,
            machine()
        );
    }
    println!(
        "in ms from the writer's commit; received = bench consumer got it; \
         delivered = dispatch committed its delivery row; confirm = the relay's enqueue → broker confirm"
    );
    let mut table = Table::new(&[
        "publisher",
        "sweep",
        "sent",
        "recv'd",
        "deliv'd",
        "dups",
        "",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
    ]);
    for r in results {
        let names = ["received", "delivered", "confirm"];
        for (i, (name, percentiles)) in names.into_iter().zip(r.percentiles()).enumerate() {
            let mut cells = if i == 0 {
                vec![
                    r.publisher.name().to_string(),
                    r.publisher
                        .sweep_ms()
                        .map_or("-".into(), |ms| format!("{ms} ms")),
                    r.sent.to_string(),
                    r.received.to_string(),
                    r.delivered.to_string(),
                    r.duplicates.to_string(),
                ]
            } else {
                vec![String::new(); 6]
            };
            cells.push(name.to_string());
            cells.extend(percentiles.cells());
            table.row(cells);
        }
    }
    print!("{}", table.render());
}

pub fn print_soak(result: &SoakResult, every: u64, as_json: bool) {
    let mib = |bytes: Option<u64>| bytes.map(|b| b as f64 / 1_048_576.0);
    let peak = |pick: fn(&Sample) -> Option<u64>| result.samples.iter().filter_map(pick).max();
    let max_lag = result.samples.iter().map(|s| s.lag_s).fold(0.0, f64::max);
    let peak_mib = |pick: fn(&Sample) -> i64| {
        result.samples.iter().map(pick).max().unwrap_or(0) as f64 / 1_048_576.0
    };
    let sizes = (peak_mib(|s| s.table_bytes), peak_mib(|s| s.index_bytes));
    if as_json {
        let samples: Vec<Value> = result
            .samples
            .iter()
            .map(|s| {
                json!({
                    "second": s.second, "pending": s.pending, "lag_s": s.lag_s,
                    "table_mib": s.table_bytes as f64 / 1_048_576.0,
                    "indexes_mib": s.index_bytes as f64 / 1_048_576.0,
                    "wal_bytes": s.wal_bytes, "dead_tuples": s.dead_tuples,
                    "relay_rss_mib": mib(s.relay_rss), "dispatch_rss_mib": mib(s.dispatch_rss),
                    "relay_cpu_s": s.relay_cpu, "dispatch_cpu_s": s.dispatch_cpu,
                    "sent": s.sent,
                    "commit_to_received": s.received.map(Percentiles::to_json),
                    "commit_to_delivered": s.delivered.map(Percentiles::to_json),
                })
            })
            .collect();
        let value = json!({
            "rate": result.load.rate, "seconds": result.load.duration.as_secs(),
            "writers": result.load.writers, "retention": result.retention,
            "peak_table_mib": sizes.0, "peak_indexes_mib": sizes.1,
            "sent": result.sent, "received": result.received,
            "delivered": result.delivered, "duplicates": result.duplicates,
            "settle_seconds": result.settle_seconds, "max_lag_s": max_lag,
            "peak_relay_rss_mib": mib(peak(|s| s.relay_rss)),
            "peak_dispatch_rss_mib": mib(peak(|s| s.dispatch_rss)),
            "relay_cpu_us_per_msg": cpu_per_message(result, |s| s.relay_cpu),
            "dispatch_cpu_us_per_msg": cpu_per_message(result, |s| s.dispatch_cpu),
            "commit_to_received": result.commit_to_received.to_json(),
            "commit_to_delivered": result.commit_to_delivered.to_json(),
            "write": result.write.to_json(),
            "wal_bytes_per_msg": wal_per_message(result),
            "samples": samples,
        });
        println!("{value:#}");
        return;
    }
    println!(
        "soak: {} msgs/s for {} s, {} writers, retention {}; {}",
        result.load.rate,
        result.load.duration.as_secs(),
        result.load.writers,
        result.retention.as_deref().unwrap_or("default"),
        machine()
    );
    let mut table = Table::new(&[
        "second",
        "sent/s",
        "pending",
        "lag ms",
        "table MiB",
        "idx MiB",
        "dead tup",
        "relay MiB",
        "dispatch MiB",
        "deliv p50",
        "p99",
        "max",
    ]);
    for window in result.samples.chunks(every.max(1) as usize) {
        let Some(last) = window.last() else { continue };
        let sent: u64 = window.iter().map(|s| s.sent).sum();
        // The window's worst second: a trend in the tail is what a soak is for.
        let worst = window
            .iter()
            .filter_map(|s| s.delivered)
            .max_by(|a, b| a.p99.total_cmp(&b.p99));
        let mut cells = vec![
            last.second.to_string(),
            format!("{:.0}", sent as f64 / window.len() as f64),
            window
                .iter()
                .map(|s| s.pending)
                .max()
                .unwrap_or(0)
                .to_string(),
            millis(window.iter().map(|s| s.lag_s).fold(0.0, f64::max) * 1000.0),
            format!("{:.1}", last.table_bytes as f64 / 1_048_576.0),
            format!("{:.1}", last.index_bytes as f64 / 1_048_576.0),
            last.dead_tuples.to_string(),
            mib(last.relay_rss).map_or("-".into(), |m| format!("{m:.1}")),
            mib(last.dispatch_rss).map_or("-".into(), |m| format!("{m:.1}")),
        ];
        match worst {
            Some(p) => cells.extend([millis(p.p50), millis(p.p99), millis(p.max)]),
            None => cells.extend(["-".to_string(), "-".into(), "-".into()]),
        }
        table.row(cells);
    }
    print!("{}", table.render());
    println!(
        "sent {}, received {}, delivered {}, duplicates {}; settled {:.1} s after writing stopped; \
         max lag {} ms; peak RSS relay {} MiB, dispatch {} MiB; \
         peak outbox.messages {:.1} MiB, its indexes {:.1} MiB",
        result.sent,
        result.received,
        result.delivered,
        result.duplicates,
        result.settle_seconds,
        millis(max_lag * 1000.0),
        mib(peak(|s| s.relay_rss)).map_or("-".into(), |m| format!("{m:.1}")),
        mib(peak(|s| s.dispatch_rss)).map_or("-".into(), |m| format!("{m:.1}")),
        sizes.0,
        sizes.1,
    );
    let per_message =
        |pick| cpu_per_message(result, pick).map_or("-".into(), |us| format!("{us:.0}"));
    println!(
        "CPU per message: relay {} µs, dispatch {} µs; WAL per message {} bytes",
        per_message(|s| s.relay_cpu),
        per_message(|s| s.dispatch_cpu),
        wal_per_message(result).map_or("-".into(), |b| format!("{b:.0}")),
    );
    let mut overall = Table::new(&["ms", "p50", "p90", "p99", "p99.9", "max"]);
    for (name, percentiles) in [
        ("enqueue (write)", result.write),
        ("commit → received", result.commit_to_received),
        ("commit → delivered", result.commit_to_delivered),
    ] {
        let mut cells = vec![name.to_string()];
        cells.extend(percentiles.cells());
        overall.row(cells);
    }
    print!("{}", overall.render());
}

/// WAL the server wrote per message sent, first sample to last (the relay's
/// marks and retention's deletes included; anything else on the server too).
fn wal_per_message(result: &SoakResult) -> Option<f64> {
    let first = result.samples.first()?.wal_bytes;
    let last = result.samples.last()?.wal_bytes;
    (result.sent > 0).then(|| (last - first) as f64 / result.sent as f64)
}

/// A child's CPU microseconds per message sent, from its first sample to
/// its last (start-up excluded, the tail of the settling included).
fn cpu_per_message(result: &SoakResult, pick: fn(&Sample) -> Option<f64>) -> Option<f64> {
    let first = result.samples.first().and_then(pick)?;
    let last = result.samples.last().and_then(pick)?;
    (result.sent > 0).then(|| (last - first) * 1e6 / result.sent as f64)
}
