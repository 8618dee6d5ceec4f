//! Connections to the upstream Postgres: ordinary SQL sessions and replication sessions, both
//! from the one `ZERO_UPSTREAM_DB` URI, both pinned to the text formats that `pgvalue` parses.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use pgwire_replication::{ReplicationConfig, SslMode as WireSslMode, TlsConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_postgres::config::{Host, SslMode};

use crate::upstream::Shard;

/// Session settings that make value output predictable: ISO dates in UTC and round-tripping
/// floats.
const SESSION_OPTIONS: &str =
    "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c IntervalStyle=iso_8601";

/// libpq's `sslmode`, which tokio-postgres only partly understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain TCP only.
    Disable,
    /// TLS if the server offers it, without verifying the certificate (libpq's default).
    Prefer,
    /// TLS, without verifying the certificate.
    Require,
    /// TLS with a certificate signed by a trusted CA (`sslrootcert`, else the web PKI roots).
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host.
    VerifyFull,
}

/// The upstream database, parsed once from its URI.
#[derive(Clone)]
pub struct UpstreamConfig {
    pg: tokio_postgres::Config,
    tls: TlsMode,
    root_cert: Option<PathBuf>,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        write!(f, "UpstreamConfig({}, {:?})", self.display(), self.tls)
    }
}

/// A URI that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid upstream URI: {0}")]
pub struct UriError(String);

/// Removes the TLS parameters that tokio-postgres rejects or ignores from a URI or key=value
/// connection string, returning them separately.
fn split_tls_params(uri: &str) -> (String, Vec<(String, String)>) {
    let tls_key = |k: &str| {
        matches!(
            k,
            "sslmode" | "sslrootcert" | "sslcert" | "sslkey" | "sslnegotiation"
        )
    };
    let mut taken = Vec::new();
    if uri.starts_with("postgres://") || uri.starts_with("postgresql://") {
        let Some((base, query)) = uri.split_once('?') else {
            return (uri.to_string(), taken);
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if tls_key(k) {
                taken.push((k.to_string(), percent_decode(v)));
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (rest, taken)
    } else {
        let mut kept = Vec::new();
        for token in uri.split_whitespace() {
            match token.split_once('=') {
                Some((k, v)) if tls_key(k) => taken.push((k.to_string(), v.to_string())),
                _ => kept.push(token),
            }
        }
        (kept.join(" "), taken)
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl UpstreamConfig {
    /// Parses a `postgres://` URI (or key=value connection string), including libpq's
    /// `sslmode` (`disable`, `prefer` (default), `require`, `verify-ca`, `verify-full`) and
    /// `sslrootcert`.
    pub fn parse(uri: &str) -> Result<UpstreamConfig, UriError> {
        let (rest, tls_params) = split_tls_params(uri);
        let mut pg =
            tokio_postgres::Config::from_str(&rest).map_err(|e| UriError(e.to_string()))?;
        if pg.get_hosts().is_empty() {
            pg.host("localhost");
        }
        if pg.get_user().is_none() {
            pg.user(std::env::var("USER").unwrap_or_else(|_| "postgres".into()));
        }
        pg.options(SESSION_OPTIONS);
        pg.application_name("zero-cache");
        let mut tls = TlsMode::Prefer;
        let mut root_cert = None;
        for (k, v) in tls_params {
            match (k.as_str(), v.as_str()) {
                ("sslmode", "disable" | "allow") => tls = TlsMode::Disable,
                ("sslmode", "prefer") => tls = TlsMode::Prefer,
                ("sslmode", "require") => tls = TlsMode::Require,
                ("sslmode", "verify-ca") => tls = TlsMode::VerifyCa,
                ("sslmode", "verify-full") => tls = TlsMode::VerifyFull,
                ("sslmode", other) => {
                    return Err(UriError(format!("unknown sslmode \"{other}\"")));
                }
                ("sslrootcert", path) => root_cert = Some(PathBuf::from(path)),
                ("sslnegotiation", "postgres") => {}
                (k, _) => {
                    return Err(UriError(format!(
                        "\"{k}\" is not supported (client certificates and direct TLS negotiation are not implemented)"
                    )));
                }
            }
        }
        if let Some(p) = &root_cert
            && !p.exists()
        {
            return Err(UriError(format!(
                "sslrootcert {} does not exist",
                p.display()
            )));
        }
        if tls == TlsMode::VerifyFull
            && let Some(Host::Tcp(h)) = pg.get_hosts().first()
            && h.parse::<std::net::IpAddr>().is_ok()
        {
            return Err(UriError(format!(
                "sslmode=verify-full needs a host name, not the address {h}: the replication \
                 connection cannot verify certificates for IP addresses (use the name in the \
                 server's certificate, or sslmode=verify-ca)"
            )));
        }
        pg.ssl_mode(match tls {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        Ok(UpstreamConfig { pg, tls, root_cert })
    }

    /// The TLS mode in force.
    pub fn tls_mode(&self) -> TlsMode {
        self.tls
    }

    /// `user@host:port/db`, for logs.
    pub fn display(&self) -> String {
        format!(
            "{}@{}:{}/{}",
            self.pg.get_user().unwrap_or_default(),
            self.host(),
            self.port(),
            self.dbname()
        )
    }

    fn host(&self) -> String {
        match self.pg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
            None => "localhost".into(),
        }
    }

    fn port(&self) -> u16 {
        self.pg.get_ports().first().copied().unwrap_or(5432)
    }

    fn dbname(&self) -> String {
        self.pg
            .get_dbname()
            .or(self.pg.get_user())
            .unwrap_or("postgres")
            .to_string()
    }

    /// Opens an SQL session, driven on a background task.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        if self.tls == TlsMode::Disable {
            let (client, conn) = self.pg.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection closed");
                }
            });
            return Ok(client);
        }
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.rustls_config());
        let (client, conn) = self.pg.connect(tls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection closed");
            }
        });
        Ok(client)
    }

    fn rustls_config(&self) -> rustls::ClientConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        match self.tls {
            TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
                .with_no_client_auth(),
            TlsMode::VerifyCa | TlsMode::VerifyFull => {
                let mut roots = rustls::RootCertStore::empty();
                match &self.root_cert {
                    Some(path) => {
                        for cert in CertificateDer::pem_file_iter(path)
                            .into_iter()
                            .flatten()
                            .flatten()
                        {
                            let _ = roots.add(cert);
                        }
                    }
                    None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
                }
                let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                )
                .build()
                .expect("a root store with the provider's algorithms builds");
                if self.tls == TlsMode::VerifyFull {
                    builder.with_webpki_verifier(verifier).with_no_client_auth()
                } else {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(CaOnly(verifier)))
                        .with_no_client_auth()
                }
            }
        }
    }

    /// The configuration of a replication session on `slot` for the shard's publications.
    pub fn replication(&self, slot: &str, shard: &Shard) -> ReplicationConfig {
        let password = self
            .pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        ReplicationConfig::new(
            self.host(),
            self.pg.get_user().unwrap_or("postgres"),
            password,
            self.dbname(),
            slot,
            shard.publications(),
        )
        .with_port(self.port())
        .with_tls(TlsConfig {
            mode: match self.tls {
                TlsMode::Disable => WireSslMode::Disable,
                TlsMode::Prefer => WireSslMode::Prefer,
                TlsMode::Require => WireSslMode::Require,
                TlsMode::VerifyCa => WireSslMode::VerifyCa,
                TlsMode::VerifyFull => WireSslMode::VerifyFull,
            },
            ca_pem_path: self.root_cert.clone(),
            ..TlsConfig::default()
        })
        .with_options(SESSION_OPTIONS)
        .with_application_name("zero-cache-replication")
        .with_status_interval(std::time::Duration::from_secs(1))
    }
}

/// libpq's `require`: encrypt, but accept any server certificate (signatures are still checked,
/// so the handshake itself is sound).
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// libpq's `verify-ca`: the chain must lead to a trusted root, whatever name it carries.
#[derive(Debug)]
struct CaOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for CaOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A small connection pool: at most `max` sessions, opened on demand with this module's URI and
/// TLS handling, reused while healthy (CVR store, change DB).
pub struct PgPool {
    cfg: UpstreamConfig,
    idle: std::sync::Mutex<Vec<tokio_postgres::Client>>,
    permits: Arc<tokio::sync::Semaphore>,
}

/// A session borrowed from a [`PgPool`]; returned to it on drop unless closed.
pub struct Pooled<'a> {
    pool: &'a PgPool,
    client: Option<tokio_postgres::Client>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &Self::Target {
        self.client.as_ref().expect("present until drop")
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.client.as_mut().expect("present until drop")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take()
            && !c.is_closed()
        {
            self.pool.idle.lock().expect("pool").push(c);
        }
    }
}

impl PgPool {
    /// A pool of at most `max` sessions (at least one).
    pub fn new(cfg: UpstreamConfig, max: usize) -> PgPool {
        PgPool {
            cfg,
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
        }
    }

    /// The database the pool connects to (for messages; no password).
    pub fn display(&self) -> String {
        self.cfg.display()
    }

    /// Waits for a free slot, then reuses an idle session or opens one.
    pub async fn get(&self) -> Result<Pooled<'_>, tokio_postgres::Error> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        let reused = {
            let mut idle = self.idle.lock().expect("pool");
            let mut found = None;
            while let Some(c) = idle.pop() {
                if !c.is_closed() {
                    found = Some(c);
                    break;
                }
            }
            found
        };
        let client = match reused {
            Some(c) => c,
            None => self.cfg.connect().await?,
        };
        Ok(Pooled {
            pool: self,
            client: Some(client),
            _permit: permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_the_uri() {
        let c = UpstreamConfig::parse(
            "postgres://u:p@h:5433/db?sslmode=verify-ca&application_name=x&sslrootcert=%2Fdev%2Fnull",
        )
        .expect("parse");
        assert_eq!(c.tls_mode(), TlsMode::VerifyCa);
        assert_eq!(
            c.root_cert.as_deref(),
            Some(std::path::Path::new("/dev/null"))
        );
        assert_eq!(c.display(), "u@h:5433/db");
        let c = UpstreamConfig::parse("host=h user=u dbname=d sslmode=require").expect("parse");
        assert_eq!(c.tls_mode(), TlsMode::Require);
        assert_eq!(
            UpstreamConfig::parse("postgres://h/db")
                .expect("parse")
                .tls_mode(),
            TlsMode::Prefer
        );
        assert!(UpstreamConfig::parse("postgres://h/db?sslmode=bogus").is_err());
        assert!(UpstreamConfig::parse("postgres://h/db?sslcert=/x").is_err());
    }
}
