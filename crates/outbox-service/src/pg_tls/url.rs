//! Taking `sslmode` out of a PostgreSQL connection string (URL or
//! key=value form) before tokio-postgres, which rejects `verify-ca` and
//! `verify-full`, parses the rest.

use std::borrow::Cow;
use std::str::FromStr;

use tokio_postgres::Config;

use super::{PgTlsError, SslMode};

/// Parses a PostgreSQL URL or key=value string; returns the tokio-postgres
/// `Config` (with sslmode mapped to `Disable`/`Prefer`/`Require`) and our
/// [`SslMode`]. Without `sslmode` the mode is `Prefer`, as in libpq.
///
/// # Errors
///
/// [`PgTlsError::UnknownSslMode`] or [`PgTlsError::InvalidUrl`].
pub(crate) fn parse(url: &str) -> Result<(Config, SslMode), PgTlsError> {
    let (rest, value) = match url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    {
        Some(after_scheme) => take_sslmode_from_url(url, url.len() - after_scheme.len()),
        None => take_sslmode_from_keywords(url),
    };
    let mode = value.map_or(Ok(SslMode::Prefer), |v| v.parse())?;
    let mut config = Config::from_str(&rest).map_err(|e| {
        // The cause alone ("invalid value for option `port`"): tokio-postgres'
        // causes name options, byte offsets or one character, never a value,
        // so unlike the whole string they cannot leak the password.
        let reason =
            std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
        PgTlsError::InvalidUrl(reason)
    })?;
    config.ssl_mode(mode.negotiation());
    Ok((config, mode))
}

/// Removes `sslmode` from the query of a `postgres://` URL; `authority` is
/// where the part after the scheme starts. Returns the rest and the last value.
fn take_sslmode_from_url(url: &str, authority: usize) -> (String, Option<String>) {
    // Like tokio-postgres, everything up to the first `@` is credentials, so a
    // `?` in an unencoded password does not start the query.
    let host = url[authority..]
        .find('@')
        .map_or(authority, |at| authority + at + 1);
    let Some(query) = url[host..].find('?').map(|q| host + q) else {
        return (url.to_owned(), None);
    };
    let mut mode = None;
    let kept: Vec<&str> = url[query + 1..]
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((key, value)) if decode(key) == "sslmode" => {
                mode = Some(decode(value).into_owned());
                false
            }
            _ => true,
        })
        .collect();
    let mut rest = url[..query].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    (rest, mode)
}

/// Percent-decodes a query key or value, as tokio-postgres does.
fn decode(s: &str) -> Cow<'_, str> {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy()
}

/// Removes `sslmode = value` pairs from a key=value string, tokenizing as
/// tokio-postgres does (spaces around `=`, single quotes, backslash escapes).
/// At a syntax error it stops and leaves the rest for tokio-postgres to report.
fn take_sslmode_from_keywords(s: &str) -> (String, Option<String>) {
    let mut cursor = Cursor { s, at: 0 };
    let mut rest = String::with_capacity(s.len());
    let mut copied = 0;
    let mut mode = None;
    loop {
        cursor.skip_ws();
        let start = cursor.at;
        let key = cursor.take_while(|c| !c.is_whitespace() && c != '=');
        if key.is_empty() {
            break;
        }
        cursor.skip_ws();
        if !cursor.eat('=') {
            break;
        }
        cursor.skip_ws();
        let Some(value) = cursor.value() else { break };
        if key == "sslmode" {
            rest.push_str(&s[copied..start]);
            copied = cursor.at;
            mode = Some(value);
        }
    }
    rest.push_str(&s[copied..]);
    (rest, mode)
}

/// A position in a key=value string.
struct Cursor<'a> {
    s: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<char> {
        self.s[self.at..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, target: char) -> bool {
        let found = self.peek() == Some(target);
        if found {
            self.at += target.len_utf8();
        }
        found
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let start = self.at;
        while self.peek().is_some_and(&f) {
            self.bump();
        }
        &self.s[start..self.at]
    }

    fn skip_ws(&mut self) {
        self.take_while(char::is_whitespace);
    }

    /// A quoted or bare value with escapes resolved; `None` on a syntax error.
    fn value(&mut self) -> Option<String> {
        let quoted = self.eat('\'');
        let mut value = String::new();
        loop {
            match self.peek() {
                Some('\'') if quoted => {
                    self.bump();
                    return Some(value);
                }
                Some(c) if !quoted && c.is_whitespace() => break,
                None if quoted => return None,
                None => break,
                Some(_) => {
                    let c = self.bump()?;
                    let c = if c == '\\' { self.bump() } else { Some(c) };
                    value.extend(c);
                }
            }
        }
        (!value.is_empty()).then_some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::Host;

    fn parse_ok(url: &str) -> (Config, SslMode) {
        match parse(url) {
            Ok(parsed) => parsed,
            Err(e) => panic!("{url}: {e}"),
        }
    }

    #[test]
    fn url_with_verify_full() {
        let (config, mode) =
            parse_ok("postgres://relay:s3cret@db.example.com:6432/shop?sslmode=verify-full");
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(config.get_hosts(), [Host::Tcp("db.example.com".into())]);
        assert_eq!(config.get_ports(), [6432]);
        assert_eq!(config.get_dbname(), Some("shop"));
        assert_eq!(config.get_user(), Some("relay"));
        assert_eq!(config.get_password(), Some(&b"s3cret"[..]));
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn url_keeps_other_parameters() {
        let (config, mode) = parse_ok(
            "postgresql://u@h/db?application_name=relay&sslmode=verify-ca&connect_timeout=7",
        );
        assert_eq!(mode, SslMode::VerifyCa);
        assert_eq!(config.get_application_name(), Some("relay"));
        assert_eq!(
            config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(7))
        );
    }

    #[test]
    fn question_mark_in_password_is_not_the_query() {
        let (config, mode) = parse_ok("postgres://u:pa?ss@h/db?sslmode=disable");
        assert_eq!(mode, SslMode::Disable);
        assert_eq!(config.get_password(), Some(&b"pa?ss"[..]));
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
    }

    #[test]
    fn default_is_prefer() {
        let (config, mode) = parse_ok("postgres://u@h/db");
        assert_eq!(mode, SslMode::Prefer);
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
        assert_eq!(parse_ok("host=h user=u").1, SslMode::Prefer);
    }

    #[test]
    fn keyword_form() {
        let (config, mode) = parse_ok(
            "host=db.example.com port=5433 sslmode = 'verify-full' dbname=shop user=relay password='a b\\'c'",
        );
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(config.get_hosts(), [Host::Tcp("db.example.com".into())]);
        assert_eq!(config.get_ports(), [5433]);
        assert_eq!(config.get_dbname(), Some("shop"));
        assert_eq!(config.get_user(), Some("relay"));
        assert_eq!(config.get_password(), Some(&b"a b'c"[..]));
    }

    #[test]
    fn last_sslmode_wins() {
        assert_eq!(
            parse_ok("sslmode=disable host=h sslmode=verify-ca").1,
            SslMode::VerifyCa
        );
        assert_eq!(
            parse_ok("postgres://h/?sslmode=disable&sslmode=require").1,
            SslMode::Require
        );
    }

    #[test]
    fn unknown_sslmode_is_named() {
        for url in [
            "postgres://u:pw@h/db?sslmode=bogus",
            "host=h sslmode=bogus password=pw",
        ] {
            let message = parse(url).map(|_| ()).err().map(|e| e.to_string());
            let message = message.unwrap_or_default();
            assert!(message.contains("`bogus`"), "{message}");
            assert!(!message.contains("pw"), "{message}");
        }
    }

    #[test]
    fn bad_port_does_not_echo_the_password() {
        for url in [
            "postgres://relay:hunter2@db:54x2/shop?sslmode=require",
            "host=db port=hunter2 password=hunter2",
        ] {
            let message = parse(url).map(|_| ()).err().map(|e| e.to_string());
            let message = message.unwrap_or_default();
            assert!(message.starts_with("invalid PostgreSQL URL: "), "{message}");
            assert!(message.contains("port"), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }

    #[test]
    fn syntax_error_after_sslmode_is_still_reported() {
        let message = parse("sslmode=verify-full host='unterminated")
            .map(|_| ())
            .err()
            .map(|e| e.to_string());
        assert!(message.unwrap_or_default().contains("unterminated"));
    }
}
