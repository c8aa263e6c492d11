//! Scenarios over one `points` table (id, grp, amount, v): point lookups and a GROUP BY,
//! through the tiers and against PostgreSQL and in-process DataFusion on the same rows; and
//! the footprint of the tiers holding it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::SessionContext;
use strata_integration_tests::postgres::PgServer;
use strata_integration_tests::tier::Tier;

use crate::measure::{Effort, Path, Watched, measure_side_by_side, with_ratios};
use crate::paths::{Engine, Flight, FlightPrepared, FlightTicket, Floor, Http, HttpFloor, InProcess, Postgres, Query};
use crate::report::{Figure, Scenario};

/// The table in every form the scenarios need, and the tiers serving it.
pub struct Points {
    pub rows: i64,
    pub pg: PgServer,
    pub platform: Tier,
    pub sidecar: Tier,
    /// A second sidecar like the first, with its results cache turned off.
    pub uncached: Tier,
    pub sidecar_ready_after: Duration,
    pub ctx: Arc<SessionContext>,
    /// Strata's engine in this process, accelerating the same Parquet file with `id`
    /// indexed, as the tiers do.
    pub engine: strata_core::Engine,
    _engine_shutdown: tokio_util::sync::DropGuard,
    /// The same without the index: lookups planned and executed by DataFusion's operators.
    pub unindexed: strata_core::Engine,
    _unindexed_shutdown: tokio_util::sync::DropGuard,
    /// Arrow memory of the table as DataFusion holds it in-process.
    pub arrow_bytes: usize,
    /// The table as a Parquet file (the platforms' source).
    pub parquet: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("grp", DataType::Int64, false),
        Field::new("amount", DataType::Float64, false),
        Field::new("v", DataType::Utf8, false),
    ]))
}

/// Rows `start..end` of the table (the same values PostgreSQL's `generate_series` makes).
fn batch(schema: &Arc<Schema>, start: i64, end: i64) -> RecordBatch {
    let ids = start..end;
    RecordBatch::try_new(
        Arc::clone(schema),
        vec![
            Arc::new(Int64Array::from_iter_values(ids.clone())),
            Arc::new(Int64Array::from_iter_values(ids.clone().map(|i| i % 1000))),
            Arc::new(Float64Array::from_iter_values(ids.clone().map(|i| (i % 977) as f64 * 0.5))),
            Arc::new(StringArray::from_iter_values(ids.map(|i| format!("value-{i}")))),
        ],
    )
    .expect("batch")
}

const BATCH_ROWS: i64 = 65_536;

fn batches(rows: i64) -> Vec<RecordBatch> {
    let schema = schema();
    (0..rows).step_by(BATCH_ROWS as usize).map(|start| batch(&schema, start, (start + BATCH_ROWS).min(rows))).collect()
}

/// Writes the table of `rows` rows to a Parquet file a batch at a time (a 50M-row table is
/// never whole in this process).
pub fn write_parquet(path: &std::path::Path, rows: i64) -> anyhow::Result<()> {
    let schema = schema();
    let mut writer = ArrowWriter::try_new(std::fs::File::create(path)?, Arc::clone(&schema), None)?;
    for start in (0..rows).step_by(BATCH_ROWS as usize) {
        writer.write(&batch(&schema, start, (start + BATCH_ROWS).min(rows)))?;
    }
    writer.close()?;
    Ok(())
}

/// A platform's config accelerating the Parquet file at `path` as `points` with
/// `acceleration` (YAML flow mapping), admitting as many concurrent queries as the bench's
/// clients send.
pub fn platform_config(path: &std::path::Path, acceleration: &str) -> String {
    format!(
        "region: eu\nlimits:\n  max_concurrent_queries: 256\ndatasets:\n  - name: points\n    from: file:{}\n    acceleration: {acceleration}\n",
        path.display()
    )
}

/// A sidecar of `platform` replicating `points` (`extra`: more top-level YAML, e.g. its
/// results cache off), once its replica has loaded, and how long that took from its start.
pub async fn replicating_sidecar(platform: &Tier, extra: &str, within: Duration) -> anyhow::Result<(Tier, Duration)> {
    let started = Instant::now();
    let sidecar = Tier::start(
        "app-sidecar",
        &format!(
            "region: eu\nlimits:\n  max_concurrent_queries: 256\n{extra}upstream:\n  endpoints: [http://{}]\nreplicas:\n  - name: points\n",
            platform.flight_addr
        ),
    )
    .await;
    sidecar.wait_ready(within).await;
    while sidecar.find_dataset("points").await.is_none_or(|d| d["state"] != "ready") {
        anyhow::ensure!(started.elapsed() < within, "the sidecar's replica of points never loaded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((sidecar, started.elapsed()))
}

impl Points {
    pub async fn start(rows: i64) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("points.parquet");
        write_parquet(&path, rows)?;
        let data = batches(rows);
        let arrow_bytes = data.iter().map(RecordBatch::get_array_memory_size).sum();
        let ctx = SessionContext::new();
        ctx.register_table("points", Arc::new(MemTable::try_new(data[0].schema(), vec![data])?))?;

        let pg = PgServer::start();
        pg.connect()
            .await
            .batch_execute(&format!(
                "CREATE TABLE points (id bigint PRIMARY KEY, grp bigint NOT NULL, amount double precision NOT NULL, v text NOT NULL);
                 INSERT INTO points SELECT i, i % 1000, (i % 977) * 0.5, 'value-' || i FROM generate_series(0, {}) i;",
                rows - 1
            ))
            .await?;
        pg.connect().await.batch_execute("VACUUM ANALYZE points").await?;

        // `id` is the primary key, as in PostgreSQL: the tiers index it (the sidecars because
        // the platform's catalog says so).
        let unindexed_config = platform_config(&path, "{}");
        let indexed_config = platform_config(&path, "{primary_key: [id]}");
        let platform = Tier::start("platform-service", &indexed_config).await;
        platform.wait_ready(Duration::from_secs(600)).await;
        let within = Duration::from_secs(600);
        let (sidecar, sidecar_ready_after) = replicating_sidecar(&platform, "", within).await?;
        let (uncached, _) = replicating_sidecar(&platform, "results_cache:\n  max_bytes: 0\n", within).await?;
        let engine_config = strata_core::Config::parse(&indexed_config, "strata-bench engine")?;
        let engine = strata_core::Engine::new(&engine_config)?;
        let engine_shutdown = engine.background().token();
        engine.start();
        tokio::time::timeout(Duration::from_secs(600), engine.wait_ready()).await?;
        let unindexed =
            strata_core::Engine::new(&strata_core::Config::parse(&unindexed_config, "strata-bench engine")?)?;
        let unindexed_shutdown = unindexed.background().token();
        unindexed.start();
        tokio::time::timeout(Duration::from_secs(600), unindexed.wait_ready()).await?;
        Ok(Self {
            rows,
            pg,
            engine,
            _engine_shutdown: engine_shutdown.drop_guard(),
            unindexed,
            _unindexed_shutdown: unindexed_shutdown.drop_guard(),
            platform,
            sidecar,
            uncached,
            sidecar_ready_after,
            ctx: Arc::new(ctx),
            arrow_bytes,
            parquet: path,
            _dir: dir,
        })
    }

    /// The processes whose CPU time each path's calls are charged with: the tiers,
    /// PostgreSQL (its postmaster and backends), and this process (the clients, and the
    /// in-process paths' engine).
    fn watched(&self) -> Vec<Watched> {
        let mut watched = vec![Watched::process("bench client", std::process::id())];
        watched.extend(self.pg.pid().map(|pid| Watched::tree("PostgreSQL", pid)));
        watched.extend([
            Watched::process("sidecar", self.sidecar.pid()),
            Watched::process("sidecar, cache off", self.uncached.pid()),
            Watched::process("platform", self.platform.pid()),
        ]);
        watched
    }

    /// Point lookup by key: the sidecar locally, forwarded, the platform, PostgreSQL, the floor.
    pub async fn lookup(&self, effort: Effort) -> anyhow::Result<Scenario> {
        let query = Query::Lookup { rows: self.rows };
        let (sidecar, platform) = (self.sidecar.flight_addr, self.platform.flight_addr);
        let http = Http { url: self.sidecar.url("/v1/sql"), query };
        let http_floor = HttpFloor { url: self.sidecar.url("/health") };
        let paths: [Path; 15] = [
            ("tonic unary round trip (floor)", &Floor { addr: platform }),
            ("HTTP/1.1 keep-alive round trip, GET /health (floor)", &http_floor),
            ("PostgreSQL, prepared, indexed", &Postgres { port: self.pg.port, query }),
            ("sidecar local (HTTP/1.1 keep-alive, /v1/sql)", &http),
            ("sidecar local (Flight SQL, prepared)", &FlightPrepared { addr: sidecar, query }),
            ("sidecar local (Flight SQL)", &Flight { addr: sidecar, query, strong: false }),
            ("sidecar local (plain Flight, SQL ticket)", &FlightTicket { addr: sidecar, query }),
            ("sidecar local, results cache off", &Flight { addr: self.uncached.flight_addr, query, strong: false }),
            ("sidecar forwarded to platform", &Flight { addr: sidecar, query, strong: true }),
            ("platform directly (Flight SQL)", &Flight { addr: platform, query, strong: false }),
            (
                "Strata engine in-process (prepared, no network)",
                &Engine { engine: self.engine.clone(), query, prepared: true },
            ),
            (
                "Strata engine in-process (literal SQL, no network)",
                &Engine { engine: self.engine.clone(), query, prepared: false },
            ),
            (
                "Strata engine in-process, no index (prepared)",
                &Engine { engine: self.unindexed.clone(), query, prepared: true },
            ),
            (
                "Strata engine in-process, no index (literal SQL)",
                &Engine { engine: self.unindexed.clone(), query, prepared: false },
            ),
            ("DataFusion in-process (no network)", &InProcess { ctx: Arc::clone(&self.ctx), query }),
        ];
        let results = measure_side_by_side(&paths, effort, 1, &self.watched()).await?;
        Ok(Scenario {
            name: format!("Point lookup by key, {} rows", self.rows),
            baseline: "PostgreSQL, prepared, indexed".into(),
            results: with_ratios(results, "PostgreSQL, prepared, indexed"),
            figures: Vec::new(),
            table: None,
        })
    }

    /// GROUP BY over the whole table: the sidecar locally vs PostgreSQL vs DataFusion in-process.
    pub async fn aggregate(&self, effort: Effort) -> anyhow::Result<Scenario> {
        let query = Query::Aggregate;
        let groups = 1000.min(self.rows as usize);
        let paths: [Path; 4] = [
            ("PostgreSQL", &Postgres { port: self.pg.port, query }),
            ("sidecar local (Flight SQL)", &Flight { addr: self.sidecar.flight_addr, query, strong: false }),
            ("sidecar local, results cache off", &Flight { addr: self.uncached.flight_addr, query, strong: false }),
            ("DataFusion in-process", &InProcess { ctx: Arc::clone(&self.ctx), query }),
        ];
        let results = measure_side_by_side(&paths, effort, groups, &self.watched()).await?;
        Ok(Scenario {
            name: format!("Aggregate (GROUP BY grp) over {} rows", self.rows),
            baseline: "PostgreSQL".into(),
            results: with_ratios(results, "PostgreSQL"),
            figures: Vec::new(),
            table: None,
        })
    }

    /// A dashboard's queries repeated: the sidecar with its results cache against the same
    /// sidecar without one.
    pub async fn dashboard(&self, effort: Effort) -> anyhow::Result<Scenario> {
        let query = Query::Dashboard;
        let paths: [Path; 4] = [
            ("sidecar, results cache off", &Flight { addr: self.uncached.flight_addr, query, strong: false }),
            ("sidecar, results cache on", &Flight { addr: self.sidecar.flight_addr, query, strong: false }),
            ("sidecar, results cache off (HTTP /v1/sql)", &Http { url: self.uncached.url("/v1/sql"), query }),
            ("sidecar, results cache on (HTTP /v1/sql)", &Http { url: self.sidecar.url("/v1/sql"), query }),
        ];
        let results = measure_side_by_side(&paths, effort, 10, &self.watched()).await?;
        Ok(Scenario {
            name: format!("Dashboard: 4 queries repeated over {} rows", self.rows),
            baseline: "sidecar, results cache off".into(),
            results: with_ratios(results, "sidecar, results cache off"),
            figures: Vec::new(),
            table: None,
        })
    }

    /// Idle RSS, accelerated memory against the Arrow size, sidecar start-to-ready.
    pub async fn footprint(&self) -> anyhow::Result<Scenario> {
        let idle = Tier::start(
            "app-sidecar",
            &format!("region: eu\nupstream:\n  endpoints: [http://{}]\n", self.platform.flight_addr),
        )
        .await;
        idle.wait_ready(Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle_rss = rss_bytes(idle.pid()).0;
        let empty = Tier::start("platform-service", "region: eu\ndatasets: []\n").await;
        empty.wait_ready(Duration::from_secs(60)).await;
        let empty_rss = settled_rss(empty.pid()).await;
        // Steady state: what a copy holds once the load's transient buffers are handed back.
        let loaded_rss = settled_rss(self.platform.pid()).await;
        let sidecar_rss = settled_rss(self.sidecar.pid()).await;
        let held = loaded_rss.saturating_sub(empty_rss);
        let replica_held = sidecar_rss.saturating_sub(idle_rss);
        let mb = |b: u64| b as f64 / 1e6;
        Ok(Scenario {
            name: "Footprint".into(),
            baseline: "Arrow size of the table in-process".into(),
            results: Vec::new(),
            table: None,
            figures: vec![
                Figure::new("idle sidecar RSS (no replicas)", mb(idle_rss), "MB", None),
                Figure::new("platform RSS, no datasets", mb(empty_rss), "MB", None),
                Figure::new(
                    format!("Arrow size of points ({} rows)", self.rows),
                    mb(self.arrow_bytes as u64),
                    "MB",
                    None,
                ),
                Figure::new(
                    "platform memory held for points (RSS over an empty platform)",
                    mb(held),
                    "MB",
                    Some(held as f64 / self.arrow_bytes as f64),
                ),
                Figure::new("sidecar RSS with the points replica", mb(sidecar_rss), "MB", None),
                Figure::new(
                    "sidecar memory held for the replica (RSS over an idle sidecar)",
                    mb(replica_held),
                    "MB",
                    Some(replica_held as f64 / self.arrow_bytes as f64),
                ),
                Figure::new(
                    "sidecar start to ready, one replicated dataset",
                    self.sidecar_ready_after.as_secs_f64() * 1e3,
                    "ms",
                    None,
                ),
            ],
        })
    }
}

/// Anonymous resident memory of a process once it stops falling (within 1% over half a
/// second, or after 10 s): the allocator returns freed pages after its decay time.
pub async fn settled_rss(pid: u32) -> u64 {
    let mut last = rss_bytes(pid).0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_bytes(pid).0;
        if now + now / 100 >= last {
            return now.min(last);
        }
        last = now;
    }
    last
}

/// Resident memory of a process: (anonymous, file-backed) bytes.
pub fn rss_bytes(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| status_bytes(&status, name).unwrap_or(0);
    (field("RssAnon:"), field("RssFile:"))
}

/// A `/proc/<pid>/status` memory field (`VmHWM:`, `RssAnon:`; written in kB) in bytes.
pub fn status_bytes(status: &str, name: &str) -> Option<u64> {
    let kb = status.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    Some(kb * 1024)
}
