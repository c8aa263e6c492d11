//! The tier gRPC protocol (`strata.v1.TierService`) as a platform serves it: its catalog,
//! version streams of accelerated datasets, forwarded queries and sub-plans, health.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow_flight::error::FlightError;
use datafusion::common::DFSchema;
use datafusion::common::tree_node::TreeNode;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::PhysicalExpr;
use datafusion_proto::bytes::Serializeable;
use futures::{Stream, StreamExt, TryStreamExt};
use strata_core::accelerator::AcceleratedTable;
use strata_core::query::Delivery;
use strata_core::trace_context;
use strata_core::{Engine, StrataError};
use strata_proto::v1::tier_service_server::{TierService, TierServiceServer};
use strata_proto::v1::{
    ArrowFrame, ChangeKind, ExecuteRequest, HealthRequest, HealthResponse, Heartbeat, IngestRequest, IngestResponse,
    ListDatasetsRequest, ListDatasetsResponse, SubscribeEvent, SubscribeRequest, VersionBegin, VersionEnd,
    execute_request, subscribe_event,
};
use strata_upstream::wire;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span};

use crate::status::to_grpc;

/// A quiet version stream sends a heartbeat this often.
const HEARTBEAT: Duration = Duration::from_secs(5);

type FrameStream = Pin<Box<dyn Stream<Item = Result<ArrowFrame, Status>> + Send>>;
type EventStream = Pin<Box<dyn Stream<Item = Result<SubscribeEvent, Status>> + Send>>;

/// The tier service of one process.
pub struct Tier {
    engine: Engine,
    tier: &'static str,
    /// One permit per open version stream (`limits.max_subscribers`).
    subscribers: Arc<tokio::sync::Semaphore>,
}

/// The gRPC service, bounded by `limits.max_message_size` both ways.
pub fn tier_server(engine: Engine, tier: &'static str) -> TierServiceServer<Tier> {
    let max = engine.limits().max_message_size.as_usize();
    let subscribers = Arc::new(tokio::sync::Semaphore::new(engine.limits().max_subscribers));
    TierServiceServer::new(Tier { engine, tier, subscribers })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
}

fn grpc(err: StrataError) -> Status {
    to_grpc(&err)
}

#[tonic::async_trait]
impl TierService for Tier {
    async fn list_datasets(
        &self,
        request: Request<ListDatasetsRequest>,
    ) -> Result<Response<ListDatasetsResponse>, Status> {
        let (options, _) = caller_options(request.metadata(), request.get_ref().context.clone());
        let access = self.engine.access(&options);
        let datasets = self
            .engine
            .catalog()
            .iter()
            .filter(|e| access.allows(&e.name))
            .map(wire::dataset_info)
            .collect::<Result<Vec<_>, _>>()
            .map_err(grpc)?;
        Ok(Response::new(ListDatasetsResponse { region: self.engine.region().to_string(), datasets }))
    }

    type SubscribeStream = EventStream;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<EventStream>, Status> {
        let (caller, _) = caller_options(request.metadata(), request.get_ref().context.clone());
        let request = request.into_inner();
        // Replicating a dataset reads all of it: only a caller granted it may, and to any
        // other it does not exist.
        if !self.engine.access(&caller).allows(&request.dataset) {
            return Err(grpc(StrataError::UnknownDataset(request.dataset)));
        }
        let table = self.engine.accelerated_table(&request.dataset).ok_or_else(|| {
            let known = self.engine.catalog().iter().any(|e| e.name.eq_ignore_ascii_case(&request.dataset));
            grpc(if known {
                StrataError::NotSupported(format!(
                    "dataset `{}` has no accelerated copy on this platform, so it cannot be replicated",
                    request.dataset
                ))
            } else {
                StrataError::UnknownDataset(request.dataset.clone())
            })
        })?;
        let filter = self.subset_filter(&table, &request.predicate).map_err(grpc)?;
        let max = self.engine.limits().max_subscribers;
        let permit = Arc::clone(&self.subscribers).try_acquire_owned().map_err(|_| {
            grpc(StrataError::ResourcesExhausted(format!(
                "{max} version streams are open (limits.max_subscribers); retry later"
            )))
        })?;
        let origin = request.context.as_ref().map(|c| format!("{}@{}", c.origin_tier, c.origin_region));
        info!(dataset = %request.dataset, from_version = request.from_version, origin, "subscriber joined");
        // Two events queued per subscriber: a reader that stalls holds little memory here
        // (its HTTP/2 window holds the rest).
        let (tx, rx) = mpsc::channel(2);
        // Versions of another epoch say nothing about this copy: start over.
        let from = if request.from_epoch == table.epoch() { request.from_version } else { 0 };
        // The stream's span, under the subscriber's trace: each version published is an event in it.
        let span = info_span!("publish_versions", dataset = %request.dataset, from_version = from, origin);
        let (options, _) = wire::options(request.context.clone());
        trace_context::adopt(&span, &options.trace);
        tokio::spawn(
            async move {
                publish(table, from, filter, tx).await;
                drop(permit);
            }
            .instrument(span),
        );
        let events = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
        Ok(Response::new(Box::pin(events)))
    }

    type ExecuteStream = FrameStream;

    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<FrameStream>, Status> {
        let (options, _deadline) = caller_options(request.metadata(), request.get_ref().context.clone());
        let request = request.into_inner();
        let stream = match request.query {
            Some(execute_request::Query::Sql(q)) => {
                let params = wire::params_from_ipc(&q.params, self.max_message()).map_err(grpc)?;
                self.engine.execute_with(&q.sql, params, &options).await
            }
            Some(execute_request::Query::Plan(plan)) => self.engine.execute_encoded_plan(&plan, &options).await,
            None => Err(StrataError::Plan("the request carries neither SQL nor a plan".into())),
        }
        .map_err(grpc)?;
        let route = stream.route().clone();
        debug!(route = %route, origin = %options.origin_tier, "forwarded query");
        // Forwarded on again (to a peer platform): its messages are passed on as they came.
        let frames: FrameStream = match stream.into_delivery() {
            Delivery::Frames(framed) => Box::pin(framed.map(|frame| {
                let frame = frame.map_err(|e| to_grpc(&e))?;
                Ok(ArrowFrame { data_header: frame.header, data_body: frame.body, app_metadata: Default::default() })
            })),
            Delivery::Batches(stream) => {
                let schema = stream.schema();
                let batches = stream.map_err(|e| FlightError::Tonic(Box::new(to_grpc(&e))));
                Box::pin(wire::encode_frames(schema, batches).map_err(Status::from))
            }
        };
        let mut response = Response::new(frames);
        crate::route_headers::insert(response.metadata_mut().as_mut(), &route);
        Ok(response)
    }

    async fn ingest(&self, request: Request<IngestRequest>) -> Result<Response<IngestResponse>, Status> {
        let (options, _) = caller_options(request.metadata(), request.get_ref().context.clone());
        let request = request.into_inner();
        // Every batch of the upload must be into a dataset the caller may write; one that is
        // not fails the whole upload (the edge keeps it and reports it), as an unknown one does.
        let access = self.engine.access(&options);
        if let Some(refused) = request.batches.iter().find(|b| !access.allows(&b.dataset)) {
            return Err(grpc(StrataError::UnknownDataset(refused.dataset.clone())));
        }
        let span = info_span!("ingest", edge = %request.edge_id, batches = request.batches.len());
        trace_context::adopt(&span, &options.trace);
        self.ingest_batches(request).instrument(span).await
    }

    async fn health(&self, _request: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            tier: self.tier.to_string(),
            region: self.engine.region().to_string(),
            ready: self.engine.is_ready(),
        }))
    }
}

/// A tier call's options: what its `QueryContext` carried (the tenant there is who the
/// calling tier acts for) and who is calling (the tenant the authentication layer marked on
/// the call from the caller's key).
fn caller_options(
    metadata: &tonic::metadata::MetadataMap,
    context: Option<strata_proto::v1::QueryContext>,
) -> (strata_core::QueryOptions, Option<std::time::SystemTime>) {
    let (mut options, deadline) = wire::options(context);
    options.tenant =
        metadata.get(crate::route_headers::TENANT_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (options, deadline)
}

impl Tier {
    /// Applies an edge's upload (inside the `ingest` span).
    async fn ingest_batches(&self, request: IngestRequest) -> Result<Response<IngestResponse>, Status> {
        let count = request.batches.len() as u64;
        let max = self.max_message();
        let batches = request
            .batches
            .into_iter()
            .map(|b| Ok((b.seq, b.dataset, wire::batches_from_ipc(&b.batch, max)?)))
            .collect::<Result<Vec<_>, StrataError>>()
            .map_err(grpc)?;
        let first = batches.first().map_or(0, |b| b.0);
        let applied = self.engine.apply_ingest(&request.edge_id, batches).await.map_err(grpc)?;
        let duplicates = count - applied.fresh.len() as u64;
        debug!(edge = %request.edge_id, first_seq = first, count, duplicates, rows = applied.rows, "edge batches");
        Ok(Response::new(IngestResponse { duplicates, rows: applied.rows }))
    }

    /// `limits.max_message_size`: no part of a request can be larger than its message.
    fn max_message(&self) -> usize {
        self.engine.limits().max_message_size.as_usize()
    }

    /// The subscriber's subset predicate, compiled against the dataset's schema.
    fn subset_filter(
        &self,
        table: &AcceleratedTable,
        predicate: &[u8],
    ) -> Result<Option<Arc<dyn PhysicalExpr>>, StrataError> {
        if predicate.is_empty() {
            return Ok(None);
        }
        let ctx = self.engine.session();
        // datafusion-proto decodes plans nested in expressions (subqueries) itself, and some of
        // its decoders panic on malformed input: a panic is a malformed request here.
        let task_ctx = ctx.task_ctx();
        let expr = strata_core::contained_panic::contain(|| Expr::from_bytes_with_ctx(predicate, &task_ctx))
            .map_err(|_| StrataError::InvalidRequest("the subset predicate is malformed".into()))?
            .map_err(|e| StrataError::InvalidRequest(format!("cannot decode the subset predicate: {e}")))?;
        // A subset is a condition on the dataset's own columns; a subquery could read anything.
        let mut reads_tables = false;
        let _ = expr.apply(|e| {
            reads_tables |= matches!(e, Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_));
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        });
        if reads_tables {
            return Err(StrataError::InvalidRequest("a subset predicate may not hold subqueries".into()));
        }
        let schema = DFSchema::try_from(datafusion::catalog::TableProvider::schema(table).as_ref().clone())?;
        Ok(Some(ctx.create_physical_expr(expr, &schema)?))
    }
}

/// Streams versions of `table` to one subscriber, starting after `from`, until it leaves.
async fn publish(
    table: Arc<AcceleratedTable>,
    mut from: u64,
    filter: Option<Arc<dyn PhysicalExpr>>,
    tx: mpsc::Sender<Result<SubscribeEvent, Status>>,
) {
    let mut changes = table.subscribe();
    let schema = datafusion::catalog::TableProvider::schema(table.as_ref());
    loop {
        let _ = changes.borrow_and_update();
        if let Some(snapshot) = table.snapshot().filter(|s| s.version != from) {
            let increment = if from == 0 { None } else { snapshot.appended_since(from) };
            let (kind, base, batches) = match increment {
                Some(added) => (ChangeKind::Append, from, added.to_vec()),
                None => (ChangeKind::Snapshot, 0, snapshot.batches.clone()),
            };
            let filtered: Result<Vec<RecordBatch>, StrataError> =
                batches.iter().map(|b| apply_filter(b, filter.as_deref())).collect();
            let filtered = match filtered {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(Err(grpc(e))).await;
                    return;
                }
            };
            // Filtered first: the subscriber is told how many rows to expect.
            let rows: usize = filtered.iter().map(RecordBatch::num_rows).sum();
            let begin = VersionBegin {
                rows: rows as u64,
                version: snapshot.version,
                base_version: base,
                kind: kind as i32,
                schema: match wire::schema_to_ipc(&schema) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(grpc(e))).await;
                        return;
                    }
                },
                refreshed_at_unix_ms: snapshot
                    .refreshed_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as i64,
                epoch: table.epoch(),
            };
            if send(&tx, subscribe_event::Event::Begin(begin)).await.is_err() {
                return;
            }
            let mut frames =
                Box::pin(wire::encode_frames(Arc::clone(&schema), futures::stream::iter(filtered.into_iter().map(Ok))));
            while let Some(frame) = frames.next().await {
                let event = match frame {
                    Ok(frame) => subscribe_event::Event::Data(frame),
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                if send(&tx, event).await.is_err() {
                    return;
                }
            }
            let end = VersionEnd { version: snapshot.version, rows: rows as u64 };
            if send(&tx, subscribe_event::Event::End(end)).await.is_err() {
                return;
            }
            from = snapshot.version;
            continue;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(HEARTBEAT) => {
                if send(&tx, subscribe_event::Event::Heartbeat(Heartbeat { version: from })).await.is_err() {
                    return;
                }
            }
            _ = tx.closed() => return,
        }
    }
}

async fn send(tx: &mpsc::Sender<Result<SubscribeEvent, Status>>, event: subscribe_event::Event) -> Result<(), ()> {
    tx.send(Ok(SubscribeEvent { event: Some(event) })).await.map_err(|_| ())
}

fn apply_filter(batch: &RecordBatch, filter: Option<&dyn PhysicalExpr>) -> Result<RecordBatch, StrataError> {
    let Some(filter) = filter else { return Ok(batch.clone()) };
    let mask = filter.evaluate(batch)?.into_array(batch.num_rows())?;
    let mask = mask
        .as_boolean_opt()
        .ok_or_else(|| StrataError::Plan("the subset predicate is not a boolean condition".into()))?;
    Ok(filter_record_batch(batch, mask)?)
}
