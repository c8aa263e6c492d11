//! Certificates for TLS tests, made fresh per test: a CA, server certificates for
//! `localhost` / 127.0.0.1 signed by it, client certificates, and a stranger's CA.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A test CA whose certificate is written to `<dir>/<name>-ca.pem`.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub ca_file: PathBuf,
    dir: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The certificate's DER bytes, to recognise it on the wire.
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, issuer.pem()).expect("write CA");
        Self { issuer, ca_file, dir: dir.to_path_buf() }
    }

    /// A certificate with subject `common_name` for `names` (DNS names or IP addresses),
    /// written as `<file>.pem` and `<file>.key`.
    pub fn issue(&self, file: &str, common_name: &str, names: &[&str]) -> CertFiles {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, common_name);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let files = CertFiles {
            cert_file: self.dir.join(format!("{file}.pem")),
            key_file: self.dir.join(format!("{file}.key")),
            der: cert.der().to_vec(),
        };
        files.write(&cert.pem(), &key.serialize_pem());
        files
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self, file: &str) -> CertFiles {
        self.issue(file, "strata test server", &["localhost", "127.0.0.1"])
    }
}

impl CertFiles {
    fn write(&self, cert: &str, key: &str) {
        std::fs::write(&self.key_file, key).expect("write key");
        std::fs::write(&self.cert_file, cert).expect("write cert");
    }

    /// Replaces these files with `other`'s contents (a renewal in place), then moves their
    /// modification time forward so the change is seen even on coarse clocks.
    pub fn replace_with(&self, other: &CertFiles) -> CertFiles {
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        for (from, to) in [(&other.key_file, &self.key_file), (&other.cert_file, &self.cert_file)] {
            std::fs::copy(from, to).expect("copy");
            std::fs::File::options().write(true).open(to).and_then(|f| f.set_modified(later)).expect("touch");
        }
        CertFiles { der: other.der.clone(), ..self.clone() }
    }

    /// The YAML of `server.tls` with these files (and a client CA, for mutual TLS).
    pub fn server_yaml(&self, client_ca: Option<&Path>, require: bool) -> String {
        let mut yaml =
            format!("  tls:\n    cert_file: {}\n    key_file: {}\n", self.cert_file.display(), self.key_file.display());
        if let Some(ca) = client_ca {
            yaml.push_str(&format!("    client_ca_file: {}\n    require_client_cert: {require}\n", ca.display()));
        }
        yaml
    }
}
