//! A tier binary running as a real process on free ports, with HTTP and Flight SQL clients.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
}

/// What `spawn` saw when the process exited before listening (bad config, for example).
pub struct Exited {
    pub code: Option<i32>,
    pub stderr: String,
}

impl Tier {
    /// Starts `binary` with `config` (YAML text) on free ports and waits for `/health`.
    pub async fn start(binary: &str, config: &str) -> Self {
        match Self::spawn(binary, config).await {
            Ok(tier) => tier,
            Err(exited) => panic!("{binary} exited with {:?}:\n{}", exited.code, exited.stderr),
        }
    }

    /// Like [`Tier::start`], but a process that exits early is reported, not a panic.
    pub async fn spawn(binary: &str, config: &str) -> Result<Self, Exited> {
        let dir = tempfile::Builder::new().prefix("strata-tier-").tempdir().expect("temp dir");
        let config_path = dir.path().join("strata.yaml");
        std::fs::write(&config_path, config).expect("write config");
        Self::spawn_with_config_file(binary, &config_path, dir).await
    }

    /// Starts `binary` on the given addresses (to restart a tier where its clients expect it).
    pub async fn start_at(binary: &str, config: &str, flight: SocketAddr, http: SocketAddr) -> Self {
        let dir = tempfile::Builder::new().prefix("strata-tier-").tempdir().expect("temp dir");
        let config_path = dir.path().join("strata.yaml");
        std::fs::write(&config_path, config).expect("write config");
        match Self::spawn_inner(binary, &config_path, dir, &flight.to_string(), &http.to_string()).await {
            Ok(tier) => tier,
            Err(exited) => panic!("{binary} exited with {:?}:\n{}", exited.code, exited.stderr),
        }
    }

    /// Starts `binary` under a command prefix (`ip netns exec <ns>`), listening on `flight`
    /// and `http` (addresses the prefix's network can bind).
    pub async fn start_under(prefix: &[&str], binary: &str, config: &str, flight: &str, http: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("strata-tier-").tempdir().expect("temp dir");
        let config_path = dir.path().join("strata.yaml");
        std::fs::write(&config_path, config).expect("write config");
        match Self::spawn_command(prefix, binary, &[], &config_path, dir, flight, http).await {
            Ok(tier) => tier,
            Err(exited) => panic!("{binary} exited with {:?}:\n{}", exited.code, exited.stderr),
        }
    }

    async fn spawn_with_config_file(binary: &str, config_path: &Path, dir: tempfile::TempDir) -> Result<Self, Exited> {
        Self::spawn_inner(binary, config_path, dir, "127.0.0.1:0", "127.0.0.1:0").await
    }

    async fn spawn_inner(
        binary: &str,
        config_path: &Path,
        dir: tempfile::TempDir,
        flight: &str,
        http: &str,
    ) -> Result<Self, Exited> {
        Self::spawn_command(&[], binary, &[], config_path, dir, flight, http).await
    }

    /// Starts a tier through the `strata` CLI (`strata edge --config ...`), as the container
    /// images run every tier.
    pub async fn start_cli(subcommand: &str, config: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("strata-tier-").tempdir().expect("temp dir");
        let config_path = dir.path().join("strata.yaml");
        std::fs::write(&config_path, config).expect("write config");
        match Self::spawn_command(&[], "strata", &[subcommand], &config_path, dir, "127.0.0.1:0", "127.0.0.1:0").await {
            Ok(tier) => tier,
            Err(exited) => panic!("strata {subcommand} exited with {:?}:\n{}", exited.code, exited.stderr),
        }
    }

    async fn spawn_command(
        prefix: &[&str],
        binary: &str,
        subcommand: &[&str],
        config_path: &Path,
        dir: tempfile::TempDir,
        flight: &str,
        http: &str,
    ) -> Result<Self, Exited> {
        let exe = crate::bin_dir().join(binary);
        assert!(exe.exists(), "{} is not built: run `cargo build --workspace --bins` first", exe.display());
        let log = dir.path().join("stderr.log");
        let mut command = match prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let mut child = command
            .args(subcommand)
            .arg("--config")
            .arg(config_path)
            .args(["--flight-addr", flight, "--http-addr", http])
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
        let tier = Self {
            flight_addr: addr("flight="),
            http_addr: addr("http="),
            child,
            log,
            _dir: dir,
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = tier.http.get(tier.url("/health")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "no /health answer; logs:\n{}", tier.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(tier)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http_addr, path)
    }

    /// The process's log output so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/v1/ready` says ready.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = self.http.get(self.url("/v1/ready")).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "not ready after {timeout:?}; logs:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
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
        let channel = Channel::from_shared(format!("http://{}", self.flight_addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect flight");
        FlightSqlServiceClient::new(channel)
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
