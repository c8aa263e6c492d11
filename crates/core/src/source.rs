//! Table providers for the places data lives: PostgreSQL (through
//! datafusion-table-providers, which pushes projection, filters and limit into the SQL it
//! sends) and Parquet/CSV/NDJSON files (through DataFusion's listing tables).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use datafusion::catalog::TableProvider;
use datafusion::common::TableReference;
use datafusion::datasource::file_format::FileFormat as DfFileFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::prelude::SessionContext;
use datafusion::sql::unparser::dialect::PostgreSqlDialect;
use datafusion_table_providers_common::UnsupportedTypeAction;
use datafusion_table_providers_common::sql::sql_provider_datafusion::SqlTable;
use datafusion_table_providers_common::util::secrets::to_secret_map;
use datafusion_table_providers_postgres::DynPostgresConnectionPool;
use datafusion_table_providers_postgres::pool::PostgresConnectionPool;
use tokio::sync::Mutex;

use crate::config::{DatasetConfig, FileFormat, SourceRef};
use crate::error::{Result, StrataError};
use crate::source_tls::{RELAY_PORT, SourceTls, SslMode, TlsRelay};
use crate::traced_postgres::TracedPool;

/// Opens sources, sharing one PostgreSQL connection pool per distinct set of connection params.
#[derive(Default)]
pub struct SourceConnector {
    pools: Mutex<HashMap<BTreeMap<String, String>, SourcePool>>,
}

/// A PostgreSQL pool, and the relay its connections go through when the source uses TLS.
struct SourcePool {
    pool: Arc<PostgresConnectionPool>,
    _relay: Option<TlsRelay>,
}

impl SourceConnector {
    /// A table provider reading the dataset's source directly.
    pub async fn open(&self, ctx: &SessionContext, dataset: &DatasetConfig) -> Result<Arc<dyn TableProvider>> {
        let source_err = |message: String| StrataError::Source { dataset: dataset.name.clone(), message };
        match &dataset.from {
            SourceRef::File { path } => {
                let format = dataset
                    .file_format()
                    .ok_or_else(|| source_err(format!("unknown file format for {}", path.display())))?;
                open_file(ctx, path, format).await.map_err(|e| source_err(e.to_string()))
            }
            SourceRef::Postgres { schema, table } => {
                let pool = self.postgres_pool(&dataset.params).await.map_err(source_err)?;
                let reference = match schema {
                    Some(schema) => TableReference::partial(schema.as_str(), table.as_str()),
                    None => TableReference::bare(table.as_str()),
                };
                // The provider datafusion-table-providers' PostgreSQL factory builds, on a
                // pool whose connections put the statements they send in the query's trace.
                let pool: Arc<DynPostgresConnectionPool> = Arc::new(TracedPool::new(pool));
                let table = SqlTable::new("postgres", &pool, reference)
                    .await
                    .map_err(|e| source_err(format!("cannot open PostgreSQL table `{}`: {e}", dataset.from)))?
                    .with_dialect(Arc::new(PostgreSqlDialect {}));
                Ok(Arc::new(ZeroColumnScan(Arc::new(table))))
            }
        }
    }

    async fn postgres_pool(
        &self,
        params: &BTreeMap<String, String>,
    ) -> std::result::Result<Arc<PostgresConnectionPool>, String> {
        let mut pools = self.pools.lock().await;
        if let Some(known) = pools.get(params) {
            return Ok(Arc::clone(&known.pool));
        }
        let tls = SourceTls::from_params(params)?;
        let mut provider_params: HashMap<String, String> = params
            .iter()
            .filter(|(k, _)| k.as_str() != "sslrootcert")
            .map(|(k, v)| {
                let key = match k.as_str() {
                    "password" => "pass",
                    "pool_size" => "connection_pool_size",
                    other => other,
                };
                (key.to_string(), v.clone())
            })
            .collect();
        // TLS is ours (rustls, see `source_tls`): the provider connects in plaintext to the
        // relay's socket, never with its own TLS. A host that is a path is PostgreSQL's own
        // Unix socket, where libpq ignores sslmode too.
        let unix_socket = params.get("host").is_some_and(|host| host.starts_with('/'));
        let relay = if tls.mode == SslMode::Disable || unix_socket {
            None
        } else {
            let host = params.get("host").map_or("localhost", String::as_str);
            let port = match params.get("port") {
                Some(port) => port.parse().map_err(|_| format!("port: `{port}` is not a port number"))?,
                None => 5432,
            };
            let relay = TlsRelay::start(host, port, tls).await?;
            provider_params.insert("host".into(), relay.socket_dir().to_string_lossy().into_owned());
            provider_params.insert("port".into(), RELAY_PORT.to_string());
            Some(relay)
        };
        provider_params.insert("sslmode".into(), "disable".into());
        let pool = PostgresConnectionPool::new(to_secret_map(provider_params))
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL: {}", with_causes(&e)))?
            // A column whose type has no faithful Arrow mapping must fail loudly, naming it,
            // rather than be dropped or turned into text behind the user's back.
            .with_unsupported_type_action(UnsupportedTypeAction::Error);
        let pool = Arc::new(pool);
        pools.insert(params.clone(), SourcePool { pool: Arc::clone(&pool), _relay: relay });
        Ok(pool)
    }
}

/// An error and what caused it, in one line: the provider's connection errors say "db
/// error" and leave PostgreSQL's own reason ("no pg_hba.conf entry ...") to their source.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string().replace('\n', " ");
    let mut cause = err.source();
    while let Some(inner) = cause {
        let line = inner.to_string().replace('\n', " ");
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = inner.source();
    }
    text
}

async fn open_file(
    ctx: &SessionContext,
    path: &std::path::Path,
    format: FileFormat,
) -> datafusion::error::Result<Arc<dyn TableProvider>> {
    let location = path.to_string_lossy();
    let url = ListingTableUrl::parse(location.as_ref())?;
    let file_format: Arc<dyn DfFileFormat> = match format {
        FileFormat::Parquet => Arc::new(ParquetFormat::default()),
        FileFormat::Csv => Arc::new(CsvFormat::default().with_has_header(true)),
        FileFormat::Ndjson => Arc::new(JsonFormat::default()),
    };
    // A single file is read whatever its extension; a directory contributes the files
    // with the format's usual extension.
    let extension = if path.is_dir() {
        match format {
            FileFormat::Parquet => ".parquet",
            FileFormat::Csv => ".csv",
            FileFormat::Ndjson => ".json",
        }
        .to_string()
    } else {
        path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default()
    };
    let options = ListingOptions::new(file_format).with_file_extension(extension);
    let config = ListingTableConfig::new(url).with_listing_options(options).infer_schema(&ctx.state()).await?;
    Ok(Arc::new(ListingTable::try_new(config)?))
}

/// Lets a SQL source answer scans that need no column (`SELECT count(*)`): the provider
/// returns a column even for an empty projection, which DataFusion rejects as a schema
/// mismatch. We read the narrowest column and project it away.
///
/// It also keeps filters SQL generation gets wrong from being pushed down (DataFusion
/// applies them to the rows instead; see [`renders_unsafely`]): those whose string literals
/// hold a quote or a backslash, because the provider renders filters
/// through sqlparser's string escaping, which leaves `''` and `\'` as it finds them, taking
/// them for escapes already made. A value `''x` then reached PostgreSQL as `'x` (a wrong
/// answer), and `\' OR '1'='1` as a literal that ends after the backslash followed by SQL
/// of the client's choosing (PostgreSQL reads backslashes literally). Found by
/// `tests/injection.rs`.
#[derive(Debug)]
struct ZeroColumnScan(Arc<dyn TableProvider>);

impl ZeroColumnScan {
    /// A scan whose filters include one SQL generation cannot render safely (see
    /// [`renders_unsafely`]). A plan made once
    /// for a statement's shape (or a prepared statement) decided pushdown on a placeholder
    /// and had the value bound in after, so such filters can still arrive here: the source
    /// gets the other filters, every column and no limit, and these are applied to its rows
    /// here, then the projection and the limit.
    async fn scan_filtering_here(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::logical_expr::Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use datafusion::common::tree_node::{Transformed, TreeNode};
        use datafusion::physical_plan::filter::FilterExec;
        use datafusion::physical_plan::limit::GlobalLimitExec;
        use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
        let (here, pushed): (Vec<_>, Vec<_>) = filters.iter().cloned().partition(renders_unsafely);
        let input = sealed(self.0.scan(state, None, &pushed, None).await?);
        let schema = self.schema();
        let df_schema = datafusion::common::DFSchema::try_from(schema.as_ref().clone())?;
        let predicate = datafusion::logical_expr::utils::conjunction(here)
            .ok_or_else(|| datafusion::error::DataFusionError::Internal("no filter to apply".into()))?
            .transform(|e| match e {
                datafusion::logical_expr::Expr::Column(c) => Ok(Transformed::yes(
                    datafusion::logical_expr::Expr::Column(datafusion::common::Column::new_unqualified(c.name)),
                )),
                other => Ok(Transformed::no(other)),
            })?
            .data;
        let predicate = state.create_physical_expr(predicate, &df_schema)?;
        let mut plan: Arc<dyn datafusion::physical_plan::ExecutionPlan> =
            Arc::new(FilterExec::try_new(predicate, input)?);
        if let Some(columns) = projection {
            let exprs = columns
                .iter()
                .map(|&i| {
                    let name = schema.field(i).name().clone();
                    let column = datafusion::physical_expr::expressions::Column::new(&name, i);
                    ProjectionExpr { expr: Arc::new(column), alias: name }
                })
                .collect::<Vec<_>>();
            plan = Arc::new(ProjectionExec::try_new(exprs, plan)?);
        }
        if limit.is_some() {
            plan = Arc::new(GlobalLimitExec::new(plan, 0, limit));
        }
        Ok(plan)
    }
}

/// `plan` (the source's scan) behind [`NoPhysicalPushdown`].
fn sealed(
    plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
) -> Arc<dyn datafusion::physical_plan::ExecutionPlan> {
    Arc::new(NoPhysicalPushdown(plan))
}

/// Keeps DataFusion's physical optimizer from pushing filters (and limits) into the source's
/// scan after planning: the provider's scan accepts them and pastes their SQL rendering into
/// its query text, with the same quoting flaw, bypassing the check made in
/// `supports_filters_pushdown`. Everything the source may evaluate was decided there.
#[derive(Debug)]
struct NoPhysicalPushdown(Arc<dyn datafusion::physical_plan::ExecutionPlan>);

impl datafusion::physical_plan::DisplayAs for NoPhysicalPushdown {
    fn fmt_as(
        &self,
        _t: datafusion::physical_plan::DisplayFormatType,
        f: &mut std::fmt::Formatter,
    ) -> std::fmt::Result {
        write!(f, "NoPhysicalPushdown")
    }
}

impl datafusion::physical_plan::ExecutionPlan for NoPhysicalPushdown {
    fn name(&self) -> &str {
        "NoPhysicalPushdown"
    }

    fn properties(&self) -> &Arc<datafusion::physical_plan::PlanProperties> {
        self.0.properties()
    }

    /// It holds no expressions of its own.
    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(
            &Arc<dyn datafusion::physical_expr::PhysicalExpr>,
        ) -> datafusion::error::Result<datafusion::common::tree_node::TreeNodeRecursion>,
    ) -> datafusion::error::Result<datafusion::common::tree_node::TreeNodeRecursion> {
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    }

    fn children(&self) -> Vec<&Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        vec![&self.0]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn datafusion::physical_plan::ExecutionPlan>>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        match (children.pop(), children.is_empty()) {
            (Some(child), true) => Ok(sealed(child)),
            _ => Err(datafusion::error::DataFusionError::Internal("NoPhysicalPushdown takes one child".into())),
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<datafusion::execution::TaskContext>,
    ) -> datafusion::error::Result<datafusion::execution::SendableRecordBatchStream> {
        self.0.execute(partition, context)
    }

    // Planning should treat it as the source scan itself: a pass-through that neither wants
    // its input repartitioned nor changes its order. (Without these two, a slow source's
    // first load reported no progress until its end: tests/status.rs.)
    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }
}

/// Whether SQL generation cannot be trusted with `filter`: it holds a string literal the
/// provider's quoting mishandles, or a `NOT` that the unparser would print without the
/// parentheses it needs.
fn renders_unsafely(filter: &datafusion::logical_expr::Expr) -> bool {
    has_unsafe_string_literal(filter) || has_unparenthesized_not(filter)
}

/// DataFusion's unparser prints `NOT x` bare (no parentheses) wherever it occurs, and
/// PostgreSQL's NOT binds looser than comparisons and `IS`: `(NOT flag) IS NULL` reached
/// PostgreSQL as `NOT flag IS NULL`, which it reads as `NOT (flag IS NULL)`: every row
/// where the answer wanted none (DataFusion's simplifier makes such a filter from
/// `(flag BETWEEN false AND false) IS NULL`). A `NOT` is printed safely only at the top of
/// the filter or right under `AND`, `OR` or another `NOT`. Found by the differential SQL
/// fuzzer (`tests/sql_fuzz.rs`).
fn has_unparenthesized_not(filter: &datafusion::logical_expr::Expr) -> bool {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::{BinaryExpr, Expr, Operator};
    let mut found = false;
    let _ = filter.apply(|expr| {
        let safe_parent =
            matches!(expr, Expr::Not(_) | Expr::BinaryExpr(BinaryExpr { op: Operator::And | Operator::Or, .. }));
        if !safe_parent {
            let mut children = Vec::new();
            let _ = expr.apply_children(|child| {
                children.push(child);
                Ok(TreeNodeRecursion::Continue)
            });
            found |= children.iter().any(|child| matches!(child, Expr::Not(_)));
        }
        Ok(if found { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
    });
    found
}

/// Whether `filter` holds a string literal that SQL generation cannot be trusted to quote.
fn has_unsafe_string_literal(filter: &datafusion::logical_expr::Expr) -> bool {
    use datafusion::common::ScalarValue;
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut unsafe_literal = false;
    let _ = filter.apply(|expr| {
        if let datafusion::logical_expr::Expr::Literal(value, _) = expr {
            let text = match value {
                ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
                    Some(s.as_str())
                }
                ScalarValue::Dictionary(_, inner) => match inner.as_ref() {
                    ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
                        Some(s.as_str())
                    }
                    _ => None,
                },
                _ => None,
            };
            unsafe_literal |= text.is_some_and(|s| s.contains(['\'', '\\', '\0']));
        }
        Ok(if unsafe_literal { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
    });
    unsafe_literal
}

#[async_trait::async_trait]
impl TableProvider for ZeroColumnScan {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.0.schema()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        self.0.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&datafusion::logical_expr::Expr],
    ) -> datafusion::error::Result<Vec<datafusion::logical_expr::TableProviderFilterPushDown>> {
        use datafusion::logical_expr::TableProviderFilterPushDown;
        let safe: Vec<&datafusion::logical_expr::Expr> =
            filters.iter().copied().filter(|f| !renders_unsafely(f)).collect();
        let mut answers = self.0.supports_filters_pushdown(&safe)?.into_iter();
        Ok(filters
            .iter()
            .map(|f| match renders_unsafely(f) {
                true => TableProviderFilterPushDown::Unsupported,
                false => answers.next().unwrap_or(TableProviderFilterPushDown::Unsupported),
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::logical_expr::Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
        if filters.iter().any(renders_unsafely) {
            return self.scan_filtering_here(state, projection, filters, limit).await;
        }
        match projection {
            Some(columns) if columns.is_empty() && !self.schema().fields().is_empty() => {
                let input = sealed(self.0.scan(state, Some(&vec![0]), filters, limit).await?);
                Ok(Arc::new(ProjectionExec::try_new(Vec::<ProjectionExpr>::new(), input)?))
            }
            _ => Ok(sealed(self.0.scan(state, projection, filters, limit).await?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::{col, lit, not};

    use super::*;

    #[test]
    fn a_not_under_anything_but_and_or_not_is_kept_from_the_source() {
        // The unparser prints these as `NOT flag IS NULL` and `NOT flag = true`.
        assert!(renders_unsafely(&not(col("flag")).is_null()));
        assert!(renders_unsafely(&not(col("flag")).eq(lit(true))));
        assert!(renders_unsafely(&col("a").gt(lit(1)).and(not(col("flag")).is_not_null())));
        // These print correctly.
        assert!(!renders_unsafely(&not(col("a").eq(lit(1)))));
        assert!(!renders_unsafely(&col("a").gt(lit(1)).and(not(col("flag")))));
        assert!(!renders_unsafely(&not(not(col("flag")).or(col("other")))));
        assert!(!renders_unsafely(&col("flag").is_null()));
    }
}
