//! TLS against live tiers: both listeners serve it, a renewed certificate is served without
//! a restart, plaintext and strangers get nothing, and a platform that requires client
//! certificates knows its sidecars by theirs and refuses any other.

use std::sync::Arc;
use std::time::Duration;

use strata_integration_tests::certs::{CertFiles, TestCa};
use strata_integration_tests::sample_datasets_yaml as datasets;
use strata_integration_tests::tier::Tier;

/// The certificate a TLS handshake with `addr` is served, verified against `ca`.
async fn served_certificate(addr: std::net::SocketAddr, ca: &std::path::Path) -> Result<Vec<u8>, String> {
    let roots = strata_core::pem::root_store(ca, "ca")?;
    let config = rustls::ClientConfig::builder_with_provider(strata_core::pem::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let stream =
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let (_, connection) = stream.get_ref();
    Ok(connection.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default())
}

#[tokio::test]
async fn both_listeners_serve_tls_and_a_renewed_certificate_without_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = TestCa::new(dir.path(), "main");
    let served = ca.server("server");
    let config = format!("server:\n{}{}", served.server_yaml(None, false), datasets());
    let tier = Tier::builder("platform-service").config(&config).tls(&ca.ca_file).start().await;
    tier.wait_ready(Duration::from_secs(20)).await;

    // HTTPS and Flight SQL over TLS answer.
    let (code, body) = tier.sql("SELECT count(*) AS n FROM customers").await;
    assert_eq!((code, body[0]["n"].as_i64()), (200, Some(200)), "{body}");
    let batches = tier.flight_query("SELECT count(*) AS n FROM orders").await.expect("flight over TLS");
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);

    // The CLI, given the CA: `strata sql` over Flight SQL with TLS, `strata health` over https.
    let strata = strata_integration_tests::bin_dir().join("strata");
    let sql = std::process::Command::new(&strata)
        .args([
            "sql",
            "--endpoint",
            &tier.flight_url(),
            "--format",
            "csv",
            "-q",
            "-c",
            "SELECT count(*) AS n FROM customers",
        ])
        .arg("--ca-file")
        .arg(&ca.ca_file)
        .output()
        .expect("run strata sql");
    let stdout = String::from_utf8_lossy(&sql.stdout);
    assert!(sql.status.success() && stdout.contains("200"), "{stdout}\n{}", String::from_utf8_lossy(&sql.stderr));
    let health = std::process::Command::new(&strata)
        .args(["health", "--http", &tier.http_addr.to_string()])
        .arg("--ca-file")
        .arg(&ca.ca_file)
        .output()
        .expect("run strata health");
    assert!(health.status.success(), "{}", String::from_utf8_lossy(&health.stdout));
    let without_ca = std::process::Command::new(&strata)
        .args(["sql", "--endpoint", &tier.flight_url(), "-c", "SELECT 1"])
        .output()
        .expect("run strata sql");
    assert!(!without_ca.status.success());
    assert!(String::from_utf8_lossy(&without_ca.stderr).contains("--ca-file"), "{without_ca:?}");

    // Plaintext gets no answer from either listener, and the tier is unharmed.
    let plain = reqwest::Client::new();
    assert!(plain.get(format!("http://{}/health", tier.http_addr)).send().await.is_err(), "plaintext HTTP answered");
    let plaintext_flight =
        tonic::transport::Channel::from_shared(format!("http://{}", tier.flight_addr)).expect("uri").connect().await;
    if let Ok(channel) = plaintext_flight {
        let mut client = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
        assert!(client.execute("SELECT 1".into(), None).await.is_err(), "plaintext Flight answered");
    }
    // A client that trusts another CA refuses the tier's certificate.
    let stranger = TestCa::new(dir.path(), "stranger");
    assert!(served_certificate(tier.http_addr, &stranger.ca_file).await.is_err());

    // Renewal in place: the next handshakes get the new certificate on both listeners.
    assert_eq!(served_certificate(tier.flight_addr, &ca.ca_file).await.expect("tls"), served.der);
    let renewed = served.replace_with(&ca.server("renewed"));
    assert_ne!(renewed.der, served.der);
    for addr in [tier.flight_addr, tier.http_addr] {
        tier.wait_for(Duration::from_secs(10), "the renewed certificate", || async {
            (served_certificate(addr, &ca.ca_file).await.ok()? == renewed.der).then_some(())
        })
        .await;
    }
    // A broken renewal (a key that does not match) keeps the last good certificate.
    std::fs::write(&renewed.key_file, std::fs::read(&ca.server("other").key_file).expect("key")).expect("write");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(served_certificate(tier.http_addr, &ca.ca_file).await.expect("tls"), renewed.der);
    assert!(tier.logs().contains("serving the previous certificate"), "{}", tier.logs());
    let (code, _) = tier.sql("SELECT 1").await;
    assert_eq!(code, 200);
}

/// A sidecar config forwarding to `platform` over TLS, presenting `client` if given.
fn sidecar_config(platform: &Tier, ca: &TestCa, client: Option<&CertFiles>) -> String {
    let mut tls = format!("    ca_file: {}\n    server_name: localhost\n", ca.ca_file.display());
    if let Some(client) = client {
        tls.push_str(&format!(
            "    cert_file: {}\n    key_file: {}\n",
            client.cert_file.display(),
            client.key_file.display()
        ));
    }
    format!(
        "region: eu\nupstream:\n  endpoints: [\"https://127.0.0.1:{}\"]\n  catalog_interval: 1s\n  tls:\n{tls}",
        platform.flight_addr.port()
    )
}

/// A Flight SQL client of `tier` over TLS presenting `client`, sending `key`.
async fn flight_with_certificate(
    tier: &Tier,
    ca: &TestCa,
    client: &CertFiles,
    key: &str,
) -> arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel> {
    let channel = strata_integration_tests::tls_channel(&tier.flight_url(), &ca.ca_file, Some(client)).await;
    let mut client = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
    client.set_token(key.to_string());
    client
}

#[tokio::test]
async fn a_platform_requiring_client_certificates_knows_its_sidecars_by_them_and_refuses_others() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = TestCa::new(dir.path(), "tiers");
    let server = ca.server("platform");
    let (ops_key, ops_hash) = strata_core::auth::generate_key().expect("randomness");
    let config = format!(
        "region: eu\nserver:\n{}auth:\n  keys:\n    - {{ id: ops, tenant: ops, hash: \"{ops_hash}\" }}\n  certificates:\n    - {{ subject: sidecar-eu, tenant: shop }}\ntenants:\n  ops: {{ datasets: [\"*\"], operator: true }}\n  shop: {{ datasets: [orders] }}\n{}",
        server.server_yaml(Some(&ca.ca_file), true),
        datasets()
    );
    // HTTP answers probes without a client certificate (its routes still need a key).
    let platform = Tier::builder("platform-service").config(&config).tls(&ca.ca_file).start().await.with_key(&ops_key);
    platform.wait_ready(Duration::from_secs(20)).await;

    // A client with a certificate from the tiers' CA and a key queries over Flight SQL.
    let operator = ca.issue("operator", "operator", &[]);
    let mut client = flight_with_certificate(&platform, &ca, &operator, &ops_key).await;
    let info = client.execute("SELECT count(*) AS n FROM customers".into(), None).await.expect("query");
    assert_eq!(info.endpoint.len(), 1);

    // The sidecar known by its certificate: no key, and it acts for `shop`.
    let sidecar_cert = ca.issue("sidecar-eu", "sidecar-eu", &[]);
    let sidecar = Tier::start("app-sidecar", &sidecar_config(&platform, &ca, Some(&sidecar_cert))).await;
    sidecar.wait_ready(Duration::from_secs(20)).await;
    let (code, body) = sidecar.sql("SELECT count(*) AS n FROM orders").await;
    assert_eq!(code, 200, "{body}\n{}", sidecar.logs());
    let (code, body) = sidecar.sql("SELECT count(*) AS n FROM customers").await;
    assert_ne!(code, 200, "shop's sidecar read customers: {body}");

    // Refused: no certificate, one from another CA, and one of the right CA whose subject
    // is not a known caller (with no key either).
    let stranger = TestCa::new(dir.path(), "stranger");
    let foreign = stranger.issue("foreign", "sidecar-eu", &[]);
    let unknown = ca.issue("unknown", "sidecar-unknown", &[]);
    for (case, cert) in [("no certificate", None), ("another CA", Some(&foreign)), ("unknown subject", Some(&unknown))]
    {
        let refused = Tier::start("app-sidecar", &sidecar_config(&platform, &ca, cert)).await;
        refused
            .wait_for(Duration::from_secs(10), "the catalog read to fail", || async {
                refused.logs().contains("cannot read the upstream catalog").then_some(())
            })
            .await;
        let (code, _) = refused.get_json("/v1/ready").await;
        assert_eq!(code, 503, "{case}: a refused sidecar reports ready\n{}", refused.logs());
        let (code, body) = refused.sql("SELECT count(*) AS n FROM orders").await;
        assert_ne!(code, 200, "{case}: {body}");
    }
    // The platform still serves its known sidecar.
    let (code, _) = sidecar.sql("SELECT count(*) AS n FROM orders").await;
    assert_eq!(code, 200);
}
