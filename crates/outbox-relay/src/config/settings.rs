//! The relay's settings as given: each a flag, an `OUTBOX_*` variable and a
//! key of the optional TOML file, all optional so the layers can be merged
//! (flags and environment over the file) before [`Settings::validate`].

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};

use super::defaults;
use outbox_service::with_default;

/// Every setting, each optional so the layers can be merged. The field doc
/// comments or `help` texts are the `--help` text; a default is named in
/// `help` from [`defaults`], which `validate` applies too.
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

    #[arg(long, env = "OUTBOX_AMQP_URL", hide_env_values = true, help = with_default!("RabbitMQ URL; `amqps://` for TLS", defaults::AMQP_URL))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_url: Option<String>,

    /// PEM file of the CA that signed the RabbitMQ server certificate (default: system roots).
    #[arg(long, env = "OUTBOX_AMQP_CA_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_ca_file: Option<PathBuf>,

    #[arg(long, env = "OUTBOX_MODE", help = with_default!("`notify` (LISTEN/NOTIFY wake-ups plus the sweep) or `poll` (sweep only, for PgBouncer in transaction mode)", defaults::MODE))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,

    #[arg(long, env = "OUTBOX_BATCH_SIZE", help = with_default!("Rows claimed per query", defaults::BATCH_SIZE))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,

    #[arg(long, env = "OUTBOX_MAX_IN_FLIGHT", help = with_default!("Publishes awaiting a broker confirm at once", defaults::MAX_IN_FLIGHT))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,

    #[arg(long, env = "OUTBOX_SWEEP_INTERVAL_MS", help = with_default!("Milliseconds between sweeps for retries due, expired leases and missed wake-ups", defaults::SWEEP_INTERVAL_MS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep_interval_ms: Option<u64>,

    #[arg(long, env = "OUTBOX_LEASE_MS", help = with_default!("Milliseconds a claimed row stays leased to this relay before another may take it over", defaults::LEASE_MS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,

    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS", help = with_default!("Attempts (nack, unroutable, oversized) before a message is dead and escalated", defaults::MAX_ATTEMPTS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,

    #[arg(long, env = "OUTBOX_RETRY_BASE_MS", help = with_default!("First retry delay in milliseconds; doubles per attempt, with jitter", defaults::RETRY_BASE_MS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_base_ms: Option<u64>,

    #[arg(long, env = "OUTBOX_RETRY_MAX_MS", help = with_default!("Longest retry delay in milliseconds", defaults::RETRY_MAX_MS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_max_ms: Option<u64>,

    #[arg(long, env = "OUTBOX_RETENTION", help = with_default!("Keep published rows this long, e.g. `30s`, `1h`, `7d`; `0` deletes them once confirmed", defaults::RETENTION))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,

    #[arg(long, env = "OUTBOX_BLOCK_ON_DEAD_HEAD", help = with_default!("A dead message blocks later messages of its ordering key", defaults::BLOCK_ON_DEAD_HEAD))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_on_dead_head: Option<bool>,

    #[arg(long, env = "OUTBOX_KEY_PIPELINE", help = with_default!("Rows of an ordering key published after its head without waiting for its confirm (0: one at a time); consumers put them back in order by `x-outbox-seq`", defaults::KEY_PIPELINE))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_pipeline: Option<u32>,

    #[arg(long, env = "OUTBOX_MAX_PAYLOAD_BYTES", help = with_default!("Largest payload published, in bytes; larger ones count as failed attempts", defaults::MAX_PAYLOAD_BYTES))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_payload_bytes: Option<u32>,

    #[arg(long, env = "OUTBOX_CONFIRM_TIMEOUT_MS", help = with_default!("Milliseconds a publish may wait for its broker confirm before its row is retried (an outage instead when the broker answers nothing); below the lease", defaults::CONFIRM_TIMEOUT_MS))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirm_timeout_ms: Option<u64>,

    #[arg(long, env = "OUTBOX_MAX_IN_FLIGHT_BYTES", help = with_default!("Payload bytes claimed and awaiting confirms at once: bounds the relay's memory by bytes, not rows", defaults::MAX_IN_FLIGHT_BYTES))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight_bytes: Option<u64>,

    #[arg(long, env = "OUTBOX_SHUTDOWN_TIMEOUT_MS", help = with_default!("Milliseconds to wait for in-flight confirms at shutdown", defaults::SHUTDOWN_TIMEOUT_MS))]
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

    #[arg(long, env = "OUTBOX_ALERT_EMAIL_FROM", help = with_default!("Sender of dead-letter emails", defaults::ALERT_EMAIL_FROM))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_email_from: Option<String>,

    #[arg(long, env = "OUTBOX_METRICS_ADDR", help = with_default!("Serve `/metrics` (Prometheus), `/healthz` and `/readyz` on this address; `off` to disable", defaults::METRICS_ADDR))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
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
}
