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
use crate::traced_postgres::TracedPool;

/// Opens sources, sharing one PostgreSQL connection pool per distinct set of connection params.
#[derive(Default)]
pub struct SourceConnector {
    pools: Mutex<HashMap<BTreeMap<String, String>, Arc<PostgresConnectionPool>>>,
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
        if let Some(pool) = pools.get(params) {
            return Ok(Arc::clone(pool));
        }
        let provider_params: HashMap<String, String> = params
            .iter()
            .map(|(k, v)| {
                let key = match k.as_str() {
                    "password" => "pass",
                    "pool_size" => "connection_pool_size",
                    other => other,
                };
                (key.to_string(), v.clone())
            })
            .collect();
        let pool = PostgresConnectionPool::new(to_secret_map(provider_params))
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?
            // A column whose type has no faithful Arrow mapping must fail loudly, naming it,
            // rather than be dropped or turned into text behind the user's back.
            .with_unsupported_type_action(UnsupportedTypeAction::Error);
        let pool = Arc::new(pool);
        pools.insert(params.clone(), Arc::clone(&pool));
        Ok(pool)
    }
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
#[derive(Debug)]
struct ZeroColumnScan(Arc<dyn TableProvider>);

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
        self.0.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::logical_expr::Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
        match projection {
            Some(columns) if columns.is_empty() && !self.schema().fields().is_empty() => {
                let input = self.0.scan(state, Some(&vec![0]), filters, limit).await?;
                Ok(Arc::new(ProjectionExec::try_new(Vec::<ProjectionExpr>::new(), input)?))
            }
            _ => self.0.scan(state, projection, filters, limit).await,
        }
    }
}
