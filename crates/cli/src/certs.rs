//! `strata certs`: a private CA and the certificates a set of tiers needs for TLS and mutual
//! TLS, for demos and test clusters (the compose demo makes its own with it). A real
//! deployment gets its certificates from its PKI (cert-manager, Vault, ...): the CA's key
//! is never written, so nothing more can be signed by this CA once the command ends.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chrono::{Datelike, Duration, Utc};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, date_time_ymd};

#[derive(clap::Args)]
pub struct CertsArgs {
    /// Directory for the files: `ca.pem`, and `<name>.pem` / `<name>.key` per certificate.
    #[arg(long)]
    pub out: PathBuf,
    /// A certificate to issue, as `<name>=<dns name or IP>,...`; its subject is `<name>`,
    /// which is also how a platform that requires client certificates knows the caller.
    /// Repeat for each tier. A certificate serves as both server and client certificate.
    #[arg(long = "cert", value_name = "NAME=HOSTS", required = true)]
    pub certs: Vec<String>,
    /// The CA's subject.
    #[arg(long, default_value = "strata private CA")]
    pub ca_name: String,
    /// Days the certificates are valid from today.
    #[arg(long, default_value_t = 365)]
    pub days: i64,
    /// Do nothing when `<out>/ca.pem` exists (a container that makes them on first start).
    #[arg(long)]
    pub if_absent: bool,
}

pub fn main(args: CertsArgs) -> ExitCode {
    if args.if_absent && args.out.join("ca.pem").exists() {
        eprintln!("{} exists: keeping the certificates there", args.out.join("ca.pem").display());
        return ExitCode::SUCCESS;
    }
    match write_all(&args) {
        Ok(written) => {
            eprintln!("wrote {} to {}", written.join(", "), args.out.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// One `--cert` argument: the name, and the names and addresses it is valid for.
fn parse_cert(arg: &str) -> Result<(String, Vec<String>), String> {
    let (name, hosts) = arg.split_once('=').ok_or_else(|| format!("--cert `{arg}`: expected NAME=HOST,..."))?;
    let valid_name = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !valid_name {
        return Err(format!("--cert `{arg}`: the name (a file name) may hold letters, digits, `-`, `_` and `.`"));
    }
    let hosts: Vec<String> = hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).map(String::from).collect();
    if hosts.is_empty() {
        return Err(format!("--cert `{arg}`: name at least one host the certificate is for"));
    }
    Ok((name.to_string(), hosts))
}

fn write_all(args: &CertsArgs) -> Result<Vec<String>, String> {
    let certs = args.certs.iter().map(|a| parse_cert(a)).collect::<Result<Vec<_>, _>>()?;
    if !(1..=3650).contains(&args.days) {
        return Err(format!("--days {}: between 1 and 3650", args.days));
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let validity = Validity::from_today(args.days);

    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, args.ca_name.as_str());
    validity.apply(&mut ca);
    let ca_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let issuer = CertifiedIssuer::self_signed(ca, ca_key).map_err(|e| format!("the CA: {e}"))?;
    write(&args.out.join("ca.pem"), &issuer.pem(), false)?;

    let mut written = vec!["ca.pem".to_string()];
    for (name, hosts) in certs {
        let mut params = CertificateParams::new(hosts).map_err(|e| format!("--cert {name}: {e}"))?;
        params.distinguished_name.push(DnType::CommonName, name.as_str());
        validity.apply(&mut params);
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params.signed_by(&key, &issuer).map_err(|e| format!("--cert {name}: {e}"))?;
        write(&args.out.join(format!("{name}.pem")), &cert.pem(), false)?;
        write(&args.out.join(format!("{name}.key")), &key.serialize_pem(), true)?;
        written.push(format!("{name}.pem/.key"));
    }
    Ok(written)
}

/// From yesterday (clocks differ) to `days` from today.
struct Validity {
    from: (i32, u8, u8),
    until: (i32, u8, u8),
}

impl Validity {
    fn from_today(days: i64) -> Self {
        let today = Utc::now().date_naive();
        let ymd = |d: chrono::NaiveDate| (d.year(), d.month() as u8, d.day() as u8);
        Self { from: ymd(today - Duration::days(1)), until: ymd(today + Duration::days(days)) }
    }

    fn apply(&self, params: &mut CertificateParams) {
        params.not_before = date_time_ymd(self.from.0, self.from.1, self.from.2);
        params.not_after = date_time_ymd(self.until.0, self.until.1, self.until.2);
    }
}

/// Writes `text`; a key is readable by its owner only.
fn write(path: &Path, text: &str, private: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if private { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_arguments_name_a_file_and_its_hosts() {
        assert_eq!(
            parse_cert("platform-eu=platform-eu, localhost,127.0.0.1"),
            Ok(("platform-eu".to_string(), vec!["platform-eu".into(), "localhost".into(), "127.0.0.1".into()]))
        );
        for bad in ["platform-eu", "=host", "../etc/passwd=host", "name="] {
            assert!(parse_cert(bad).is_err(), "{bad}");
        }
    }

    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn writes_a_ca_and_certificates_it_signs_with_private_keys() {
        let dir = tempfile::tempdir().expect("dir");
        let args = CertsArgs {
            out: dir.path().to_path_buf(),
            certs: vec!["server=localhost,127.0.0.1".into(), "client=client".into()],
            ca_name: "test CA".into(),
            days: 30,
            if_absent: false,
        };
        write_all(&args).expect("written");
        let roots = strata_core::pem::root_store(&dir.path().join("ca.pem"), "ca").expect("ca");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            strata_core::pem::crypto_provider(),
        )
        .build()
        .expect("verifier");
        let server = strata_core::pem::certificates(&dir.path().join("server.pem"), "server").expect("server");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let now = rustls::pki_types::UnixTime::now();
        verifier.verify_server_cert(&server[0], &[], &name, &[], now).expect("the CA signed it, for 127.0.0.1");
        let other = rustls::pki_types::ServerName::try_from("example.com").expect("name");
        assert!(verifier.verify_server_cert(&server[0], &[], &other, &[], now).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("client.key")).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join("ca.key").exists(), "the CA key must not be written");
    }
}
