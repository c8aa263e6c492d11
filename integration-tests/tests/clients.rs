//! The Python ADBC Flight SQL driver and pyarrow.flight against the running binary.

use std::process::Command;
use std::time::Duration;

use strata_integration_tests::tier::Tier;
use strata_integration_tests::workspace_root;

#[tokio::test]
async fn python_flight_sql_clients() {
    let python = std::env::var("STRATA_PYTHON").unwrap_or_else(|_| {
        panic!("STRATA_PYTHON is not set: run the tests with scripts/test.sh, which installs the Python clients")
    });
    let config = std::fs::read_to_string(workspace_root().join("examples/strata.yaml"))
        .expect("example config")
        .replace("file:data/", &format!("file:{}/examples/data/", workspace_root().display()));
    let tier = Tier::start("platform-service", &config).await;
    tier.wait_ready(Duration::from_secs(20)).await;
    let test_file = workspace_root().join("integration-tests/python/test_clients.py");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(test_file)
            .env("STRATA_FLIGHT_URI", format!("grpc://{}", tier.flight_addr))
            .output()
            .map(|o| (o, tier))
    })
    .await
    .expect("join")
    .expect("run pytest");
    let (output, tier) = output;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "Python client tests failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        tier.logs()
    );
    assert!(stdout.contains("passed"), "{stdout}");
}
