//! Tables served upstream. A scan becomes a sub-plan (scan, filters, projection, limit)
//! shipped as datafusion-proto bytes and executed by the upstream tier, streaming Arrow back.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, plan_err};
use datafusion::datasource::{TableType, provider_as_source};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, TableProviderFilterPushDown};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties};
use futures::{StreamExt, TryStreamExt};
use strata_core::routing::QueryOptions;
use strata_proto::v1::{ExecuteRequest, execute_request};

use crate::client::UpstreamClient;
use crate::wire;

/// Stands for a remote table inside a shipped plan: encodes as its name only.
#[derive(Debug)]
pub struct NamedTable {
    schema: SchemaRef,
}

#[async_trait]
impl TableProvider for NamedTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        plan_err!("a shipped-plan placeholder cannot be scanned here")
    }
}

/// Who this tier is, for the context of the calls it makes.
#[derive(Debug, Clone)]
pub struct Origin {
    pub tier: String,
    pub region: String,
}

/// A dataset served by an upstream tier, queried through it.
pub struct UpstreamTable {
    name: String,
    schema: SchemaRef,
    client: UpstreamClient,
    origin: Origin,
}

impl fmt::Debug for UpstreamTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTable").field("name", &self.name).finish()
    }
}

impl UpstreamTable {
    pub fn new(name: impl Into<String>, schema: SchemaRef, client: UpstreamClient, origin: Origin) -> Self {
        Self { name: name.into(), schema, client, origin }
    }
}

#[async_trait]
impl TableProvider for UpstreamTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Every filter is shipped upstream; DataFusion re-checks them here, which is cheap and
    /// keeps the answer right whatever the upstream does with them.
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let source = provider_as_source(Arc::new(NamedTable { schema: Arc::clone(&self.schema) }));
        let mut builder = LogicalPlanBuilder::scan(self.name.as_str(), source, None)?;
        // The filters name columns by the query's qualifier; the sub-plan has its own.
        let unqualified = filters
            .iter()
            .map(|f| {
                f.clone()
                    .transform(|e| {
                        Ok(match e {
                            Expr::Column(c) => Transformed::yes(Expr::Column(Column::new_unqualified(c.name))),
                            other => Transformed::no(other),
                        })
                    })
                    .map(|t| t.data)
            })
            .collect::<DfResult<Vec<_>>>()?;
        if let Some(filter) = conjunction(unqualified) {
            builder = builder.filter(filter)?;
        }
        let projected = match projection {
            Some(indices) => {
                let columns: Vec<Expr> =
                    indices.iter().map(|i| Expr::Column(Column::from_name(self.schema.field(*i).name()))).collect();
                builder = builder.project(columns)?;
                Arc::new(self.schema.project(indices)?)
            }
            None => Arc::clone(&self.schema),
        };
        if let Some(limit) = limit {
            builder = builder.limit(0, Some(limit))?;
        }
        let plan = builder.build()?;
        let bytes = strata_core::plan_codec::encode_plan(&plan)?;
        Ok(Arc::new(UpstreamExec::new(self.name.clone(), projected, bytes, self.client.clone(), self.origin.clone())))
    }
}

/// Runs one shipped sub-plan upstream as a single partition.
#[derive(Debug)]
pub struct UpstreamExec {
    table: String,
    schema: SchemaRef,
    plan: bytes::Bytes,
    client: UpstreamClient,
    origin: Origin,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamClient").field("endpoints", &self.endpoints()).finish()
    }
}

impl UpstreamExec {
    fn new(table: String, schema: SchemaRef, plan: bytes::Bytes, client: UpstreamClient, origin: Origin) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Self { table, schema, plan, client, origin, properties: Arc::new(properties) }
    }
}

impl DisplayAs for UpstreamExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "UpstreamExec: table={}, plan_bytes={}", self.table, self.plan.len())
    }
}

impl ExecutionPlan for UpstreamExec {
    fn name(&self) -> &str {
        "UpstreamExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    /// A leaf with no expressions of its own: the shipped plan is opaque here.
    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn datafusion::physical_expr::PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn with_new_children(self: Arc<Self>, _children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, _partition: usize, _context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let request = ExecuteRequest {
            context: Some(wire::context(&QueryOptions::default(), &self.origin.tier, &self.origin.region, None)),
            query: Some(execute_request::Query::Plan(self.plan.clone())),
        };
        let client = self.client.clone();
        let schema = Arc::clone(&self.schema);
        let expected = Arc::clone(&schema);
        let batches = futures::stream::once(async move {
            let (_, frames) = client.execute(request, None).await.map_err(DataFusionError::from)?;
            Ok::<_, DataFusionError>(wire::decode_frames(frames, expected))
        })
        .try_flatten()
        .boxed();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)))
    }
}

/// A dataset as seen at an edge: the platform's rows (replica or upstream) plus rows written
/// here and not yet confirmed by the platform, so a writer reads its own writes at once.
pub struct WithLocalWrites {
    base: Arc<dyn TableProvider>,
    local: Arc<dyn TableProvider>,
}

impl fmt::Debug for WithLocalWrites {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithLocalWrites").finish()
    }
}

impl WithLocalWrites {
    pub fn new(base: Arc<dyn TableProvider>, local: Arc<dyn TableProvider>) -> Self {
        Self { base, local }
    }
}

#[async_trait]
impl TableProvider for WithLocalWrites {
    fn schema(&self) -> SchemaRef {
        self.base.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let base = self.base.scan(state, projection, filters, limit).await?;
        let local = self.local.scan(state, projection, filters, limit).await?;
        datafusion::physical_plan::union::UnionExec::try_new(vec![base, local])
    }
}
