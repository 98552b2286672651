//! Watching a child process as an operator would: its JSON log lines
//! (stderr, `--log-format json`) and its Prometheus page.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;

use crate::dispatch::wait_until;

/// A child process whose stderr is collected line by line (and echoed, so
/// a failing test still shows it).
pub struct Logged {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Logged {
    pub fn spawn(mut command: Command) -> Logged {
        command.stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                lock(&sink).push(line);
            }
        });
        Logged { child, lines }
    }

    /// Every line so far, as written.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines).clone()
    }

    /// Every line so far; each must be one JSON object.
    pub fn json_lines(&self) -> Vec<Value> {
        lock(&self.lines)
            .iter()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
            })
            .collect()
    }

    /// Waits for a JSON line that `matches`, and returns it.
    pub async fn wait_for_line(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let find = || self.json_lines().into_iter().find(|line| matches(line));
        wait_until(&format!("a log line with {what}"), || async {
            find().is_some()
        })
        .await;
        find().expect("found above")
    }

    /// SIGTERM, then the exit code. Waits without blocking the runtime:
    /// the process may need the test's own tasks (a proxy) to shut down.
    pub async fn terminate(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let mut status = None;
        wait_until("the process exits", || {
            status = self.child.try_wait().expect("try_wait");
            std::future::ready(status.is_some())
        })
        .await;
        status.and_then(|s| s.code())
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // Only when a test failed before `terminate`.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lock(lines: &Mutex<Vec<String>>) -> MutexGuard<'_, Vec<String>> {
    lines
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `"addr"`-like field `field` of the first log line whose message is
/// `message`: where a process that bound port 0 listens.
pub async fn logged_address(process: &Logged, message: &str, field: &str) -> String {
    let line = process
        .wait_for_line(message, |line| line["message"] == message)
        .await;
    line[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {line}"))
        .to_string()
}

/// One scrape of a Prometheus page: series (`name{labels}`) to value.
#[derive(Debug)]
pub struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    pub async fn of(addr: &str) -> Scrape {
        let (status, body) = crate::http::request(addr, "GET", "/metrics", None).await;
        assert_eq!(status, 200, "{body}");
        Scrape(
            body.lines()
                .filter(|line| !line.starts_with('#'))
                .filter_map(|line| {
                    let (series, value) = line.rsplit_once(' ')?;
                    Some((series.to_string(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// The sum over the series of `name` whose labels include `labels`
    /// (`[("reason", "nack")]`); `None` when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let values: Vec<f64> = self
            .0
            .iter()
            .filter(|(series, _)| {
                let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
                series_name == name
                    && labels
                        .iter()
                        .all(|(key, value)| rest.contains(&format!("{key}=\"{value}\"")))
            })
            .map(|(_, value)| *value)
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// Like [`Scrape::sum`], failing with the page when the metric is missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in {:#?}", self.0))
    }
}

/// Waits until `name` (summed over series with `labels`) satisfies `holds`.
pub async fn wait_for_metric(
    addr: &str,
    name: &str,
    labels: &[(&str, &str)],
    holds: impl Fn(f64) -> bool,
) {
    let what = format!("{name} {labels:?} moves");
    wait_until(&what, || async {
        Scrape::of(addr).await.sum(name, labels).is_some_and(&holds)
    })
    .await;
}

/// The metric names starting with `prefix` (`outbox_`, `dispatch_`) in
/// `text`; histogram series (`_bucket`, `_sum`, `_count`) by their base name.
pub fn metric_names(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        let preceded = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        // `outbox_consumer=debug` is a log target in a filter, not a metric.
        let log_target = tail[end..].starts_with('=') || tail[end..].starts_with("::");
        if !preceded && !log_target {
            let name = &tail[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(base.to_string());
        }
        rest = &tail[end.max(1)..];
    }
    names
}

/// The metrics docs/operations.md § "Metrics, health and logs" documents.
pub fn documented_metrics(prefix: &str) -> BTreeSet<String> {
    let guide = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md");
    let text = std::fs::read_to_string(guide).expect("read docs/operations.md");
    let start = text
        .find("## Metrics, health and logs")
        .expect("docs/operations.md has a metrics section");
    let section = &text[start..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    metric_names(&section[..end], prefix)
}

impl Scrape {
    /// Whether `name` is on the page (a histogram by its `_count`).
    pub fn has(&self, name: &str) -> bool {
        self.sum(name, &[]).is_some() || self.sum(&format!("{name}_count"), &[]).is_some()
    }
}
