//! The console's one rule: reading is open, changing needs the token. A
//! request without `Authorization` gets 401, a wrong token or a console
//! without one 403.

use axum::http::{HeaderMap, StatusCode, header};

use crate::Actor;
use crate::audit::Via;

/// The secret and the name it writes in the audit trail.
pub struct Token {
    name: String,
    secret: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// Who holds it, in the audit trail.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A guessable token would make the console writable by anyone who can reach it.
const MIN_LEN: usize = 16;

impl Token {
    pub fn new(name: &str, secret: &str) -> anyhow::Result<Token> {
        if secret.trim().chars().count() < MIN_LEN {
            anyhow::bail!("OUTBOX_CONSOLE_TOKEN must be at least {MIN_LEN} characters");
        }
        if name.trim().is_empty() {
            anyhow::bail!("OUTBOX_CONSOLE_TOKEN_NAME must not be empty");
        }
        // A secret read from a file often ends in a newline; the header's
        // value is trimmed as well.
        Ok(Token {
            name: name.trim().to_string(),
            secret: secret.trim().to_string(),
        })
    }
}

/// Why a change is refused: a status and one line.
pub type Refusal = (StatusCode, String);

/// Named tokens, one per line as `name:secret` (blank lines and `#`
/// comments skipped), from `OUTBOX_CONSOLE_TOKENS_FILE`: one per person,
/// so the audit trail tells them apart. An error names the line, never
/// the secret.
pub fn parse_tokens(text: &str) -> anyhow::Result<Vec<Token>> {
    let mut tokens: Vec<Token> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let number = index + 1;
        let Some((name, secret)) = line.split_once(':') else {
            anyhow::bail!("OUTBOX_CONSOLE_TOKENS_FILE line {number}: not `name:secret`");
        };
        let token = Token::new(name, secret)
            .map_err(|e| anyhow::anyhow!("OUTBOX_CONSOLE_TOKENS_FILE line {number}: {e}"))?;
        if tokens.iter().any(|t| t.name == token.name) {
            anyhow::bail!(
                "OUTBOX_CONSOLE_TOKENS_FILE line {number}: the name `{}` is taken",
                token.name
            );
        }
        if tokens.iter().any(|t| t.secret == token.secret) {
            anyhow::bail!(
                "OUTBOX_CONSOLE_TOKENS_FILE line {number}: the same secret as an earlier line"
            );
        }
        tokens.push(token);
    }
    Ok(tokens)
}

/// Who makes this change, or why they may not.
pub fn actor(tokens: &[Token], headers: &HeaderMap) -> Result<Actor, Refusal> {
    if tokens.is_empty() {
        return Err((
            StatusCode::FORBIDDEN,
            "the console is read-only: start it with OUTBOX_CONSOLE_TOKEN (or a tokens file) set \
             to allow changes"
                .into(),
        ));
    }
    let Some(given) = headers.get(header::AUTHORIZATION) else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "a change needs the header `Authorization: Bearer <OUTBOX_CONSOLE_TOKEN>`".into(),
        ));
    };
    // The scheme's name is case-insensitive (RFC 9110).
    let given = given
        .to_str()
        .ok()
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token);
    // Every token is compared, so the time taken does not tell which
    // matched, nor how far.
    let matched = tokens.iter().fold(None, |found, token| {
        if same(given.trim().as_bytes(), token.secret.as_bytes()) {
            Some(token)
        } else {
            found
        }
    });
    let Some(token) = matched else {
        return Err((StatusCode::FORBIDDEN, "wrong token".into()));
    };
    let via = match headers.get("x-outbox-via").and_then(|v| v.to_str().ok()) {
        Some("console") => Via::Console,
        _ => Via::Api,
    };
    Ok(Actor {
        name: token.name.clone(),
        via,
    })
}

/// Compares in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(authorization: Option<&'static str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = authorization {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn changes_need_the_token() {
        let token = [Token::new("alice", "0123456789abcdef").expect("a token")];
        let status = |t: &[Token], h| actor(t, &headers(h)).map_err(|(status, _)| status);
        let forbidden = Err(StatusCode::FORBIDDEN);
        assert_eq!(status(&[], Some("Bearer 0123456789abcdef")), forbidden);
        assert_eq!(status(&token, None), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(status(&token, Some("Bearer 0123456789abcdeX")), forbidden);
        assert_eq!(status(&token, Some("0123456789abcdef")), forbidden);
        assert!(actor(&token, &headers(Some("bearer 0123456789abcdef"))).is_ok());
        let who = actor(&token, &headers(Some("Bearer 0123456789abcdef")));
        assert_eq!(
            who.map(|a| (a.name, a.via)),
            Ok(("alice".to_string(), Via::Api))
        );
        assert!(Token::new("alice", "short").is_err());
    }

    #[test]
    fn a_tokens_file_names_each_holder() {
        let tokens = parse_tokens("# ops\nalice:0123456789abcdef\n\n bob : fedcba9876543210 \n")
            .expect("two tokens");
        let who = |value: &'static str| actor(&tokens, &headers(Some(value))).map(|a| a.name);
        assert_eq!(who("Bearer 0123456789abcdef"), Ok("alice".to_string()));
        assert_eq!(who("Bearer fedcba9876543210"), Ok("bob".to_string()));
        let error = |text: &str| {
            parse_tokens(text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(error("alice").contains("line 1: not `name:secret`"));
        assert!(error("alice:short").contains("line 1: OUTBOX_CONSOLE_TOKEN must be at least 16"));
        let twice = "a:0123456789abcdef\na:fedcba9876543210";
        assert!(error(twice).contains("line 2: the name `a` is taken"));
        let shared = "a:0123456789abcdef\nb:0123456789abcdef";
        assert!(error(shared).contains("line 2: the same secret"));
        assert!(!error(shared).contains("0123456789abcdef"));
    }
}

/// Whether a request's `Host` names this machine. A console bound to
/// loopback answers only such requests: a web page elsewhere could
/// otherwise point its own name at 127.0.0.1 (DNS rebinding) and read the
/// outbox through the operator's browser.
pub fn local_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod host_tests {
    use super::*;
    use axum::http::HeaderValue;

    fn host(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn only_this_machine_names_are_local() {
        for ok in [
            "127.0.0.1:8089",
            "localhost:8089",
            "LOCALHOST",
            "[::1]:8089",
            "127.0.0.2",
        ] {
            assert!(local_host(&host(ok)), "{ok}");
        }
        for refused in [
            "attacker.example",
            "attacker.example:8089",
            "10.0.0.1:8089",
            "localhost.attacker.example",
        ] {
            assert!(!local_host(&host(refused)), "{refused}");
        }
        assert!(!local_host(&HeaderMap::new()));
    }
}
