//! PostgreSQL sources over TLS, against a real PostgreSQL that accepts TCP over TLS only:
//! rustls verifies the server as `sslmode` asks (verify-full by default), and a server the
//! CA did not sign, or whose certificate names another host, is refused with the reason on
//! the dataset.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use strata_integration_tests::certs::TestCa;
use strata_integration_tests::postgres::PgServer;
use strata_integration_tests::tier::Tier;

async fn seed(pg: &PgServer) {
    pg.connect()
        .await
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, qty int); INSERT INTO items SELECT g, g % 7 FROM generate_series(1, 500) g;")
        .await
        .expect("seed");
}

/// A federated dataset `name` over `items`, and `<name>_acc` accelerated, with `tls` params.
fn dataset(name: &str, port: u16, tls: &str) -> String {
    dataset_at(name, "127.0.0.1", port, tls)
}

fn dataset_at(name: &str, host: &str, port: u16, tls: &str) -> String {
    let params = format!("{{host: '{host}', port: '{port}', user: postgres, db: postgres, {tls}}}");
    format!(
        "  - name: {name}\n    from: postgres:public.items\n    params: {params}\n\
         \x20 - name: {name}_acc\n    from: postgres:public.items\n    params: {params}\n    acceleration: {{refresh: full}}\n"
    )
}

fn root(path: &Path) -> String {
    format!("sslrootcert: '{}'", path.display())
}

/// Waits until `name` either answers a count or records why its source cannot be reached.
async fn outcome(tier: &Tier, name: &str) -> Result<i64, String> {
    tier.wait_for(Duration::from_secs(30), &format!("dataset {name} to connect or fail"), || async {
        let dataset = tier.find_dataset(name).await?;
        if let Some(error) = dataset["last_error"].as_str() {
            return Some(Err(error.to_string()));
        }
        let (code, body) = tier.sql(&format!("SELECT count(*) AS n FROM {name}")).await;
        match (code, body[0]["n"].as_i64()) {
            (200, Some(n)) => Some(Ok(n)),
            _ => None,
        }
    })
    .await
}

/// The PostgreSQL connections of the given user that are encrypted, and all of them.
async fn ssl_connections(pg: &PgServer) -> (i64, i64) {
    let row = pg
        .connect()
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.client_addr IS NOT NULL",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn a_source_over_tls_is_verified_by_rustls_and_answers() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = TestCa::new(dir.path(), "db");
    let pg = PgServer::start_tls(&ca.server("postgres"));
    seed(&pg).await;
    let config = format!(
        "datasets:\n{}{}{}",
        dataset("verified", pg.port, &format!("sslmode: verify-full, {}", root(&ca.ca_file))),
        // No sslmode: verify-full is the default.
        dataset("by_default", pg.port, &root(&ca.ca_file)),
        dataset("plaintext", pg.port, "sslmode: disable"),
    );
    let tier = Tier::start("platform-service", &config).await;

    for name in ["verified", "verified_acc", "by_default", "by_default_acc"] {
        assert_eq!(outcome(&tier, name).await, Ok(500), "{name}");
    }
    let expected: i64 =
        pg.connect().await.query_one("SELECT count(*) FROM items WHERE qty = 3", &[]).await.expect("count").get(0);
    let (code, body) = tier.sql("SELECT qty, count(*) AS n FROM verified WHERE qty = 3 GROUP BY qty").await;
    assert_eq!((code, body[0]["n"].as_i64()), (200, Some(expected)), "{body}");
    // The server refuses TCP without TLS, so the plaintext dataset cannot connect (and the
    // ones above did connect over TLS): PostgreSQL's own reason reaches the dataset.
    let refused = outcome(&tier, "plaintext").await.expect_err("plaintext refused");
    assert!(refused.contains("no encryption") || refused.contains("pg_hba"), "{refused}");
    let (encrypted, all) = ssl_connections(&pg).await;
    assert!(encrypted > 0 && encrypted == all, "{encrypted} of {all} TCP connections encrypted");
}

#[tokio::test]
async fn servers_the_ca_did_not_sign_or_that_name_another_host_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = TestCa::new(dir.path(), "db");
    let stranger = TestCa::new(dir.path(), "stranger");
    // A certificate for another host name than the one the source connects to.
    let pg = PgServer::start_tls(&ca.issue("postgres", "db.internal", &["db.internal"]));
    seed(&pg).await;
    let config = format!(
        "datasets:\n{}{}{}{}",
        dataset("wrong_name", pg.port, &format!("sslmode: verify-full, {}", root(&ca.ca_file))),
        dataset("any_name", pg.port, &format!("sslmode: verify-ca, {}", root(&ca.ca_file))),
        dataset("strangers", pg.port, &format!("sslmode: verify-full, {}", root(&stranger.ca_file))),
        dataset("encrypted_only", pg.port, "sslmode: require"),
    );
    let tier = Tier::start("platform-service", &config).await;

    let wrong_name = outcome(&tier, "wrong_name").await.expect_err("wrong name refused");
    assert!(
        wrong_name.contains("TLS to PostgreSQL at 127.0.0.1") && wrong_name.contains("not valid for name"),
        "{wrong_name}"
    );
    let strangers = outcome(&tier, "strangers").await.expect_err("unknown issuer refused");
    assert!(strangers.contains("UnknownIssuer"), "{strangers}");
    // verify-ca checks the chain, not the name; require only encrypts (and says so).
    assert_eq!(outcome(&tier, "any_name").await, Ok(500));
    assert_eq!(outcome(&tier, "encrypted_only").await, Ok(500));
    assert!(tier.logs().contains("the server is not authenticated"), "no warning for sslmode require");
    // The platform is unharmed by the refused sources.
    let (code, body): (u16, Value) = tier.sql("SELECT count(*) AS n FROM any_name_acc").await;
    assert_eq!((code, body[0]["n"].as_i64()), (200, Some(500)), "{body}");
}

#[tokio::test]
async fn a_server_without_tls_is_refused_unless_tls_is_only_preferred_or_local() {
    let pg = PgServer::start();
    seed(&pg).await;
    let socket = pg.socket_dir().display().to_string();
    let config = format!(
        "datasets:\n{}{}{}",
        dataset("required", pg.port, "sslmode: require"),
        dataset("preferred", pg.port, "sslmode: prefer"),
        // The server's Unix socket: no TLS there, as with libpq, whatever sslmode says.
        dataset_at("local", &socket, pg.port, "sslmode: verify-full"),
    );
    let tier = Tier::start("platform-service", &config).await;
    let required = outcome(&tier, "required").await.expect_err("no TLS refused");
    assert!(required.contains("does not accept TLS"), "{required}");
    assert_eq!(outcome(&tier, "preferred").await, Ok(500));
    assert_eq!(outcome(&tier, "local").await, Ok(500));
}
