//! An emulated network hop: the platform runs in its own network namespace behind a veth
//! pair whose both ends delay every packet by 0.5 ms (`tc netem`), the sidecar on the host.
//! Where the kernel has no netem, the delay is a relay of ours on the host end instead
//! ([`DelayRelay`], 0.5 ms each way), through which every path to the platform goes. Local
//! answers stay on loopback; forwarded ones pay the hop. Needs root (CAP_NET_ADMIN).

use std::process::Command;
use std::time::Duration;

use strata_integration_tests::tier::Tier;

use crate::delay_relay::DelayRelay;
use crate::measure::{Effort, Path, Watched, measure_side_by_side, with_ratios};
use crate::paths::{Flight, Floor, Query};
use crate::report::Scenario;

const HOST_IP: &str = "10.213.7.1";
const NS_IP: &str = "10.213.7.2";
/// The hop's delay, each way.
const ONE_WAY: Duration = Duration::from_micros(500);

/// The namespace and its veth pair; removed when dropped.
struct Namespace {
    name: String,
    /// Why the hop has no added delay, when `tc netem` is unavailable (a kernel without
    /// sch_netem): the scenario then measures a bare veth hop between namespaces.
    no_delay: Option<String>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

fn tc(prefix: &[&str], dev: &str, delay: &str) -> anyhow::Result<()> {
    let mut args: Vec<&str> = prefix.to_vec();
    args.extend(["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", delay]);
    let output = Command::new(args[0]).args(&args[1..]).output()?;
    anyhow::ensure!(output.status.success(), "{}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    Ok(())
}

impl Namespace {
    fn create(delay: &str) -> anyhow::Result<Self> {
        let name = format!("strata-bench-{}", std::process::id());
        let host_dev = format!("sb{}h", std::process::id() % 100_000);
        let ns_dev = format!("sb{}n", std::process::id() % 100_000);
        ip(&["netns", "add", &name])?;
        let mut ns = Self { name, no_delay: None };
        ip(&["link", "add", &host_dev, "type", "veth", "peer", "name", &ns_dev])?;
        ip(&["link", "set", &ns_dev, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &host_dev])?;
        ip(&["link", "set", &host_dev, "up"])?;
        let exec = ["ip", "netns", "exec", ns.name.as_str()];
        let in_ns = |args: &[&str]| -> anyhow::Result<()> {
            let mut all: Vec<&str> = vec!["netns", "exec", &ns.name, "ip"];
            all.extend(args);
            ip(&all)
        };
        in_ns(&["addr", "add", &format!("{NS_IP}/24"), "dev", &ns_dev])?;
        in_ns(&["link", "set", &ns_dev, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        if let Err(err) = tc(&[], &host_dev, delay).and_then(|()| tc(&exec, &ns_dev, delay)) {
            eprintln!("no netem delay on the hop: {err:#}");
            ns.no_delay = Some(format!("{err:#}"));
        }
        Ok(ns)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the host end.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The lookup scenario across the emulated hop.
pub async fn run(parquet: &std::path::Path, rows: i64, effort: Effort) -> anyhow::Result<Scenario> {
    let ns = Namespace::create(&format!("{}us", ONE_WAY.as_micros()))?;
    let platform = Tier::builder("platform-service")
        // The same table as the lookup scenario's: `id` its primary key, so the sidecar's
        // local answers come from its replica's key index there and here alike.
        .config(&crate::points::platform_config(parquet, "{primary_key: [id]}"))
        .under(&["ip", "netns", "exec", &ns.name], &format!("{NS_IP}:0"), &format!("{NS_IP}:0"))
        .start()
        .await;
    platform.wait_ready(Duration::from_secs(600)).await;
    // Without netem, everything that reaches the platform goes through the delay relay.
    let relay = match &ns.no_delay {
        None => None,
        Some(_) => Some(DelayRelay::start(format!("{HOST_IP}:0").parse()?, platform.flight_addr, ONE_WAY)?),
    };
    let platform_addr = relay.as_ref().map_or(platform.flight_addr, |r| r.addr);
    let sidecar = Tier::start(
        "app-sidecar",
        &format!(
            "region: eu\nlimits:\n  max_concurrent_queries: 256\nupstream:\n  endpoints: [http://{platform_addr}]\n  call_timeout: 10s\nreplicas:\n  - name: points\n",
        ),
    )
    .await;
    sidecar.wait_ready(Duration::from_secs(600)).await;
    let started = std::time::Instant::now();
    while sidecar.find_dataset("points").await.is_none_or(|d| d["state"] != "ready") {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(1200), "the replica never crossed the hop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let query = Query::Lookup { rows };
    let (s, p) = (sidecar.flight_addr, platform_addr);
    let paths: [Path; 4] = [
        ("tonic unary round trip across the hop (floor)", &Floor { addr: p }),
        ("sidecar local (Flight SQL, loopback)", &Flight { addr: s, query, strong: false }),
        ("sidecar forwarded across the hop", &Flight { addr: s, query, strong: true }),
        ("platform directly across the hop", &Flight { addr: p, query, strong: false }),
    ];
    let watch = [Watched::process("sidecar", sidecar.pid()), Watched::process("platform", platform.pid())];
    let results = measure_side_by_side(&paths, effort, 1, &watch).await?;
    drop(sidecar);
    drop(platform);
    drop(relay);
    let hop = match &ns.no_delay {
        None => "an emulated hop (veth between network namespaces, netem 0.5 ms each way)".to_string(),
        Some(_) => "an emulated hop (veth between network namespaces and a delay relay, 0.5 ms each way; \
                    this kernel has no netem)"
            .to_string(),
    };
    drop(ns);
    Ok(Scenario {
        name: format!("Point lookup across {hop}, {rows} rows"),
        baseline: "tonic unary round trip across the hop (floor)".into(),
        results: with_ratios(results, "tonic unary round trip across the hop (floor)"),
        figures: Vec::new(),
        table: None,
    })
}
