//! Progress bars on stderr for anything longer than a few seconds. They draw
//! only on a terminal, so piped output and `--json` stay clean.

use indicatif::{ProgressBar, ProgressStyle};

const TEMPLATE: &str = "{prefix:>24} [{bar:30}] {pos}/{len} {msg}";

/// A bar of `len` steps (seconds, messages…) labelled `prefix`.
pub fn bar(len: u64, prefix: impl Into<String>) -> ProgressBar {
    let bar = ProgressBar::new(len);
    // The template is a constant; were it ever invalid, a plain bar will do.
    let style = ProgressStyle::with_template(TEMPLATE)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(prefix.into());
    bar
}
