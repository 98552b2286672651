//! The documentation's links: every relative link in README.md,
//! docs/**/*.md, crates/*/README.md and examples/**/README.md names a file
//! that exists, every `#anchor` a heading of its target (GitHub's slugs),
//! and every guide under docs/ is reachable from the README. No database,
//! no broker: a moved section or a renamed heading fails here, in CI.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

/// One link as written: where it is and what it points at.
struct Link {
    line: usize,
    target: String,
}

/// A markdown file, read once: its links and the anchors its headings make.
struct Page {
    links: Vec<Link>,
    anchors: BTreeSet<String>,
}

#[test]
fn every_relative_link_and_anchor_in_the_docs_resolves() {
    // GitHub's slugs, as the checks below rely on them.
    let mut seen = BTreeMap::new();
    assert_eq!(
        slug("Metrics, health and logs", &mut seen),
        "metrics-health-and-logs"
    );
    assert_eq!(
        slug("Metrics, health and logs", &mut seen),
        "metrics-health-and-logs-1"
    );
    assert_eq!(
        slug("The consumer: `outbox-consumer` and `dispatch`", &mut seen),
        "the-consumer-outbox-consumer-and-dispatch"
    );
    assert_eq!(
        slug("Changing the queue's arguments", &mut seen),
        "changing-the-queues-arguments"
    );
    assert_eq!(slug("4. Consume", &mut seen), "4-consume");
    assert_eq!(
        slug("outbox_key_pipeline Ünïcode", &mut seen),
        "outbox_key_pipeline-ünïcode"
    );

    let root = std::fs::canonicalize(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .expect("the repository root");
    let files = documentation(&root);
    for expected in [
        "README.md",
        "docs/benchmarks.md",
        "crates/dispatch/README.md",
    ] {
        assert!(
            files.contains(&root.join(expected)),
            "{expected} is not among the files checked"
        );
    }
    let pages: BTreeMap<PathBuf, Page> = files
        .iter()
        .map(|file| {
            let text = std::fs::read_to_string(file)
                .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
            (file.clone(), parse(&text))
        })
        .collect();

    let mut broken = Vec::new();
    // Markdown files linked from each page, for the reachability check.
    let mut edges: BTreeMap<&Path, Vec<PathBuf>> = BTreeMap::new();
    for (file, page) in &pages {
        let shown = file.strip_prefix(&root).unwrap_or(file).display();
        let dir = file.parent().expect("a file has a directory");
        for link in &page.links {
            let mut complain = |why: String| {
                broken.push(format!("{shown}:{}: ({}) {why}", link.line, link.target));
            };
            let (path, anchor) = match link.target.split_once('#') {
                Some((path, anchor)) => (path, Some(percent_decoded(anchor))),
                None => (link.target.as_str(), None),
            };
            let path = path.split('?').next().unwrap_or_default();
            let target = if path.is_empty() {
                file.clone()
            } else if let Some(from_root) = path.strip_prefix('/') {
                normalized(&root.join(percent_decoded(from_root)))
            } else {
                normalized(&dir.join(percent_decoded(path)))
            };
            if !target.exists() {
                complain("no such file".to_string());
                continue;
            }
            let markdown = target.extension().is_some_and(|e| e == "md");
            if markdown {
                edges.entry(file).or_default().push(target.clone());
            }
            let Some(anchor) = anchor else { continue };
            if !markdown {
                // `#L10` on source files and the like: not headings.
                continue;
            }
            let anchors = match pages.get(&target) {
                Some(page) => page.anchors.clone(),
                None => match std::fs::read_to_string(&target) {
                    Ok(text) => parse(&text).anchors,
                    Err(e) => {
                        complain(format!("cannot read the target: {e}"));
                        continue;
                    }
                },
            };
            if !anchors.contains(&anchor) {
                complain(format!("no heading makes #{anchor}"));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{} broken link(s) in the documentation:\n{}",
        broken.len(),
        broken.join("\n")
    );

    // Every guide is reachable from the README.
    let readme = root.join("README.md");
    let mut reached = BTreeSet::from([readme.clone()]);
    let mut todo = vec![readme];
    while let Some(file) = todo.pop() {
        for next in edges.get(file.as_path()).into_iter().flatten() {
            if reached.insert(next.clone()) {
                todo.push(next.clone());
            }
        }
    }
    let unreachable: Vec<_> = files
        .iter()
        .filter(|file| file.starts_with(root.join("docs")) && !reached.contains(*file))
        .map(|file| {
            file.strip_prefix(&root)
                .unwrap_or(file)
                .display()
                .to_string()
        })
        .collect();
    assert!(
        unreachable.is_empty(),
        "guides no link from README.md leads to: {unreachable:?}"
    );
}

/// The files checked: README.md, docs/**/*.md, crates/*/README.md and
/// examples/**/README.md (not inside hidden or dependency directories).
fn documentation(root: &Path) -> BTreeSet<PathBuf> {
    let mut files = BTreeSet::from([root.join("README.md")]);
    walk(&root.join("docs"), &mut |path| {
        if path.extension().is_some_and(|e| e == "md") {
            files.insert(path.to_path_buf());
        }
    });
    let crates = std::fs::read_dir(root.join("crates")).expect("read crates/");
    for entry in crates {
        let readme = entry.expect("a crates/ entry").path().join("README.md");
        if readme.is_file() {
            files.insert(readme);
        }
    }
    walk(&root.join("examples"), &mut |path| {
        if path.file_name().is_some_and(|n| n == "README.md") {
            files.insert(path.to_path_buf());
        }
    });
    files
}

/// Calls `found` for every file under `dir`, skipping hidden directories
/// (`.venv`) and installed dependencies.
fn walk(dir: &Path, found: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            let skipped = name.starts_with('.')
                || ["node_modules", "target", "build", "__pycache__"].contains(&name.as_ref());
            if !skipped {
                walk(&path, found);
            }
        } else {
            found(&path);
        }
    }
}

/// `a/./b/../c` as `a/c`, without touching the file system.
fn normalized(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// `%20` and the like decoded; anything malformed is left as it is.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The links and anchors of a markdown text. Fenced code blocks and inline
/// code spans hold neither links nor headings.
fn parse(text: &str) -> Page {
    // Headings keep their code spans (`## The \`x\` flag` makes
    // `the-x-flag`); links are looked for where no code is.
    let unfenced = without_fences(text);
    let prose = without_code_spans(&unfenced);
    let mut anchors = BTreeSet::new();
    let mut seen = BTreeMap::new();
    let mut links = Vec::new();
    for (index, (full, line)) in unfenced.lines().zip(prose.lines()).enumerate() {
        let line_number = index + 1;
        if let Some(heading) = heading(full) {
            anchors.insert(slug(&heading, &mut seen));
        }
        // Explicit HTML anchors: <a name="x"> or id="x".
        for attribute in ["name=\"", "id=\""] {
            let mut rest = line;
            while let Some(at) = rest.find(attribute) {
                rest = &rest[at + attribute.len()..];
                if let Some(end) = rest.find('"') {
                    anchors.insert(rest[..end].to_string());
                }
            }
        }
        // Reference definitions: `[label]: target`.
        let trimmed = line.trim_start();
        if trimmed.starts_with('[')
            && let Some(close) = trimmed.find("]:")
            && !trimmed[..close].contains("](")
        {
            let target = trimmed[close + 2..].split_whitespace().next().unwrap_or("");
            push_link(&mut links, line_number, target);
        }
        // Inline links and images: `[text](target)`, `![alt](target)`.
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let mut depth = 0usize;
            let end = rest
                .char_indices()
                .find(|&(_, c)| match c {
                    '(' => {
                        depth += 1;
                        false
                    }
                    ')' if depth == 0 => true,
                    ')' => {
                        depth -= 1;
                        false
                    }
                    _ => false,
                })
                .map_or(rest.len(), |(i, _)| i);
            let inside = rest[..end].trim();
            // `<target with spaces>`, or `target "title"`.
            let target = match inside.strip_prefix('<') {
                Some(bracketed) => bracketed.split('>').next().unwrap_or(""),
                None => inside.split_whitespace().next().unwrap_or(""),
            };
            push_link(&mut links, line_number, target);
            rest = &rest[end..];
        }
    }
    Page { links, anchors }
}

/// Keeps a link to check: relative targets only (no scheme, not empty).
fn push_link(links: &mut Vec<Link>, line: usize, target: &str) {
    let external = target.contains("://") || target.starts_with("mailto:");
    if !target.is_empty() && !external {
        links.push(Link {
            line,
            target: target.to_string(),
        });
    }
}

/// `text` with fenced code blocks blanked out (their lines kept empty, so
/// line numbers hold).
fn without_fences(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // The fence that opened the current block: its character and length.
    let mut fence: Option<(char, usize)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let run = marker.map_or(0, |m| trimmed.chars().take_while(|c| *c == m).count());
        match (fence, marker) {
            (None, Some(m)) if run >= 3 => fence = Some((m, run)),
            (Some((m, n)), Some(c))
                if c == m && run >= n && trimmed[run * c.len_utf8()..].trim().is_empty() =>
            {
                fence = None;
            }
            (None, _) => out.push_str(line),
            (Some(_), _) => {}
        }
        out.push('\n');
    }
    out
}

/// Inline code spans (a run of backticks up to the next run of the same
/// length) replaced by spaces, newlines kept.
fn without_code_spans(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|c| **c == '`').count();
        let mut close = None;
        let mut j = i + run;
        while j < chars.len() {
            if chars[j] == '`' {
                let other = chars[j..].iter().take_while(|c| **c == '`').count();
                if other == run {
                    close = Some(j);
                    break;
                }
                j += other;
            } else {
                j += 1;
            }
        }
        match close {
            Some(j) => {
                for c in &chars[i..j + run] {
                    out.push(if *c == '\n' { '\n' } else { ' ' });
                }
                i = j + run;
            }
            None => {
                for c in &chars[i..i + run] {
                    out.push(*c);
                }
                i += run;
            }
        }
    }
    out
}

/// The text of an ATX heading (`## Text ##`), as GitHub renders it:
/// inline code and emphasis markers dropped, links by their text.
fn heading(line: &str) -> Option<String> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let line = line.trim_start_matches(' ');
    let level = line.chars().take_while(|c| *c == '#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let rest = &line[level..];
    if !(rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t')) {
        return None;
    }
    let text = rest.trim().trim_end_matches('#').trim_end();
    // `[text](target)` renders as `text`.
    let mut plain = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        plain.push_str(&rest[..at]);
        rest = &rest[at + 2..];
        rest = rest.find(')').map_or("", |end| &rest[end + 1..]);
    }
    plain.push_str(rest);
    Some(plain)
}

/// GitHub's anchor for a heading (github-slugger): lowercase; drop every
/// character but letters, digits, `-`, `_` and spaces; spaces become `-`;
/// a repeated slug gets `-1`, `-2`… in the order the headings come.
fn slug(heading: &str, seen: &mut BTreeMap<String, usize>) -> String {
    let base: String = heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect();
    let mut result = base.clone();
    while seen.contains_key(&result) {
        // The base's count moves, as in github-slugger.
        let n = seen.entry(base.clone()).or_insert(0);
        *n += 1;
        result = format!("{base}-{n}");
    }
    seen.insert(result.clone(), 0);
    result
}
