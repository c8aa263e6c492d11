//! Platform replicas running one query together (`cluster:`, datafusion-distributed): four
//! real `platform-service` processes on loopback over the same Parquet files (TPC-H), the
//! one a query is sent to coordinating and the others taking tasks. Every answer is
//! compared with in-process DataFusion over the same rows; replicas are killed and frozen
//! mid-query.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use serde_json::Value;
use strata_integration_tests::tier::Tier;
use strata_integration_tests::{free_port, workspace_root};

use crate::tpch::{differs, rows, tables_at};

/// Files per table: a stage over a table gets one task per worker only if there are files
/// (or byte ranges) to share out.
const FILES_PER_TABLE: usize = 4;

struct Cluster {
    replicas: Vec<Tier>,
    /// The replicas' worker URLs, in the same order.
    workers: Vec<String>,
    /// In-process DataFusion over the same rows: the single-node answer.
    local: SessionContext,
    _dir: tempfile::TempDir,
}

/// Writes each TPC-H table as a directory of Parquet files and returns the `datasets:`
/// entries reading them (and `nation_fast`, an accelerated copy of `nation`).
fn write_tables(dir: &std::path::Path, tables: &[(&str, Vec<RecordBatch>)], local: &SessionContext) -> String {
    let mut yaml = String::from("datasets:\n");
    for (name, batches) in tables {
        let table_dir = dir.join(name);
        std::fs::create_dir_all(&table_dir).expect("table dir");
        let all = arrow::compute::concat_batches(&batches[0].schema(), batches).expect("concat");
        let per_file = all.num_rows().div_ceil(FILES_PER_TABLE).max(1);
        for (i, start) in (0..all.num_rows()).step_by(per_file).enumerate() {
            let part = all.slice(start, per_file.min(all.num_rows() - start));
            let file = std::fs::File::create(table_dir.join(format!("part-{i}.parquet"))).expect("create");
            let mut writer =
                datafusion::parquet::arrow::ArrowWriter::try_new(file, part.schema(), None).expect("writer");
            writer.write(&part).expect("write");
            writer.close().expect("close");
        }
        yaml.push_str(&format!("  - name: {name}\n    from: file:{}/\n    format: parquet\n", table_dir.display()));
        let table = MemTable::try_new(batches[0].schema(), vec![batches.clone()]).expect("memtable");
        local.register_table(*name, Arc::new(table)).expect("register");
    }
    // `orders` again, its files declaring in their metadata that they are sorted by key
    // (as files written by a sorting job do).
    let sorted_dir = dir.join("orders_sorted");
    std::fs::create_dir_all(&sorted_dir).expect("dir");
    let orders = &tables.iter().find(|(n, _)| *n == "orders").expect("orders").1;
    let all = arrow::compute::concat_batches(&orders[0].schema(), orders).expect("concat");
    let per_file = all.num_rows().div_ceil(FILES_PER_TABLE);
    for (i, start) in (0..all.num_rows()).step_by(per_file).enumerate() {
        let part = all.slice(start, per_file.min(all.num_rows() - start));
        let props = datafusion::parquet::file::properties::WriterProperties::builder()
            .set_sorting_columns(Some(vec![datafusion::parquet::file::metadata::SortingColumn {
                column_idx: 0,
                descending: false,
                nulls_first: false,
            }]))
            .build();
        let file = std::fs::File::create(sorted_dir.join(format!("part-{i}.parquet"))).expect("create");
        let mut writer =
            datafusion::parquet::arrow::ArrowWriter::try_new(file, part.schema(), Some(props)).expect("writer");
        writer.write(&part).expect("write");
        writer.close().expect("close");
    }
    yaml.push_str(&format!("  - name: orders_sorted\n    from: file:{}/\n    format: parquet\n", sorted_dir.display()));
    yaml.push_str(&format!(
        "  - name: nation_fast\n    from: file:{}/\n    format: parquet\n    acceleration: {{}}\n",
        dir.join("nation").display()
    ));
    yaml
}

/// Starts `n` replicas that all list each other; `cluster` is more of each one's
/// `cluster:` section (indented two spaces).
async fn start_cluster(n: usize, cluster: &str, query_timeout: &str) -> Cluster {
    let cluster = cluster.to_string();
    start_cluster_with(Setup { extra: Box::new(move |_| cluster.clone()), ..Setup::new(n, query_timeout) }).await
}

/// How [`start_cluster_with`] starts a cluster.
struct Setup<'a> {
    n: usize,
    /// Each replica's own end of the config: its `cluster:` lines, then any top-level sections.
    extra: Box<dyn Fn(usize) -> String + 'a>,
    query_timeout: &'a str,
    /// Sent with the tests' requests.
    key: Option<&'a str>,
    /// Workers the first replica must find before the cluster counts as up.
    workers_expected: usize,
    scale: f64,
    /// `https` workers, and the CA the tests' HTTP client trusts.
    tls_ca: Option<&'a std::path::Path>,
}

impl<'a> Setup<'a> {
    fn new(n: usize, query_timeout: &'a str) -> Self {
        Self {
            n,
            extra: Box::new(|_| CLUSTER.to_string()),
            query_timeout,
            key: None,
            workers_expected: n,
            scale: 0.01,
            tls_ca: None,
        }
    }
}

async fn start_cluster_with(setup: Setup<'_>) -> Cluster {
    let dir = tempfile::tempdir().expect("dir");
    let local = SessionContext::new();
    let tables = tables_at(setup.scale);
    let datasets = write_tables(dir.path(), &tables, &local);
    local
        .register_table("nation_fast", local.table_provider("nation").await.expect("nation"))
        .expect("register nation_fast");
    local
        .register_table("orders_sorted", local.table_provider("orders").await.expect("orders"))
        .expect("register orders_sorted");
    let ports: Vec<u16> = (0..setup.n).map(|_| free_port()).collect();
    let scheme = if setup.tls_ca.is_some() { "https" } else { "http" };
    let workers: Vec<String> = ports.iter().map(|p| format!("{scheme}://127.0.0.1:{p}")).collect();
    // The first replica (the one queries are sent to) starts last, so its check at start
    // finds all the others.
    let mut replicas = Vec::new();
    for (i, port) in ports.iter().enumerate().rev() {
        let yaml = format!(
            "region: eu\nlimits:\n  query_timeout: {}\n{datasets}cluster:\n  listen: 127.0.0.1:{port}\n  workers: [{}]\n{}",
            setup.query_timeout,
            workers.join(", "),
            (setup.extra)(i)
        );
        let builder = Tier::builder("platform-service").config(&yaml);
        let replica = match setup.tls_ca {
            Some(ca) => builder.tls(ca).start().await,
            None => builder.start().await,
        };
        replica.wait_ready(Duration::from_secs(60)).await;
        let replica = match setup.key {
            Some(key) => replica.with_key(key),
            None => replica,
        };
        replicas.insert(0, replica);
    }
    let workers_expected = setup.workers_expected;
    let first = &replicas[0];
    first
        .wait_for(Duration::from_secs(30), "the first replica to find the others", || async {
            let (_, body, headers) =
                first.sql_with("SELECT sum(l_quantity) AS q FROM lineitem", &[("strata-distribute", "on")]).await;
            let detail = header(&headers, "strata-route-detail");
            (detail.contains(&format!("over {workers_expected} workers")) && body.is_array()).then_some(())
        })
        .await;
    Cluster { replicas, local, workers, _dir: dir }
}

const CLUSTER: &str =
    "  refresh: 1s\n  distribute_above: 1MiB\n  bytes_per_task: 256KiB\n  connect_timeout: 1s\n  keepalive: 1s\n";

fn header(headers: &reqwest::header::HeaderMap, name: &str) -> String {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// Rows of a JSON answer as sorted strings, for order-free comparison.
fn sorted(rows: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = rows.iter().map(Value::to_string).collect();
    out.sort();
    out
}

#[tokio::test]
async fn tpch_over_parquet_runs_distributed_and_equals_the_single_node_answers() {
    // Scale factor 0.1: 600,000 rows of lineitem in 4 files (about 40 MiB of Parquet).
    let cluster = start_cluster_with(Setup {
        extra: Box::new(|_| CLUSTER.replace("1MiB", "4MiB")),
        scale: 0.1,
        ..Setup::new(4, "120s")
    })
    .await;
    let coordinator = &cluster.replicas[0];
    let mut failures = Vec::new();
    let mut distributed = Vec::new();
    for n in 1..=22 {
        let sql = std::fs::read_to_string(workspace_root().join(format!("integration-tests/tpch/q{n:02}.sql")))
            .expect("query");
        let expected = rows(&cluster.local.sql(&sql).await.expect("plan").collect().await.expect("run"));
        if let Some(difference) = differs(coordinator, n, &sql, &expected).await {
            failures.push(difference);
        }
        let (status, _, headers) = coordinator.sql_with(&sql, &[]).await;
        if status == 200 && header(&headers, "strata-route") == "distributed" {
            distributed.push(n);
        }
    }
    assert!(failures.is_empty(), "distributed TPC-H differs:\n{}\nlog:\n{}", failures.join("\n"), coordinator.logs());
    // Every query reading lineitem or orders scans more than `distribute_above`.
    assert!(distributed.len() >= 15, "only {distributed:?} ran distributed");
}

#[tokio::test]
async fn queries_of_every_kind_equal_their_answer_on_one_replica() {
    let cluster = start_cluster(4, CLUSTER, "120s").await;
    let coordinator = &cluster.replicas[0];
    let queries = [
        // Aggregation with a shuffle.
        "SELECT l_returnflag, l_linestatus, count(*) AS n, sum(l_quantity) AS qty FROM lineitem GROUP BY 1, 2 ORDER BY 1, 2",
        // A join with an accelerated dimension: its stage stays on the coordinator.
        "SELECT n.n_name, count(*) AS n FROM lineitem l JOIN supplier s ON l.l_suppkey = s.s_suppkey JOIN nation_fast n ON s.s_nationkey = n.n_nationkey GROUP BY n.n_name ORDER BY n DESC, n.n_name",
        // COUNT DISTINCT with top-k.
        "SELECT l_suppkey, count(DISTINCT l_partkey) AS parts FROM lineitem GROUP BY l_suppkey ORDER BY parts DESC, l_suppkey LIMIT 10",
        // Files whose metadata says they are sorted (an ordering the planner may rely on).
        "SELECT o_orderstatus, count(*) AS n, max(o_orderkey) AS last FROM orders_sorted GROUP BY 1 ORDER BY 1",
        "SELECT o_orderkey, o_totalprice FROM orders_sorted WHERE o_custkey < 20 ORDER BY o_orderkey LIMIT 15",
        // A window.
        "SELECT o_custkey, o_orderkey, rank() OVER (PARTITION BY o_custkey ORDER BY o_totalprice DESC, o_orderkey) AS r FROM orders WHERE o_custkey < 40 ORDER BY o_custkey, r",
    ];
    for sql in queries {
        let (status, body, headers) = coordinator.sql_with(sql, &[]).await;
        assert_eq!(status, 200, "{sql}: {body}\n{}", coordinator.logs());
        assert_eq!(
            header(&headers, "strata-route"),
            "distributed",
            "{sql}: {}",
            header(&headers, "strata-route-detail")
        );
        let (_, alone, alone_headers) = coordinator.sql_with(sql, &[("strata-distribute", "off")]).await;
        assert_eq!(header(&alone_headers, "strata-route"), "local", "{sql}");
        let expected = rows(&cluster.local.sql(sql).await.expect("plan").collect().await.expect("run"));
        let got = body.as_array().expect("rows");
        assert_eq!(got.len(), expected.len(), "{sql}");
        // Ordered queries: the same rows in the same order as the replica alone.
        assert_eq!(body, alone, "{sql}: distributed and single-replica answers differ");
        assert_eq!(sorted(got), sorted(alone.as_array().expect("rows")), "{sql}");
    }

    // A small query with distribution enabled stays where it was sent.
    let (_, _, headers) = coordinator.sql_with("SELECT count(*) FROM nation", &[]).await;
    assert_eq!(header(&headers, "strata-route"), "local");

    // EXPLAIN shows the stages of a distributed query.
    let (status, body, _) =
        coordinator.sql_with("EXPLAIN SELECT l_returnflag, count(*) FROM lineitem GROUP BY 1", &[]).await;
    assert_eq!(status, 200, "{body}");
    let plan = body.to_string();
    assert!(plan.contains("DistributedExec") && plan.contains("Stage 1"), "no stages in {plan}");

    // EXPLAIN ANALYZE runs it and says which worker ran each task.
    let (status, body, _) = coordinator
        .sql_with("EXPLAIN ANALYZE SELECT l_returnflag, sum(l_quantity) FROM lineitem GROUP BY 1", &[])
        .await;
    assert_eq!(status, 200, "{body}");
    let rows = body.as_array().expect("rows");
    let placement = rows.iter().find(|r| r["plan_type"] == "task_placement").expect("task placement").to_string();
    let workers: std::collections::BTreeSet<&str> =
        placement.split(['\\', ' ', '"']).filter(|w| w.starts_with("http://127.0.0.1:")).collect();
    assert!(workers.len() >= 3, "tasks ran on {workers:?}: {placement}");
    // ...and each stage's metrics, every task's among them, gathered from the workers: the
    // bytes the network boundaries moved and the operators' time per task.
    let plan = rows
        .iter()
        .find(|r| r["plan_type"] == "distributed_plan_with_metrics")
        .and_then(|r| r["plan"].as_str())
        .expect("plan with metrics");
    assert!(plan.contains("bytes_transferred={0:"), "no bytes moved shown: {plan}");
    let stage_one = plan.lines().skip_while(|l| !l.contains("Stage 1")).collect::<Vec<_>>().join("\n");
    assert!(stage_one.contains("elapsed_compute={0:") && stage_one.contains(", 2:"), "no per-task metrics: {plan}");
}

#[tokio::test]
async fn a_replica_killed_or_frozen_mid_query_fails_the_query_cleanly_or_is_retried() {
    // Members are re-checked rarely here, so a dead replica is still listed when the query
    // is planned: the query itself has to cope.
    let cluster_yaml = CLUSTER.replace("refresh: 1s", "refresh: 60s");
    let cluster = start_cluster(4, &cluster_yaml, "8s").await;
    let sql = "SELECT l_returnflag, count(*) AS n, sum(l_extendedprice) AS total FROM lineitem GROUP BY 1 ORDER BY 1";
    let expected = rows(&cluster.local.sql(sql).await.expect("plan").collect().await.expect("run"));

    // Killed while the query waits on it (frozen first, so the query is surely in flight):
    // an answer from the others after one retry, or a clear error, at once.
    let coordinator = &cluster.replicas[0];
    cluster.replicas[3].signal("STOP");
    let query = coordinator.sql_with(sql, &[]);
    let victim = cluster.replicas[3].pid();
    let kill = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = std::process::Command::new("kill").arg("-KILL").arg(victim.to_string()).status();
    };
    let started = Instant::now();
    let ((status, body, headers), ()) = tokio::join!(query, kill);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "a killed worker held the query {took:?}");
    check_outcome("killed", status, &body, &headers, expected.len());

    // Frozen: SIGSTOP keeps its sockets open and answers nothing (no reset, no FIN). The
    // keepalive notices; the query ends within its deadline (8s) either way.
    cluster.replicas[2].signal("STOP");
    let started = Instant::now();
    let (status, body, headers) = cluster.replicas[0].sql_with(sql, &[]).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "a frozen worker held the query {took:?}");
    check_outcome("frozen", status, &body, &headers, expected.len());

    // The two losses show in the coordinator's metrics: fewer workers, and the retries.
    let metrics = reqwest::get(coordinator.url("/metrics")).await.expect("metrics").text().await.expect("body");
    assert!(metrics.contains("strata_cluster_workers 2"), "{metrics}");
    let retries: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("strata_distributed_retries_total "))
        .and_then(|v| v.parse().ok())
        .expect("retries counted");
    assert!(retries >= 1, "{metrics}");

    // Afterwards the cluster answers correctly without it.
    let (status, body, headers) = cluster.replicas[0].sql_with(sql, &[]).await;
    assert_eq!(status, 200, "{body}\n{}", cluster.replicas[0].logs());
    assert_eq!(header(&headers, "strata-route"), "distributed");
    let got: Vec<Vec<String>> = body
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| ["l_returnflag", "n"].iter().map(|k| r[k].to_string().trim_matches('"').to_string()).collect())
        .collect();
    let want: Vec<Vec<String>> = expected.iter().map(|r| r[..2].to_vec()).collect();
    assert_eq!(got, want);
}

/// A query that lost a worker either answered in full after its one retry, or failed with
/// an error that names the worker or the deadline.
fn check_outcome(what: &str, status: u16, body: &Value, headers: &reqwest::header::HeaderMap, rows: usize) {
    if status == 200 {
        assert_eq!(body.as_array().map(Vec::len), Some(rows), "{what}: {body}");
        assert!(header(headers, "strata-route-detail").contains("retried"), "{what}: {headers:?}");
    } else {
        let text = body.to_string();
        assert!(text.contains("worker") || text.contains("timed out"), "{what}: {status}: {text}");
    }
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

/// CPU time each process of `pids` has used since `since`.
fn cpu_since(pids: &[u32], since: &[Duration]) -> Vec<Duration> {
    pids.iter().zip(since).map(|(pid, at)| cpu_time(*pid) - *at).collect()
}

/// Waits until none of `pids` uses more than 50 ms of CPU in half a second.
async fn until_quiet(pids: &[u32], within: Duration) {
    let until = Instant::now() + within;
    loop {
        let before: Vec<Duration> = pids.iter().map(|p| cpu_time(*p)).collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        if cpu_since(pids, &before).iter().all(|used| *used < Duration::from_millis(50)) {
            return;
        }
        assert!(Instant::now() < until, "still busy after {within:?}");
    }
}

/// Sixteen copies of lineitem joined with it on a hundred suppliers: near 600 million joined
/// rows, each multiplied and summed: about 13 s on three replicas sharing two cores. One
/// probe batch fans out to millions of rows, which the join emits without reading its input
/// again: without `CooperativeJoins` (strata-core) the replicas worked on for 1.5 to 2.5 s
/// after the deadline's answer, in a debug build.
fn heavy_query() -> String {
    let copies = ["SELECT l_suppkey, l_extendedprice, l_tax FROM lineitem"; 16].join(" UNION ALL ");
    format!(
        "SELECT sum(a.l_extendedprice * b.l_discount + a.l_tax * b.l_quantity) FROM ({copies}) a JOIN lineitem b ON a.l_suppkey = b.l_suppkey"
    )
}

#[tokio::test]
async fn a_query_past_its_deadline_stops_its_tasks_on_every_worker() {
    let sql = heavy_query();
    // What the whole query costs the replicas, run to its end.
    let whole = {
        let cluster = start_cluster(3, CLUSTER, "300s").await;
        let pids: Vec<u32> = cluster.replicas.iter().map(Tier::pid).collect();
        let at_start: Vec<Duration> = pids.iter().map(|p| cpu_time(*p)).collect();
        let _ = cluster.replicas[0].sql_with(&sql, &[]).await;
        until_quiet(&pids, Duration::from_secs(60)).await;
        cpu_since(&pids, &at_start).iter().sum::<Duration>()
    };

    let cluster = start_cluster(3, CLUSTER, "3s").await;
    let pids: Vec<u32> = cluster.replicas.iter().map(Tier::pid).collect();
    // The other replicas must do work on it, else the rest proves nothing. On a machine
    // busy with other tests a replica may get too little CPU within the 3 s deadline: the
    // query is then asked again (up to three times), once the replicas are quiet.
    let mut attempts = 0;
    let before_answer = loop {
        attempts += 1;
        let at_start: Vec<Duration> = pids.iter().map(|p| cpu_time(*p)).collect();
        let started = Instant::now();
        let (status, body, _) = cluster.replicas[0].sql_with(&sql, &[]).await;
        assert!(status >= 400 && body.to_string().contains("time"), "{status}: {body}");
        assert!(started.elapsed() < Duration::from_secs(6), "the deadline held the answer {:?}", started.elapsed());
        let used = cpu_since(&pids, &at_start);
        let idle = used.iter().enumerate().skip(1).find(|(_, used)| **used <= Duration::from_millis(300));
        match idle {
            None => break used,
            Some((i, used)) if attempts == 3 => panic!("replica {i} used only {used:?} on the query"),
            Some(_) => until_quiet(&pids, Duration::from_secs(20)).await,
        }
    };
    // After the deadline the replicas stop: they go quiet, having spent well under what
    // running their tasks to the end would have cost. CPU time, not wall time, so that a
    // loaded machine cannot make a stopped task look running or a running one look stopped.
    let at_answer: Vec<Duration> = pids.iter().map(|p| cpu_time(*p)).collect();
    let answered = Instant::now();
    // Within a second of the answer the replicas' tasks have stopped: a quarter of a second
    // passes with next to no CPU used by all of them together. (A replica starved of CPU by
    // a busy machine could look stopped early, never one that stopped look running.)
    let mut timeline = Vec::new();
    let quiet_after = loop {
        let window_start = answered.elapsed();
        let before: Vec<Duration> = pids.iter().map(|p| cpu_time(*p)).collect();
        tokio::time::sleep(Duration::from_millis(250)).await;
        let each = cpu_since(&pids, &before);
        let used: Duration = each.iter().sum();
        timeline.push((window_start, each));
        if used <= Duration::from_millis(30) || window_start > Duration::from_secs(10) {
            break window_start;
        }
    };
    eprintln!("CPU per 250 ms after the deadline's answer: {timeline:?}");
    assert!(
        quiet_after <= Duration::from_millis(1_000),
        "the replicas still worked {quiet_after:?} after the answer (CPU per window and replica: {timeline:?})"
    );
    until_quiet(&pids, Duration::from_secs(20)).await;
    let after: Duration = cpu_since(&pids, &at_answer).iter().sum();
    let remaining = whole.saturating_sub(before_answer.iter().sum());
    eprintln!("CPU after the deadline: {after:?}, of {remaining:?} the rest of the query costs (whole {whole:?})");
    assert!(
        after.as_secs_f64() < 0.5 * remaining.as_secs_f64(),
        "after the deadline the replicas spent {after:?} of CPU, of the {remaining:?} the rest of the query costs (whole: {whole:?})"
    );
}

/// `GetWorkerInfo` on a worker port, sending `key` (if any) as the coordinator would.
async fn worker_version(url: &str, key: Option<&str>) -> Result<String, String> {
    use datafusion_distributed::grpc::{BoxCloneSyncChannel, create_worker_client};
    let channel = tonic::transport::Channel::from_shared(url.to_string()).expect("url").connect_lazy();
    let header = key.map(|k| tonic::codegen::http::HeaderValue::from_str(&format!("Bearer {k}")).expect("ascii"));
    let channel = tower::ServiceBuilder::new()
        .map_request(move |mut request: tonic::codegen::http::Request<tonic::body::Body>| {
            if let Some(value) = &header {
                request.headers_mut().insert("authorization", value.clone());
            }
            request
        })
        .service(channel);
    let mut client = create_worker_client(BoxCloneSyncChannel::new(channel));
    client
        .get_worker_info(datafusion_distributed::GetWorkerInfoRequest {})
        .await
        .map(|i| i.version)
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn with_auth_only_the_replicas_key_opens_the_worker_port_and_other_builds_are_left_out() {
    let (cluster_key, cluster_hash) = strata_core::auth::generate_key().expect("randomness");
    let (app_key, app_hash) = strata_core::auth::generate_key().expect("randomness");
    let auth = format!(
        "  tenant: replicas\n  credential: {cluster_key}\nauth:\n  keys:\n    - {{id: replicas, tenant: replicas, hash: \"{cluster_hash}\"}}\n    - {{id: app, tenant: apps, hash: \"{app_hash}\"}}\ntenants:\n  replicas: {{datasets: []}}\n  apps: {{datasets: [\"*\"]}}\n"
    );
    // The last replica runs another build: it must take no task.
    let extra = move |i: usize| format!("{CLUSTER}{}{auth}", if i == 3 { "  version: an-older-build\n" } else { "" });
    let cluster = start_cluster_with(Setup {
        extra: Box::new(extra),
        key: Some(&app_key),
        workers_expected: 3,
        ..Setup::new(4, "60s")
    })
    .await;
    let coordinator = &cluster.replicas[0];
    assert!(coordinator.logs().contains("leaving out a replica of another version"), "{}", coordinator.logs());

    // An application's key queries, and the query is distributed with the replicas' key.
    let sql = "SELECT l_returnflag, sum(l_quantity) AS q FROM lineitem GROUP BY 1 ORDER BY 1";
    let (status, body, headers) = coordinator.sql_with(sql, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "strata-route"), "distributed");
    assert!(header(&headers, "strata-route-detail").contains("over 3 workers"), "{headers:?}");

    // The worker port: only the replicas' key.
    let worker = &cluster.workers[1];
    let version = worker_version(worker, Some(&cluster_key)).await.expect("the replicas' key is let in");
    assert!(version.starts_with("strata-"), "{version}");
    for key in [None, Some(app_key.as_str()), Some("strata_not_a_key")] {
        let refused = worker_version(worker, key).await.expect_err("refused");
        assert!(refused.contains("credentials") || refused.contains("authentication"), "{key:?}: {refused}");
    }
    // And the replicas' key reads nothing on the public ports.
    let as_replica = reqwest::Client::new()
        .post(cluster.replicas[1].url("/v1/sql"))
        .bearer_auth(&cluster_key)
        .body("SELECT count(*) FROM nation")
        .send()
        .await
        .expect("POST /v1/sql");
    let status = as_replica.status().as_u16();
    let body = as_replica.text().await.expect("body");
    assert!(status >= 400 && body.contains("not found"), "the replicas' key read a dataset: {status} {body}");
    let (status, body, _) = cluster.replicas[1].sql_with("SELECT count(*) FROM nation", &[]).await;
    assert_eq!(status, 200, "the app key reads: {body}");
}

/// A worker resolver of fixed URLs, as an attacker's own coordinator would use.
struct FixedWorkers(Vec<url::Url>);

impl datafusion_distributed::WorkerResolver for FixedWorkers {
    fn get_urls(&self) -> Result<Vec<url::Url>, datafusion::error::DataFusionError> {
        Ok(self.0.clone())
    }
}

#[tokio::test]
async fn a_plan_fragment_reading_a_file_of_no_dataset_is_refused_by_the_worker() {
    use datafusion::execution::SessionStateBuilder;
    use datafusion_distributed::{DistributedExt, SessionStateBuilderExt};
    let cluster = start_cluster(2, CLUSTER, "60s").await;
    // A file the platform does not serve, on the same machine as the worker.
    let secrets = tempfile::tempdir().expect("dir");
    for part in 0..4 {
        let rows: String = (0..200).map(|i| format!("{i},secret-{part}-{i}\n")).collect();
        std::fs::write(secrets.path().join(format!("part-{part}.csv")), format!("id,secret\n{rows}")).expect("write");
    }
    // An attacker who reaches the worker port (no `auth:` here) plans a query of its own over
    // that file and sends the scan to the worker.
    let worker = url::Url::parse(&cluster.workers[1]).expect("url");
    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_distributed_worker_resolver(FixedWorkers(vec![worker.clone(), worker.clone(), worker]))
        .with_distributed_file_scan_config_bytes_per_partition(1)
        .expect("config")
        .with_distributed_planner()
        .build();
    let ctx = SessionContext::from(state);
    let location = format!("{}/", secrets.path().display());
    ctx.register_csv("secrets", &location, datafusion::prelude::CsvReadOptions::new()).await.expect("register");
    let plan = ctx.sql("SELECT secret, count(*) FROM secrets GROUP BY secret").await.expect("plan");
    let physical = plan.clone().create_physical_plan().await.expect("physical plan");
    let shown = datafusion_distributed::display_plan_ascii(physical.as_ref(), false);
    assert!(shown.contains("Stage"), "the attack must send a stage to the worker: {shown}");
    let refused = plan.collect().await.expect_err("the worker refused the fragment").to_string();
    assert!(refused.contains("not a file of any configured dataset"), "{refused}");
}

/// `strata_query_routes_total` of `route` on `tier`, over every reason.
async fn routed_total(tier: &Tier, route: &str) -> u64 {
    let text = reqwest::get(tier.url("/metrics")).await.expect("GET /metrics").text().await.expect("body");
    text.lines()
        .filter(|l| l.starts_with("strata_query_routes_total{") && l.contains(&format!("route=\"{route}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_query_a_sidecar_forwards_is_distributed_by_the_platform_and_the_hint_travels_with_it() {
    let cluster = start_cluster(3, CLUSTER, "60s").await;
    let platform = &cluster.replicas[0];
    let sidecar = Tier::sidecar_of(platform, &["nation_fast"], "60s").await;
    let sql = "SELECT l_returnflag, sum(l_quantity) AS q FROM lineitem GROUP BY 1 ORDER BY 1";
    let expected = rows(&cluster.local.sql(sql).await.expect("plan").collect().await.expect("run"));

    let before = routed_total(platform, "distributed").await;
    let (status, body, headers) = sidecar.sql_with(sql, &[]).await;
    assert_eq!(status, 200, "{body}\n{}", sidecar.logs());
    assert_eq!(header(&headers, "strata-route"), "forwarded");
    assert_eq!(body.as_array().map(Vec::len), Some(expected.len()), "{body}");
    assert_eq!(routed_total(platform, "distributed").await, before + 1, "the platform distributed the forward");

    // `strata-distribute: off` sent to the sidecar reaches the platform.
    let (status, body, _) = sidecar.sql_with(sql, &[("strata-distribute", "off")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(routed_total(platform, "distributed").await, before + 1, "the hint was lost on the way");
}

#[tokio::test]
async fn replicas_talk_over_mutual_tls_and_know_each_other_by_certificate() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = strata_integration_tests::certs::TestCa::new(dir.path(), "cluster");
    let server = ca.server("platform");
    let replica = ca.issue("replica", "replica", &["localhost"]);
    let intruder = ca.issue("intruder", "intruder", &["localhost"]);
    let (app_key, app_hash) = strata_core::auth::generate_key().expect("randomness");
    let extra = format!(
        "{CLUSTER}  tenant: replicas\n  tls:\n    ca_file: {}\n    cert_file: {}\n    key_file: {}\nserver:\n{}auth:\n  certificates: [{{subject: replica, tenant: replicas}}, {{subject: intruder, tenant: apps}}]\n  keys: [{{id: app, tenant: apps, hash: \"{app_hash}\"}}]\ntenants:\n  replicas: {{datasets: []}}\n  apps: {{datasets: [\"*\"]}}\n",
        ca.ca_file.display(),
        replica.cert_file.display(),
        replica.key_file.display(),
        server.server_yaml(Some(&ca.ca_file), true),
    );
    let cluster = start_cluster_with(Setup {
        extra: Box::new(move |_| extra.clone()),
        key: Some(&app_key),
        tls_ca: Some(&ca.ca_file),
        ..Setup::new(3, "60s")
    })
    .await;
    let sql = "SELECT l_returnflag, sum(l_quantity) AS q FROM lineitem GROUP BY 1 ORDER BY 1";
    let (status, body, headers) = cluster.replicas[0].sql_with(sql, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(header(&headers, "strata-route-detail").contains("over 3 workers"), "{headers:?}");

    let worker = &cluster.workers[1];
    // The replicas' certificate opens the worker port; another certificate of the same CA
    // (a tenant that may query) does not, nor does plaintext.
    let info = |client: Option<&strata_integration_tests::certs::CertFiles>| {
        let (worker, ca) = (worker.clone(), ca.ca_file.clone());
        let client = client.cloned();
        async move {
            let channel = strata_integration_tests::tls_channel(&worker, &ca, client.as_ref()).await;
            let mut client = datafusion_distributed::grpc::create_worker_client(
                datafusion_distributed::grpc::BoxCloneSyncChannel::new(channel),
            );
            client
                .get_worker_info(datafusion_distributed::GetWorkerInfoRequest {})
                .await
                .map(|i| i.version)
                .map_err(|e| e.to_string())
        }
    };
    assert!(info(Some(&replica)).await.is_ok_and(|v| v.starts_with("strata-")));
    let refused = info(Some(&intruder)).await.expect_err("another tenant's certificate");
    assert!(refused.contains("credentials"), "{refused}");
    let plaintext = worker_version(&worker.replace("https://", "http://"), None).await;
    assert!(plaintext.is_err(), "the worker port answered plaintext: {plaintext:?}");
}
