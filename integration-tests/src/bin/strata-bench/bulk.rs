//! Bulk transfer: a large result over Flight DoGet, and a sidecar's first snapshot of the
//! same dataset, against a raw TCP copy of as many bytes on the same loopback.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::sql::client::FlightSqlServiceClient;
use datafusion::parquet::arrow::ArrowWriter;
use futures::StreamExt;
use strata_integration_tests::tier::Tier;

use crate::paths::channel;
use crate::report::{Figure, Scenario};

const COLUMNS: usize = 8;

/// Moves `bytes` of Arrow (eight Int64 columns) out of the platform, and as many raw bytes
/// over a TCP socket; reports both rates and their ratio.
pub async fn run(bytes: u64) -> anyhow::Result<Scenario> {
    let rows = (bytes / (COLUMNS as u64 * 8)) as i64;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bulk.parquet");
    let schema = Arc::new(Schema::new(
        (0..COLUMNS).map(|c| Field::new(format!("c{c}"), DataType::Int64, false)).collect::<Vec<_>>(),
    ));
    let mut writer = ArrowWriter::try_new(std::fs::File::create(&path)?, Arc::clone(&schema), None)?;
    for start in (0..rows).step_by(1 << 20) {
        let end = (start + (1 << 20)).min(rows);
        let columns: Vec<ArrayRef> = (0..COLUMNS as i64)
            .map(|c| Arc::new(Int64Array::from_iter_values((start..end).map(|i| i.wrapping_mul(c + 1)))) as ArrayRef)
            .collect();
        writer.write(&RecordBatch::try_new(Arc::clone(&schema), columns)?)?;
    }
    writer.close()?;
    let platform = Tier::start(
        "platform-service",
        &format!(
            "region: eu\nlimits:\n  max_result_rows: {}\n  query_timeout: 600s\n  memory_limit: 8GiB\ndatasets:\n  - name: bulk\n    from: file:{}\n    acceleration: {{}}\n",
            rows + 1,
            path.display()
        ),
    )
    .await;
    platform.wait_ready(Duration::from_secs(1800)).await;

    let default_client = FlightSqlServiceClient::new(channel(platform.flight_addr).await?);
    let (flight_rate, moved) = best_do_get(default_client, rows).await?;
    // The same transfer with HTTP/2 flow-control windows and frames sized for bulk data (the
    // defaults are 2 MiB windows and 16 KiB frames): what a client tuned for throughput gets.
    let tuned = tonic::transport::Channel::from_shared(format!("http://{}", platform.flight_addr))?
        .tcp_nodelay(true)
        .initial_stream_window_size(BULK_WINDOW)
        .initial_connection_window_size(BULK_WINDOW)
        .max_frame_size(BULK_FRAME)
        .connect()
        .await?;
    let (tuned_rate, _) = best_do_get(FlightSqlServiceClient::new(tuned), rows).await?;

    let snapshot = first_snapshot(&platform, rows, moved).await?;
    let replication_rate = snapshot.rate;

    let best_tcp = (0..3).map(|_| raw_tcp_copy(moved)).collect::<std::io::Result<Vec<f64>>>()?;
    let tcp_rate = moved as f64 / best_tcp.into_iter().fold(f64::MAX, f64::min);
    let gb = |r: f64| r / 1e9;
    Ok(Scenario {
        name: format!("Bulk transfer of {:.2} GB of Arrow (best of 3)", moved as f64 / 1e9),
        baseline: "raw TCP loopback copy of the same number of bytes".into(),
        results: Vec::new(),
        table: None,
        figures: vec![
            Figure::new("raw TCP loopback", gb(tcp_rate), "GB/s", Some(1.0)),
            Figure::new(
                "Flight SQL DoGet (decoded into batches)",
                gb(flight_rate),
                "GB/s",
                Some(flight_rate / tcp_rate),
            ),
            Figure::new(
                "Flight SQL DoGet, client with 16 MiB HTTP/2 windows and 1 MiB frames",
                gb(tuned_rate),
                "GB/s",
                Some(tuned_rate / tcp_rate),
            ),
            Figure::new(
                "a sidecar's first snapshot of it (process start to replica ready)",
                gb(replication_rate),
                "GB/s",
                Some(replication_rate / tcp_rate),
            ),
            Figure::new("  against DoGet decoded", replication_rate / flight_rate, "x", None),
            Figure::new("  sidecar peak RSS / Arrow bytes replicated", snapshot.peak_ratio, "x", None),
            Figure::new("  sidecar CPU in user space", snapshot.user_seconds, "s", None),
            Figure::new("  sidecar CPU in the kernel (page faults, receiving)", snapshot.kernel_seconds, "s", None),
            Figure::new(
                "  sidecar page faults per MiB replicated",
                snapshot.page_faults as f64 / (moved as f64 / f64::from(1u32 << 20)),
                "faults",
                None,
            ),
        ],
    })
}

/// What a sidecar's first snapshot cost it.
struct Snapshot {
    /// Bytes per second, from starting the process until the replica is ready.
    rate: f64,
    /// Peak RSS against the Arrow bytes held (1x would be the copy alone).
    peak_ratio: f64,
    /// The process's CPU until ready, split as the kernel accounts it: a new process fills
    /// pages it never held, and each first touch is a page fault in the kernel's time (on a
    /// VM whose freed memory goes back to its host, an expensive one), which a DoGet client
    /// reusing its buffers does not pay.
    user_seconds: f64,
    kernel_seconds: f64,
    /// Minor page faults until ready.
    page_faults: u64,
}

/// `/proc/<pid>/stat`'s minor faults, user and system time (in USER_HZ ticks, 100 a second
/// on Linux).
fn process_stat(pid: u32) -> anyhow::Result<(u64, f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from the third (`state`) on.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no field {n} in /proc/{pid}/stat"))
    };
    Ok((field(10)?, field(14)? as f64 / 100.0, field(15)? as f64 / 100.0))
}

/// A sidecar replicating `bulk` from scratch: the rate of its first snapshot (from starting
/// the process until the replica is ready with every row) and what it cost the process.
async fn first_snapshot(platform: &Tier, rows: i64, bytes: u64) -> anyhow::Result<Snapshot> {
    let yaml = format!(
        "region: eu\nlimits:\n  memory_limit: 8GiB\nupstream:\n  endpoints: [http://{}]\nreplicas:\n  - name: bulk\n",
        platform.flight_addr
    );
    let started = Instant::now();
    let sidecar = Tier::start("app-sidecar", &yaml).await;
    loop {
        let (_, body) = sidecar.get_json("/v1/datasets").await;
        let bulk = body["datasets"].as_array().and_then(|d| d.iter().find(|d| d["name"] == "bulk")).cloned();
        if bulk.as_ref().is_some_and(|d| d["state"] == "ready" && d["rows"].as_i64() == Some(rows)) {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(1800), "the replica did not load: {bulk:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = bytes as f64 / started.elapsed().as_secs_f64();
    let (page_faults, user_seconds, kernel_seconds) = process_stat(sidecar.pid())?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", sidecar.pid()))?;
    let peak = crate::points::status_bytes(&status, "VmHWM:")
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/{}/status", sidecar.pid()))?;
    Ok(Snapshot { rate, peak_ratio: peak as f64 / bytes as f64, user_seconds, kernel_seconds, page_faults })
}

const BULK_WINDOW: u32 = 16 << 20;
const BULK_FRAME: u32 = 1 << 20;

/// The best rate of three `SELECT * FROM bulk` over DoGet, and the Arrow bytes moved.
async fn best_do_get(
    mut client: FlightSqlServiceClient<tonic::transport::Channel>,
    rows: i64,
) -> anyhow::Result<(f64, u64)> {
    let mut best = f64::MAX;
    let mut moved = 0u64;
    for _ in 0..3 {
        let started = Instant::now();
        let info = client.execute("SELECT * FROM bulk".into(), None).await?;
        let mut got_rows = 0usize;
        moved = 0;
        for endpoint in info.endpoint {
            let ticket = endpoint.ticket.ok_or_else(|| anyhow::anyhow!("no ticket"))?;
            let mut stream = client.do_get(ticket).await?;
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                got_rows += batch.num_rows();
                moved += batch.columns().iter().map(|c| c.to_data().buffers()[0].len() as u64).sum::<u64>();
            }
        }
        anyhow::ensure!(got_rows as i64 == rows, "DoGet returned {got_rows} rows, expected {rows}");
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok((moved as f64 / best, moved))
}

/// Seconds to copy `bytes` from one thread to another over a loopback TCP socket.
fn raw_tcp_copy(bytes: u64) -> std::io::Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut socket, _) = listener.accept()?;
        let chunk = vec![7u8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            socket.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let started = Instant::now();
    let mut socket = std::net::TcpStream::connect(addr)?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while got < bytes {
        let n = socket.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    sender.join().map_err(|_| std::io::Error::other("sender panicked"))??;
    if got != bytes {
        return Err(std::io::Error::other(format!("raw copy moved {got} of {bytes} bytes")));
    }
    Ok(elapsed)
}
