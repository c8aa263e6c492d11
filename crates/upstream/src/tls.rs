//! TLS from a tier to its upstream (rustls with ring; no OpenSSL): the upstream's
//! certificate is verified against a configured CA, and this tier presents its own
//! certificate where the platform requires one (mutual TLS). The files are re-read when
//! they change, so a renewed client certificate is used by the next connection without a
//! restart.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use strata_core::StrataError;
use strata_core::config::ClientTlsConfig;
use strata_core::pem::{certificates, crypto_provider, private_key, root_store};
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tower::BoxError;

use crate::reloading::Reloading;

/// A tier's client TLS settings, reloaded when their files change.
pub struct ClientTls {
    config: Reloading<ClientConfig>,
    server_name: Option<String>,
}

impl ClientTls {
    /// Loads the files once; errors name `field` (`upstream.tls`, `peers[0].tls`).
    pub fn new(files: &ClientTlsConfig, field: &str) -> Result<Arc<Self>, StrataError> {
        let paths = [Some(&files.ca_file), files.cert_file.as_ref(), files.key_file.as_ref()];
        let (owned, field_name) = (files.clone(), field.to_string());
        let config = Reloading::new(
            paths.into_iter().flatten().cloned().collect(),
            "TLS files changed: new connections use them",
            "TLS files changed but do not load; keeping the previous ones",
            move || build(&owned, &field_name),
        )
        .map_err(StrataError::Config)?;
        Ok(Arc::new(Self { config, server_name: files.server_name.clone() }))
    }
}

fn build(files: &ClientTlsConfig, field: &str) -> Result<ClientConfig, String> {
    let provider = crypto_provider();
    let roots = root_store(&files.ca_file, &format!("{field}.ca_file"))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{field}: {e}"))?
        .with_root_certificates(roots);
    let mut config = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => {
            let certs = certificates(cert, &format!("{field}.cert_file"))?;
            let key = private_key(key, &format!("{field}.key_file"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("{field}: the key does not fit the client certificate: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    // The tier protocol is gRPC: HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Connects to an `https://` upstream: TCP, then TLS with the current settings. A tonic
/// channel's connector (`Endpoint::connect_with_connector_lazy`).
#[derive(Clone)]
pub struct TlsConnector {
    tls: Arc<ClientTls>,
    server_name: Option<String>,
    connect_timeout: Duration,
}

impl TlsConnector {
    pub fn new(tls: Arc<ClientTls>, connect_timeout: Duration) -> Self {
        let server_name = tls.server_name.clone();
        Self { tls, server_name, connect_timeout }
    }
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<Uri> for TlsConnector {
    type Response = TlsIo;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<TlsIo, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.tls.config.current();
        let name = self.server_name.clone();
        let timeout = self.connect_timeout;
        Box::pin(async move {
            let host = uri.host().ok_or("an upstream endpoint without a host")?.to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = name.unwrap_or_else(|| host.trim_start_matches('[').trim_end_matches(']').to_string());
            let server_name =
                ServerName::try_from(name.clone()).map_err(|_| format!("`{name}` is not a TLS server name"))?;
            let connect = async {
                let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)).await?;
                tcp.set_nodelay(true)?;
                tokio_rustls::TlsConnector::from(config).connect(server_name, tcp).await
            };
            let stream = tokio::time::timeout(timeout, connect).await.map_err(|_| {
                format!("no TLS connection to {host}:{port} within {timeout:?} (upstream.connect_timeout)")
            })??;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}
