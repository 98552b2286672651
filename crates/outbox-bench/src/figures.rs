//! The figures every benchmark shares: histograms of microseconds, their
//! percentiles, milliseconds as text, plain-text tables, and the machine
//! a run was on.

use anyhow::Context;
use hdrhistogram::Histogram as Hdr;
use serde_json::{Value, json};

/// A table of text cells: the first column left-aligned, the rest right-aligned.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut text = String::new();
            for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
                if i == 0 {
                    text.push_str(&format!("{cell:<width$}"));
                } else {
                    text.push_str(&format!("  {cell:>width$}"));
                }
            }
            text.trim_end().to_string() + "\n"
        };
        let mut out = line(&self.headers);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&line(&rule));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

/// A histogram of microseconds from 1 µs to one hour, 3 significant digits.
/// (Explicit bounds: `saturating_record` clamps instead of growing.)
pub fn new_histogram() -> anyhow::Result<Hdr<u64>> {
    Hdr::new_with_bounds(1, 3_600_000_000, 3).context("histogram")
}

/// Latency percentiles in milliseconds, from a histogram of microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(histogram: &Hdr<u64>) -> Percentiles {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Percentiles {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        }
    }

    pub fn cells(&self) -> Vec<String> {
        if self.count == 0 {
            return vec!["-".into(); 5];
        }
        [self.p50, self.p90, self.p99, self.p999, self.max]
            .into_iter()
            .map(millis)
            .collect()
    }

    pub fn to_json(self) -> Value {
        json!({
            "count": self.count,
            "p50_ms": self.p50, "p90_ms": self.p90, "p99_ms": self.p99,
            "p99_9_ms": self.p999, "max_ms": self.max,
        })
    }
}

/// Milliseconds with about three significant digits.
pub fn millis(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// The core count and the load average, for a table's heading.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    match crate::setup::load_average() {
        Some(load) => format!("{cores} cores, load {load:.2}"),
        None => format!("{cores} cores"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(&["mode", "p50"]);
        table.row(vec!["notify".into(), "1.25".into()]);
        table.row(vec!["poll".into(), "512".into()]);
        assert_eq!(
            table.render(),
            "mode     p50\n------  ----\nnotify  1.25\npoll     512\n"
        );
    }

    #[test]
    fn percentiles_are_milliseconds_of_recorded_microseconds() {
        let mut histogram = new_histogram().expect("valid bounds");
        for ms in 1..=1000 {
            histogram.saturating_record(ms * 1000);
        }
        let percentiles = Percentiles::of(&histogram);
        assert_eq!(percentiles.count, 1000);
        assert!((percentiles.p50 - 500.0).abs() < 1.0, "{percentiles:?}");
        assert!((percentiles.max - 1000.0).abs() < 1.0, "{percentiles:?}");
    }

    #[test]
    fn millis_keeps_three_significant_digits() {
        assert_eq!(millis(1.2345), "1.23");
        assert_eq!(millis(12.345), "12.3");
        assert_eq!(millis(2499.6), "2500");
    }
}
