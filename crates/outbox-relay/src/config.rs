//! The relay's configuration: flags, `OUTBOX_*` environment variables and an
//! optional TOML file (`--config`), in that order of precedence, validated
//! once before anything connects.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::alert::AlertConfig;
use outbox_service::limits::{self, check, millis};

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9100);

/// Every setting, each optional so the layers can be merged. The field doc
/// comments are the `--help` text.
#[derive(Debug, Default, Clone, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Settings {
    /// PostgreSQL URL of the application database; `sslmode=require|verify-ca|verify-full` for TLS.
    #[arg(long, env = "OUTBOX_DATABASE_URL", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,

    /// PEM file of the CA that signed the PostgreSQL server certificate (default: system roots).
    #[arg(long, env = "OUTBOX_DATABASE_CA_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_ca_file: Option<PathBuf>,

    /// RabbitMQ URL; `amqps://` for TLS [default: amqp://guest:guest@127.0.0.1:5672/%2f].
    #[arg(long, env = "OUTBOX_AMQP_URL", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_url: Option<String>,

    /// PEM file of the CA that signed the RabbitMQ server certificate (default: system roots).
    #[arg(long, env = "OUTBOX_AMQP_CA_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_ca_file: Option<PathBuf>,

    /// `notify` (LISTEN/NOTIFY wake-ups plus the sweep) or `poll` (sweep only, for PgBouncer in transaction mode) [default: notify].
    #[arg(long, env = "OUTBOX_MODE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,

    /// Rows claimed per query [default: 500].
    #[arg(long, env = "OUTBOX_BATCH_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,

    /// Publishes awaiting a broker confirm at once [default: 256].
    #[arg(long, env = "OUTBOX_MAX_IN_FLIGHT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,

    /// Milliseconds between sweeps for retries due, expired leases and missed wake-ups [default: 1000].
    #[arg(long, env = "OUTBOX_SWEEP_INTERVAL_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep_interval_ms: Option<u64>,

    /// Milliseconds a claimed row stays leased to this relay before another may take it over [default: 30000].
    #[arg(long, env = "OUTBOX_LEASE_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,

    /// Attempts (nack, unroutable, oversized) before a message is dead and escalated [default: 5].
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,

    /// First retry delay in milliseconds; doubles per attempt, with jitter [default: 1000].
    #[arg(long, env = "OUTBOX_RETRY_BASE_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_base_ms: Option<u64>,

    /// Longest retry delay in milliseconds [default: 300000].
    #[arg(long, env = "OUTBOX_RETRY_MAX_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_max_ms: Option<u64>,

    /// Keep published rows this long, e.g. `30s`, `1h`, `7d`; `0` deletes them once confirmed [default: 1h].
    #[arg(long, env = "OUTBOX_RETENTION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,

    /// A dead message blocks later messages of its ordering key [default: true].
    #[arg(long, env = "OUTBOX_BLOCK_ON_DEAD_HEAD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_on_dead_head: Option<bool>,

    /// Largest payload published, in bytes; larger ones count as failed attempts [default: 16777216].
    #[arg(long, env = "OUTBOX_MAX_PAYLOAD_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_payload_bytes: Option<u32>,

    /// Milliseconds a publish may wait for its broker confirm before its row is retried; below the lease [default: 10000].
    #[arg(long, env = "OUTBOX_CONFIRM_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirm_timeout_ms: Option<u64>,

    /// Payload bytes claimed and awaiting confirms at once: bounds the relay's memory by bytes, not rows [default: 33554432].
    #[arg(long, env = "OUTBOX_MAX_IN_FLIGHT_BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight_bytes: Option<u64>,

    /// Milliseconds to wait for in-flight confirms at shutdown [default: 10000].
    #[arg(long, env = "OUTBOX_SHUTDOWN_TIMEOUT_MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_ms: Option<u64>,

    /// POST a JSON alert here when a message becomes dead.
    #[arg(long, env = "OUTBOX_ALERT_WEBHOOK_URL", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_webhook_url: Option<String>,

    /// SMTP server for dead-letter emails, e.g. `smtp://mail:25` or `smtps://user:pass@mail`.
    #[arg(long, env = "OUTBOX_ALERT_SMTP_URL", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_smtp_url: Option<String>,

    /// Comma-separated recipients of dead-letter emails.
    #[arg(long, env = "OUTBOX_ALERT_EMAIL_TO")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_email_to: Option<String>,

    /// Sender of dead-letter emails [default: outbox-relay@localhost].
    #[arg(long, env = "OUTBOX_ALERT_EMAIL_FROM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_email_from: Option<String>,

    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` on this address; `off` to disable [default: 127.0.0.1:9100].
    #[arg(long, env = "OUTBOX_METRICS_ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

/// How the relay learns that there is work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// LISTEN for wake-ups, plus the periodic sweep.
    Notify,
    /// The periodic sweep only (PgBouncer in transaction mode cannot LISTEN).
    Poll,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub database_ca_file: Option<PathBuf>,
    pub amqp_url: String,
    pub amqp_ca_file: Option<PathBuf>,
    pub mode: Mode,
    pub batch_size: u32,
    pub max_in_flight: u32,
    pub sweep_interval: Duration,
    pub lease: Duration,
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// Published rows older than this are deleted; zero deletes them as
    /// soon as they are confirmed.
    pub retention: Duration,
    pub block_on_dead_head: bool,
    pub max_payload_bytes: u32,
    /// A confirm not back by then retries its row (an attempt): a queue
    /// that stopped answering must not hold the whole window.
    pub confirm_timeout: Duration,
    /// Payload bytes claimed or unconfirmed at once (a row larger than
    /// this is still claimed, alone).
    pub max_in_flight_bytes: u64,
    pub shutdown_timeout: Duration,
    pub alert: AlertConfig,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None` when `off`.
    pub metrics_addr: Option<SocketAddr>,
    /// False when `metrics_addr` is the default: then an address in use (a
    /// second relay on the host) is a warning, not a reason to stop.
    pub metrics_addr_given: bool,
}

/// Environment variables the relay reads; any other `OUTBOX_*` is a typo.
const KNOWN_ENV: &[&str] = &[
    "OUTBOX_CONFIG",
    "OUTBOX_DATABASE_URL",
    "OUTBOX_DATABASE_CA_FILE",
    "OUTBOX_AMQP_URL",
    "OUTBOX_AMQP_CA_FILE",
    "OUTBOX_MODE",
    "OUTBOX_BATCH_SIZE",
    "OUTBOX_MAX_IN_FLIGHT",
    "OUTBOX_SWEEP_INTERVAL_MS",
    "OUTBOX_LEASE_MS",
    "OUTBOX_MAX_ATTEMPTS",
    "OUTBOX_RETRY_BASE_MS",
    "OUTBOX_RETRY_MAX_MS",
    "OUTBOX_RETENTION",
    "OUTBOX_BLOCK_ON_DEAD_HEAD",
    "OUTBOX_MAX_PAYLOAD_BYTES",
    "OUTBOX_CONFIRM_TIMEOUT_MS",
    "OUTBOX_MAX_IN_FLIGHT_BYTES",
    "OUTBOX_SHUTDOWN_TIMEOUT_MS",
    "OUTBOX_ALERT_WEBHOOK_URL",
    "OUTBOX_ALERT_SMTP_URL",
    "OUTBOX_ALERT_EMAIL_TO",
    "OUTBOX_ALERT_EMAIL_FROM",
    "OUTBOX_METRICS_ADDR",
    "OUTBOX_LOG_FORMAT",
];

/// Rejects `OUTBOX_*` variables that no setting reads (a typo would
/// otherwise silently leave the default in force).
pub fn check_environment(vars: impl Iterator<Item = (String, String)>) -> anyhow::Result<()> {
    for (name, _) in vars {
        if name.starts_with("OUTBOX_") && !KNOWN_ENV.contains(&name.as_str()) {
            bail!("unknown setting {name} in the environment (see `outbox-relay run --help`)");
        }
    }
    Ok(())
}

impl Settings {
    /// Reads a TOML file whose keys are the flag names with underscores.
    pub fn from_file(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            // toml's message spans several lines with a source excerpt; keep the first.
            let first = e
                .message()
                .lines()
                .next()
                .unwrap_or("parse error")
                .to_string();
            anyhow::anyhow!("config file {}: {first}", path.display())
        })
    }

    /// `self` (flags and environment) wins over `file`.
    pub fn over(self, file: Settings) -> anyhow::Result<Settings> {
        let mut merged = serde_json::to_value(file)?;
        let overrides = serde_json::to_value(self)?;
        if let (Some(base), serde_json::Value::Object(top)) = (merged.as_object_mut(), overrides) {
            base.extend(top);
        }
        Ok(serde_json::from_value(merged)?)
    }

    pub fn validate(self) -> anyhow::Result<Config> {
        let database_url = self
            .database_url
            .context("OUTBOX_DATABASE_URL (or --database-url) is required")?;
        let mode = match self.mode.as_deref().unwrap_or("notify") {
            "notify" => Mode::Notify,
            "poll" => Mode::Poll,
            other => bail!("OUTBOX_MODE must be `notify` or `poll`, not `{other}`"),
        };
        let retention = match self.retention.as_deref() {
            None => Duration::from_secs(3600),
            Some("0") => Duration::ZERO,
            Some(text) => humantime::parse_duration(text).map_err(|e| {
                anyhow::anyhow!(
                    "OUTBOX_RETENTION `{text}` is not a duration like 30s, 1h or 7d: {e}"
                )
            })?,
        };
        if retention > limits::MAX_RETENTION {
            bail!(
                "OUTBOX_RETENTION must be at most 3650d (allowed: 0 to 3650d), not `{}`",
                self.retention.unwrap_or_default()
            );
        }
        let lease = millis("OUTBOX_LEASE_MS", self.lease_ms, 30_000, limits::LEASE_MS)?;
        // Unset, it stays below a short lease by itself; set, it must.
        let confirm_default = 10_000.min(lease.as_millis() as u64 / 2);
        let confirm_timeout = millis(
            "OUTBOX_CONFIRM_TIMEOUT_MS",
            self.confirm_timeout_ms,
            confirm_default,
            limits::CONFIRM_TIMEOUT_MS,
        )?;
        if confirm_timeout >= lease {
            bail!(
                "OUTBOX_CONFIRM_TIMEOUT_MS must be less than OUTBOX_LEASE_MS ({} ms): a row whose confirm is awaited must still be leased",
                lease.as_millis()
            );
        }
        let config = Config {
            database_url,
            database_ca_file: self.database_ca_file,
            amqp_url: self.amqp_url.unwrap_or_else(|| DEFAULT_AMQP_URL.into()),
            amqp_ca_file: self.amqp_ca_file,
            mode,
            batch_size: check(
                "OUTBOX_BATCH_SIZE",
                self.batch_size,
                500,
                limits::BATCH_SIZE,
            )?,
            max_in_flight: check(
                "OUTBOX_MAX_IN_FLIGHT",
                self.max_in_flight,
                256,
                limits::MAX_IN_FLIGHT,
            )?,
            sweep_interval: millis(
                "OUTBOX_SWEEP_INTERVAL_MS",
                self.sweep_interval_ms,
                1000,
                limits::SWEEP_INTERVAL_MS,
            )?,
            lease,
            max_attempts: check(
                "OUTBOX_MAX_ATTEMPTS",
                self.max_attempts,
                5,
                limits::MAX_ATTEMPTS,
            )?,
            retry_base: millis(
                "OUTBOX_RETRY_BASE_MS",
                self.retry_base_ms,
                1000,
                limits::RETRY_MS,
            )?,
            retry_max: millis(
                "OUTBOX_RETRY_MAX_MS",
                self.retry_max_ms,
                300_000,
                limits::RETRY_MS,
            )?,
            retention,
            block_on_dead_head: self.block_on_dead_head.unwrap_or(true),
            max_payload_bytes: check(
                "OUTBOX_MAX_PAYLOAD_BYTES",
                self.max_payload_bytes,
                16 << 20,
                limits::MAX_PAYLOAD_BYTES,
            )?,
            confirm_timeout,
            max_in_flight_bytes: check(
                "OUTBOX_MAX_IN_FLIGHT_BYTES",
                self.max_in_flight_bytes,
                32 << 20,
                limits::MAX_IN_FLIGHT_BYTES,
            )?,
            shutdown_timeout: millis(
                "OUTBOX_SHUTDOWN_TIMEOUT_MS",
                self.shutdown_timeout_ms,
                10_000,
                limits::SHUTDOWN_TIMEOUT_MS,
            )?,
            alert: AlertConfig {
                webhook_url: self.alert_webhook_url,
                smtp_url: self.alert_smtp_url,
                smtp_from: self
                    .alert_email_from
                    .unwrap_or_else(|| "outbox-relay@localhost".into()),
                smtp_to: self
                    .alert_email_to
                    .map(|to| {
                        to.split(',')
                            .map(|a| a.trim().to_string())
                            .filter(|a| !a.is_empty())
                            .collect()
                    })
                    .unwrap_or_default(),
            },
            metrics_addr: match self.metrics_addr.as_deref() {
                None => Some(DEFAULT_METRICS_ADDR),
                Some("off") => None,
                Some(addr) => Some(addr.parse().map_err(|_| {
                    anyhow::anyhow!("OUTBOX_METRICS_ADDR `{addr}` is not host:port or `off`")
                })?),
            },
            metrics_addr_given: self.metrics_addr.is_some(),
        };
        if config.retry_max < config.retry_base {
            bail!("OUTBOX_RETRY_MAX_MS must be at least OUTBOX_RETRY_BASE_MS");
        }
        let target = outbox_service::db::parse_url(
            &config.database_url,
            config.database_ca_file.as_deref(),
        )?;
        let ca_file = config.database_ca_file.as_deref();
        if let Some(line) = outbox_service::pg_tls::unverified_warning(
            target.ssl_mode,
            ca_file,
            "OUTBOX_DATABASE_CA_FILE",
        ) {
            tracing::warn!("{line}");
        }
        outbox_service::amqp::check_urls(&config.amqp_url)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Settings {
        Settings {
            database_url: Some("postgres://u@localhost/db".into()),
            ..Settings::default()
        }
    }

    #[test]
    fn defaults_are_sane() {
        let config = base().validate().expect("valid");
        assert_eq!(config.mode, Mode::Notify);
        assert_eq!(config.max_attempts, 5);
        assert!(config.sweep_interval <= Duration::from_secs(1));
        assert_eq!(config.retention, Duration::from_secs(3600));
        assert_eq!(config.amqp_url, DEFAULT_AMQP_URL);
        assert_eq!(config.metrics_addr, Some(DEFAULT_METRICS_ADDR));
        assert!(!config.metrics_addr_given);
    }

    #[test]
    fn metrics_can_be_turned_off_or_moved() {
        for (text, expected) in [("off", None), ("0.0.0.0:9200", Some("0.0.0.0:9200"))] {
            let config = Settings {
                metrics_addr: Some(text.into()),
                ..base()
            }
            .validate()
            .expect(text);
            assert_eq!(
                config.metrics_addr.map(|a| a.to_string()).as_deref(),
                expected
            );
            assert!(config.metrics_addr_given);
        }
    }

    #[test]
    fn zero_batch_size_is_rejected() {
        let settings = Settings {
            batch_size: Some(0),
            ..base()
        };
        let error = settings.validate().expect_err("zero batch");
        assert!(
            error
                .to_string()
                .contains("OUTBOX_BATCH_SIZE must be at least 1"),
            "{error}"
        );
    }

    /// Each numeric setting, how to set it, and its allowed range.
    type Bound = (&'static str, fn(&mut Settings, u64), u64, u64);

    fn bounds() -> Vec<Bound> {
        vec![
            (
                "OUTBOX_BATCH_SIZE",
                |s, v| s.batch_size = Some(v as u32),
                1,
                10_000,
            ),
            (
                "OUTBOX_MAX_IN_FLIGHT",
                |s, v| s.max_in_flight = Some(v as u32),
                1,
                65_535,
            ),
            (
                "OUTBOX_SWEEP_INTERVAL_MS",
                |s, v| s.sweep_interval_ms = Some(v),
                1,
                3_600_000,
            ),
            (
                "OUTBOX_LEASE_MS",
                |s, v| s.lease_ms = Some(v),
                1001,
                86_400_000,
            ),
            (
                "OUTBOX_MAX_ATTEMPTS",
                |s, v| s.max_attempts = Some(v as u32),
                1,
                10_000,
            ),
            (
                "OUTBOX_RETRY_BASE_MS",
                |s, v| s.retry_base_ms = Some(v),
                1,
                2_592_000_000,
            ),
            (
                "OUTBOX_RETRY_MAX_MS",
                |s, v| s.retry_max_ms = Some(v),
                1,
                2_592_000_000,
            ),
            (
                "OUTBOX_MAX_PAYLOAD_BYTES",
                |s, v| s.max_payload_bytes = Some(v as u32),
                1,
                512 << 20,
            ),
            (
                "OUTBOX_CONFIRM_TIMEOUT_MS",
                |s, v| s.confirm_timeout_ms = Some(v),
                1,
                86_399_999,
            ),
            (
                "OUTBOX_MAX_IN_FLIGHT_BYTES",
                |s, v| s.max_in_flight_bytes = Some(v),
                1 << 20,
                4 << 30,
            ),
            (
                "OUTBOX_SHUTDOWN_TIMEOUT_MS",
                |s, v| s.shutdown_timeout_ms = Some(v),
                0,
                3_600_000,
            ),
        ]
    }

    /// Settings that let `name` reach its own bounds: the retry base must
    /// not exceed the retry max, and the confirm timeout must stay below
    /// the lease.
    fn room_for(name: &str) -> Settings {
        let mut settings = base();
        match name {
            "OUTBOX_RETRY_BASE_MS" => settings.retry_max_ms = Some(2_592_000_000),
            "OUTBOX_RETRY_MAX_MS" => settings.retry_base_ms = Some(1),
            "OUTBOX_CONFIRM_TIMEOUT_MS" => settings.lease_ms = Some(86_400_000),
            "OUTBOX_LEASE_MS" => settings.confirm_timeout_ms = Some(1),
            _ => {}
        }
        settings
    }

    #[test]
    fn every_numeric_setting_is_range_checked() {
        for (name, set, min, max) in bounds() {
            let run = |value: u64| {
                let mut settings = room_for(name);
                set(&mut settings, value);
                settings.validate()
            };
            run(min).unwrap_or_else(|e| panic!("{name}={min}: {e}"));
            run(max).unwrap_or_else(|e| panic!("{name}={max}: {e}"));
            // u64::MAX of a u32 setting: clap refuses it before we see it,
            // the cast here gives u32::MAX, also out of range.
            let mut refused = vec![max + 1, u64::MAX];
            if min > 0 {
                refused.push(min - 1);
            }
            for value in refused {
                let error = run(value)
                    .expect_err(&format!("{name}={value}"))
                    .to_string();
                assert!(error.starts_with(name), "{name}={value}: {error}");
                assert!(error.contains("allowed:"), "{name}={value}: {error}");
                assert!(!error.contains('\n'), "{error}");
            }
        }
    }

    #[test]
    fn confirm_timeout_must_be_below_the_lease() {
        let settings = Settings {
            lease_ms: Some(5_000),
            confirm_timeout_ms: Some(5_000),
            ..base()
        };
        let error = settings.validate().expect_err("equal").to_string();
        assert!(error.contains("less than OUTBOX_LEASE_MS"), "{error}");
        // Unset, it follows a short lease down.
        let config = Settings {
            lease_ms: Some(5_000),
            ..base()
        }
        .validate()
        .expect("valid");
        assert_eq!(config.confirm_timeout, Duration::from_millis(2_500));
        assert_eq!(
            base().validate().expect("valid").confirm_timeout,
            Duration::from_secs(10)
        );
    }

    #[test]
    fn retention_is_bounded() {
        for (text, ok) in [
            ("3650d", true),
            ("3651d", false),
            ("100000000y", false),
            ("0", true),
        ] {
            let settings = Settings {
                retention: Some(text.into()),
                ..base()
            };
            match settings.validate() {
                Ok(_) => assert!(ok, "{text} accepted"),
                Err(e) => {
                    assert!(!ok, "{text}: {e}");
                    assert!(
                        e.to_string()
                            .starts_with("OUTBOX_RETENTION must be at most"),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = Settings {
            batch_size: Some(7),
            max_attempts: Some(9),
            ..Settings::default()
        };
        let flags = Settings {
            batch_size: Some(3),
            ..base()
        };
        let config = flags.over(file).expect("merge").validate().expect("valid");
        assert_eq!((config.batch_size, config.max_attempts), (3, 9));
    }

    #[test]
    fn unknown_environment_setting_is_rejected() {
        let vars = vec![("OUTBOX_BATCH_SIZ".to_string(), "5".to_string())];
        assert!(check_environment(vars.into_iter()).is_err());
    }

    #[test]
    fn retention_accepts_zero_and_durations() {
        for (text, expected) in [("0", 0), ("90s", 90), ("7d", 7 * 86_400)] {
            let settings = Settings {
                retention: Some(text.into()),
                ..base()
            };
            assert_eq!(
                settings.validate().expect(text).retention,
                Duration::from_secs(expected)
            );
        }
        let settings = Settings {
            retention: Some("soon".into()),
            ..base()
        };
        assert!(settings.validate().is_err());
    }
}
