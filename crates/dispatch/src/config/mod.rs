//! The `dispatch` binary's configuration: flags or `DISPATCH_*` environment
//! variables, validated once before anything connects.
//!
//! - `settings`: the [`Settings`] as given;
//! - this module: the checks that turn them into a [`Config`].

mod settings;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use outbox_service::db::{PgTarget, parse_url};
use outbox_service::limits::{self, check};

use crate::deliveries::{Dispatcher, SlowOrder};
use outbox_consumer::{ConsumerConfig, QueueType, Topology};

pub use settings::Settings;

/// The binary's own defaults, once; the consumer's are the library's
/// (`ConsumerConfig::DEFAULT_*`). `--help` names them from here.
pub mod defaults {
    /// The seed's names.
    pub const EXCHANGE: &str = "order_confirm_fanoutExchange";
    pub const QUEUE: &str = "order_confirm_fanoutQueue";
    pub const QUEUE_TYPE: &str = "classic";
    pub const HTTP_ADDR: &str = "127.0.0.1:9000";
    /// The seed's rider.
    pub const RIDERS: &str = "Zhang Fei";
    /// The seed's slow dispatcher took 3 s.
    pub const SLOW_ORDER_MS: u64 = 3000;
    /// A week: far beyond any copy still on its way (a retry waits at most
    /// `DISPATCH_RETRY_MAX_MS` per delivery), short enough that the inbox
    /// is a week of orders, not all of them.
    pub const INBOX_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
}

/// Created by `sql/dispatch/V1__dispatch.sql`.
pub const INBOX_TABLE: &str = "dispatch.inbox";
/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub database_ca_file: Option<PathBuf>,
    pub consumer: ConsumerConfig,
    pub http_addr: SocketAddr,
    pub dispatcher: Dispatcher,
}

impl Settings {
    /// The database to connect to (all `dispatch migrate` needs).
    pub fn database(&self) -> anyhow::Result<PgTarget> {
        target(
            self.database_url.as_deref(),
            self.database_ca_file.as_deref(),
        )
    }

    pub fn validate(self) -> anyhow::Result<Config> {
        let database = self.database()?;
        outbox_service::pg_tls::warn_if_unverified(
            database.ssl_mode,
            self.database_ca_file.as_deref(),
            "DISPATCH_DATABASE_CA_FILE",
        );
        let amqp_url = self
            .amqp_url
            .unwrap_or_else(|| outbox_service::amqp::DEFAULT_URL.into());
        outbox_service::amqp::check_urls(&amqp_url)?;
        let queue = name("DISPATCH_QUEUE", self.queue, defaults::QUEUE)?;
        let defaults = Topology::named(defaults::EXCHANGE, &queue);
        let topology = Topology {
            exchange: name("DISPATCH_EXCHANGE", self.exchange, defaults::EXCHANGE)?,
            retry_queue: name(
                "DISPATCH_RETRY_QUEUE",
                self.retry_queue,
                &defaults.retry_queue,
            )?,
            dead_letter_exchange: name(
                "DISPATCH_DEAD_LETTER_EXCHANGE",
                self.dead_letter_exchange,
                &defaults.dead_letter_exchange,
            )?,
            dead_letter_queue: name(
                "DISPATCH_DEAD_LETTER_QUEUE",
                self.dead_letter_queue,
                &defaults.dead_letter_queue,
            )?,
            queue_type: match self.queue_type.as_deref().unwrap_or(defaults::QUEUE_TYPE) {
                "classic" => QueueType::Classic,
                "quorum" => QueueType::Quorum,
                other => bail!("DISPATCH_QUEUE_TYPE must be `classic` or `quorum`, not `{other}`"),
            },
            single_active_consumer: self.single_active_consumer.unwrap_or(false),
            expires: match self.queue_expires_ms {
                None => None,
                some => Some(millis(
                    "DISPATCH_QUEUE_EXPIRES_MS",
                    some,
                    Duration::ZERO,
                    limits::QUEUE_EXPIRES_MS,
                )?),
            },
            queue,
        };
        // The library's defaults are the binary's.
        let base = ConsumerConfig::new(&amqp_url, topology, INBOX_TABLE);
        let consumer = ConsumerConfig {
            prefetch: at_least_one("DISPATCH_PREFETCH", self.prefetch, base.prefetch)?,
            lanes: at_least_one("DISPATCH_LANES", self.lanes, base.lanes)?,
            batch_size: at_least_one("DISPATCH_BATCH_SIZE", self.batch_size, base.batch_size)?,
            max_deliveries: check(
                "DISPATCH_MAX_DELIVERIES",
                self.max_deliveries,
                base.max_deliveries,
                limits::MAX_DELIVERIES,
            )?,
            retry_base: millis(
                "DISPATCH_RETRY_BASE_MS",
                self.retry_base_ms,
                base.retry_base,
                limits::RETRY_MS,
            )?,
            retry_max: millis(
                "DISPATCH_RETRY_MAX_MS",
                self.retry_max_ms,
                base.retry_max,
                limits::RETRY_MS,
            )?,
            shutdown_timeout: millis(
                "DISPATCH_SHUTDOWN_TIMEOUT_MS",
                self.shutdown_timeout_ms,
                base.shutdown_timeout,
                limits::SHUTDOWN_TIMEOUT_MS,
            )?,
            inbox_retention: match millis(
                "DISPATCH_INBOX_RETENTION_MS",
                self.inbox_retention_ms,
                Duration::from_millis(defaults::INBOX_RETENTION_MS),
                limits::INBOX_RETENTION_MS,
            )? {
                Duration::ZERO => None,
                retention => Some(retention),
            },
            key_gap_wait: millis(
                "DISPATCH_KEY_GAP_WAIT_MS",
                self.key_gap_wait_ms,
                base.key_gap_wait,
                limits::KEY_GAP_WAIT_MS,
            )?,
            amqp_ca_file: self.amqp_ca_file,
            name: "dispatch".into(),
            ..base
        };
        if consumer.retry_max < consumer.retry_base {
            bail!("DISPATCH_RETRY_MAX_MS must be at least DISPATCH_RETRY_BASE_MS");
        }
        let http_addr = self.http_addr.as_deref().unwrap_or(defaults::HTTP_ADDR);
        let http_addr = http_addr
            .parse()
            .with_context(|| format!("DISPATCH_HTTP_ADDR `{http_addr}` is not host:port"))?;
        let riders: Vec<String> = self
            .riders
            .as_deref()
            .unwrap_or(defaults::RIDERS)
            .split(',')
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect();
        if riders.is_empty() {
            bail!("DISPATCH_RIDERS must name at least one rider");
        }
        let slow_order = match (self.slow_order_id, self.slow_order_ms) {
            (Some(order_id), ms) => Some(SlowOrder {
                order_id,
                delay: millis(
                    "DISPATCH_SLOW_ORDER_MS",
                    ms,
                    Duration::from_millis(defaults::SLOW_ORDER_MS),
                    limits::SLOW_ORDER_MS,
                )?,
            }),
            (None, Some(_)) => bail!("DISPATCH_SLOW_ORDER_MS needs DISPATCH_SLOW_ORDER_ID"),
            (None, None) => None,
        };
        Ok(Config {
            database_url: self.database_url.unwrap_or_default(),
            database_ca_file: self.database_ca_file,
            consumer,
            http_addr,
            dispatcher: Dispatcher { riders, slow_order },
        })
    }
}

impl Config {
    pub fn database(&self) -> anyhow::Result<PgTarget> {
        target(Some(&self.database_url), self.database_ca_file.as_deref())
    }
}

fn target(url: Option<&str>, ca_file: Option<&Path>) -> anyhow::Result<PgTarget> {
    let url = url.context("DISPATCH_DATABASE_URL (or --database-url) is required")?;
    Ok(parse_url(url, ca_file)?.named("dispatch"))
}

fn name(setting: &str, value: Option<String>, default: &str) -> anyhow::Result<String> {
    let value = value.unwrap_or_else(|| default.into());
    if value.is_empty() || value.len() > 255 {
        bail!("{setting} must be 1 to 255 characters");
    }
    Ok(value)
}

/// `value`, or `default` when unset; zero is refused.
fn at_least_one<T: Default + PartialEq>(
    setting: &str,
    value: Option<T>,
    default: T,
) -> anyhow::Result<T> {
    let value = value.unwrap_or(default);
    if value == T::default() {
        bail!("{setting} must be at least 1");
    }
    Ok(value)
}

/// `value` in milliseconds, or `default`; refused outside `range`.
fn millis(
    setting: &str,
    value: Option<u64>,
    default: Duration,
    range: std::ops::RangeInclusive<u64>,
) -> anyhow::Result<Duration> {
    let default = u64::try_from(default.as_millis()).unwrap_or(u64::MAX);
    limits::millis(setting, value, default, range)
}

#[cfg(test)]
mod tests;
