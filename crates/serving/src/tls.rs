//! TLS on a tier's listeners, with rustls (ring; no OpenSSL): the certificate, its key and
//! the client CA are re-read when any of them changes (looked at most once a second, at
//! accept), so a renewed certificate is served to the next connection without a restart; a
//! broken renewal (half-written file, key that does not match) keeps the last good one and
//! says so in the log.
//!
//! With `client_ca_file`, clients may present a certificate, verified against that CA; with
//! `require_client_cert`, connections to the gRPC listener (Flight SQL and the tier protocol)
//! without one are refused in the handshake (mutual TLS between tiers); the HTTP listener
//! keeps answering probes that have none. The verified certificate's subject common name travels with the
//! connection ([`PeerCertificate`]) so the authentication layer can know the caller by it.
//!
//! Handshakes run in their own tasks, bounded by `server.handshake_timeout`: a client that
//! stalls mid-handshake holds one connection slot for that long and never the accept loop.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use strata_core::config::ServerTlsConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;
use tracing::debug;

use strata_core::pem;
use strata_upstream::reloading::Reloading;

use crate::connections::{GuardedIo, GuardedListener};

/// A listener's TLS settings, reloaded when their files change.
pub struct ServerTls(Reloading<ServerConfig>);

impl ServerTls {
    /// Loads the files once; an error names the field and the file. `alpn`: the protocols
    /// this listener speaks (`h2` for gRPC; `h2` and `http/1.1` for HTTP). `require_client_cert`
    /// applies to the gRPC listener only: the HTTP one must answer probes (`/health`), which
    /// present no certificate, so there a client certificate is asked for but optional.
    pub fn new(files: &ServerTlsConfig, alpn: &[&[u8]], require_client_cert: bool) -> Result<Arc<Self>, String> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let paths = [Some(&files.cert_file), Some(&files.key_file), files.client_ca_file.as_ref()];
        let owned = files.clone();
        let config = Reloading::new(
            paths.into_iter().flatten().cloned().collect(),
            "TLS files changed: serving the new certificate",
            // Mid-renewal: files are replaced one at a time; the last good pair stays.
            "TLS files changed but do not load; serving the previous certificate",
            move || build(&owned, &alpn, require_client_cert),
        )?;
        Ok(Arc::new(Self(config)))
    }

    /// The configuration for the next handshake, reloaded first if a file changed.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.0.current()
    }
}

fn build(files: &ServerTlsConfig, alpn: &[Vec<u8>], require_client_cert: bool) -> Result<ServerConfig, String> {
    let provider = pem::crypto_provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("server.tls: {e}"))?;
    let builder = match &files.client_ca_file {
        Some(ca) => {
            let roots = Arc::new(pem::root_store(ca, "server.tls.client_ca_file")?);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            let verifier = if require_client_cert { verifier } else { verifier.allow_unauthenticated() };
            let verifier = verifier.build().map_err(|e| format!("server.tls.client_ca_file: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let certs = pem::certificates(&files.cert_file, "server.tls.cert_file")?;
    let key = pem::private_key(&files.key_file, "server.tls.key_file")?;
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!("server.tls: the key in {} does not fit the certificate: {e}", files.key_file.display())
    })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

/// The verified client certificate's subject common name, when the client presented one:
/// put into each request's extensions by the gRPC server (tonic's connect info).
#[derive(Debug, Clone, Default)]
pub struct PeerCertificate {
    pub subject: Option<String>,
    pub remote_addr: Option<std::net::SocketAddr>,
}

/// One connection after its TLS handshake.
pub struct TlsIo {
    stream: TlsStream<GuardedIo>,
    peer: PeerCertificate,
}

impl TlsIo {
    fn new(stream: TlsStream<GuardedIo>) -> Self {
        let (io, connection) = stream.get_ref();
        let subject = connection.peer_certificates().and_then(|certs| certs.first()).and_then(|c| common_name(c));
        let remote_addr = io.remote_addr();
        Self { stream, peer: PeerCertificate { subject, remote_addr } }
    }
}

/// A certificate's subject common name, if it has one.
fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let name = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(name)
}

impl AsyncRead for TlsIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = PeerCertificate;

    fn connect_info(&self) -> PeerCertificate {
        self.peer.clone()
    }
}

/// One TLS handshake on an admitted connection, within `timeout`.
pub async fn accept(tls: &ServerTls, io: GuardedIo, timeout: Duration) -> io::Result<TlsIo> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
    match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Ok(Ok(stream)) => Ok(TlsIo::new(stream)),
        Ok(Err(err)) => Err(err),
        Err(_) => {
            Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake not finished within server.handshake_timeout"))
        }
    }
}

/// The connections of `listener` after their TLS handshakes, as the stream tonic serves.
/// Each handshake runs in its own task; failed ones are logged at debug level (scanners
/// and plaintext clients make many) and dropped.
pub fn incoming(
    mut listener: GuardedListener,
    tls: Arc<ServerTls>,
    timeout: Duration,
) -> impl futures::Stream<Item = io::Result<TlsIo>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<TlsIo>(64);
    tokio::spawn(async move {
        loop {
            let (io, peer) = tokio::select! {
                accepted = listener.next() => accepted,
                _ = tx.closed() => return,
            };
            let (tls, tx) = (Arc::clone(&tls), tx.clone());
            tokio::spawn(async move {
                match accept(&tls, io, timeout).await {
                    Ok(stream) => {
                        let _ = tx.send(stream).await;
                    }
                    Err(err) => debug!(%peer, error = %err, "TLS handshake failed"),
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|io| (Ok(io), rx)) })
}
