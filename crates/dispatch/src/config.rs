//! The `dispatch` binary's configuration: flags or `DISPATCH_*` environment
//! variables, validated once before anything connects.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory};
use outbox_service::db::{PgTarget, parse_url};
use outbox_service::limits::{self, check};

use crate::deliveries::{Dispatcher, SlowOrder};
use outbox_consumer::{ConsumerConfig, QueueType, Topology};

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The seed's names.
pub const DEFAULT_EXCHANGE: &str = "order_confirm_fanoutExchange";
pub const DEFAULT_QUEUE: &str = "order_confirm_fanoutQueue";
/// Created by `sql/dispatch/V1__dispatch.sql`.
pub const INBOX_TABLE: &str = "dispatch.inbox";

/// Every setting; the doc comments are the `--help` text.
#[derive(Debug, Default, Clone, Args)]
pub struct Settings {
    /// PostgreSQL URL of the dispatch database; `sslmode=require|verify-ca|verify-full` for TLS.
    #[arg(
        long,
        env = "DISPATCH_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    pub database_url: Option<String>,

    /// PEM file of the CA that signed the PostgreSQL server certificate (default: system roots).
    #[arg(long, env = "DISPATCH_DATABASE_CA_FILE", global = true)]
    pub database_ca_file: Option<PathBuf>,

    /// RabbitMQ URL; `amqps://` for TLS [default: amqp://guest:guest@127.0.0.1:5672/%2f].
    #[arg(long, env = "DISPATCH_AMQP_URL", hide_env_values = true)]
    pub amqp_url: Option<String>,

    /// PEM file of the CA that signed the RabbitMQ server certificate (default: system roots).
    #[arg(long, env = "DISPATCH_AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,

    /// Fanout exchange the orders arrive on [default: order_confirm_fanoutExchange].
    #[arg(long, env = "DISPATCH_EXCHANGE")]
    pub exchange: Option<String>,

    /// Queue consumed [default: order_confirm_fanoutQueue].
    #[arg(long, env = "DISPATCH_QUEUE")]
    pub queue: Option<String>,

    /// Queue holding transient failures until their retry [default: QUEUE.retry].
    #[arg(long, env = "DISPATCH_RETRY_QUEUE")]
    pub retry_queue: Option<String>,

    /// Dead-letter exchange [default: QUEUE.dlx].
    #[arg(long, env = "DISPATCH_DEAD_LETTER_EXCHANGE")]
    pub dead_letter_exchange: Option<String>,

    /// Dead-letter queue [default: QUEUE.dlq].
    #[arg(long, env = "DISPATCH_DEAD_LETTER_QUEUE")]
    pub dead_letter_queue: Option<String>,

    /// `classic`, or `quorum` for a clustered RabbitMQ (3.10 or later) [default: classic].
    #[arg(long, env = "DISPATCH_QUEUE_TYPE")]
    pub queue_type: Option<String>,

    /// Let the queues expire after this many idle milliseconds, and the exchanges go with them (for throwaway set-ups).
    #[arg(long, env = "DISPATCH_QUEUE_EXPIRES_MS")]
    pub queue_expires_ms: Option<u64>,

    /// Unacked deliveries at once, which is also how many handlers run concurrently [default: 16].
    #[arg(long, env = "DISPATCH_PREFETCH")]
    pub prefetch: Option<u16>,

    /// Deliveries of a transiently failing message before it is dead-lettered [default: 5].
    #[arg(long, env = "DISPATCH_MAX_DELIVERIES")]
    pub max_deliveries: Option<u32>,

    /// First retry delay in milliseconds; doubles per delivery [default: 1000].
    #[arg(long, env = "DISPATCH_RETRY_BASE_MS")]
    pub retry_base_ms: Option<u64>,

    /// Longest retry delay in milliseconds [default: 60000].
    #[arg(long, env = "DISPATCH_RETRY_MAX_MS")]
    pub retry_max_ms: Option<u64>,

    /// Milliseconds shutdown waits for handlers in progress [default: 10000].
    #[arg(long, env = "DISPATCH_SHUTDOWN_TIMEOUT_MS")]
    pub shutdown_timeout_ms: Option<u64>,

    /// Address of the HTTP API [default: 127.0.0.1:9000].
    #[arg(long, env = "DISPATCH_HTTP_ADDR")]
    pub http_addr: Option<String>,

    /// Comma-separated riders, picked by order id [default: Zhang Fei].
    #[arg(long, env = "DISPATCH_RIDERS")]
    pub riders: Option<String>,

    /// The seed's slow dispatcher: this order id takes DISPATCH_SLOW_ORDER_MS to handle (off by default).
    #[arg(long, env = "DISPATCH_SLOW_ORDER_ID")]
    pub slow_order_id: Option<i64>,

    /// How long the slow order takes, in milliseconds [default: 3000].
    #[arg(long, env = "DISPATCH_SLOW_ORDER_MS")]
    pub slow_order_ms: Option<u64>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub database_ca_file: Option<PathBuf>,
    pub consumer: ConsumerConfig,
    pub http_addr: SocketAddr,
    pub dispatcher: Dispatcher,
}

/// Rejects `DISPATCH_*` variables that no setting reads: a typo would
/// otherwise silently leave the default in force.
pub fn check_environment(vars: impl Iterator<Item = (String, String)>) -> anyhow::Result<()> {
    let command = crate::cli::Cli::command();
    Ok(outbox_service::environment::check(
        &command,
        "DISPATCH_",
        &[],
        vars,
    )?)
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
        let ca_file = self.database_ca_file.as_deref();
        if let Some(line) = outbox_service::pg_tls::unverified_warning(
            database.ssl_mode,
            ca_file,
            "DISPATCH_DATABASE_CA_FILE",
        ) {
            tracing::warn!("{line}");
        }
        let amqp_url = self.amqp_url.unwrap_or_else(|| DEFAULT_AMQP_URL.into());
        outbox_service::amqp::check_urls(&amqp_url)?;
        let queue = name("DISPATCH_QUEUE", self.queue, DEFAULT_QUEUE)?;
        let defaults = Topology::named(DEFAULT_EXCHANGE, &queue);
        let topology = Topology {
            exchange: name("DISPATCH_EXCHANGE", self.exchange, DEFAULT_EXCHANGE)?,
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
            queue_type: match self.queue_type.as_deref().unwrap_or("classic") {
                "classic" => QueueType::Classic,
                "quorum" => QueueType::Quorum,
                other => bail!("DISPATCH_QUEUE_TYPE must be `classic` or `quorum`, not `{other}`"),
            },
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
            amqp_ca_file: self.amqp_ca_file,
            name: "dispatch".into(),
            ..base
        };
        if consumer.retry_max < consumer.retry_base {
            bail!("DISPATCH_RETRY_MAX_MS must be at least DISPATCH_RETRY_BASE_MS");
        }
        let http_addr = self.http_addr.as_deref().unwrap_or("127.0.0.1:9000");
        let http_addr = http_addr
            .parse()
            .map_err(|_| anyhow::anyhow!("DISPATCH_HTTP_ADDR `{http_addr}` is not host:port"))?;
        let riders: Vec<String> = self
            .riders
            .as_deref()
            .unwrap_or("Zhang Fei")
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
                    Duration::from_secs(3),
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
    let mut target = parse_url(url, ca_file)?;
    // parse_url names connections after the relay unless the URL names them.
    if target.config.get_application_name() == Some("outbox-relay") {
        target.config.application_name("dispatch");
    }
    Ok(target)
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
mod tests {
    use super::*;

    fn base() -> Settings {
        Settings {
            database_url: Some("postgres://u@localhost/db".into()),
            ..Settings::default()
        }
    }

    #[test]
    fn defaults_are_the_seeds() {
        let config = base().validate().expect("valid");
        let topology = &config.consumer.topology;
        assert_eq!(topology.exchange, "order_confirm_fanoutExchange");
        assert_eq!(topology.queue, "order_confirm_fanoutQueue");
        assert_eq!(topology.dead_letter_queue, "order_confirm_fanoutQueue.dlq");
        assert_eq!(topology.queue_type, QueueType::Classic);
        assert_eq!(config.http_addr.port(), 9000);
        assert_eq!(config.consumer.amqp_url, DEFAULT_AMQP_URL);
        assert!(config.dispatcher.slow_order.is_none());
    }

    #[test]
    fn derived_names_follow_the_queue() {
        let settings = Settings {
            queue: Some("q".into()),
            ..base()
        };
        let topology = settings.validate().expect("valid").consumer.topology;
        assert_eq!(
            (
                topology.retry_queue.as_str(),
                topology.dead_letter_exchange.as_str()
            ),
            ("q.retry", "q.dlx")
        );
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (
                Settings {
                    database_url: None,
                    ..base()
                },
                "DISPATCH_DATABASE_URL",
            ),
            (
                Settings {
                    queue_type: Some("stream".into()),
                    ..base()
                },
                "DISPATCH_QUEUE_TYPE",
            ),
            (
                Settings {
                    prefetch: Some(0),
                    ..base()
                },
                "DISPATCH_PREFETCH",
            ),
            (
                Settings {
                    http_addr: Some("nine".into()),
                    ..base()
                },
                "DISPATCH_HTTP_ADDR",
            ),
            (
                Settings {
                    slow_order_ms: Some(5),
                    ..base()
                },
                "DISPATCH_SLOW_ORDER_ID",
            ),
            (
                Settings {
                    riders: Some(" , ".into()),
                    ..base()
                },
                "DISPATCH_RIDERS",
            ),
            (
                Settings {
                    queue_expires_ms: Some(0),
                    ..base()
                },
                "DISPATCH_QUEUE_EXPIRES_MS",
            ),
            (
                Settings {
                    retry_max_ms: Some(10),
                    ..base()
                },
                "DISPATCH_RETRY_MAX_MS",
            ),
        ];
        for (settings, expected) in cases {
            let error = settings.validate().expect_err(expected).to_string();
            assert!(error.contains(expected), "{expected}: {error}");
        }
    }

    #[test]
    fn every_numeric_setting_is_range_checked() {
        type Bound = (&'static str, fn(&mut Settings, u64), u64, u64);
        let bounds: [Bound; 6] = [
            (
                "DISPATCH_QUEUE_EXPIRES_MS",
                |s, v| s.queue_expires_ms = Some(v),
                1,
                2_592_000_000,
            ),
            (
                "DISPATCH_MAX_DELIVERIES",
                |s, v| s.max_deliveries = Some(v as u32),
                1,
                10_000,
            ),
            (
                "DISPATCH_RETRY_BASE_MS",
                |s, v| s.retry_base_ms = Some(v),
                1,
                2_592_000_000,
            ),
            (
                "DISPATCH_RETRY_MAX_MS",
                |s, v| s.retry_max_ms = Some(v),
                1,
                2_592_000_000,
            ),
            (
                "DISPATCH_SHUTDOWN_TIMEOUT_MS",
                |s, v| s.shutdown_timeout_ms = Some(v),
                0,
                3_600_000,
            ),
            (
                "DISPATCH_SLOW_ORDER_MS",
                |s, v| s.slow_order_ms = Some(v),
                1,
                3_600_000,
            ),
        ];
        for (name, set, min, max) in bounds {
            let run = |value: u64| {
                // Room for the setting's own bounds: base ≤ max, a slow order id.
                let mut settings = Settings {
                    retry_base_ms: Some(1),
                    retry_max_ms: Some(2_592_000_000),
                    slow_order_id: Some(1),
                    ..base()
                };
                set(&mut settings, value);
                settings.validate()
            };
            run(min).unwrap_or_else(|e| panic!("{name}={min}: {e}"));
            run(max).unwrap_or_else(|e| panic!("{name}={max}: {e}"));
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
            }
        }
    }

    #[test]
    fn slow_order_defaults_to_the_seeds_three_seconds() {
        let settings = Settings {
            slow_order_id: Some(100001),
            ..base()
        };
        let slow = settings.validate().expect("valid").dispatcher.slow_order;
        assert_eq!(slow.map(|s| s.delay), Some(Duration::from_secs(3)));
    }

    #[test]
    fn unknown_environment_setting_is_rejected() {
        let typo = vec![("DISPATCH_PREFECH".to_string(), "5".to_string())];
        assert!(check_environment(typo.into_iter()).is_err());
        let known = vec![("DISPATCH_PREFETCH".to_string(), "5".to_string())];
        assert!(check_environment(known.into_iter()).is_ok());
    }
}
