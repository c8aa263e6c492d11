//! PEM files and the crypto provider every TLS connection of a tier uses: the listeners,
//! the tier protocol client and the PostgreSQL source (rustls with ring; no OpenSSL).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The certificates of a PEM file; `field` names the setting in errors.
pub fn certificates(path: &Path, field: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{field}: cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{field}: {} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path, field: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{field}: cannot read a private key from {}: {e}", path.display()))
}

/// The CA certificates of a PEM file as a trust store.
pub fn root_store(path: &Path, field: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(path, field)? {
        roots.add(cert).map_err(|e| format!("{field}: {} holds a certificate rustls refuses: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The crypto of every TLS connection of a tier: ring's. rustls 0.23.48 deprecated it
/// because it has no post-quantum key exchange (aws-lc-rs has), but aws-lc-rs builds a C
/// library with CMake on every cold build, which this project's two-core CI cannot afford.
/// Revisit when ring gains ML-KEM or CI grows.
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
