//! The relay's configuration: flags, `OUTBOX_*` environment variables and an
//! optional TOML file (`--config`), in that order of precedence, validated
//! once before anything connects.
//!
//! - `settings`: the [`Settings`] as given (flags, environment, file);
//! - `defaults`: each default, once;
//! - this module: the checks that turn them into a [`Config`].

pub mod defaults;
mod settings;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::alert::AlertConfig;
use outbox_service::limits::{self, check, millis};

pub use settings::Settings;

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
    /// Rows of a key claimed after its head (see `store::CLAIM`).
    pub key_pipeline: u32,
    pub max_payload_bytes: u32,
    /// A confirm not back by then retries its row (an attempt): a queue
    /// that stopped answering must not hold the whole window. Unless the
    /// broker answers nothing at all (a probe within this bound too): that
    /// is an outage. Bounds every other round trip with the broker.
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

impl Settings {
    pub fn validate(self) -> anyhow::Result<Config> {
        let database_url = self
            .database_url
            .context("OUTBOX_DATABASE_URL (or --database-url) is required")?;
        let mode = match self.mode.as_deref().unwrap_or(defaults::MODE) {
            "notify" => Mode::Notify,
            "poll" => Mode::Poll,
            other => bail!("OUTBOX_MODE must be `notify` or `poll`, not `{other}`"),
        };
        let retention = match self.retention.as_deref().unwrap_or(defaults::RETENTION) {
            "0" => Duration::ZERO,
            text => humantime::parse_duration(text).with_context(|| {
                format!("OUTBOX_RETENTION `{text}` is not a duration like 30s, 1h or 7d")
            })?,
        };
        if retention > limits::MAX_RETENTION {
            bail!(
                "OUTBOX_RETENTION must be at most 3650d (allowed: 0 to 3650d), not `{}`",
                self.retention.unwrap_or_default()
            );
        }
        let lease = millis(
            "OUTBOX_LEASE_MS",
            self.lease_ms,
            defaults::LEASE_MS,
            limits::LEASE_MS,
        )?;
        // Unset, it stays below a short lease by itself; set, it must.
        let confirm_default = defaults::CONFIRM_TIMEOUT_MS.min(lease.as_millis() as u64 / 2);
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
            amqp_url: self.amqp_url.unwrap_or_else(|| defaults::AMQP_URL.into()),
            amqp_ca_file: self.amqp_ca_file,
            mode,
            batch_size: check(
                "OUTBOX_BATCH_SIZE",
                self.batch_size,
                defaults::BATCH_SIZE,
                limits::BATCH_SIZE,
            )?,
            max_in_flight: check(
                "OUTBOX_MAX_IN_FLIGHT",
                self.max_in_flight,
                defaults::MAX_IN_FLIGHT,
                limits::MAX_IN_FLIGHT,
            )?,
            sweep_interval: millis(
                "OUTBOX_SWEEP_INTERVAL_MS",
                self.sweep_interval_ms,
                defaults::SWEEP_INTERVAL_MS,
                limits::SWEEP_INTERVAL_MS,
            )?,
            lease,
            max_attempts: check(
                "OUTBOX_MAX_ATTEMPTS",
                self.max_attempts,
                defaults::MAX_ATTEMPTS,
                limits::MAX_ATTEMPTS,
            )?,
            retry_base: millis(
                "OUTBOX_RETRY_BASE_MS",
                self.retry_base_ms,
                defaults::RETRY_BASE_MS,
                limits::RETRY_MS,
            )?,
            retry_max: millis(
                "OUTBOX_RETRY_MAX_MS",
                self.retry_max_ms,
                defaults::RETRY_MAX_MS,
                limits::RETRY_MS,
            )?,
            retention,
            block_on_dead_head: self
                .block_on_dead_head
                .unwrap_or(defaults::BLOCK_ON_DEAD_HEAD),
            key_pipeline: check(
                "OUTBOX_KEY_PIPELINE",
                self.key_pipeline,
                defaults::KEY_PIPELINE,
                limits::KEY_PIPELINE,
            )?,
            max_payload_bytes: check(
                "OUTBOX_MAX_PAYLOAD_BYTES",
                self.max_payload_bytes,
                defaults::MAX_PAYLOAD_BYTES,
                limits::MAX_PAYLOAD_BYTES,
            )?,
            confirm_timeout,
            max_in_flight_bytes: check(
                "OUTBOX_MAX_IN_FLIGHT_BYTES",
                self.max_in_flight_bytes,
                defaults::MAX_IN_FLIGHT_BYTES,
                limits::MAX_IN_FLIGHT_BYTES,
            )?,
            shutdown_timeout: millis(
                "OUTBOX_SHUTDOWN_TIMEOUT_MS",
                self.shutdown_timeout_ms,
                defaults::SHUTDOWN_TIMEOUT_MS,
                limits::SHUTDOWN_TIMEOUT_MS,
            )?,
            alert: AlertConfig {
                webhook_url: self.alert_webhook_url,
                smtp_url: self.alert_smtp_url,
                smtp_from: self
                    .alert_email_from
                    .unwrap_or_else(|| defaults::ALERT_EMAIL_FROM.into()),
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
                None => Some(defaults::METRICS_ADDR),
                Some("off") => None,
                Some(addr) => Some(addr.parse().with_context(|| {
                    format!("OUTBOX_METRICS_ADDR `{addr}` is not host:port or `off`")
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
        outbox_service::pg_tls::warn_if_unverified(
            target.ssl_mode,
            config.database_ca_file.as_deref(),
            "OUTBOX_DATABASE_CA_FILE",
        );
        outbox_service::amqp::check_urls(&config.amqp_url)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests;
