//! Connecting to RabbitMQ. A URL setting may list the nodes of one cluster,
//! comma-separated: a connection goes to the first node that answers, and
//! a reconnect tries them all again, so losing the node in use costs one
//! reconnect. Every connect is bounded (lapin can hang on a rejected
//! `connection.open`, and on a black-holed network that accepts the TCP
//! connection and answers nothing) and no error echoes a password. A
//! connection asks for [`DEFAULT_HEARTBEAT_SECS`] heartbeats unless its URL
//! sets `heartbeat=`: lapin closes a connection that heard nothing from the
//! broker for two intervals, so a silent broker is found even when idle
//! (the server's default, 60 s, would take two minutes).

use std::path::Path;
use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};

use crate::secrets::{redact, scrub};

/// The local broker with RabbitMQ's stock guest login: every service's
/// default.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The heartbeat interval asked for when a URL does not set `heartbeat=`.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Why no node could be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read AMQP CA file {path}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid AMQP URL {0}")]
    Url(String),
    /// Every node refused or timed out; one line per node, redacted.
    #[error("cannot connect to RabbitMQ at {0}")]
    Unreachable(String),
}

/// The URLs of a (possibly comma-separated) setting, trimmed.
pub(crate) fn nodes(urls: &str) -> impl Iterator<Item = &str> {
    urls.split(',').map(str::trim).filter(|url| !url.is_empty())
}

/// Fails on a setting with no URL or one lapin cannot parse, without
/// echoing a password.
pub fn check_urls(urls: &str) -> Result<(), ConnectError> {
    if nodes(urls).next().is_none() {
        return Err(ConnectError::Url("(empty)".into()));
    }
    for url in nodes(urls) {
        if let Err(error) = url.parse::<lapin::uri::AMQPUri>() {
            return Err(ConnectError::Url(format!(
                "{}: {}",
                redact(url),
                scrub(&error, url)
            )));
        }
    }
    Ok(())
}

/// Connects to the first node of `urls` that answers, naming the
/// connection `name` (the broker's management UI shows it).
pub async fn connect(
    urls: &str,
    ca_file: Option<&Path>,
    name: &str,
) -> Result<Connection, ConnectError> {
    let cert_chain = ca_file
        .map(|path| {
            std::fs::read_to_string(path).map_err(|source| ConnectError::CaFile {
                path: path.display().to_string(),
                source,
            })
        })
        .transpose()?;
    let mut failures = Vec::new();
    for url in nodes(urls) {
        let uri = match url.parse::<AMQPUri>() {
            Ok(mut uri) => {
                uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
                uri
            }
            Err(error) => {
                failures.push(format!("{}: {}", redact(url), scrub(&error, url)));
                continue;
            }
        };
        let why = match DefaultConnectionBuilder::new() {
            Ok(builder) => {
                let builder = builder
                    .with_uri(uri)
                    .with_properties(
                        ConnectionProperties::default().with_connection_name(name.into()),
                    )
                    .with_tls_config(OwnedTLSConfig {
                        identity: None,
                        cert_chain: cert_chain.clone(),
                    });
                match tokio::time::timeout(CONNECT_TIMEOUT, builder.connect()).await {
                    Ok(Ok(connection)) => return Ok(connection),
                    // lapin's error quotes a URL it cannot parse whole.
                    Ok(Err(error)) => scrub(&error.to_string(), url),
                    Err(_) => "timed out".to_string(),
                }
            }
            Err(error) => error.to_string(),
        };
        failures.push(format!("{}: {why}", redact(url)));
    }
    if failures.is_empty() {
        return Err(ConnectError::Url("(empty)".into()));
    }
    Err(ConnectError::Unreachable(failures.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_nodes_is_checked_node_by_node() {
        assert!(check_urls("amqp://guest:guest@127.0.0.1:5681").is_ok());
        assert!(check_urls("amqp://a:b@h1:5681, amqp://a:b@h2:5682,").is_ok());
        assert!(check_urls(" , ").is_err());
        let error = check_urls("amqp://a:s3cret@h1:5681,nope://a:s3cret@h2")
            .expect_err("a bad second URL")
            .to_string();
        assert!(error.contains("invalid AMQP URL"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn bad_amqp_urls_are_refused_without_their_password() {
        for url in [
            "amqp://guest:S3/cret@host/%2f",
            "amqp:guest:S3cret@host",
            "amqp://guest:S3cret@host:port/",
            "amqps://guest:S3?cret@host:99999/",
            "http://guest:S3cret@host/",
        ] {
            let error = check_urls(url).expect_err(url).to_string();
            assert!(error.starts_with("invalid AMQP URL"), "{error}");
            assert!(!error.contains("cret"), "{url}: {error}");
        }
        assert!(check_urls("amqps://guest:S3%2Fcret@host:5671/%2f").is_ok());
    }

    #[tokio::test]
    async fn every_node_down_names_each_without_its_password() {
        // Port 1 on loopback refuses at once.
        let error = connect(
            "amqp://u:s3cret@127.0.0.1:1,amqp://u:s3cret@127.0.0.1:2",
            None,
            "t",
        )
        .await
        .expect_err("nothing listens")
        .to_string();
        assert!(
            error.contains("127.0.0.1:1") && error.contains("127.0.0.1:2"),
            "{error}"
        );
        assert!(!error.contains("s3cret"), "{error}");
    }
}
