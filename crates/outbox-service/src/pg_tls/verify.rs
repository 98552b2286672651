//! The rustls connector for a [`SslMode`]: which certificates are checked,
//! against which roots (a CA file or the system's), and the verifier that
//! checks a chain without the host name (`verify-ca`).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{PgTlsError, SslMode};

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
pub(crate) fn connector(
    mode: SslMode,
    ca_file: Option<&Path>,
) -> Result<MakeRustlsConnect, PgTlsError> {
    let ca = ca_file.map(load_ca_file).transpose()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algs = provider.signature_verification_algorithms;
    let roots = |ca: Option<RootCertStore>| ca.map_or_else(system_roots, Ok).map(Arc::new);

    let verifier: Arc<dyn ServerCertVerifier> = match (mode, ca) {
        (SslMode::VerifyFull, ca) => {
            WebPkiServerVerifier::builder_with_provider(roots(ca)?, Arc::clone(&provider))
                .build()
                .map_err(|e| PgTlsError::Tls(e.into()))?
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
        .map_err(|e| PgTlsError::Tls(e.into()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // As libpq 17 does: required by PostgreSQL 17's `sslnegotiation=direct`,
    // ignored by servers that do not know ALPN.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(config))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ca_file_is_named() {
        let path = Path::new("/nonexistent/pg-ca.pem");
        for mode in [SslMode::Require, SslMode::VerifyFull] {
            let message = connector(mode, Some(path))
                .err()
                .map(|e| outbox::chain_line(&e));
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
