//! A bad config stops the process at start with exit code 64 and a message naming the
//! file, the field and the line.

use strata_integration_tests::tier::Tier;

async fn rejected(config: &str) -> String {
    match Tier::builder("platform-service").config(config).spawn().await {
        Ok(_) => panic!("config was accepted:\n{config}"),
        Err(exited) => {
            assert_eq!(exited.code, Some(64), "exit code for a bad config; stderr:\n{}", exited.stderr);
            exited.stderr
        }
    }
}

#[tokio::test]
async fn unknown_field_is_named_with_its_line() {
    let err = rejected("region: eu\nlimits:\n  query_timout: 5s\n").await;
    assert!(err.contains("strata.yaml"), "{err}");
    assert!(err.contains("unknown field `query_timout`"), "{err}");
    assert!(err.contains("line 3"), "{err}");
}

#[tokio::test]
async fn bad_duration_is_named() {
    let err =
        rejected("datasets:\n  - name: t\n    from: file:x.csv\n    acceleration:\n      refresh_interval: often\n")
            .await;
    assert!(err.contains("invalid duration `often`"), "{err}");
    assert!(err.contains("line 5"), "{err}");
}

#[tokio::test]
async fn unknown_source_kind_is_named() {
    let err = rejected("datasets:\n  - name: t\n    from: oracle:hr.emp\n").await;
    assert!(err.contains("unknown source kind `oracle`"), "{err}");
}

#[tokio::test]
async fn missing_table_is_named() {
    let err = rejected("datasets:\n  - name: t\n    from: postgres:public.\n").await;
    assert!(err.contains("missing table"), "{err}");
}

#[tokio::test]
async fn unset_secret_is_named() {
    let err = rejected(
        "datasets:\n  - name: t\n    from: postgres:t\n    params: {password: '${STRATA_TEST_UNSET_SECRET}'}\n",
    )
    .await;
    assert!(err.contains("STRATA_TEST_UNSET_SECRET") && err.contains("line 4"), "{err}");
}

#[tokio::test]
async fn yaml_aliases_that_multiply_are_refused_quickly() {
    // Nine levels of ten aliases each: a billion values from a few hundred bytes of YAML.
    let mut config = String::from("x0: &x0 [a, a, a, a, a, a, a, a, a, a]\n");
    for i in 1..10 {
        config.push_str(&format!("x{i}: &x{i} [{}]\n", vec![format!("*x{}", i - 1); 10].join(", ")));
    }
    config.push_str("region: eu\n");
    let started = std::time::Instant::now();
    let err = rejected(&config).await;
    assert!(err.contains("expands to more than 100000 values"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "took {:?}", started.elapsed());
}

/// Flags override the file before the checks run, so a value given by flag is checked like
/// one in the file and named by its flag (it used to reach the tier unchecked and exit 1).
#[test]
fn a_bad_upstream_flag_exits_64_naming_the_flag() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("strata.yaml");
    std::fs::write(&config, "region: eu\nupstream:\n  endpoints: [http://127.0.0.1:1]\n").expect("write");
    for binary in ["app-sidecar", "edge-agent"] {
        let out = std::process::Command::new(strata_integration_tests::bin_dir().join(binary))
            .arg("--config")
            .arg(&config)
            .args(["--upstream", "platform:50051", "--http-addr", "127.0.0.1:0", "--flight-addr", "127.0.0.1:0"])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{binary}: {stderr}");
        assert!(stderr.contains("--upstream `platform:50051`") && stderr.contains("http://host:port"), "{stderr}");
    }
    // Through the CLI too, where a flag-given upstream also satisfies a sidecar's need for one.
    std::fs::write(&config, "region: eu\n").expect("write");
    let out = std::process::Command::new(strata_integration_tests::bin_dir().join("strata"))
        .args(["sidecar", "--config"])
        .arg(&config)
        .args(["--upstream", "ftp://platform:50051"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--upstream"), "{}", String::from_utf8_lossy(&out.stderr));
}
