//! TLS for PostgreSQL connections: libpq's `sslmode` on top of `rustls`.
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require`, and its
//! parser rejects `verify-ca` and `verify-full`. [`parse`] therefore takes
//! `sslmode` out of the connection string, hands the rest to tokio-postgres and
//! returns the full strength as [`SslMode`]; [`connector`] turns that strength
//! into a rustls configuration:
//!
//! | sslmode             | TLS                     | certificate check                          |
//! |---------------------|-------------------------|--------------------------------------------|
//! | `disable`           | never                   | none                                       |
//! | `prefer` (default)  | when the server has it  | none                                       |
//! | `require`           | always                  | none, or the chain when a CA file is given |
//! | `verify-ca`         | always                  | chain                                      |
//! | `verify-full`       | always                  | chain and host name                        |
//!
//! The chain is checked against the CA file when one is given, else against
//! the operating system's roots (rustls-native-certs, which also honours
//! `SSL_CERT_FILE` and `SSL_CERT_DIR`), like libpq's `sslrootcert=system`.
//! Services whose CA is private (Amazon RDS, Cloud SQL) need the CA file.
//!
//! Crypto is rustls' ring provider, set on each connector, so the process-wide
//! default provider never matters.
//!
//! - `url`: taking `sslmode` out of a URL or key=value string ([`parse`]);
//! - `verify`: the rustls connector and its certificate checks ([`connector`]).

mod url;
mod verify;

use std::path::{Path, PathBuf};
use std::str::FromStr;

pub(crate) use url::parse;
pub(crate) use verify::connector;

/// How hard a connection insists on TLS, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, without checking the certificate.
    Prefer,
    /// TLS always; the certificate is checked only when a CA file is given.
    Require,
    /// TLS always, with a certificate chain to a trusted root.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The mode tokio-postgres should negotiate; the checking is the connector's.
    fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            Self::Disable => Pg::Disable,
            Self::Prefer => Pg::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => Pg::Require,
        }
    }
}

impl FromStr for SslMode {
    type Err = PgTlsError;

    fn from_str(value: &str) -> Result<Self, PgTlsError> {
        match value {
            "disable" => Ok(Self::Disable),
            "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-ca" => Ok(Self::VerifyCa),
            "verify-full" => Ok(Self::VerifyFull),
            other => Err(PgTlsError::UnknownSslMode(other.to_owned())),
        }
    }
}

/// Why a connection string or TLS setting was refused. Messages are one line
/// and never contain the password.
#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    /// tokio-postgres refused the connection string.
    #[error("invalid PostgreSQL URL: {0}")]
    InvalidUrl(String),
    /// `sslmode` has a value libpq would not accept either, or `allow`, which
    /// tokio-postgres cannot do (plain TCP first, TLS on refusal).
    #[error("unknown sslmode `{0}` (expected disable, prefer, require, verify-ca or verify-full)")]
    UnknownSslMode(String),
    /// The CA file could not be read.
    #[error("cannot read CA file {}", path.display())]
    CaFileUnreadable {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("invalid CA file {}: {reason}", path.display())]
    CaFileInvalid { path: PathBuf, reason: String },
    /// Verification was asked for, without a CA file, on a system with no roots.
    #[error("no system root certificates found{0}; give a CA file")]
    NoSystemRoots(String),
    /// rustls refused the configuration.
    #[error("TLS setup failed")]
    Tls(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The warning to log once at start when the connection will be encrypted
/// but the server not checked: `require` without a CA file takes any
/// certificate (as libpq does), which a user asking for TLS may not expect.
/// `ca_setting` names the variable that gives the CA file.
pub fn unverified_warning(
    mode: SslMode,
    ca_file: Option<&Path>,
    ca_setting: &str,
) -> Option<String> {
    (mode == SslMode::Require && ca_file.is_none()).then(|| {
        format!(
            "sslmode=require encrypts but does not verify the server: set {ca_setting} or sslmode=verify-full"
        )
    })
}

/// Logs [`unverified_warning`]'s line, when there is one: once, at start.
pub fn warn_if_unverified(mode: SslMode, ca_file: Option<&Path>, ca_setting: &str) {
    if let Some(line) = unverified_warning(mode, ca_file, ca_setting) {
        tracing::warn!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_require_without_a_ca_file_warns() {
        let ca = Path::new("/etc/ca.pem");
        let line = unverified_warning(SslMode::Require, None, "OUTBOX_DATABASE_CA_FILE")
            .expect("require without a CA file warns");
        assert_eq!(
            line,
            "sslmode=require encrypts but does not verify the server: \
             set OUTBOX_DATABASE_CA_FILE or sslmode=verify-full"
        );
        assert!(unverified_warning(SslMode::Require, Some(ca), "X").is_none());
        for mode in [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert!(unverified_warning(mode, None, "X").is_none(), "{mode:?}");
            assert!(
                unverified_warning(mode, Some(ca), "X").is_none(),
                "{mode:?}"
            );
        }
        let (_, mode) = parse("postgres://u@h/db?sslmode=require").expect("parse");
        assert!(unverified_warning(mode, None, "X").is_some());
        let (_, mode) = parse("host=h sslmode=require").expect("parse");
        assert!(unverified_warning(mode, None, "X").is_some());
    }
}
