//! Helpers for end-to-end tests: a throwaway PostgreSQL, the real `platform-service`
//! binary on free ports, and clients for its HTTP and Flight SQL interfaces.

pub mod certs;
pub mod otlp;
pub mod postgres;
pub mod sqlgen;
pub mod tier;

use std::path::PathBuf;

/// Directory holding the workspace's built binaries: the profile directory, which holds a
/// binary such as `strata-bench` itself, or the parent of a test executable's `deps/`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The workspace root, for fixtures such as `examples/` and `integration-tests/slt/`.
/// The YAML `datasets:` of the sample data in examples/data: `customers` (CSV, read live)
/// and `orders` (NDJSON, accelerated).
pub fn sample_datasets_yaml() -> String {
    let data = workspace_root().join("examples/data");
    format!(
        "datasets:\n  - name: customers\n    from: file:{}/customers.csv\n  - name: orders\n    from: file:{}/orders.ndjson\n    acceleration: {{refresh: full}}\n",
        data.display(),
        data.display()
    )
}

/// An engine in this process from the config `yaml`, started and with every dataset loaded
/// (within `timeout`), and the guard that stops its background work when dropped.
pub async fn loaded_engine(
    yaml: &str,
    timeout: std::time::Duration,
) -> (strata_core::Engine, tokio_util::sync::DropGuard) {
    let config = strata_core::Config::parse(yaml, "test").expect("config");
    let engine = strata_core::Engine::new(&config).expect("engine");
    let stop = engine.background().token().drop_guard();
    engine.start();
    tokio::time::timeout(timeout, engine.wait_ready()).await.expect("the datasets loaded in time");
    (engine, stop)
}

/// A gRPC channel to `url` (`https://...`) over TLS, trusting `ca_file`, presenting
/// `client` (a certificate and its key) when given.
pub async fn tls_channel(
    url: &str,
    ca_file: &std::path::Path,
    client: Option<&certs::CertFiles>,
) -> tonic::transport::Channel {
    let files = strata_core::config::ClientTlsConfig {
        ca_file: ca_file.to_path_buf(),
        cert_file: client.map(|c| c.cert_file.clone()),
        key_file: client.map(|c| c.key_file.clone()),
        server_name: Some("localhost".into()),
    };
    let tls = strata_upstream::tls::ClientTls::new(&files, "test").expect("client TLS");
    let connector = strata_upstream::tls::TlsConnector::new(tls, std::time::Duration::from_secs(5));
    tonic::transport::Channel::from_shared(url.to_string())
        .expect("uri")
        .tcp_nodelay(true)
        .connect_with_connector(connector)
        .await
        .expect("connect over TLS")
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// A free TCP port on loopback for a server started later (PostgreSQL, which cannot report
/// its own; a cluster whose members must know each other's ports in advance). Taken below
/// the kernel's ephemeral range: a port the kernel hands out for `:0` is also where the
/// outgoing connections of tests running meanwhile take theirs, and one took a cluster
/// worker's port before its replica bound it ("Address already in use"). Free when
/// checked, and never handed out twice by this process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    const LOWEST: u32 = 15_000;
    if ephemeral_low <= LOWEST + 1_000 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        return listener.local_addr().expect("local addr").port();
    }
    let span = ephemeral_low - LOWEST;
    // Each test process starts elsewhere in the range, so two running at once rarely meet.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = (LOWEST + NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {LOWEST} and {ephemeral_low}")
}

/// Polls `probe` until it returns `Some` and returns that value, or `None` once `timeout`
/// has passed (the caller then says what it waited for, with the logs that explain why).
/// Tests wait on the state they need instead of sleeping a guessed time.
pub async fn try_wait_until<T, Fut>(timeout: std::time::Duration, mut probe: impl FnMut() -> Fut) -> Option<T>
where
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut interval = std::time::Duration::from_millis(10);
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        // Quick at first (most waits are short), then at most 5 times a second.
        tokio::time::sleep(interval.min(deadline - tokio::time::Instant::now())).await;
        interval = (interval * 2).min(std::time::Duration::from_millis(200));
    }
}

/// [`try_wait_until`] that panics after `timeout`, naming `what` it waited for.
pub async fn wait_until<T, Fut>(timeout: std::time::Duration, what: &str, probe: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    match try_wait_until(timeout, probe).await {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}
