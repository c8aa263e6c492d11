//! TLS to PostgreSQL sources with rustls, as libpq's `sslmode` and `sslrootcert` mean it.
//!
//! datafusion-table-providers' PostgreSQL pool (0.15.1) builds its TLS from
//! `postgres_native_tls`, which is OpenSSL on Linux, and offers no way to give it another
//! connector. Rather than keep OpenSSL in a tier's TLS path, a source with TLS is reached
//! through a relay of ours: the pool connects, in plaintext, to a Unix socket in a private
//! directory (mode 0700, so only this process's user can reach it), and the relay makes
//! each of its connections to PostgreSQL itself: TCP, PostgreSQL's `SSLRequest`, then a
//! rustls handshake that verifies the server as the mode asks. Everything the pool does
//! (pooling, the SQL it generates, Arrow conversion) is unchanged.
//!
//! The CA file is read again for every new connection, so a rotated CA is used without a
//! restart; connections already open keep the certificate they were verified with.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::pem;

/// libpq's `sslmode`s. Every mode but `disable` goes through rustls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext.
    Disable,
    /// TLS when the server offers it, plaintext otherwise; the certificate is not checked.
    Prefer,
    /// TLS; the certificate is not checked unless `sslrootcert` is set (then as `verify-ca`).
    Require,
    /// TLS with a certificate that chains to the CA; any host name.
    VerifyCa,
    /// TLS with a certificate that chains to the CA and names the host. The default.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "disable" => Ok(Self::Disable),
            "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-ca" => Ok(Self::VerifyCa),
            "verify-full" => Ok(Self::VerifyFull),
            _ => Err(format!("sslmode: `{text}` is not one of disable, prefer, require, verify-ca, verify-full")),
        }
    }
}

/// How a PostgreSQL source's connections are secured, read from its params.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTls {
    pub mode: SslMode,
    /// The CA certificates (PEM); unset: the system's trust store.
    pub root_cert: Option<PathBuf>,
}

impl SourceTls {
    /// Reads `sslmode` (default `verify-full`, as libpq's secure choice and the provider's)
    /// and `sslrootcert`. A `connection_string` is handed to the provider as it is, so it
    /// must say `sslmode=disable`: TLS is configured with the separate params.
    pub fn from_params(params: &BTreeMap<String, String>) -> Result<Self, String> {
        if let Some(connection_string) = params.get("connection_string") {
            let plaintext =
                connection_string.split_whitespace().any(|part| part.eq_ignore_ascii_case("sslmode=disable"));
            if !plaintext || params.contains_key("sslmode") || params.contains_key("sslrootcert") {
                return Err("connection_string: Strata's TLS to PostgreSQL is set with the host, port, user, db, \
                            sslmode and sslrootcert params; a connection_string is only for plaintext and must \
                            say sslmode=disable"
                    .into());
            }
            return Ok(Self { mode: SslMode::Disable, root_cert: None });
        }
        let mode = params.get("sslmode").map_or(Ok(SslMode::VerifyFull), |m| SslMode::parse(m))?;
        let root_cert = params.get("sslrootcert").map(PathBuf::from);
        if mode == SslMode::Disable && root_cert.is_some() {
            return Err("sslrootcert: set, but sslmode is disable, so nothing would be verified".into());
        }
        Ok(Self { mode, root_cert })
    }

    /// The rustls settings for one new connection, the CA file read now.
    fn client_config(&self) -> Result<ClientConfig, String> {
        let provider = pem::crypto_provider();
        let verifier: Arc<dyn ServerCertVerifier> = match (self.mode, &self.root_cert) {
            (SslMode::Disable, _) => return Err("sslmode is disable: no TLS".into()),
            (SslMode::VerifyFull, root) => web_pki(root.as_deref(), &provider)?,
            (SslMode::Prefer | SslMode::Require, None) => {
                Arc::new(Lenient { chain: None, provider: Arc::clone(&provider) })
            }
            (SslMode::VerifyCa | SslMode::Prefer | SslMode::Require, root) => {
                Arc::new(Lenient { chain: Some(web_pki(root.as_deref(), &provider)?), provider: Arc::clone(&provider) })
            }
        };
        Ok(ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS settings: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth())
    }
}

/// The standard verifier over the CA file, or over the system's trust store.
fn web_pki(root: Option<&Path>, provider: &Arc<CryptoProvider>) -> Result<Arc<WebPkiServerVerifier>, String> {
    let roots = match root {
        Some(path) => pem::root_store(path, "sslrootcert")?,
        None => system_roots()?,
    };
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|e| format!("sslrootcert: {e}"))
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found.errors.first().map(|e| format!(": {e}")).unwrap_or_default();
        return Err(format!(
            "sslmode verifies the server, no sslrootcert is set and the system has no CA certificates{why}; \
             set sslrootcert to the CA that signs the server's certificate"
        ));
    }
    Ok(roots)
}

/// The modes that check less than `verify-full`: with a CA (`verify-ca`, or `require` /
/// `prefer` given `sslrootcert`) the chain must lead to it and the name may be any; without
/// (`require` / `prefer`), the connection is encrypted and the server not authenticated
/// (libpq's meaning; a warning at start says so). The handshake's signatures are checked
/// either way.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// PostgreSQL's `SSLRequest`: length 8, then the code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// How long one connection to PostgreSQL may take, TCP and handshake together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The port number in the relay socket's name (`.s.PGSQL.<port>`, as PostgreSQL names
/// its own sockets); the pool is given it with the socket's directory as its host.
pub const RELAY_PORT: u16 = 5432;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where a relay connects, and how it secures the connection.
struct Target {
    host: String,
    port: u16,
    tls: SourceTls,
}

impl Target {
    /// One connection to PostgreSQL, secured as the mode asks; the error says why not.
    async fn connect(&self) -> Result<Box<dyn Io>, String> {
        let at = format!("{}:{}", self.host, self.port);
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_now(&at))
            .await
            .map_err(|_| format!("no TLS connection to PostgreSQL at {at} within {CONNECT_TIMEOUT:?}"))?
    }

    async fn connect_now(&self, at: &str) -> Result<Box<dyn Io>, String> {
        let config = self.tls.client_config()?;
        let mut tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL at {at}: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| format!("{at}: {e}"))?;
        tcp.write_all(&SSL_REQUEST).await.map_err(|e| format!("PostgreSQL at {at}: {e}"))?;
        let answer = tcp.read_u8().await.map_err(|e| format!("PostgreSQL at {at} closed at the TLS request: {e}"))?;
        match answer {
            b'S' => {}
            b'N' if self.tls.mode == SslMode::Prefer => return Ok(Box::new(tcp)),
            b'N' => {
                return Err(format!(
                    "PostgreSQL at {at} does not accept TLS (its `ssl` setting is off) and sslmode is {:?}",
                    self.tls.mode
                ));
            }
            other => return Err(format!("PostgreSQL at {at} answered the TLS request with byte {other:#04x}")),
        }
        let name = ServerName::try_from(self.host.clone())
            .map_err(|_| format!("host `{}` is not a name a TLS certificate can hold", self.host))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS to PostgreSQL at {at}: {e}"))?;
        Ok(Box::new(stream))
    }
}

/// A Unix socket the PostgreSQL pool connects to in plaintext, whose every connection is
/// relayed to PostgreSQL over rustls. Stops, and removes its directory, when dropped.
pub struct TlsRelay {
    dir: tempfile::TempDir,
    accept: tokio::task::JoinHandle<()>,
}

impl TlsRelay {
    /// Connects to `host:port` once, so that a certificate or setting that is wrong fails
    /// here with its reason (through the relay, the pool would only see a closed socket),
    /// then listens.
    pub async fn start(host: &str, port: u16, tls: SourceTls) -> Result<Self, String> {
        if matches!(tls.mode, SslMode::Prefer | SslMode::Require) && tls.root_cert.is_none() {
            warn!(
                host,
                port,
                "PostgreSQL source with sslmode {:?} and no sslrootcert: encrypted, but the server is not \
                 authenticated; use verify-full with sslrootcert",
                tls.mode
            );
        }
        let target = Arc::new(Target { host: host.to_string(), port, tls });
        drop(target.connect().await?);
        let dir = tempfile::Builder::new()
            .prefix("strata-pg-tls-")
            .tempdir()
            .map_err(|e| format!("cannot make the PostgreSQL TLS relay's directory: {e}"))?;
        restrict_to_owner(dir.path()).map_err(|e| format!("{}: {e}", dir.path().display()))?;
        let socket = dir.path().join(format!(".s.PGSQL.{RELAY_PORT}"));
        let listener =
            UnixListener::bind(&socket).map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
        let accept = tokio::spawn(relay_connections(listener, target));
        Ok(Self { dir, accept })
    }

    /// The directory of the socket: the pool's `host` (a path means a Unix socket).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TlsRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn restrict_to_owner(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

async fn relay_connections(listener: UnixListener, target: Arc<Target>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                warn!(error = %e, "PostgreSQL TLS relay: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let target = Arc::clone(&target);
        tokio::spawn(async move { relay_one(client, &target).await });
    }
}

async fn relay_one(mut client: UnixStream, target: &Target) {
    let mut server = match target.connect().await {
        Ok(server) => server,
        Err(e) => {
            // The pool sees the socket close; the reason is here.
            warn!(host = %target.host, port = target.port, error = %e, "PostgreSQL source connection refused");
            return;
        }
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
        debug!(error = %e, "PostgreSQL TLS relay: connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_default_is_verify_full_against_the_system_roots() {
        let tls = SourceTls::from_params(&params(&[("host", "db")])).expect("tls");
        assert_eq!(tls, SourceTls { mode: SslMode::VerifyFull, root_cert: None });
    }

    #[test]
    fn modes_are_read_as_libpq_spells_them_and_others_are_refused() {
        let tls =
            SourceTls::from_params(&params(&[("sslmode", "Verify-CA"), ("sslrootcert", "/ca.pem")])).expect("tls");
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.root_cert.as_deref(), Some(Path::new("/ca.pem")));
        let err = SourceTls::from_params(&params(&[("sslmode", "allow")])).expect_err("allow");
        assert!(err.contains("sslmode: `allow`"), "{err}");
    }

    #[test]
    fn a_root_cert_with_tls_disabled_is_a_mistake() {
        let err = SourceTls::from_params(&params(&[("sslmode", "disable"), ("sslrootcert", "/ca.pem")]))
            .expect_err("mistake");
        assert!(err.contains("sslrootcert"), "{err}");
    }

    #[test]
    fn a_connection_string_must_be_plaintext() {
        let ok = SourceTls::from_params(&params(&[("connection_string", "host=db user=u sslmode=disable")]));
        assert_eq!(ok.expect("plaintext").mode, SslMode::Disable);
        for string in ["host=db user=u", "host=db sslmode=require"] {
            let err = SourceTls::from_params(&params(&[("connection_string", string)])).expect_err(string);
            assert!(err.contains("connection_string"), "{err}");
        }
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let tls = SourceTls { mode: SslMode::VerifyFull, root_cert: Some(PathBuf::from("/nonexistent/ca.pem")) };
        let err = tls.client_config().expect_err("missing file");
        assert!(err.contains("sslrootcert") && err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
