//! TLS for Postgres connections with libpq `sslmode` semantics, on rustls (ring).
//!
//! | sslmode | encryption | certificate chain | host name |
//! |---|---|---|---|
//! | `disable` | never | – | – |
//! | `allow` | plaintext first, TLS if that fails | not checked | not checked |
//! | `prefer` | TLS first, plaintext if that fails | not checked | not checked |
//! | `require` | always | not checked (checked like `verify-ca` when `sslrootcert` is given, as libpq does) | not checked |
//! | `verify-ca` | always | against `sslrootcert` or the system roots | not checked |
//! | `verify-full` | always | against `sslrootcert` or the system roots | checked |
//!
//! `sslrootcert = "system"` means the system roots (as in libpq 16). This module builds the
//! connector and turns TLS failures into sentences; the fallback order of `allow` / `prefer` is
//! carried out by the connection code (`pool.rs`). It does not do client certificates.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::SslMode;
use crate::store::api::StoreError;

/// The TLS side of a connection setup: the mode and, unless it is `disable`, the connector.
#[derive(Clone)]
pub(super) struct Tls {
    pub mode: SslMode,
    pub connector: Option<MakeRustlsConnect>,
}

impl Tls {
    /// Builds the connector for `mode` (reading `sslrootcert` once, here).
    pub fn new(mode: SslMode, sslrootcert: Option<&Path>) -> Result<Self, StoreError> {
        if mode == SslMode::Disable {
            return Ok(Self {
                mode,
                connector: None,
            });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Unavailable(format!("TLS: cannot set up rustls: {e}")))?;
        let check_chain = match mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            // libpq: "if a root CA file exists, the behavior of sslmode=require will be the
            // same as that of verify-ca".
            SslMode::Require => sslrootcert.is_some(),
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => false,
        };
        let verifier: Arc<dyn ServerCertVerifier> = if check_chain {
            let roots = Arc::new(roots(sslrootcert, mode)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| {
                    StoreError::Unavailable(format!("TLS: cannot build the verifier: {e}"))
                })?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        } else {
            Arc::new(NoVerification(provider.signature_verification_algorithms))
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Self {
            mode,
            connector: Some(MakeRustlsConnect::new(config)),
        })
    }
}

/// The trust roots for a verifying mode.
fn roots(sslrootcert: Option<&Path>, mode: SslMode) -> Result<RootCertStore, StoreError> {
    let path = match sslrootcert {
        None => return Ok(crate::client::root_store()),
        Some(p) if p == Path::new("system") => return Ok(crate::client::root_store()),
        Some(p) => p,
    };
    let unreadable = |reason: String| {
        StoreError::Unavailable(format!(
            "TLS: cannot use sslrootcert {} (sslmode={}): {reason}",
            path.display(),
            mode.as_str()
        ))
    };
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| unreadable(e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| unreadable(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| unreadable(format!("not a usable CA certificate ({e})")))?;
    }
    if roots.is_empty() {
        return Err(unreadable("the file holds no certificate".to_owned()));
    }
    Ok(roots)
}

/// `verify-ca`: the full WebPKI check minus the host name. rustls checks the chain before the
/// name, so a name mismatch reported by the inner verifier means the chain was fine.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` / `require` / `allow`: encryption without authentication of the server, exactly
/// what libpq does in these modes. The handshake signatures are still checked, so the peer
/// must hold the key of the certificate it presents.
#[derive(Debug)]
struct NoVerification(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A sentence for a TLS failure found anywhere in `err`'s source chain (`None` if the failure
/// was not about TLS), e.g. "TLS: server certificate not trusted (sslmode=verify-full)".
pub(super) fn describe_failure(
    err: &(dyn std::error::Error + 'static),
    mode: SslMode,
    host: &str,
) -> Option<String> {
    let mode = mode.as_str();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(r) = rustls_error(e) {
            return Some(format!(
                "TLS: {} (sslmode={mode})",
                describe_rustls(r, host)
            ));
        }
        let text = e.to_string();
        if text.contains("server does not support TLS") {
            return Some(format!(
                "TLS: the server does not support TLS (sslmode={mode})"
            ));
        }
        next = e.source();
    }
    None
}

/// rustls errors reach us wrapped in `io::Error`s, whose `source()` skips the wrapped error
/// itself; look inside explicitly.
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(r) = e.downcast_ref::<rustls::Error>() {
        return Some(r);
    }
    let io = e.downcast_ref::<std::io::Error>()?;
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

fn describe_rustls(e: &rustls::Error, host: &str) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "server certificate not trusted".to_owned(),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("server certificate does not match host name \"{host}\"")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "server certificate has expired".to_owned()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "server certificate is not valid yet".to_owned()
            }
            CertificateError::Revoked => "server certificate has been revoked".to_owned(),
            CertificateError::BadEncoding => "server certificate is malformed".to_owned(),
            other => format!("server certificate rejected ({other:?})"),
        },
        other => format!("handshake failed ({other})"),
    }
}
