//! Every default of the relay's settings, once: [`Settings::validate`]
//! applies them and `--help` names them (`outbox_service::with_default!`).
//!
//! [`Settings::validate`]: super::Settings::validate

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

pub use outbox_service::amqp::DEFAULT_URL as AMQP_URL;

pub const MODE: &str = "notify";
pub const BATCH_SIZE: u32 = 500;
pub const MAX_IN_FLIGHT: u32 = 256;
pub const SWEEP_INTERVAL_MS: u64 = 1000;
pub const LEASE_MS: u64 = 30_000;
pub const MAX_ATTEMPTS: u32 = 5;
pub const RETRY_BASE_MS: u64 = 1000;
pub const RETRY_MAX_MS: u64 = 300_000;
/// Long enough to answer "was it published, and when?" during an incident.
pub const RETENTION: &str = "1h";
pub const BLOCK_ON_DEAD_HEAD: bool = true;
/// Below half the shipped consumers' prefetch (256), so that a key's rows
/// confirmed behind a failed one all fit in what a consumer holds.
pub const KEY_PIPELINE: u32 = 64;
pub const MAX_PAYLOAD_BYTES: u32 = 16 << 20;
/// Or half the lease, when that is shorter: see `validate`.
pub const CONFIRM_TIMEOUT_MS: u64 = 10_000;
pub const MAX_IN_FLIGHT_BYTES: u64 = 32 << 20;
pub const SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
pub const ALERT_EMAIL_FROM: &str = "outbox-relay@localhost";
pub const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9100);
