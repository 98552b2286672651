//! SVG plots (plotters, SVG backend only: no font or image libraries).
//! - latency: percentile curves, one per publisher, on log-log axes (the
//!   x axis is 1/(1-q), so 90, 99, 99.9 are evenly spaced);
//! - soak: latency, lag and resident memory against time;
//! - sweep: the relay's and the bridge's p50 and p99 against the rate.

use std::path::Path;

use hdrhistogram::Histogram as Hdr;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::latency::LatencyResult;
use crate::soak::{Sample, SoakResult};

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
/// The x axis ends at the 99.99th percentile.
const MAX_X: f64 = 10_000.0;
/// Points per decade of the x axis.
const STEPS_PER_DECADE: u32 = 10;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
/// One named line of (x, y) points.
type Line = (String, Vec<(f64, f64)>);

/// Percentile curves of commit → received and commit → delivered.
pub fn latency(path: &Path, results: &[LatencyResult]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1280, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(failed)?;
    let panels = root.split_evenly((1, 2));
    let curves = |pick: fn(&LatencyResult) -> &Hdr<u64>| -> Vec<Line> {
        results
            .iter()
            .filter(|r| !pick(r).is_empty())
            .map(|r| (label(r), percentile_curve(pick(r))))
            .collect()
    };
    percentile_panel(
        &panels[0],
        "commit → consumer received",
        &curves(|r| &r.commit_to_received),
    )?;
    percentile_panel(
        &panels[1],
        "commit → delivery row committed",
        &curves(|r| &r.commit_to_delivered),
    )?;
    root.present().map_err(failed)
}

/// Latency against rate, log-log: p50 and p99 of commit → received for the
/// relay and the bridge, and both p50s of commit → delivered.
pub fn sweep(path: &Path, results: &[LatencyResult]) -> anyhow::Result<()> {
    let points = crate::sweep::points(results);
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(failed)?;
    let at = |histogram: &Hdr<u64>, quantile| histogram.value_at_quantile(quantile) as f64 / 1000.0;
    let line = |name: &str, pick: &dyn Fn(&crate::sweep::Point<'_>) -> f64| -> Line {
        let points = points.iter().map(|point| (point.rate, pick(point)));
        (name.to_string(), points.collect())
    };
    let lines = [
        line("relay p50", &|p| at(&p.relay.commit_to_received, 0.5)),
        line("bridge p50", &|p| at(&p.bridge.commit_to_received, 0.5)),
        line("relay p99", &|p| at(&p.relay.commit_to_received, 0.99)),
        line("bridge p99", &|p| at(&p.bridge.commit_to_received, 0.99)),
        line("relay delivered p50", &|p| {
            at(&p.relay.commit_to_delivered, 0.5)
        }),
        line("bridge delivered p50", &|p| {
            at(&p.bridge.commit_to_delivered, 0.5)
        }),
    ];
    let rates = points.iter().map(|p| p.rate);
    let (low, high) = rates.fold((f64::MAX, 1.0_f64), |(lo, hi), r| (lo.min(r), hi.max(r)));
    let ys = lines
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1));
    let top = ys.fold(1.0_f64, f64::max) * 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "commit → … against the write rate (ms, log-log)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (low.min(high) * 0.8..high * 1.25).log_scale(),
            (0.05..top).log_scale(),
        )
        .map_err(failed)?;
    chart
        .configure_mesh()
        .x_desc("messages per second")
        .y_desc("ms")
        .draw()
        .map_err(failed)?;
    draw_lines(&mut chart, &lines, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(failed)
}

fn label(result: &LatencyResult) -> String {
    match result.publisher.sweep_ms() {
        Some(ms) => format!("{} ({ms} ms sweep)", result.publisher.name()),
        None => result.publisher.name().to_string(),
    }
}

/// (1/(1-q), milliseconds) for q from 0 to 0.9999.
fn percentile_curve(histogram: &Hdr<u64>) -> Vec<(f64, f64)> {
    let decades = MAX_X.log10() as u32;
    (0..=decades * STEPS_PER_DECADE)
        .map(|step| {
            let x = 10f64.powf(f64::from(step) / f64::from(STEPS_PER_DECADE));
            let quantile = 1.0 - 1.0 / x;
            (x, histogram.value_at_quantile(quantile) as f64 / 1000.0)
        })
        .collect()
}

fn percentile_panel(area: &Area<'_>, title: &str, lines: &[Line]) -> anyhow::Result<()> {
    let all = lines
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1));
    let top = all.fold(1.0_f64, f64::max) * 1.5;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1.0..MAX_X).log_scale(), (0.05..top).log_scale())
        .map_err(failed)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .x_label_formatter(&|x| trim(100.0 - 100.0 / x))
        .draw()
        .map_err(failed)?;
    // Percentile curves rise to the right: the lower right is free.
    draw_lines(&mut chart, lines, SeriesLabelPosition::LowerRight)
}

/// Latency, lag and memory of a soak run against seconds.
pub fn soak(path: &Path, result: &SoakResult) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1280, 960)).into_drawing_area();
    root.fill(&WHITE).map_err(failed)?;
    let panels = root.split_evenly((3, 1));
    let series = |pick: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        result
            .samples
            .iter()
            .filter_map(|s| pick(s).map(|y| (s.second as f64, y)))
            .collect()
    };
    let latency = vec![
        (
            "delivered p50".to_string(),
            series(&|s| s.delivered.map(|p| p.p50)),
        ),
        (
            "delivered p99".to_string(),
            series(&|s| s.delivered.map(|p| p.p99)),
        ),
        (
            "received p50".to_string(),
            series(&|s| s.received.map(|p| p.p50)),
        ),
        (
            "received p99".to_string(),
            series(&|s| s.received.map(|p| p.p99)),
        ),
    ];
    let lag = vec![(
        "oldest pending age".to_string(),
        series(&|s| Some(s.lag_s * 1000.0)),
    )];
    let mib = |bytes: Option<u64>| bytes.map(|b| b as f64 / 1_048_576.0);
    let memory = vec![
        ("relay".to_string(), series(&|s| mib(s.relay_rss))),
        ("dispatch".to_string(), series(&|s| mib(s.dispatch_rss))),
    ];
    let title = format!(
        "soak: {} msgs/s, {} writers",
        result.load.rate, result.load.writers
    );
    let latency_title = format!("{title}: commit → … (ms, log scale), by second of commit");
    time_panel(&panels[0], &latency_title, "ms", &latency, true)?;
    time_panel(
        &panels[1],
        "lag: age of the oldest pending row",
        "ms",
        &lag,
        false,
    )?;
    time_panel(&panels[2], "resident memory", "MiB", &memory, false)?;
    root.present().map_err(failed)
}

/// Lines against seconds. Latencies spread over decades read better with
/// `log_y`: the lines are drawn as log10 of their values, labelled back.
fn time_panel(
    area: &Area<'_>,
    title: &str,
    unit: &str,
    lines: &[Line],
    log_y: bool,
) -> anyhow::Result<()> {
    let scaled: Vec<Line>;
    let lines = if log_y {
        let log = |(x, y): &(f64, f64)| (*x, y.max(0.01).log10());
        scaled = lines
            .iter()
            .map(|(name, points)| (name.clone(), points.iter().map(log).collect()))
            .collect();
        &scaled
    } else {
        lines
    };
    let points = || lines.iter().flat_map(|(_, points)| points.iter());
    let right = points().map(|p| p.0).fold(1.0_f64, f64::max);
    let (bottom, top) = if log_y {
        let low = points()
            .map(|p| p.1)
            .fold(f64::MAX, f64::min)
            .min(0.0)
            .floor();
        (
            low,
            points().map(|p| p.1).fold(0.0_f64, f64::max).ceil() + 0.2,
        )
    } else {
        (
            0.0,
            points().map(|p| p.1).fold(0.0_f64, f64::max).max(1.0) * 1.1,
        )
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..right, bottom..top)
        .map_err(failed)?;
    let label = |y: &f64| {
        if log_y {
            crate::figures::millis(10f64.powf(*y))
        } else {
            format!("{y:.1}")
        }
    };
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(unit)
        .y_label_formatter(&label)
        .draw()
        .map_err(failed)?;
    draw_lines(&mut chart, lines, SeriesLabelPosition::UpperLeft)
}

fn draw_lines<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    lines: &[Line],
    legend: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, (name, points)) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(failed)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(failed)
}

/// "99.9" rather than "99.90000000000001".
fn trim(percent: f64) -> String {
    let text = format!("{percent:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn failed(error: impl std::error::Error + Send + Sync + 'static) -> anyhow::Error {
    anyhow::Error::new(error).context("cannot draw the plot")
}

/// Draws a plot unless the path is `-`, and says where it went.
pub fn write(
    path: &std::path::PathBuf,
    draw: impl FnOnce(&std::path::PathBuf) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if path.as_os_str() == "-" {
        return Ok(());
    }
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    draw(path)?;
    eprintln!("plot written to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels_are_short() {
        assert_eq!(trim(100.0 - 100.0 / 1000.0), "99.9");
        assert_eq!(trim(0.0), "0");
        assert_eq!(trim(90.0), "90");
    }

    #[test]
    fn curve_climbs_to_the_tail() {
        let mut histogram = crate::figures::new_histogram().expect("valid bounds");
        for micros in 1..=10_000 {
            histogram.saturating_record(micros);
        }
        let curve = percentile_curve(&histogram);
        assert_eq!(curve.len(), 41);
        assert!((curve[0].1 - 0.001).abs() < 1e-6, "{:?}", curve[0]);
        // 1/(1-q) = 10 is the 90th percentile: 9 ms of 10.
        assert!((curve[10].1 - 9.0).abs() < 0.05, "{:?}", curve[10]);
        assert!(curve.windows(2).all(|w| w[0].1 <= w[1].1));
    }
}
