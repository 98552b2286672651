//! A `metrics` recorder for the bench process. It keeps the samples of the
//! relay's own `outbox_enqueue_to_confirm_seconds` histogram in an
//! HdrHistogram (in microseconds), so the relay's view can be printed next
//! to the consumer's; every other metric is dropped.

use std::sync::{Arc, Mutex, MutexGuard};

use hdrhistogram::Histogram as Hdr;
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

pub const ENQUEUE_TO_CONFIRM: &str = "outbox_enqueue_to_confirm_seconds";

/// The captured samples; cheap to clone.
#[derive(Clone)]
pub struct Captured(Arc<Sink>);

struct Sink(Mutex<Hdr<u64>>);

impl Sink {
    fn lock(&self) -> MutexGuard<'_, Hdr<u64>> {
        // A panic while recording leaves a histogram that is still usable.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl HistogramFn for Sink {
    fn record(&self, seconds: f64) {
        let micros = (seconds * 1e6).round().max(0.0) as u64;
        self.lock().saturating_record(micros);
    }
}

impl Captured {
    /// The samples so far; starts a new, empty capture.
    pub fn take(&self) -> Hdr<u64> {
        let mut histogram = self.0.lock();
        let taken = histogram.clone();
        histogram.reset();
        taken
    }
}

struct CaptureRecorder(Captured);

impl Recorder for CaptureRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        if key.name() == ENQUEUE_TO_CONFIRM {
            Histogram::from_arc(self.0.0.clone())
        } else {
            Histogram::noop()
        }
    }
}

/// Installs the recorder for the whole process (once).
pub fn install() -> anyhow::Result<Captured> {
    let histogram = crate::report::new_histogram()?;
    let captured = Captured(Arc::new(Sink(Mutex::new(histogram))));
    metrics::set_global_recorder(CaptureRecorder(captured.clone()))
        .map_err(|_| anyhow::anyhow!("a metrics recorder is installed already"))?;
    Ok(captured)
}
