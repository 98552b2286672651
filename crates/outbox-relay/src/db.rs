//! Connecting to PostgreSQL: URL parsing with errors that never echo the
//! password, and connection settings a long-lived relay needs.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use tokio_postgres::{Client, Config, NoTls};

/// Parses a PostgreSQL URL or key=value string, adding a connect timeout
/// and TCP keepalives when the URL does not set them.
pub fn parse_url(url: &str) -> anyhow::Result<Config> {
    let mut config = Config::from_str(url)
        .map_err(|e| anyhow::anyhow!("invalid PostgreSQL URL {}: {e}", redact(url)))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    if config.get_application_name().is_none() {
        config.application_name("outbox-relay");
    }
    Ok(config)
}

/// Opens one connection and drives it on a background task.
pub async fn connect(config: &Config) -> anyhow::Result<Client> {
    let target = describe(config);
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| anyhow::anyhow!(outbox::error_line(&e)))
        .with_context(|| format!("cannot connect to PostgreSQL at {target}"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %error, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// `user@host:port/dbname`, never the password.
pub fn describe(config: &Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        config.get_user().unwrap_or("?"),
        config.get_dbname().unwrap_or("?")
    )
}

/// Replaces the password of a URL (`scheme://user:secret@host`) by `***`.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // key=value form: hide password=...
        return url
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end + 3],
                &rest[..colon],
                &rest[at..]
            ),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_url_password() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/orders"),
            "postgres://app:***@db:5432/orders"
        );
        assert_eq!(redact("amqp://guest@host/%2f"), "amqp://guest@host/%2f");
        assert_eq!(
            redact("host=db password=s3cret user=app"),
            "host=db password=*** user=app"
        );
    }

    #[test]
    fn bad_url_error_does_not_echo_password() {
        let error = parse_url("postgres://app:s3cret@db:notaport/orders").expect_err("bad port");
        let text = format!("{error:#}");
        assert!(text.contains("invalid PostgreSQL URL"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
