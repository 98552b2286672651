//! A `metrics` recorder for the bench process. It keeps the samples of the
//! relay's own `outbox_enqueue_to_confirm_seconds` histogram in an
//! HdrHistogram (in microseconds), so the relay's view can be printed next
//! to the consumer's, and counts its claims (`outbox_claim_batch_size`) and
//! wake-ups (`outbox_wakeups_total`) for the latency profile; every other
//! metric is dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hdrhistogram::Histogram as Hdr;
use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

pub const ENQUEUE_TO_CONFIRM: &str = "outbox_enqueue_to_confirm_seconds";
const CLAIM_BATCH: &str = "outbox_claim_batch_size";
const WAKEUPS: &str = "outbox_wakeups_total";

/// The captured samples; cheap to clone.
#[derive(Clone)]
pub struct Captured(Arc<Sink>, Arc<Claims>);

/// The relay's claims and wake-ups since the last [`Captured::take_claims`].
#[derive(Debug, Default, Clone, Copy)]
pub struct ClaimCounts {
    pub claims: u64,
    /// Claims that found nothing.
    pub empty: u64,
    pub rows: u64,
    /// Drains begun on a NOTIFY.
    pub notified: u64,
    /// Drains begun otherwise (sweep, re-check, reconnect).
    pub other_wakeups: u64,
}

#[derive(Default)]
struct Claims {
    claims: AtomicU64,
    empty: AtomicU64,
    rows: AtomicU64,
    notified: AtomicU64,
    other_wakeups: AtomicU64,
}

impl HistogramFn for Claims {
    fn record(&self, rows: f64) {
        self.claims.fetch_add(1, Ordering::Relaxed);
        if rows < 0.5 {
            self.empty.fetch_add(1, Ordering::Relaxed);
        }
        self.rows.fetch_add(rows.round() as u64, Ordering::Relaxed);
    }
}

/// One `outbox_wakeups_total` series, added to its side of the count.
struct Wakeups(Arc<Claims>, bool);

impl CounterFn for Wakeups {
    fn increment(&self, value: u64) {
        let count = match self.1 {
            true => &self.0.notified,
            false => &self.0.other_wakeups,
        };
        count.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, _: u64) {}
}

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

    /// The claim counts so far; starts counting afresh.
    pub fn take_claims(&self) -> ClaimCounts {
        let take = |count: &AtomicU64| count.swap(0, Ordering::Relaxed);
        let claims = &self.1;
        ClaimCounts {
            claims: take(&claims.claims),
            empty: take(&claims.empty),
            rows: take(&claims.rows),
            notified: take(&claims.notified),
            other_wakeups: take(&claims.other_wakeups),
        }
    }
}

struct CaptureRecorder(Captured);

impl Recorder for CaptureRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() != WAKEUPS {
            return Counter::noop();
        }
        let notified = key
            .labels()
            .any(|label| label.key() == "cause" && label.value() == "notify");
        Counter::from_arc(Arc::new(Wakeups(self.0.1.clone(), notified)))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match key.name() {
            ENQUEUE_TO_CONFIRM => Histogram::from_arc(self.0.0.clone()),
            CLAIM_BATCH => Histogram::from_arc(self.0.1.clone()),
            _ => Histogram::noop(),
        }
    }
}

/// Installs the recorder for the whole process (once).
pub fn install() -> anyhow::Result<Captured> {
    let histogram = crate::figures::new_histogram()?;
    let captured = Captured(
        Arc::new(Sink(Mutex::new(histogram))),
        Arc::new(Claims::default()),
    );
    metrics::set_global_recorder(CaptureRecorder(captured.clone()))
        .map_err(|_| anyhow::anyhow!("a metrics recorder is installed already"))?;
    Ok(captured)
}
