//! TLS to PostgreSQL with libpq's `sslmode` meanings, on rustls (the same rustls and aws-lc-rs
//! provider reqwest already links).
//!
//! tokio-postgres knows only `sslmode=disable|prefer|require` and rejects libpq's certificate
//! options, so [`parse`] reads them out of the URL first, hands the rest to
//! `tokio_postgres::Config` (with `verify-ca`/`verify-full` mapped to `require`), and keeps the
//! real mode in the connector:
//!
//! | sslmode       | TLS                                 | certificate check                     |
//! |---------------|-------------------------------------|---------------------------------------|
//! | `disable`     | never                               | -                                     |
//! | `prefer`      | if the server offers it, else plain | none                                  |
//! | `require`     | always                              | none (chain if sslrootcert is a file) |
//! | `verify-ca`   | always                              | chain to `sslrootcert`                |
//! | `verify-full` | always                              | chain + host name                     |
//!
//! `sslrootcert` is a PEM file or `system` (the platform roots; as in libpq 16 it defaults
//! sslmode to `verify-full` and refuses weaker modes). `sslcert` + `sslkey` (PEM) present a
//! client certificate. `sslmode=allow` is refused: tokio-postgres cannot try plain first.
//!
//! `channel_binding=disable|prefer|require` (libpq's, read by tokio-postgres) binds a SCRAM
//! login to the TLS session: the stream reports `tls-server-end-point`, so the driver uses
//! SCRAM-SHA-256-PLUS whenever the server offers it, and with `require` refuses a login without
//! it (a server that does not ask for SCRAM, or no TLS). `require` with `sslmode=disable` is
//! refused here, by name, before any connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// libpq's `sslmode`, including the two modes tokio-postgres does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, String> {
        match value {
            "disable" => Ok(Self::Disable),
            "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-ca" => Ok(Self::VerifyCa),
            "verify-full" => Ok(Self::VerifyFull),
            "allow" => Err("sslmode=allow is not supported (the driver cannot try plaintext first): \
                            use sslmode=prefer or sslmode=disable"
                .to_owned()),
            other => Err(format!(
                "sslmode={other} is unknown: expected disable, prefer, require, verify-ca or verify-full"
            )),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: it negotiates TLS, the connector does the checking.
    fn driver_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require | Self::VerifyCa | Self::VerifyFull => "require",
        }
    }
}

/// Where trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RootCert {
    File(String),
    System,
}

impl RootCert {
    fn option(&self) -> String {
        match self {
            Self::File(path) => format!("sslrootcert={path}"),
            Self::System => "sslrootcert=system".to_owned(),
        }
    }
}

/// The TLS options of one URL, after libpq's defaults are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TlsOptions {
    mode: SslMode,
    root_cert: Option<RootCert>,
    client_cert: Option<(String, String)>,
}

/// The libpq TLS options read out of a URL, and the URL left for tokio-postgres.
#[derive(Debug, PartialEq, Eq)]
struct Split {
    options: TlsOptions,
    driver_url: String,
}

/// Reads `sslmode`, `sslrootcert`, `sslcert`, `sslkey` out of the query string (raw text of
/// every other parameter is kept as written, so the driver decodes it as before).
fn split_url(url: &str) -> Result<Split, String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, query),
        None => (url, ""),
    };
    let mut mode = None;
    let mut root_cert = None;
    let mut cert = None;
    let mut key = None;
    let mut binding_required = false;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let Some((name, value)) = url::form_urlencoded::parse(pair.as_bytes()).next() else {
            continue;
        };
        match &*name {
            "sslmode" => mode = Some(SslMode::parse(&value)?),
            "sslrootcert" if value == "system" => root_cert = Some(RootCert::System),
            "sslrootcert" => root_cert = Some(RootCert::File(value.into_owned())),
            "sslcert" => cert = Some(value.into_owned()),
            "sslkey" => key = Some(value.into_owned()),
            // The driver reads it too (SCRAM-SHA-256-PLUS); read here only to check it fits.
            "channel_binding" => {
                binding_required = value == "require";
                kept.push(pair);
            }
            _ => kept.push(pair),
        }
    }
    let client_cert = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => return Err("sslcert is set without sslkey: give both or neither".to_owned()),
        (None, Some(_)) => return Err("sslkey is set without sslcert: give both or neither".to_owned()),
    };
    let mode = match (mode, &root_cert) {
        // libpq 16: sslrootcert=system defaults to verify-full and refuses anything weaker,
        // since the public roots vouch for any host that bought a certificate.
        (None | Some(SslMode::VerifyFull), Some(RootCert::System)) => SslMode::VerifyFull,
        (Some(weak), Some(RootCert::System)) => {
            return Err(format!(
                "sslmode={} cannot be used with sslrootcert=system: use sslmode=verify-full",
                weak.as_str()
            ));
        }
        // libpq: require with a CA file behaves as verify-ca.
        (Some(SslMode::Require), Some(RootCert::File(_))) => SslMode::VerifyCa,
        (mode, _) => mode.unwrap_or(SslMode::Prefer),
    };
    if binding_required && mode == SslMode::Disable {
        return Err("channel_binding=require needs TLS, and sslmode=disable never uses it: \
                    use sslmode=verify-full (or require) with channel_binding=require"
            .to_owned());
    }
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
        return Err(format!("sslmode={} needs sslrootcert=<CA file> or sslrootcert=system", mode.as_str()));
    }
    let mut driver_url = base.to_owned();
    driver_url.push_str(&format!("?sslmode={}", mode.driver_str()));
    for pair in kept {
        driver_url.push('&');
        driver_url.push_str(pair);
    }
    Ok(Split { options: TlsOptions { mode, root_cert, client_cert }, driver_url })
}

/// Parses a PostgreSQL URL (or key=value string) into the driver's config and the connector
/// its TLS options ask for. Errors name the offending option.
pub fn parse(url: &str) -> Result<(tokio_postgres::Config, MakeRustls), String> {
    // Key=value connection strings go to the driver unchanged (no libpq-only options there).
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let (options, driver_url) = if is_url {
        let split = split_url(url)?;
        (split.options, split.driver_url)
    } else {
        (TlsOptions { mode: SslMode::Prefer, root_cert: None, client_cert: None }, url.to_owned())
    };
    let config: tokio_postgres::Config =
        driver_url.parse().map_err(|e: tokio_postgres::Error| crate::text::with_causes(&e))?;
    let tls = MakeRustls::new(&options)?;
    Ok((config, tls))
}

/// Checks a URL the way [`parse`] reads it, without reading any certificate file (config load
/// must not depend on files that are mounted later).
pub fn check(url: &str) -> Result<(), String> {
    let split = split_url(url)?;
    split.driver_url.parse::<tokio_postgres::Config>().map_err(|e| crate::text::with_causes(&e))?;
    Ok(())
}

/// The `sslmode` `url` connects with once libpq's defaults are applied (`prefer` when it names
/// none, `verify-full` with `sslrootcert=system`, `verify-ca` for `require` with a CA file), as
/// libpq spells it: what the production TLS floor judges (`DatabaseConfig::tls_floor`).
pub(super) fn effective_sslmode(url: &str) -> Result<&'static str, String> {
    split_url(url).map(|split| split.options.mode.as_str())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn load_roots(root: &RootCert) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match root {
        RootCert::File(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect())
                .map_err(|e| format!("sslrootcert={path}: cannot read: {e}"))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("sslrootcert={path}: no usable CA certificate in the file"));
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why =
                    found.errors.first().map(|e| e.to_string()).unwrap_or_else(|| "none installed".into());
                return Err(format!("sslrootcert=system: no platform CA certificates ({why})"));
            }
        }
    }
    Ok(store)
}

fn load_client_cert(
    cert: &str,
    key: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("sslcert={cert}: cannot read: {e}"))?;
    if chain.is_empty() {
        return Err(format!("sslcert={cert}: no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("sslkey={key}: cannot read: {e}"))?;
    Ok((chain, key))
}

/// A `MakeTlsConnect` for tokio-postgres and deadpool built from one URL's TLS options.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
}

impl MakeRustls {
    fn new(options: &TlsOptions) -> Result<Self, String> {
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> = match &options.root_cert {
            Some(root) if options.mode != SslMode::Prefer && options.mode != SslMode::Disable => {
                let roots = load_roots(root)?;
                let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("{}: {e}", root.option()))?;
                Arc::new(Verify { inner, mode: options.mode, root: root.option() })
            }
            _ => Arc::new(NoVerify { algorithms: provider.signature_verification_algorithms }),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("sslmode={}: {e}", options.mode.as_str()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &options.client_cert {
            Some((cert, key)) => {
                let (chain, key_der) = load_client_cert(cert, key)?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| format!("sslcert={cert}, sslkey={key}: {e}"))?
            }
            None => builder.with_no_client_auth(),
        };
        // What libpq 17 sends; required by servers accepting sslnegotiation=direct.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Self { config: Arc::new(config) })
    }
}

/// `require` and `prefer`: encrypt, trust any certificate (but still check the handshake
/// signature, so the session is bound to the certificate the server sent).
#[derive(Debug)]
struct NoVerify {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoVerify {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `verify-ca` and `verify-full`: webpki's chain check; the host name check only for
/// verify-full. Failures are reworded to name the option that asked for the check.
#[derive(Debug)]
struct Verify {
    inner: Arc<WebPkiServerVerifier>,
    mode: SslMode,
    root: String,
}

/// A certificate failure worded for the operator; carried inside rustls's error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

fn refuse(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(Refused(message)))))
}

/// rustls lists presented names in their Debug form (`DnsName("db.example.com")`).
fn presented_name(name: &str) -> &str {
    match (name.find('"'), name.rfind('"')) {
        (Some(start), Some(end)) if start < end => &name[start + 1..end],
        _ => name,
    }
}

/// The operator's wording of a refused certificate instead of rustls's Debug of its wrapper.
fn reword(error: io::Error) -> io::Error {
    let refused =
        error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).and_then(|e| match e {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                other.0.downcast_ref::<Refused>().map(|r| r.0.clone())
            }
            _ => None,
        });
    match refused {
        Some(message) => io::Error::new(error.kind(), message),
        None => error,
    }
}

fn server_name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(dns) => dns.as_ref().to_owned(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

impl ServerCertVerifier for Verify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mode = self.mode.as_str();
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(verified) => Ok(verified),
            // webpki checks the name only after the chain, so a name error means the chain is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.mode == SslMode::VerifyCa => Ok(ServerCertVerified::assertion()),
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                expected,
                presented,
            })) => Err(refuse(format!(
                "sslmode={mode}: certificate is for host {}, not {}",
                presented.iter().map(|name| presented_name(name)).collect::<Vec<_>>().join(", "),
                server_name_text(&expected)
            ))),
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)) => Err(refuse(
                format!("sslmode={mode}: certificate is not for host {}", server_name_text(server_name)),
            )),
            Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
                Err(refuse(format!("sslmode={mode}: certificate is not signed by a CA in {}", self.root)))
            }
            Err(other) => Err(refuse(format!("sslmode={mode} ({}): {other}", self.root))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnect, io::Error> {
        // A Unix socket has no host name ("" here) and never negotiates TLS: a bad name is
        // only an error once a handshake is actually attempted.
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("host {host:?} cannot be checked against a certificate: {e}"));
        Ok(RustlsConnect { config: self.config.clone(), name })
    }
}

/// One connection attempt's TLS handshake.
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: Result<ServerName<'static>, String>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, io::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = self.name.map_err(io::Error::other)?;
            let tls =
                tokio_rustls::TlsConnector::from(self.config).connect(name, stream).await.map_err(reword)?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

/// An established TLS session.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S> tokio_postgres::tls::TlsStream for RustlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// `tls-server-end-point` (RFC 5929): the hash of the certificate the server presented, so
    /// SCRAM-SHA-256-PLUS binds the password exchange to this TLS session and a relay that
    /// terminated TLS with a certificate of its own cannot complete it. Without a certificate or
    /// with a signature hash RFC 5929 does not cover, SCRAM runs unbound (refused with
    /// `channel_binding=require`).
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        match session.peer_certificates().and_then(|chain| chain.first()) {
            Some(end_entity) => match tls_server_end_point(end_entity) {
                Some(hash) => ChannelBinding::tls_server_end_point(hash),
                None => ChannelBinding::none(),
            },
            None => ChannelBinding::none(),
        }
    }
}

/// The hash of a DER certificate that `tls-server-end-point` is made of (RFC 5929 section 4.1):
/// the hash function of the certificate's signature algorithm, SHA-256 where that is MD5 or
/// SHA-1. `None` when the signature names no single hash of these (RSA-PSS, Ed25519) or the
/// certificate cannot be read.
fn tls_server_end_point(certificate: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    let hash = match signature_algorithm(certificate)? {
        oid::MD5_RSA | oid::SHA1_RSA | oid::SHA256_RSA | oid::ECDSA_SHA1 | oid::ECDSA_SHA256 => {
            sha2::Sha256::digest(certificate).to_vec()
        }
        oid::SHA224_RSA | oid::ECDSA_SHA224 => sha2::Sha224::digest(certificate).to_vec(),
        oid::SHA384_RSA | oid::ECDSA_SHA384 => sha2::Sha384::digest(certificate).to_vec(),
        oid::SHA512_RSA | oid::ECDSA_SHA512 => sha2::Sha512::digest(certificate).to_vec(),
        _ => return None,
    };
    Some(hash)
}

/// DER contents of the signature algorithm OIDs `tls-server-end-point` knows.
mod oid {
    // 1.2.840.113549.1.1.n: PKCS #1 (RSA) signatures.
    pub const MD5_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04];
    pub const SHA1_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05];
    pub const SHA256_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
    pub const SHA384_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
    pub const SHA512_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
    pub const SHA224_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0e];
    // 1.2.840.10045.4.1 and 1.2.840.10045.4.3.n: ECDSA signatures.
    pub const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    pub const ECDSA_SHA224: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x01];
    pub const ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    pub const ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    pub const ECDSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];
}

const DER_SEQUENCE: u8 = 0x30;
const DER_OID: u8 = 0x06;

/// The OID of a DER certificate's `signatureAlgorithm`:
/// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm SEQUENCE { OID, … }, … }`.
fn signature_algorithm(certificate: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = der_element(certificate, DER_SEQUENCE)?;
    let (_tbs_certificate, rest) = der_element(certificate, DER_SEQUENCE)?;
    let (algorithm, _) = der_element(rest, DER_SEQUENCE)?;
    let (oid, _) = der_element(algorithm, DER_OID)?;
    Some(oid)
}

/// The DER element with `tag` at the start of `input`: its contents and the bytes after it.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    if found != tag {
        return None;
    }
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form: the low bits count the length bytes (0 is BER's indefinite length).
        let count = usize::from(first & 0x7f);
        if count == 0 || count > std::mem::size_of::<u32>() || rest.len() < count {
            return None;
        }
        let (bytes, rest) = rest.split_at(count);
        (bytes.iter().fold(0usize, |length, byte| (length << 8) | usize::from(*byte)), rest)
    };
    (rest.len() >= length).then(|| rest.split_at(length))
}

impl<S> AsyncRead for RustlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S> AsyncWrite for RustlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(url: &str) -> Result<TlsOptions, String> {
        split_url(url).map(|s| s.options)
    }

    #[test]
    fn libpq_only_options_are_taken_out_and_the_rest_kept_as_written() {
        let split = split_url(
            "postgres://u:p@db:5432/app?application_name=a%20b&sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=5",
        )
        .expect("splits");
        assert_eq!(
            split.driver_url,
            "postgres://u:p@db:5432/app?sslmode=require&application_name=a%20b&connect_timeout=5"
        );
        assert_eq!(split.options.mode, SslMode::VerifyFull);
        assert_eq!(split.options.root_cert, Some(RootCert::File("/ca.pem".into())));
    }

    #[test]
    fn sslmode_defaults_follow_libpq() {
        assert_eq!(options("postgres://db/app").expect("ok").mode, SslMode::Prefer);
        assert_eq!(options("postgres://db/app?sslrootcert=system").expect("ok").mode, SslMode::VerifyFull);
        assert_eq!(
            options("postgres://db/app?sslmode=require&sslrootcert=/ca.pem").expect("ok").mode,
            SslMode::VerifyCa
        );
        assert_eq!(options("postgres://db/app?sslmode=require").expect("ok").mode, SslMode::Require);
    }

    #[test]
    fn unsupported_or_incomplete_tls_options_are_refused_by_name() {
        for (url, needle) in [
            ("postgres://db/app?sslmode=allow", "sslmode=allow"),
            ("postgres://db/app?sslmode=bogus", "sslmode=bogus"),
            ("postgres://db/app?sslmode=verify-ca", "sslrootcert"),
            ("postgres://db/app?sslmode=require&sslrootcert=system", "sslrootcert=system"),
            ("postgres://db/app?sslcert=/c.pem", "sslkey"),
        ] {
            let err = options(url).expect_err(url);
            assert!(err.contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn channel_binding_require_without_tls_is_refused_by_name() {
        let err = options("postgres://db/app?sslmode=disable&channel_binding=require").expect_err("refused");
        assert!(err.contains("channel_binding=require") && err.contains("sslmode=disable"), "{err}");
        for url in [
            "postgres://db/app?sslmode=require&channel_binding=require",
            "postgres://db/app?channel_binding=require",
            "postgres://db/app?sslmode=disable&channel_binding=prefer",
        ] {
            let split = split_url(url).expect(url);
            assert!(split.driver_url.contains("channel_binding="), "{url}: kept for the driver");
        }
    }

    /// A DER `Certificate` with an empty `tbsCertificate` and the signature algorithm `oid`:
    /// only the structure [`signature_algorithm`] walks.
    fn certificate_signed_with(oid: &[u8]) -> Vec<u8> {
        let mut algorithm = vec![DER_OID, oid.len() as u8];
        algorithm.extend_from_slice(oid);
        algorithm.extend_from_slice(&[0x05, 0x00]); // NULL parameters
        let mut body = vec![DER_SEQUENCE, 0x00, DER_SEQUENCE, algorithm.len() as u8];
        body.extend_from_slice(&algorithm);
        body.extend_from_slice(&[0x03, 0x01, 0x00]); // an empty BIT STRING signature
        let mut der = vec![DER_SEQUENCE, body.len() as u8];
        der.extend_from_slice(&body);
        der
    }

    #[test]
    fn the_end_point_hash_follows_the_signature_hash_and_sha1_and_md5_become_sha256() {
        let ed25519: &[u8] = &[0x2b, 0x65, 0x70];
        let rsa_pss: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
        for (oid, length) in [
            (oid::MD5_RSA, Some(32)),
            (oid::SHA1_RSA, Some(32)),
            (oid::ECDSA_SHA1, Some(32)),
            (oid::SHA224_RSA, Some(28)),
            (oid::ECDSA_SHA224, Some(28)),
            (oid::SHA256_RSA, Some(32)),
            (oid::ECDSA_SHA256, Some(32)),
            (oid::SHA384_RSA, Some(48)),
            (oid::ECDSA_SHA384, Some(48)),
            (oid::SHA512_RSA, Some(64)),
            (oid::ECDSA_SHA512, Some(64)),
            (ed25519, None),
            (rsa_pss, None),
        ] {
            let certificate = certificate_signed_with(oid);
            assert_eq!(signature_algorithm(&certificate), Some(oid));
            assert_eq!(tls_server_end_point(&certificate).map(|h| h.len()), length, "{oid:02x?}");
        }
        let sha1 = certificate_signed_with(oid::SHA1_RSA);
        use sha2::Digest;
        assert_eq!(tls_server_end_point(&sha1), Some(sha2::Sha256::digest(&sha1).to_vec()));
    }

    #[test]
    fn a_real_certificate_is_hashed_whole_with_its_signature_hash() {
        use sha2::Digest;
        for (name, algorithm, expected) in [
            ("ECDSA P-256 SHA-256", &rcgen::PKCS_ECDSA_P256_SHA256, 32),
            ("ECDSA P-384 SHA-384", &rcgen::PKCS_ECDSA_P384_SHA384, 48),
            ("Ed25519", &rcgen::PKCS_ED25519, 0),
        ] {
            let key = rcgen::KeyPair::generate_for(algorithm).expect("key");
            let params = rcgen::CertificateParams::new(vec!["db.example.com".to_owned()]).expect("params");
            let certificate = params.self_signed(&key).expect("certificate");
            let der: &[u8] = certificate.der();
            let hash = tls_server_end_point(der);
            assert_eq!(hash.as_ref().map_or(0, Vec::len), expected, "{name}");
            if expected == 48 {
                assert_eq!(hash, Some(sha2::Sha384::digest(der).to_vec()));
            }
        }
    }

    #[test]
    fn truncated_or_indefinite_der_is_not_read() {
        let certificate = certificate_signed_with(oid::SHA256_RSA);
        for cut in 0..certificate.len() {
            assert_eq!(signature_algorithm(&certificate[..cut]), None, "cut at {cut}");
        }
        assert_eq!(der_element(&[DER_SEQUENCE, 0x80, 0x00, 0x00], DER_SEQUENCE), None);
        assert_eq!(
            der_element(&[DER_SEQUENCE, 0x82, 0x00, 0x01, 0xaa], DER_SEQUENCE),
            Some((&[0xaa][..], &[][..]))
        );
    }

    #[test]
    fn presented_names_lose_their_debug_wrapping() {
        assert_eq!(presented_name("DnsName(\"db.example.com\")"), "db.example.com");
        assert_eq!(presented_name("10.0.0.1"), "10.0.0.1");
    }

    #[test]
    fn an_unreadable_root_certificate_is_named_with_its_path() {
        let Err(err) = parse("postgres://db/app?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem") else {
            panic!("a missing CA file must fail");
        };
        assert!(err.starts_with("sslrootcert=/nonexistent/ca.pem: cannot read"), "{err}");
    }
}
