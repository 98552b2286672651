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

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::Config;
use tokio_postgres_rustls::MakeRustlsConnect;

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
    #[error("cannot read CA file {}: {error}", path.display())]
    CaFileUnreadable {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("invalid CA file {}: {reason}", path.display())]
    CaFileInvalid { path: PathBuf, reason: String },
    /// Verification was asked for, without a CA file, on a system with no roots.
    #[error("no system root certificates found{0}; give a CA file")]
    NoSystemRoots(String),
    /// rustls refused the configuration.
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// Parses a PostgreSQL URL or key=value string; returns the tokio-postgres
/// `Config` (with sslmode mapped to `Disable`/`Prefer`/`Require`) and our
/// [`SslMode`]. Without `sslmode` the mode is `Prefer`, as in libpq.
///
/// # Errors
///
/// [`PgTlsError::UnknownSslMode`] or [`PgTlsError::InvalidUrl`].
pub fn parse(url: &str) -> Result<(Config, SslMode), PgTlsError> {
    let (rest, value) = match url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    {
        Some(after_scheme) => take_sslmode_from_url(url, url.len() - after_scheme.len()),
        None => take_sslmode_from_keywords(url),
    };
    let mode = value.map_or(Ok(SslMode::Prefer), |v| v.parse())?;
    let mut config = Config::from_str(&rest).map_err(|e| {
        // The cause alone ("invalid value for option `port`"): tokio-postgres'
        // causes name options, byte offsets or one character, never a value,
        // so unlike the whole string they cannot leak the password.
        let reason =
            std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
        PgTlsError::InvalidUrl(reason)
    })?;
    config.ssl_mode(mode.negotiation());
    Ok((config, mode))
}

/// The connector to pass to `Config::connect` for that mode (for `Disable` a
/// connector is still returned; tokio-postgres won't use it).
///
/// A given CA file is read in every mode, so a wrong path shows at start-up.
/// `Prefer` never checks the certificate: on a failed check tokio-postgres
/// would give up rather than fall back to plain TCP as libpq does, so checking
/// could only break connections that `Prefer` allows in clear anyway.
///
/// # Errors
///
/// The CA file is unreadable or holds no usable certificate, or a verifying
/// mode has no CA file and the system has no roots.
pub fn connector(mode: SslMode, ca_file: Option<&Path>) -> Result<MakeRustlsConnect, PgTlsError> {
    let ca = ca_file.map(load_ca_file).transpose()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algs = provider.signature_verification_algorithms;
    let roots = |ca: Option<RootCertStore>| ca.map_or_else(system_roots, Ok).map(Arc::new);

    let verifier: Arc<dyn ServerCertVerifier> = match (mode, ca) {
        (SslMode::VerifyFull, ca) => {
            WebPkiServerVerifier::builder_with_provider(roots(ca)?, Arc::clone(&provider))
                .build()
                .map_err(|e| PgTlsError::Tls(e.to_string()))?
        }
        (SslMode::VerifyCa, ca) => Arc::new(NoHostnameCheck {
            roots: Some(roots(ca)?),
            algs,
        }),
        // libpq checks the chain in `require` too once it has a root file.
        (SslMode::Require, Some(ca)) => Arc::new(NoHostnameCheck {
            roots: Some(Arc::new(ca)),
            algs,
        }),
        (SslMode::Disable | SslMode::Prefer | SslMode::Require, _) => {
            Arc::new(NoHostnameCheck { roots: None, algs })
        }
    };

    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgTlsError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // As libpq 17 does: required by PostgreSQL 17's `sslnegotiation=direct`,
    // ignored by servers that do not know ALPN.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(config))
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

/// Reads a PEM file of one or more CA certificates.
fn load_ca_file(path: &Path) -> Result<RootCertStore, PgTlsError> {
    let pem = std::fs::read(path).map_err(|error| PgTlsError::CaFileUnreadable {
        path: path.to_owned(),
        error,
    })?;
    let invalid = |reason: String| PgTlsError::CaFileInvalid {
        path: path.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| invalid(format!("malformed PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| invalid(format!("unusable certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(invalid("no PEM certificate in it".into()));
    }
    Ok(roots)
}

/// The operating system's trusted roots.
fn system_roots() -> Result<RootCertStore, PgTlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    // Stores often hold a few certificates webpki cannot parse; the rest
    // are still good, so only an empty result is an error.
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = found.errors.first().map(|e| format!(" ({e})"));
        return Err(PgTlsError::NoSystemRoots(why.unwrap_or_default()));
    }
    Ok(roots)
}

/// Checks the chain against `roots` when there are some, and never the host
/// name (`verify-ca`); without roots it takes any certificate (`require`).
/// Handshake signatures are checked either way, as rustls needs them.
#[derive(Debug)]
struct NoHostnameCheck {
    roots: Option<Arc<RootCertStore>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoHostnameCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algs.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Removes `sslmode` from the query of a `postgres://` URL; `authority` is
/// where the part after the scheme starts. Returns the rest and the last value.
fn take_sslmode_from_url(url: &str, authority: usize) -> (String, Option<String>) {
    // Like tokio-postgres, everything up to the first `@` is credentials, so a
    // `?` in an unencoded password does not start the query.
    let host = url[authority..]
        .find('@')
        .map_or(authority, |at| authority + at + 1);
    let Some(query) = url[host..].find('?').map(|q| host + q) else {
        return (url.to_owned(), None);
    };
    let mut mode = None;
    let kept: Vec<&str> = url[query + 1..]
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((key, value)) if decode(key) == "sslmode" => {
                mode = Some(decode(value).into_owned());
                false
            }
            _ => true,
        })
        .collect();
    let mut rest = url[..query].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    (rest, mode)
}

/// Percent-decodes a query key or value, as tokio-postgres does.
fn decode(s: &str) -> Cow<'_, str> {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy()
}

/// Removes `sslmode = value` pairs from a key=value string, tokenizing as
/// tokio-postgres does (spaces around `=`, single quotes, backslash escapes).
/// At a syntax error it stops and leaves the rest for tokio-postgres to report.
fn take_sslmode_from_keywords(s: &str) -> (String, Option<String>) {
    let mut cursor = Cursor { s, at: 0 };
    let mut rest = String::with_capacity(s.len());
    let mut copied = 0;
    let mut mode = None;
    loop {
        cursor.skip_ws();
        let start = cursor.at;
        let key = cursor.take_while(|c| !c.is_whitespace() && c != '=');
        if key.is_empty() {
            break;
        }
        cursor.skip_ws();
        if !cursor.eat('=') {
            break;
        }
        cursor.skip_ws();
        let Some(value) = cursor.value() else { break };
        if key == "sslmode" {
            rest.push_str(&s[copied..start]);
            copied = cursor.at;
            mode = Some(value);
        }
    }
    rest.push_str(&s[copied..]);
    (rest, mode)
}

/// A position in a key=value string.
struct Cursor<'a> {
    s: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<char> {
        self.s[self.at..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, target: char) -> bool {
        let found = self.peek() == Some(target);
        if found {
            self.at += target.len_utf8();
        }
        found
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let start = self.at;
        while self.peek().is_some_and(&f) {
            self.bump();
        }
        &self.s[start..self.at]
    }

    fn skip_ws(&mut self) {
        self.take_while(char::is_whitespace);
    }

    /// A quoted or bare value with escapes resolved; `None` on a syntax error.
    fn value(&mut self) -> Option<String> {
        let quoted = self.eat('\'');
        let mut value = String::new();
        loop {
            match self.peek() {
                Some('\'') if quoted => {
                    self.bump();
                    return Some(value);
                }
                Some(c) if !quoted && c.is_whitespace() => break,
                None if quoted => return None,
                None => break,
                Some(_) => {
                    let c = self.bump()?;
                    let c = if c == '\\' { self.bump() } else { Some(c) };
                    value.extend(c);
                }
            }
        }
        (!value.is_empty()).then_some(value)
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
    use tokio_postgres::config::Host;

    fn parse_ok(url: &str) -> (Config, SslMode) {
        match parse(url) {
            Ok(parsed) => parsed,
            Err(e) => panic!("{url}: {e}"),
        }
    }

    #[test]
    fn url_with_verify_full() {
        let (config, mode) =
            parse_ok("postgres://relay:s3cret@db.example.com:6432/shop?sslmode=verify-full");
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(config.get_hosts(), [Host::Tcp("db.example.com".into())]);
        assert_eq!(config.get_ports(), [6432]);
        assert_eq!(config.get_dbname(), Some("shop"));
        assert_eq!(config.get_user(), Some("relay"));
        assert_eq!(config.get_password(), Some(&b"s3cret"[..]));
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn url_keeps_other_parameters() {
        let (config, mode) = parse_ok(
            "postgresql://u@h/db?application_name=relay&sslmode=verify-ca&connect_timeout=7",
        );
        assert_eq!(mode, SslMode::VerifyCa);
        assert_eq!(config.get_application_name(), Some("relay"));
        assert_eq!(
            config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(7))
        );
    }

    #[test]
    fn question_mark_in_password_is_not_the_query() {
        let (config, mode) = parse_ok("postgres://u:pa?ss@h/db?sslmode=disable");
        assert_eq!(mode, SslMode::Disable);
        assert_eq!(config.get_password(), Some(&b"pa?ss"[..]));
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
    }

    #[test]
    fn default_is_prefer() {
        let (config, mode) = parse_ok("postgres://u@h/db");
        assert_eq!(mode, SslMode::Prefer);
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Prefer
        );
        assert_eq!(parse_ok("host=h user=u").1, SslMode::Prefer);
    }

    #[test]
    fn keyword_form() {
        let (config, mode) = parse_ok(
            "host=db.example.com port=5433 sslmode = 'verify-full' dbname=shop user=relay password='a b\\'c'",
        );
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(config.get_hosts(), [Host::Tcp("db.example.com".into())]);
        assert_eq!(config.get_ports(), [5433]);
        assert_eq!(config.get_dbname(), Some("shop"));
        assert_eq!(config.get_user(), Some("relay"));
        assert_eq!(config.get_password(), Some(&b"a b'c"[..]));
    }

    #[test]
    fn last_sslmode_wins() {
        assert_eq!(
            parse_ok("sslmode=disable host=h sslmode=verify-ca").1,
            SslMode::VerifyCa
        );
        assert_eq!(
            parse_ok("postgres://h/?sslmode=disable&sslmode=require").1,
            SslMode::Require
        );
    }

    #[test]
    fn unknown_sslmode_is_named() {
        for url in [
            "postgres://u:pw@h/db?sslmode=bogus",
            "host=h sslmode=bogus password=pw",
        ] {
            let message = parse(url).map(|_| ()).err().map(|e| e.to_string());
            let message = message.unwrap_or_default();
            assert!(message.contains("`bogus`"), "{message}");
            assert!(!message.contains("pw"), "{message}");
        }
    }

    #[test]
    fn bad_port_does_not_echo_the_password() {
        for url in [
            "postgres://relay:hunter2@db:54x2/shop?sslmode=require",
            "host=db port=hunter2 password=hunter2",
        ] {
            let message = parse(url).map(|_| ()).err().map(|e| e.to_string());
            let message = message.unwrap_or_default();
            assert!(message.starts_with("invalid PostgreSQL URL: "), "{message}");
            assert!(message.contains("port"), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }

    #[test]
    fn syntax_error_after_sslmode_is_still_reported() {
        let message = parse("sslmode=verify-full host='unterminated")
            .map(|_| ())
            .err()
            .map(|e| e.to_string());
        assert!(message.unwrap_or_default().contains("unterminated"));
    }

    #[test]
    fn missing_ca_file_is_named() {
        let path = Path::new("/nonexistent/pg-ca.pem");
        for mode in [SslMode::Require, SslMode::VerifyFull] {
            let message = connector(mode, Some(path)).err().map(|e| e.to_string());
            let message = message.unwrap_or_default();
            assert!(
                message.starts_with("cannot read CA file /nonexistent/pg-ca.pem: "),
                "{message}"
            );
        }
    }

    #[test]
    fn ca_file_without_certificates_is_refused() {
        let path = std::env::temp_dir().join(format!("pg-tls-empty-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").expect("write temp file");
        let message = connector(SslMode::VerifyCa, Some(&path))
            .err()
            .map(|e| e.to_string());
        std::fs::remove_file(&path).ok();
        let message = message.unwrap_or_default();
        assert!(message.starts_with("invalid CA file "), "{message}");
        assert!(message.contains(&*path.to_string_lossy()), "{message}");
    }

    #[test]
    fn connector_builds_for_every_mode() {
        for mode in [SslMode::Disable, SslMode::Prefer, SslMode::Require] {
            assert!(connector(mode, None).is_ok(), "{mode:?}");
        }
        // These need roots; a machine without a system store must say so.
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            match connector(mode, None) {
                Ok(_) | Err(PgTlsError::NoSystemRoots(_)) => {}
                Err(e) => panic!("{mode:?}: {e}"),
            }
        }
    }

    /// A self-signed P-256 CA made with openssl for these tests only.
    const TEST_CA: &str = "\
-----BEGIN CERTIFICATE-----\n\
MIIBiTCCAS+gAwIBAgIUZ18w92gQtiGXfQMFhNL3xWNvc7cwCgYIKoZIzj0EAwIw\n\
GTEXMBUGA1UEAwwOcGctdGxzIHRlc3QgQ0EwIBcNMjYxMTI2MjMxOTMxWhgPMjEy\n\
NjExMDIyMzE5MzFaMBkxFzAVBgNVBAMMDnBnLXRscyB0ZXN0IENBMFkwEwYHKoZI\n\
zj0CAQYIKoZIzj0DAQcDQgAEwvx/dANHIsvZpn4iJSoHnGh85AJpSCRUHTUYRYfm\n\
0x/pnZsBPBHqmcpdcfr4Z7t9BIQBUkN2ehK9rjV06akLraNTMFEwHQYDVR0OBBYE\n\
FKhaFf/30w2mZc8RCaHEnXB7oKhUMB8GA1UdIwQYMBaAFKhaFf/30w2mZc8RCaHE\n\
nXB7oKhUMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIga5w/1nJS\n\
c9PeF1Y9vTg+MCqEZa+S6Gn50ayarGOSi8QCIQC424/oYD7+GhqC/zpKt60E2mGX\n\
nUfkCZKKiMy0h39EWA==\n\
-----END CERTIFICATE-----\n";

    #[test]
    fn connector_builds_for_every_mode_with_a_ca_file() {
        let path = std::env::temp_dir().join(format!("pg-tls-ca-{}.pem", std::process::id()));
        std::fs::write(&path, TEST_CA).expect("write temp file");
        let results: Vec<_> = [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ]
        .into_iter()
        .map(|mode| (mode, connector(mode, Some(&path)).err()))
        .collect();
        std::fs::remove_file(&path).ok();
        for (mode, error) in results {
            assert!(error.is_none(), "{mode:?}: {error:?}");
        }
    }
}
