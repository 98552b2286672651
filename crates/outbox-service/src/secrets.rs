//! Keeping passwords out of errors and log lines.
//!
//! [`redact`] masks every password a setting value may hold, whatever its
//! form: URLs (`scheme://user:pass@host`, the password unescaped with `/`,
//! `@`, `:`, `?` or `#` in it, or percent-escaped), `password=` in a URL's
//! query (PostgreSQL takes `?password=…`), libpq key=value strings
//! (`password=s3cret`, `password = 'a b'`), several URLs separated by commas
//! (`amqp://a:p@h1,amqp://a:p@h2`) and PostgreSQL's multi-host URLs
//! (`postgres://u:p@h1:5432,h2:5432/db`). When the form is ambiguous it
//! masks too much rather than too little.
//!
//! [`scrub`] cleans a library's error message about a URL: some quote their
//! input whole (amq-protocol's "Invalid URL: '…'"), so every password of
//! that URL, raw or percent-decoded, is masked in the message.

use std::ops::Range;

use percent_encoding::percent_decode_str;

const MASK: &str = "***";

/// `text` with each password it may hold replaced by `***`.
pub(crate) fn redact(text: &str) -> String {
    let mut spans = secret_spans(text);
    spans.sort_by_key(|span| span.start);
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for span in spans {
        if span.end <= copied {
            continue;
        }
        let start = span.start.max(copied);
        out.push_str(&text[copied..start]);
        out.push_str(MASK);
        copied = span.end;
    }
    out.push_str(&text[copied..]);
    out
}

/// `message`, an error about `url`, with every password of `url` (as
/// written and percent-decoded) replaced by `***`.
pub(crate) fn scrub(message: &str, url: &str) -> String {
    let mut secrets: Vec<String> = Vec::new();
    for span in secret_spans(url) {
        let raw = &url[span];
        secrets.push(raw.to_owned());
        secrets.push(percent_decode_str(raw).decode_utf8_lossy().into_owned());
    }
    // Longest first, so a password that contains another is masked whole.
    secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
    secrets
        .iter()
        .filter(|secret| !secret.is_empty())
        .fold(message.to_owned(), |message, secret| {
            message.replace(secret.as_str(), MASK)
        })
}

/// Byte ranges of `text` that may be passwords.
fn secret_spans(text: &str) -> Vec<Range<usize>> {
    let starts = url_starts(text);
    // A key=value string whose password holds ` x://` is no URL list.
    if starts.first() != Some(&(text.len() - text.trim_start().len())) {
        return keyword_spans(text, 0, text.len());
    }
    let mut spans = Vec::new();
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(text.len());
        // `amqp://a:p@h1, amqp://…`: the separator belongs to neither URL.
        let end = start
            + text[start..end]
                .trim_end_matches([',', ' ', '\t', '\n'])
                .len();
        spans.extend(url_spans(text, start, end));
    }
    spans
}

/// Where URLs (`scheme://`) begin: at the start, or after a comma, a space
/// or a quote. A `://` inside a password (after `:` or `@`) starts none.
fn url_starts(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut starts = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("://") {
        let colon = from + found;
        let mut start = colon;
        while start > 0 && is_scheme_byte(bytes[start - 1]) {
            start -= 1;
        }
        let boundary = start == 0
            || matches!(
                bytes[start - 1],
                b',' | b' ' | b'\t' | b'\n' | b'\'' | b'"' | b'(' | b'<' | b'['
            );
        if start < colon && bytes[start].is_ascii_alphabetic() && boundary {
            starts.push(start);
        }
        from = colon + 3;
    }
    starts
}

fn is_scheme_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'-' | b'.')
}

/// The passwords of the URL in `text[start..end]`: the userinfo's, taken up
/// to the *last* `@` (an unescaped password may hold `@`, `/`, `?`, `#`),
/// and each `password=` of the query.
fn url_spans(text: &str, start: usize, end: usize) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    let Some(offset) = text[start..end].find("://") else {
        return spans;
    };
    let after = start + offset + 3;
    if let Some(at) = text[after..end].rfind('@') {
        let at = after + at;
        if let Some(colon) = text[after..at].find(':') {
            spans.push(after + colon + 1..at);
        }
    }
    // Every `?` or `&` may start a parameter: a password holding `?` sits
    // before the query proper, and masking a stray one costs nothing.
    let bytes = text.as_bytes();
    for key_start in (after..end).filter(|&i| matches!(bytes[i], b'?' | b'&')) {
        let key_start = key_start + 1;
        let Some(eq) = text[key_start..end].find(['=', '&', '?']) else {
            continue;
        };
        let eq = key_start + eq;
        if bytes[eq] != b'=' {
            continue;
        }
        let key = percent_decode_str(&text[key_start..eq]).decode_utf8_lossy();
        if is_secret_key(&key) {
            let value_end = text[eq + 1..end].find('&').map_or(end, |i| eq + 1 + i);
            spans.push(eq + 1..value_end);
        }
    }
    spans
}

/// The values of secret keys in a libpq key=value string (values may be
/// single-quoted with `\` escapes, spaces around `=` are allowed), and the
/// password of a bare `user:pass@host` word (a URL without its `//`).
fn keyword_spans(text: &str, from: usize, to: usize) -> Vec<Range<usize>> {
    let bytes = text.as_bytes();
    let skip_space = |mut i: usize| {
        while i < to && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let mut spans = Vec::new();
    let mut i = skip_space(from);
    while i < to {
        let key_start = i;
        while i < to && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' {
            i += 1;
        }
        let key = &text[key_start..i];
        i = skip_space(i);
        if i >= to || bytes[i] != b'=' {
            spans.extend(userinfo_span(text, key_start, key_start + key.len()));
            continue;
        }
        i = skip_space(i + 1);
        let value_start = i;
        if i < to && bytes[i] == b'\'' {
            i += 1;
            while i < to && bytes[i] != b'\'' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(to);
        }
        // An unquoted value, or what sticks to a quoted one (`''s3cret`).
        while i < to && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if is_secret_key(key) && value_start < i {
            spans.push(value_start..i);
        } else {
            spans.extend(userinfo_span(text, value_start, i));
        }
        i = skip_space(i);
    }
    spans
}

/// `…:secret@…` in one word: from the first `:` to the last `@`.
fn userinfo_span(text: &str, start: usize, end: usize) -> Option<Range<usize>> {
    let word = &text[start..end];
    let at = word.rfind('@')?;
    let colon = word[..at].find(':')?;
    Some(start + colon + 1..start + at)
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password") || key.contains("passwd")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each password starts with a mark found nowhere else in the forms.
    const PASSWORDS: &[&str] = &[
        "Zq9plain",
        "Zq9S3/cret",
        "Zq9p@ss@word",
        "Zq9a:b:c",
        "Zq9wh?t",
        "Zq9ha#sh",
        "Zq9pct%2Fenc%40",
        "Zq9com,ma",
        "Zq9semi;colon",
        "Zq9/",
        "Zq9://x",
    ];

    /// URL forms with `{}` where the password goes, and a part of the URL
    /// that must survive redaction.
    const URL_FORMS: &[(&str, &str)] = &[
        ("postgres://app:{}@db:5432/orders", "@db:5432/orders"),
        (
            "postgresql://app:{}@db/orders?sslmode=require",
            "sslmode=require",
        ),
        ("postgres://app:{}@h1:5432,h2:5432/db", "h2:5432/db"),
        ("amqp://guest:{}@host/%2f", "@host/%2f"),
        (
            "amqps://guest:{}@host:5671/vhost?heartbeat=10",
            "heartbeat=10",
        ),
        ("amqp://:{}@host", "@host"),
        ("amqp:guest:{}@host", "@host"),
        ("guest:{}@host", "@host"),
    ];

    /// Forms whose password may not hold `&` (the query's separator).
    const QUERY_FORMS: &[(&str, &str)] = &[
        (
            "postgres://app@db/orders?password={}",
            "postgres://app@db/orders",
        ),
        (
            "postgres://db/orders?sslmode=require&password={}",
            "sslmode=require",
        ),
        (
            "postgres://db/o?password={}&sslmode=require",
            "sslmode=require",
        ),
        ("postgres://db/o?p%61ssword={}", "postgres://db/o"),
        ("postgres://db/o?PASSWORD={}", "postgres://db/o"),
        ("postgres://db/o?sslpassword={}", "postgres://db/o"),
    ];

    /// Several URLs: the password is in each; every host must survive.
    const MULTI_FORMS: &[(&str, &str)] = &[
        ("amqp://a:{}@h1,amqp://a:{}@h2", "@h2"),
        ("amqp://a:{}@h1, amqps://b:{}@h2/%2f", "@h2/%2f"),
        ("amqp://a:{}@h1,amqp://h2", "amqp://h2"),
    ];

    fn check(form: &str, kept: &str, password: &str) {
        let text = form.replace("{}", password);
        let redacted = redact(&text);
        assert!(!redacted.contains("Zq9"), "{text} -> {redacted}");
        assert!(redacted.contains(MASK), "{text} -> {redacted}");
        assert!(redacted.contains(kept), "{text} -> {redacted}: lost {kept}");
        let error = format!("cannot parse '{text}'");
        assert!(!scrub(&error, &text).contains("Zq9"), "scrub {text}");
    }

    #[test]
    fn every_url_form_hides_every_password() {
        for password in PASSWORDS {
            for (form, kept) in URL_FORMS.iter().chain(MULTI_FORMS) {
                check(form, kept, password);
            }
            if !password.contains('&') {
                for (form, kept) in QUERY_FORMS {
                    check(form, kept, password);
                }
            }
        }
    }

    #[test]
    fn keyword_strings_hide_the_password() {
        for password in PASSWORDS {
            for form in [
                "host=db password={} user=app",
                "host=db password = {} user=app",
                "password={}",
                "host=db sslpassword={}",
            ] {
                check(form, "host=db", &format!("{password} host=db"));
                check(&format!("host=db {form}"), "host=db", password);
            }
        }
        for quoted in ["'Zq9 a b'", "'Zq9it\\'s'", "'Zq9 unterminated", "''Zq9"] {
            let text = format!("host=db password={quoted} user=app");
            let redacted = redact(&text);
            assert!(!redacted.contains("Zq9"), "{text} -> {redacted}");
            assert!(redacted.starts_with("host=db password=***"), "{redacted}");
        }
        assert_eq!(
            redact("host=db password='a b' user=app"),
            "host=db password=*** user=app"
        );
    }

    #[test]
    fn urls_without_a_password_are_unchanged() {
        for url in [
            "amqp://guest@host/%2f",
            "amqp://host:5672/%2f",
            "postgres://u@h1:5432,h2:5432/db?sslmode=require",
            "postgres://db/orders?application_name=relay",
            "host=db user=app",
            "",
        ] {
            assert_eq!(redact(url), url);
        }
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/orders"),
            "postgres://app:***@db:5432/orders"
        );
    }

    #[test]
    fn scrub_masks_decoded_passwords_too() {
        let url = "amqp://guest:S3%2Fcret@host/%2f";
        assert_eq!(
            scrub("login as guest with S3/cret failed (S3%2Fcret)", url),
            "login as guest with *** failed (***)"
        );
    }
}
