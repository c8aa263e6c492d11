//! A tier binary running as a real process on free ports, with HTTP and Flight SQL clients.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use serde_json::Value;
use tonic::transport::Channel;

/// A running tier process; killed when dropped.
pub struct Tier {
    pub flight_addr: SocketAddr,
    pub http_addr: SocketAddr,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
    /// Sent by the Flight SQL clients of [`Tier::flight`] (see [`Tier::with_key`]).
    key: Option<String>,
    /// Set when the tier serves TLS (see [`TierBuilder::tls`]).
    tls_ca: Option<PathBuf>,
}

/// The HTTP client of a tier handle: trusting `ca` (a TLS tier), sending `key`.
fn http_client(ca: Option<&std::path::Path>, key: Option<&str>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder();
    if let Some(key) = key {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {key}").parse().expect("ascii key"));
        builder = builder.default_headers(headers);
    }
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).expect("read CA");
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA pem"));
    }
    builder.build().expect("http client")
}

/// What `spawn` saw when the process exited before listening (bad config, for example).
pub struct Exited {
    pub code: Option<i32>,
    pub stderr: String,
}

/// How to start a tier process: the one way every test and bench starts one.
///
/// `Tier::builder("sidecar").config(yaml).start().await`; [`TierBuilder::at`] to restart a
/// tier where its clients expect it, [`TierBuilder::under`] to run it in a network
/// namespace, [`Tier::cli`] for `strata <tier>` as the container images run it.
#[must_use]
pub struct TierBuilder {
    binary: String,
    subcommand: Option<String>,
    prefix: Vec<String>,
    config: String,
    flight: String,
    http: String,
    /// The CA of a tier that serves TLS: its clients here verify against it.
    tls_ca: Option<PathBuf>,
}

impl TierBuilder {
    /// The YAML config file's text.
    pub fn config(mut self, yaml: &str) -> Self {
        self.config = yaml.to_string();
        self
    }

    /// The tier serves TLS (`server.tls` in its config) with a certificate signed by the CA
    /// in `ca_file`: this handle's HTTP and Flight clients use https and verify against it.
    pub fn tls(mut self, ca_file: &std::path::Path) -> Self {
        self.tls_ca = Some(ca_file.to_path_buf());
        self
    }

    /// Listen on these addresses instead of free ports.
    pub fn at(mut self, flight: SocketAddr, http: SocketAddr) -> Self {
        self.flight = flight.to_string();
        self.http = http.to_string();
        self
    }

    /// Run under a command prefix (`ip netns exec <ns>`), listening on addresses that the
    /// prefix's network can bind.
    pub fn under(mut self, prefix: &[&str], flight: &str, http: &str) -> Self {
        self.prefix = prefix.iter().map(|p| p.to_string()).collect();
        self.flight = flight.to_string();
        self.http = http.to_string();
        self
    }

    /// Starts the process and waits for `/health`; panics with its stderr if it exits first.
    pub async fn start(self) -> Tier {
        let name = match &self.subcommand {
            Some(sub) => format!("{} {sub}", self.binary),
            None => self.binary.clone(),
        };
        match self.spawn().await {
            Ok(tier) => tier,
            Err(exited) => panic!("{name} exited with {:?}:\n{}", exited.code, exited.stderr),
        }
    }

    /// Like [`TierBuilder::start`], but a process that exits before listening (a bad
    /// config) is reported, not a panic.
    pub async fn spawn(self) -> Result<Tier, Exited> {
        let dir = tempfile::Builder::new().prefix("strata-tier-").tempdir().expect("temp dir");
        let config_path = dir.path().join("strata.yaml");
        std::fs::write(&config_path, &self.config).expect("write config");
        let exe = crate::bin_dir().join(&self.binary);
        assert!(exe.exists(), "{} is not built: run `cargo build --workspace --all-targets` first", exe.display());
        let log = dir.path().join("stderr.log");
        let mut command = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let mut child = command
            .args(&self.subcommand)
            .arg("--config")
            .arg(&config_path)
            .args(["--flight-addr", &self.flight, "--http-addr", &self.http])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn tier binary");
        let stdout = child.stdout.take().expect("stdout");
        let line = tokio::task::spawn_blocking(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            // Keep draining stdout so the process never blocks on a full pipe.
            std::thread::spawn(move || for _ in reader.lines() {});
            line
        })
        .await
        .expect("read stdout");
        if !line.contains("listening") {
            let status = child.wait().expect("wait");
            return Err(Exited { code: status.code(), stderr: std::fs::read_to_string(&log).unwrap_or_default() });
        }
        let addr = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in `{line}`"))
        };
        let tier = Tier {
            flight_addr: addr("flight="),
            http_addr: addr("http="),
            child,
            log,
            _dir: dir,
            http: http_client(self.tls_ca.as_deref(), None),
            key: None,
            tls_ca: self.tls_ca,
        };
        tier.wait_for(Duration::from_secs(10), "a /health answer", || tier.answers("/health")).await;
        Ok(tier)
    }
}

impl Tier {
    /// A tier binary (`platform-service`, `app-sidecar`, `edge-agent`) to start on free ports.
    pub fn builder(binary: &str) -> TierBuilder {
        TierBuilder {
            binary: binary.to_string(),
            subcommand: None,
            prefix: Vec::new(),
            config: String::new(),
            tls_ca: None,
            flight: "127.0.0.1:0".into(),
            http: "127.0.0.1:0".into(),
        }
    }

    /// A tier run through the `strata` CLI (`strata edge --config ...`).
    pub fn cli(subcommand: &str) -> TierBuilder {
        TierBuilder { subcommand: Some(subcommand.to_string()), ..Self::builder("strata") }
    }

    /// `Tier::builder(binary).config(config).start()`, the common case.
    pub async fn start(binary: &str, config: &str) -> Self {
        Self::builder(binary).config(config).start().await
    }

    /// This tier's HTTP helpers (`sql`, `get_json`, `wait_ready`, ...) send `key` as
    /// `authorization: Bearer`, and `flight()` clients too: for tiers with `auth:`.
    pub fn with_key(mut self, key: &str) -> Self {
        self.http = http_client(self.tls_ca.as_deref(), Some(key));
        self.key = Some(key.to_string());
        self
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls_ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}{}", self.http_addr, path)
    }

    /// The Flight endpoint (`http://` or `https://`).
    pub fn flight_url(&self) -> String {
        let scheme = if self.tls_ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.flight_addr)
    }

    /// A channel to the Flight listener, over TLS when the tier serves it.
    pub async fn channel(&self) -> Channel {
        match &self.tls_ca {
            None => Channel::from_shared(self.flight_url()).expect("uri").connect().await.expect("connect flight"),
            Some(ca) => crate::tls_channel(&self.flight_url(), ca, None).await,
        }
    }

    /// The process's log output so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A sidecar in region eu of `platform`, replicating `replicas` (queries time out after
    /// `query_timeout`), once it is ready and every replica has loaded.
    pub async fn sidecar_of(platform: &Tier, replicas: &[&str], query_timeout: &str) -> Tier {
        let mut yaml = format!(
            "region: eu\nlimits:\n  query_timeout: {query_timeout}\nupstream:\n  endpoints: [http://{}]\nreplicas:\n",
            platform.flight_addr
        );
        for name in replicas {
            yaml.push_str(&format!("  - name: {name}\n"));
        }
        let sidecar = Tier::start("app-sidecar", &yaml).await;
        sidecar.wait_ready(Duration::from_secs(60)).await;
        sidecar
            .wait_for(Duration::from_secs(60), "the sidecar's replicas to load", || async {
                let (_, body) = sidecar.get_json("/v1/datasets").await;
                body["datasets"]
                    .as_array()
                    .is_some_and(|d| d.len() == replicas.len() && d.iter().all(|d| d["state"] == "ready"))
                    .then_some(())
            })
            .await;
        sidecar
    }

    /// Waits until `/v1/ready` says ready.
    pub async fn wait_ready(&self, timeout: Duration) {
        self.wait_for(timeout, "/v1/ready to answer 200", || self.answers("/v1/ready")).await
    }

    /// `Some(())` once `GET path` answers 2xx.
    async fn answers(&self, path: &str) -> Option<()> {
        let response = self.http.get(self.url(path)).send().await.ok()?;
        response.status().is_success().then_some(())
    }

    /// Waits until `probe` returns `Some`, panicking after `timeout` with `what` and this
    /// tier's logs.
    pub async fn wait_for<T, Fut>(&self, timeout: Duration, what: &str, probe: impl FnMut() -> Fut) -> T
    where
        Fut: std::future::Future<Output = Option<T>>,
    {
        match crate::try_wait_until(timeout, probe).await {
            Some(value) => value,
            None => panic!("timed out after {timeout:?} waiting for {what}; logs:\n{}", self.logs()),
        }
    }

    /// `POST /v1/sql` asking for JSON: the status and the parsed body.
    pub async fn sql(&self, sql: &str) -> (u16, Value) {
        let r = self.http.post(self.url("/v1/sql")).body(sql.to_string()).send().await.expect("POST /v1/sql");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// `POST /v1/sql` with extra request headers: status, body and response headers.
    pub async fn sql_with(&self, sql: &str, headers: &[(&str, &str)]) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut request = self.http.post(self.url("/v1/sql")).body(sql.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let r = request.send().await.expect("POST /v1/sql");
        let status = r.status().as_u16();
        let response_headers = r.headers().clone();
        let text = r.text().await.expect("body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value, response_headers)
    }

    /// Runs a query that must succeed: its rows, `strata-route` and `strata-route-reason`.
    pub async fn routed(&self, sql: &str, headers: &[(&str, &str)]) -> (Vec<Value>, String, String) {
        let (status, body, h) = self.sql_with(sql, headers).await;
        let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        match (status, body) {
            (200, Value::Array(rows)) => (rows, header("strata-route"), header("strata-route-reason")),
            (status, body) => panic!("`{sql}` failed with {status}: {body}\nlogs:\n{}", self.logs()),
        }
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `POST /v1/sql` expecting success: the rows as JSON objects.
    pub async fn rows(&self, sql: &str) -> Vec<Value> {
        match self.sql(sql).await {
            (200, Value::Array(rows)) => rows,
            (status, body) => panic!("`{sql}` failed with {status}: {body}"),
        }
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.expect("GET");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str) -> (u16, Value) {
        let r = self.http.post(self.url(path)).send().await.expect("POST");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The value of an unlabelled counter or gauge on `/metrics` (panics when it is missing).
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self.http.get(self.url("/metrics")).send().await.expect("GET /metrics").text().await.expect("text");
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} not on /metrics:\n{text}"))
    }

    /// The status of one dataset from `/v1/datasets`, if it is listed yet.
    pub async fn find_dataset(&self, name: &str) -> Option<Value> {
        let (_, body) = self.get_json("/v1/datasets").await;
        body["datasets"].as_array().and_then(|d| d.iter().find(|d| d["name"] == name).cloned())
    }

    /// The status of one dataset from `/v1/datasets`.
    pub async fn dataset(&self, name: &str) -> Value {
        let (_, body) = self.get_json("/v1/datasets").await;
        body["datasets"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["name"] == name).cloned())
            .unwrap_or_else(|| panic!("dataset {name} not in {body}"))
    }

    /// A Flight SQL client connected to this tier.
    pub async fn flight(&self) -> FlightSqlServiceClient<Channel> {
        let channel = self.channel().await;
        let mut client = FlightSqlServiceClient::new(channel);
        if let Some(key) = &self.key {
            client.set_token(key.clone());
        }
        client
    }

    /// Runs a statement over Flight SQL and collects the batches.
    pub async fn flight_query(&self, sql: &str) -> Result<Vec<RecordBatch>, tonic::Status> {
        let mut client = self.flight().await;
        let info = client.execute(sql.to_string(), None).await.map_err(to_status)?;
        let mut batches = Vec::new();
        for endpoint in info.endpoint {
            let ticket = endpoint.ticket.expect("ticket");
            let stream = client.do_get(ticket).await.map_err(to_status)?;
            let mut part: Vec<RecordBatch> = stream.try_collect().await.map_err(to_status)?;
            batches.append(&mut part);
        }
        Ok(batches)
    }

    /// Sends `signal` (`TERM`, `STOP`, ...) without waiting.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status();
    }

    /// Waits for the process to exit, returning its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        self.child.wait().ok().and_then(|s| s.code())
    }

    /// Sends SIGTERM and waits for the process to exit, returning its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        self.child.wait().ok().and_then(|s| s.code())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn to_status(err: arrow_flight::error::FlightError) -> tonic::Status {
    match err {
        arrow_flight::error::FlightError::Tonic(status) => *status,
        other => tonic::Status::unknown(other.to_string()),
    }
}

impl Drop for Tier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
