//! Connecting to PostgreSQL: URL parsing with errors that never echo the
//! password, TLS (see `pg_tls`), and the settings a long-lived relay needs
//! (connect timeout, TCP keepalives so a silently dead socket is noticed).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::pg_tls;
use crate::secrets::scrub;

/// Where and how to connect.
#[derive(Clone)]
pub struct PgTarget {
    pub config: Config,
    pub tls: MakeRustlsConnect,
    /// The `sslmode` asked for, stronger than `config`'s (see `pg_tls`).
    pub ssl_mode: pg_tls::SslMode,
}

impl PgTarget {
    /// `user@host:port/dbname`, never the password.
    pub fn describe(&self) -> String {
        describe(&self.config)
    }

    /// Names its connections in `pg_stat_activity` after the binary and
    /// its role (`dispatch`, `outbox-relay status`), unless the URL names
    /// them itself (`application_name=`): an operator reading the server's
    /// sessions, or a lock holder's name, sees who it is.
    pub fn named(mut self, name: &str) -> PgTarget {
        if self.config.get_application_name().is_none() {
            self.config.application_name(name);
        }
        self
    }
}

/// Parses a PostgreSQL URL or key=value string (`sslmode` as libpq knows
/// it), adding a connect timeout and TCP keepalives unless the URL sets
/// them, and `target_session_attrs=read-write` to a multi-host URL.
pub fn parse_url(url: &str, ca_file: Option<&Path>) -> anyhow::Result<PgTarget> {
    // pg_tls never quotes the URL; scrubbing anyway keeps it so if that changes.
    let (mut config, mode) =
        pg_tls::parse(url).map_err(|e| anyhow::anyhow!("{}", scrub(&e.to_string(), url)))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3);
    // The relay and the consumer write: of several hosts (a primary and its
    // standbys) only the primary will do, and after a failover the next
    // connection must find the new one. libpq's default, `any`, would
    // settle on a standby; an explicit setting is kept.
    if config.get_hosts().len() > 1
        && config.get_target_session_attrs() == TargetSessionAttrs::Any
        && !url.contains("target_session_attrs")
    {
        config.target_session_attrs(TargetSessionAttrs::ReadWrite);
    }
    let tls = pg_tls::connector(mode, ca_file)?;
    Ok(PgTarget {
        config,
        tls,
        ssl_mode: mode,
    })
}

/// How long opening a connection may take, handshake included: the
/// connect timeout covers only the TCP connect, and a server that accepts
/// and then says nothing (stopped, or behind a stuck proxy) would hold the
/// handshake forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens one connection and drives it on a background task.
pub async fn connect(target: &PgTarget) -> anyhow::Result<Client> {
    let connect = target.config.connect(target.tls.clone());
    let (client, connection) = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "PostgreSQL did not answer within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            )
        })
        .and_then(|connected| connected.map_err(|e| outbox::PgError(e).into()))
        .with_context(|| format!("cannot connect to PostgreSQL at {}", target.describe()))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %error, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// A connection pool with bounded waits that has proven it can connect:
/// deadpool's `build` never fails, so without the first `get` a wrong URL
/// would only surface on the first request.
pub async fn pool(target: &PgTarget, size: usize) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        target.config.clone(),
        target.tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let timeouts = Timeouts {
        wait: Some(Duration::from_secs(10)),
        create: Some(Duration::from_secs(10)),
        recycle: Some(Duration::from_secs(5)),
    };
    let pool = Pool::builder(manager)
        .max_size(size)
        .timeouts(timeouts)
        .runtime(Runtime::Tokio1)
        .build()?;
    let _proof = pool
        .get()
        .await
        .map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => anyhow::Error::new(outbox::PgError(e)),
            other => anyhow::Error::new(other),
        })
        .with_context(|| format!("cannot connect to PostgreSQL at {}", target.describe()))?;
    Ok(pool)
}

/// One line for a pool error, with the server's message when there is one.
pub fn pool_error(error: &deadpool_postgres::PoolError) -> String {
    match error {
        deadpool_postgres::PoolError::Backend(e) => outbox::error_line(e),
        other => other.to_string(),
    }
}

/// The same URL pointing at database `dbname` (URL form only: the path is
/// replaced, the query kept).
pub fn with_dbname(url: &str, dbname: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    format!("{}/{dbname}{query}", &base[..path_start])
}

/// `user@host:port/dbname`, never the password; every host of a
/// multi-host URL (`user@h1:5432,h2:5432/dbname`), since any may be the one
/// that failed.
pub fn describe(config: &Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            // One port for all hosts, or one each (tokio-postgres' rule).
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{name}:{port}")
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "localhost:5432".to_string()
    } else {
        hosts.join(",")
    };
    format!(
        "{}@{hosts}/{}",
        config.get_user().unwrap_or("?"),
        config.get_dbname().unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::redact;

    #[test]
    fn with_dbname_replaces_only_the_path() {
        assert_eq!(
            with_dbname("postgres://u:p@h:5432/postgres?sslmode=require", "orders"),
            "postgres://u:p@h:5432/orders?sslmode=require"
        );
        assert_eq!(with_dbname("postgres://h", "d"), "postgres://h/d");
    }

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
    fn multi_host_urls_keep_every_host_and_read_write() {
        use TargetSessionAttrs::{Any, ReadWrite};
        // Several hosts: read-write unless the URL asks otherwise; one host: libpq's `any`.
        for (url, described, attrs) in [
            (
                "postgres://relay:s3cret@10.0.0.1:5441,10.0.0.2:5442/shop?target_session_attrs=read-write",
                "relay@10.0.0.1:5441,10.0.0.2:5442/shop",
                ReadWrite,
            ),
            (
                "postgres://u@a:5441,b:5442/db?sslmode=disable",
                "u@a:5441,b:5442/db",
                ReadWrite,
            ),
            (
                "postgres://u@a,b/db?target_session_attrs=any",
                "u@a:5432,b:5432/db",
                Any,
            ),
            ("postgres://u@a/db", "u@a:5432/db", Any),
            // In a URL each host has its own port; key=value may give one for all.
            ("postgres://u@a,b:6432/db", "u@a:5432,b:6432/db", ReadWrite),
            (
                "host=a,b port=6432 user=u dbname=db",
                "u@a:6432,b:6432/db",
                ReadWrite,
            ),
        ] {
            let target = parse_url(url, None).expect(url);
            assert_eq!(target.describe(), described, "{url}");
            assert_eq!(target.config.get_target_session_attrs(), attrs, "{url}");
        }
        assert_eq!(
            with_dbname(
                "postgres://u:p@a:5441,b:5442/postgres?target_session_attrs=read-write",
                "orders"
            ),
            "postgres://u:p@a:5441,b:5442/orders?target_session_attrs=read-write"
        );
    }

    #[test]
    fn bad_url_error_does_not_echo_password() {
        let Err(error) = parse_url("postgres://app:s3cret@db:notaport/orders", None) else {
            panic!("a bad port must be rejected");
        };
        let text = format!("{error:#}");
        assert!(text.contains("PostgreSQL URL"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
