//! Large queries over shared files run on every replica of the platform at once, with
//! datafusion-distributed: the replica that received the query plans it as usual, and when
//! the files it scans are large (or the caller asked) plans it again with the distributed
//! planner, which cuts it into stages whose tasks run on the replicas' worker services and
//! stream to each other. Accelerated and PostgreSQL tables cannot travel (their scans have
//! no codec, on purpose: their rows live here), so the planner keeps their stages on this
//! replica as single tasks, and their rows are broadcast or shuffled to the file stages.
//!
//! What the library leaves to us, and this module adds: the decision per query, the worker
//! list from the tier's membership (see [`ClusterMembers`]), one retry of the whole query
//! after the list is checked again when a worker fails before the first row, and the
//! worker side's own session: this engine's functions and memory pool, and a check that
//! every file a plan fragment reads belongs to a configured dataset.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, SessionState, SessionStateBuilder, TaskContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_distributed::{
    ChannelResolver, DistributedExt, NetworkBoundaryExt, SessionStateBuilderExt, Worker, WorkerChannel,
    WorkerPlanRewriteEvent, WorkerPlanRewriteEventResponse, WorkerQueryContext, WorkerResolver,
};
use futures::StreamExt;
use tracing::warn;
use url::Url;

use super::Engine;
use crate::config::ClusterConfig;
use crate::error::{Result, StrataError};

/// The replicas a query may be distributed over, as the tier finds them (a static list or
/// DNS, filtered by version). Implemented by the tier crate; the engine never resolves.
#[async_trait]
pub trait ClusterMembers: Send + Sync + 'static {
    /// The worker URLs of the replicas that may take a task now, without I/O (the planner
    /// asks while it plans).
    fn workers(&self) -> Vec<Url>;
    /// Asks every known replica again now, dropping those that do not answer: after one
    /// failed a query, before the query is retried.
    async fn recheck(&self);
}

/// What the tier gives [`Engine::enable_distribution`].
pub struct Membership {
    pub members: Arc<dyn ClusterMembers>,
    /// Connections to the workers (timeouts, keepalive, the replicas' credential).
    pub channels: Arc<dyn ChannelResolver + Send + Sync>,
    /// This replica's own worker URL, as the others reach it.
    pub self_url: Url,
}

/// How a query was distributed, for its route.
#[derive(Debug, Clone)]
pub(super) struct Distributed {
    pub workers: usize,
    pub stages: usize,
    pub file_bytes: u64,
    pub retried: bool,
}

impl std::fmt::Display for Distributed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "distributed over {} workers in {} stages ({} MiB of files){}",
            self.workers,
            self.stages,
            self.file_bytes >> 20,
            if self.retried { "; retried once after a worker failed" } else { "" }
        )
    }
}

/// A distribution-enabled engine's cluster side.
pub(super) struct Distribution {
    members: Arc<dyn ClusterMembers>,
    /// Queries retried after a worker failed before their first row.
    retries: std::sync::atomic::AtomicU64,
    channels: Channels,
    worker: Worker,
    self_url: Url,
    distribute_above: u64,
    bytes_per_task: usize,
}

struct Members(Arc<dyn ClusterMembers>);

impl WorkerResolver for Members {
    fn get_urls(&self) -> std::result::Result<Vec<Url>, DataFusionError> {
        Ok(self.0.workers())
    }
}

#[derive(Clone)]
struct Channels(Arc<dyn ChannelResolver + Send + Sync>);

#[async_trait]
impl ChannelResolver for Channels {
    async fn get_worker_client_for_url(
        &self,
        url: &Url,
    ) -> std::result::Result<Box<dyn WorkerChannel>, DataFusionError> {
        self.0.get_worker_client_for_url(url).await
    }
}

impl Engine {
    /// Makes this engine a replica of a cluster: queries it receives may be distributed over
    /// `membership`'s workers, and the returned worker (to be served on `cluster.listen`)
    /// runs the tasks other replicas send here.
    pub fn enable_distribution(&self, membership: Membership, config: &ClusterConfig) -> Worker {
        let channels = Channels(membership.channels);
        let worker = self.worker(channels.clone(), config);
        let distribution = Distribution {
            members: membership.members,
            retries: std::sync::atomic::AtomicU64::new(0),
            channels,
            worker: worker.clone(),
            self_url: membership.self_url,
            distribute_above: config.distribute_above.0,
            bytes_per_task: config.bytes_per_task.as_usize(),
        };
        *self.inner.distribution.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(distribution));
        worker
    }

    /// With `cluster:`, the replicas that take tasks now (this one included) and the
    /// queries retried after a worker failed: what `/metrics` reports.
    pub fn cluster_status(&self) -> Option<(usize, u64)> {
        let distribution = self.distribution()?;
        Some((distribution.members.workers().len(), distribution.retries.load(std::sync::atomic::Ordering::Relaxed)))
    }

    pub(super) fn distribution(&self) -> Option<Arc<Distribution>> {
        self.inner.distribution.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The worker side: tasks run in a session with this engine's functions (the bounded
    /// replacements included) and its memory pool, so a replica's tasks and its own queries
    /// share one `limits.memory_limit`; a fragment reading a file outside every configured
    /// dataset is refused before it runs.
    fn worker(&self, channels: Channels, config: &ClusterConfig) -> Worker {
        let planning = self.inner.planning.clone();
        let allowed = Arc::new(AllowedFiles::of(self));
        let build = move |ctx: WorkerQueryContext| {
            let (planning, allowed, channels) = (planning.clone(), Arc::clone(&allowed), channels.clone());
            async move {
                let state = ctx
                    .builder
                    .with_scalar_functions(planning.scalar_functions().values().cloned().collect())
                    .with_aggregate_functions(planning.aggregate_functions().values().cloned().collect())
                    .with_window_functions(planning.window_functions().values().cloned().collect())
                    .with_distributed_channel_resolver(channels)
                    .with_distributed_worker_plan_rewrite_handler(move |event: WorkerPlanRewriteEvent<'_>| {
                        allowed.check(&event.plan)?;
                        Ok(WorkerPlanRewriteEventResponse::new(event.plan))
                    })
                    .build();
                Ok(state)
            }
        };
        Worker::from_session_builder(build)
            .with_runtime_env(self.inner.task_ctx.runtime_env())
            .with_max_message_size(config.max_message_size.as_usize() / 2)
            .with_version(config.version())
    }

    /// Plans and starts `plan` distributed when `local` (its plan for this replica alone)
    /// scans enough bytes of files, or the caller asked (`hint`); `None` leaves it to run here.
    pub(super) async fn run_distributed(
        &self,
        plan: &LogicalPlan,
        local: &Arc<dyn ExecutionPlan>,
        state: &SessionState,
        task_ctx: &Arc<TaskContext>,
        hint: Option<bool>,
    ) -> Result<Option<(SendableRecordBatchStream, Distributed)>> {
        let Some(distribution) = self.distribution() else { return Ok(None) };
        let file_bytes = match plan {
            // EXPLAIN's own physical plan holds only text: size what it explains.
            LogicalPlan::Explain(explain) => {
                file_bytes(&state.query_planner().create_physical_plan(&explain.plan, state).await?)
            }
            LogicalPlan::Analyze(analyze) => {
                file_bytes(&state.query_planner().create_physical_plan(&analyze.input, state).await?)
            }
            _ => file_bytes(local),
        };
        let wanted = hint.unwrap_or(file_bytes > 0 && file_bytes >= distribution.distribute_above);
        if !wanted || file_bytes == 0 {
            return Ok(None);
        }
        let (stream, placement, retried) = match distribution.start(plan, state, task_ctx).await {
            Ok(Some((stream, placement))) => (stream, placement, false),
            Ok(None) => return Ok(None),
            Err(err) if is_transport_failure(&err) => {
                warn!(error = %err, "a worker failed before the first row; checking the workers again and retrying once");
                distribution.retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                distribution.members.recheck().await;
                match distribution.start(plan, state, task_ctx).await? {
                    Some((stream, placement)) => (stream, placement, true),
                    None => return Ok(None),
                }
            }
            Err(err) => return Err(err),
        };
        let stages = placement.0.lock().unwrap_or_else(|p| p.into_inner()).len();
        Ok(Some((stream, Distributed { workers: placement.workers(), stages, file_bytes, retried })))
    }
}

impl Distribution {
    /// The coordinator's session for one query: the planning state of `state` with the
    /// distributed planner, the members, the connections, this replica as the local worker,
    /// and the task placement recorded into `placement`. `without_file_order`: the files'
    /// own sort-order metadata is not read (see [`Distribution::plan`]).
    fn coordinator(
        &self,
        state: &SessionState,
        placement: &Placement,
        without_file_order: bool,
        analyze: bool,
    ) -> Result<SessionState> {
        let mut builder = SessionStateBuilder::new_from_existing(state.clone());
        if without_file_order && let Some(config) = builder.config().as_mut() {
            // A listing table infers a file's ordering only with its statistics.
            config.options_mut().execution.collect_statistics = false;
        }
        Ok(builder
            .with_distributed_worker_resolver(Members(Arc::clone(&self.members)))
            .with_distributed_channel_resolver(self.channels.clone())
            .with_distributed_local_worker_context(self.worker.to_local_worker_context(self.self_url.clone()))
            .with_distributed_file_scan_config_bytes_per_partition(self.bytes_per_task)?
            .with_distributed_planner()
            .with_distributed_route_tasks_handler(placement.router(self.self_url.clone()))
            // The workers send each task's metrics back only when asked: for EXPLAIN ANALYZE.
            .with_distributed_metrics_collection(analyze)?
            .build())
    }

    /// The distributed physical plan of `logical`, and the session it runs in.
    ///
    /// datafusion-distributed 4.0 cannot split a scan of Parquet files whose metadata
    /// declares a sort order over tasks when the files do not share out evenly ("Different
    /// partition count where provided in two different variants of DistributedLeafExec"):
    /// such a plan is made again without reading the files' sort order (the planner then
    /// sorts where the query needs it), which is what the same files without that metadata
    /// get.
    async fn plan(
        &self,
        logical: &LogicalPlan,
        state: &SessionState,
        placement: &Placement,
        analyze: bool,
    ) -> Result<(SessionState, Arc<dyn ExecutionPlan>)> {
        let coordinator = self.coordinator(state, placement, false, analyze)?;
        match coordinator.query_planner().create_physical_plan(logical, &coordinator).await {
            Ok(physical) => Ok((coordinator, physical)),
            Err(err) if err.to_string().contains("Different partition count") => {
                warn!(error = %err, "distributing without the files' sort order (a datafusion-distributed limitation)");
                let coordinator = self.coordinator(state, placement, true, analyze)?;
                let physical = coordinator.query_planner().create_physical_plan(logical, &coordinator).await?;
                Ok((coordinator, physical))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// The distributed plan of `plan`, started and polled to its first batch (so a worker
    /// that is gone fails here, where the query can still be retried); `None` when the
    /// planner found nothing worth distributing or fewer than two workers answer. EXPLAIN
    /// shows the stages; EXPLAIN ANALYZE runs them and shows each one's metrics and the
    /// workers its tasks ran on.
    async fn start(
        &self,
        plan: &LogicalPlan,
        state: &SessionState,
        task_ctx: &Arc<TaskContext>,
    ) -> Result<Option<(SendableRecordBatchStream, Placement)>> {
        if self.members.workers().len() < 2 {
            return Ok(None);
        }
        let placement = Placement::default();
        let (inner, analyze) = match plan {
            LogicalPlan::Explain(explain) if !explain.verbose => (explain.plan.as_ref(), false),
            LogicalPlan::Analyze(analyze) if !analyze.verbose => (analyze.input.as_ref(), true),
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => return Ok(None),
            plan => (plan, false),
        };
        let (coordinator, physical) = self.plan(inner, state, &placement, analyze).await?;
        if count_stages(&physical) == 0 {
            return Ok(None);
        }
        let ctx =
            super::query_path::derived_task_context(task_ctx, coordinator.config().clone(), task_ctx.runtime_env());
        let stream = match plan {
            LogicalPlan::Explain(_) => {
                let rows = [
                    ("logical_plan", inner.display_indent().to_string()),
                    ("distributed_plan", datafusion_distributed::display_plan_ascii(physical.as_ref(), false)),
                ];
                explanation(plan, &rows)?
            }
            LogicalPlan::Analyze(_) if analyze => {
                let batches = datafusion::physical_plan::collect(Arc::clone(&physical), ctx).await?;
                // Every worker's task metrics, placed on the stages' nodes, per task.
                let physical = datafusion_distributed::rewrite_distributed_plan_with_metrics(
                    physical,
                    datafusion_distributed::DistributedMetricsFormat::PerTask,
                )
                .await?;
                let rows = [
                    ("output_rows", batches.iter().map(|b| b.num_rows()).sum::<usize>().to_string()),
                    (
                        "distributed_plan_with_metrics",
                        datafusion_distributed::display_plan_ascii(physical.as_ref(), true),
                    ),
                    ("task_placement", placement.to_string()),
                ];
                explanation(plan, &rows)?
            }
            _ => {
                let mut stream = datafusion::physical_plan::execute_stream(physical, ctx)?;
                let schema = stream.schema();
                let first = match stream.next().await {
                    Some(Err(err)) => return Err(err.into()),
                    first => first,
                };
                let rest = futures::stream::iter(first).chain(stream);
                Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(schema, rest))
            }
        };
        Ok(Some((stream, placement)))
    }
}

/// The answer of an EXPLAIN: one `(plan_type, plan)` row per entry, in the plan's schema.
fn explanation(plan: &LogicalPlan, rows: &[(&str, String)]) -> Result<SendableRecordBatchStream> {
    let schema = Arc::new(plan.schema().as_arrow().clone());
    let kinds = arrow::array::StringArray::from_iter_values(rows.iter().map(|(kind, _)| *kind));
    let texts = arrow::array::StringArray::from_iter_values(rows.iter().map(|(_, text)| text.as_str()));
    let batch = arrow::array::RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(kinds), Arc::new(texts)])?;
    Ok(Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
        schema,
        futures::stream::iter([Ok(batch)]),
    )))
}

/// Where one query's tasks ran: each stage's head and the worker of each of its tasks, as
/// the coordinator assigned them. The planner's own rule, kept: a stage of one task runs
/// here (its rows may come from this replica's accelerated copies, which cannot travel);
/// the tasks of a wider stage go round the workers from a random one.
#[derive(Clone, Default)]
pub(super) struct Placement(Arc<std::sync::Mutex<Vec<PlacedStage>>>);

/// One stage's head (one line) and the worker of each of its tasks.
type PlacedStage = (String, Vec<Url>);

impl Placement {
    fn router(&self, self_url: Url) -> impl datafusion_distributed::RouteTasksHandler {
        let placement = self.clone();
        move |event: datafusion_distributed::RouteTasksEvent<'_>| {
            let urls = match event.task_count {
                1 => vec![self_url.clone()],
                count => {
                    let workers =
                        match datafusion_distributed::get_distributed_worker_resolver(event.task_ctx.session_config())
                            .and_then(|r| r.get_urls())
                        {
                            Ok(workers) if !workers.is_empty() => workers,
                            Ok(_) => {
                                return Some(Err(DataFusionError::Execution(
                                    "no workers to run the query's tasks on".into(),
                                )));
                            }
                            Err(err) => return Some(Err(err)),
                        };
                    let first = rand_start(workers.len());
                    (0..count).map(|i| workers[(first + i) % workers.len()].clone()).collect()
                }
            };
            let head = datafusion::physical_plan::displayable(event.plan.as_ref()).one_line().to_string();
            placement.0.lock().unwrap_or_else(|p| p.into_inner()).push((head.trim().to_string(), urls.clone()));
            Some(Ok(datafusion_distributed::RouteTasksEventResponse::new(urls)))
        }
    }

    /// How many distinct workers took a task.
    fn workers(&self) -> usize {
        let placed = self.0.lock().unwrap_or_else(|p| p.into_inner());
        placed.iter().flat_map(|(_, urls)| urls).collect::<std::collections::BTreeSet<_>>().len()
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (head, urls) in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            writeln!(f, "stage `{head}`:")?;
            for (task, url) in urls.iter().enumerate() {
                writeln!(f, "  task {task}: {url}")?;
            }
        }
        Ok(())
    }
}

/// A start in `0..n`, different per query, so stages do not all begin on the same worker.
fn rand_start(n: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(n as u64);
    (hasher.finish() % n as u64) as usize
}

/// Bytes of the files `plan` scans (Parquet, CSV, JSON), as listed when it was planned.
fn file_bytes(plan: &Arc<dyn ExecutionPlan>) -> u64 {
    let mut total = 0;
    let _ = plan.apply(|node| {
        if let Some(files) = file_scan(node) {
            total += files.file_groups.iter().flat_map(|g| g.iter()).map(|f| f.object_meta.size).sum::<u64>();
        }
        Ok(TreeNodeRecursion::Continue)
    });
    total
}

fn file_scan(node: &Arc<dyn ExecutionPlan>) -> Option<&FileScanConfig> {
    node.downcast_ref::<DataSourceExec>()?.data_source().downcast_ref::<FileScanConfig>()
}

/// Network boundaries in a distributed plan: each starts a stage.
fn count_stages(plan: &Arc<dyn ExecutionPlan>) -> usize {
    let mut stages = 0;
    let _ = plan.apply(|node| {
        if node.is_network_boundary() {
            stages += 1;
        }
        Ok(TreeNodeRecursion::Continue)
    });
    stages
}

/// Whether `err` says a worker could not be reached or went away (worth one retry with a
/// fresh worker list), rather than something about the query itself.
fn is_transport_failure(err: &StrataError) -> bool {
    let text = err.to_string().to_ascii_lowercase();
    [
        "transport error",
        "connection refused",
        "connection reset",
        "broken pipe",
        "error connecting",
        "unavailable",
        "h2 protocol error",
        "keep-alive timed out",
    ]
    .iter()
    .any(|marker| text.contains(marker))
}

/// The files plan fragments from other replicas may read: those of the configured file
/// datasets. The worker service runs whatever plan it is sent, and a file scan names its
/// paths itself, so without this a caller of the worker port could read any file the
/// process can.
struct AllowedFiles {
    /// Canonical paths without the leading `/`, as object store locations are written.
    roots: Vec<String>,
}

impl AllowedFiles {
    fn of(engine: &Engine) -> Self {
        let roots = engine
            .inner
            .datasets
            .iter()
            .filter_map(|ds| match &ds.config.from {
                crate::config::SourceRef::File { path } => Some(without_glob(path)),
                _ => None,
            })
            .map(|path| std::fs::canonicalize(&path).unwrap_or(path))
            .map(|path| path.to_string_lossy().trim_start_matches('/').trim_end_matches('/').to_string())
            .collect();
        Self { roots }
    }

    /// Refuses `plan` if it scans a file outside every root, or another object store.
    fn check(&self, plan: &Arc<dyn ExecutionPlan>) -> datafusion::common::Result<()> {
        plan.apply(|node| {
            let Some(scan) = file_scan(node) else { return Ok(TreeNodeRecursion::Continue) };
            if scan.object_store_url.as_str() != "file:///" {
                return Err(DataFusionError::Plan(format!(
                    "worker: refused a plan reading `{}`: only the platform's file datasets may be read",
                    scan.object_store_url.as_str()
                )));
            }
            for file in scan.file_groups.iter().flat_map(|g| g.iter()) {
                let location = file.object_meta.location.as_ref();
                if !self.allows(location) {
                    return Err(DataFusionError::Plan(format!(
                        "worker: refused a plan reading `/{location}`: it is not a file of any configured dataset"
                    )));
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        Ok(())
    }

    fn allows(&self, location: &str) -> bool {
        if location.split('/').any(|segment| segment == ".." || segment == ".") {
            return false;
        }
        self.roots.iter().any(|root| {
            location == root || (location.starts_with(root.as_str()) && location[root.len()..].starts_with('/'))
        })
    }
}

/// The directory part of a path before its first glob component (`/data/*.parquet` ->
/// `/data`), as a listing table reads it.
fn without_glob(path: &std::path::Path) -> std::path::PathBuf {
    let is_glob = |part: &std::ffi::OsStr| part.to_string_lossy().contains(['*', '?', '[']);
    path.iter().take_while(|part| !is_glob(part)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_files_are_those_under_a_dataset_root() {
        let allowed = AllowedFiles { roots: vec!["data/sales".into(), "data/one.parquet".into()] };
        assert!(allowed.allows("data/sales/part-0.parquet"));
        assert!(allowed.allows("data/sales/y=2024/part-1.parquet"));
        assert!(allowed.allows("data/one.parquet"));
        assert!(!allowed.allows("data/salesman/part-0.parquet"), "a sibling sharing the prefix");
        assert!(!allowed.allows("data/sales/../../etc/passwd"));
        assert!(!allowed.allows("etc/passwd"));
        assert!(!allowed.allows("data/one.parquet.bak"));
    }

    #[test]
    fn a_glob_allows_its_directory() {
        assert_eq!(without_glob(std::path::Path::new("/data/sales/*.parquet")), std::path::Path::new("/data/sales"));
        assert_eq!(without_glob(std::path::Path::new("/data/x.parquet")), std::path::Path::new("/data/x.parquet"));
    }

    #[test]
    fn transport_failures_are_told_from_query_errors() {
        let gone = StrataError::Execution("External error: Error connecting to Distributed DataFusion worker on 'http://127.0.0.1:1/': transport error".into());
        assert!(is_transport_failure(&gone));
        let query = StrataError::Execution("Arrow error: Divide by zero error".into());
        assert!(!is_transport_failure(&query));
    }
}
