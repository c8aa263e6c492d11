//! The benchmark harness keeps working: `strata-bench --quick` runs every scenario against
//! the real binaries and reports every path with its baseline. Times are never asserted.

use strata_integration_tests::bin_dir;

#[tokio::test]
async fn quick_benchmark_reports_every_scenario_against_its_baseline() {
    let dir = tempfile::tempdir().expect("dir");
    let json = dir.path().join("bench.json");
    let png = dir.path().join("growth.png");
    let output = tokio::process::Command::new(bin_dir().join("strata-bench"))
        .args(["--quick", "--json"])
        .arg(&json)
        .arg("--growth-png")
        .arg(&png)
        .output()
        .await
        .expect("run strata-bench");
    assert!(output.status.success(), "strata-bench failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let markdown = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("parse");
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    let names: Vec<&str> = scenarios.iter().filter_map(|s| s["name"].as_str()).collect();
    let scenario = |prefix: &str| {
        find(&report["scenarios"], "name", |n| n.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} scenario in {names:?}"))
    };
    for wanted in [
        "Footprint",
        "Point lookup",
        "Aggregate",
        "Dashboard",
        "Tracing cost",
        "Bulk transfer",
        "TPC-H",
        "Edge ingest",
        "Edge restart",
        "Edge outage",
        "How cost grows",
    ] {
        assert!(names.iter().any(|n| n.starts_with(wanted)), "no {wanted} scenario in {names:?}");
    }
    for scenario in scenarios {
        let baseline = scenario["baseline"].as_str().expect("baseline");
        for path in scenario["results"].as_array().expect("results") {
            assert!(path["p50_us"].as_f64().is_some_and(|v| v > 0.0), "{path}");
            assert!(path["p99_us"].as_f64() >= path["p50_us"].as_f64(), "{path}");
            let concurrency: Vec<u64> = path["throughput"]
                .as_array()
                .expect("throughput")
                .iter()
                .filter_map(|t| t["concurrency"].as_u64())
                .collect();
            assert_eq!(concurrency, [1, 8, 64], "{path}");
            assert!(path["p50_ratio"].as_f64().is_some(), "every path has a ratio to `{baseline}`: {path}");
        }
        assert!(markdown.contains(scenario["name"].as_str().expect("name")), "the table lists {}", scenario["name"]);
    }
    // Whose CPU each lookup costs, sequentially and under load: PostgreSQL's backends (its
    // postmaster's children) are charged to it, the HTTP floor to the sidecar serving it.
    let lookup = scenario("Point lookup");
    let path = |name: &str| {
        find(&lookup["results"], "name", |n| n.starts_with(name))
            .unwrap_or_else(|| panic!("no path `{name}` in {lookup}"))
    };
    let cpu = |cpu_per_call: &serde_json::Value, process: &str| {
        find(cpu_per_call, "process", |p| p == process)
            .and_then(|c| c["us"].as_f64())
            .unwrap_or_else(|| panic!("no CPU of `{process}` in {cpu_per_call}"))
    };
    for (name, server) in [
        ("PostgreSQL", "PostgreSQL"),
        ("HTTP/1.1 keep-alive round trip", "sidecar"),
        ("sidecar local (HTTP", "sidecar"),
    ] {
        let measured = path(name);
        assert!(cpu(&measured["cpu_per_call"], server) > 0.0, "{server} answers `{name}`: {measured}");
        let loaded = measured["throughput"].as_array().expect("throughput").iter().find(|t| t["concurrency"] == 8);
        let loaded = loaded.unwrap_or_else(|| panic!("no throughput at 8 in {measured}"));
        assert!(cpu(&loaded["cpu_per_call"], server) > 0.0, "{server} answers `{name}` under load: {loaded}");
        assert!(cpu(&loaded["cpu_per_call"], "bench client") > 0.0, "{loaded}");
    }
    // Its background processes may wake, but nothing of a path it does not answer is its.
    let idle = cpu(&path("sidecar local (HTTP")["cpu_per_call"], "PostgreSQL");
    assert!(idle < 5.0, "PostgreSQL charged {idle} µs per sidecar lookup");
    assert!(markdown.contains("CPU time per call at 8 clients"), "the loaded CPU table is printed");

    let tpch = scenario("TPC-H");
    assert_eq!(tpch["table"]["rows"].as_array().expect("rows").len(), 23, "22 queries and the total");

    // A first snapshot's cost as the kernel accounts it: the sidecar's CPU in user space and
    // in the kernel, and the page faults of filling its replica.
    let bulk = scenario("Bulk");
    let figure = |name: &str| {
        find(&bulk["figures"], "name", |n| n.trim() == name)
            .and_then(|f| f["value"].as_f64())
            .unwrap_or_else(|| panic!("no figure `{name}` in {bulk}"))
    };
    let (user, kernel) =
        (figure("sidecar CPU in user space"), figure("sidecar CPU in the kernel (page faults, receiving)"));
    assert!(user >= 0.0 && kernel >= 0.0 && user + kernel > 0.0, "user {user} s, kernel {kernel} s");
    assert!(figure("sidecar page faults per MiB replicated") > 0.0, "{bulk}");

    // The growth table: each measure at both quick sizes, and its log-log slope.
    let growth = scenario("How cost grows");
    assert_eq!(growth["table"]["columns"], serde_json::json!(["10k rows", "100k rows", "log-log slope"]));
    for row in growth["table"]["rows"].as_array().expect("rows") {
        let cells = row[1].as_array().expect("cells");
        assert!(
            cells.iter().all(|c| c.as_f64().is_some_and(f64::is_finite)),
            "a value for each size and a slope: {row}"
        );
        assert!(cells[..2].iter().all(|c| c.as_f64() > Some(0.0)), "{row}");
    }
    let plot = std::fs::read(&png).expect("the growth plot is written");
    assert!(plot.starts_with(b"\x89PNG\r\n\x1a\n") && plot.len() > 10_000, "a PNG with something drawn");
}

/// The first element of the JSON array `list` whose string field `key` is `wanted`.
fn find<'a>(list: &'a serde_json::Value, key: &str, wanted: impl Fn(&str) -> bool) -> Option<&'a serde_json::Value> {
    list.as_array()?.iter().find(|item| item[key].as_str().is_some_and(&wanted))
}
