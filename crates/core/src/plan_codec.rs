//! Sub-plans shipped between tiers as datafusion-proto bytes. Tables travel by name: the
//! sending tier's placeholder for a remote table encodes nothing, and the receiving tier
//! resolves the name against its own catalog, so a plan can only read what the receiver serves.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::{TableReference, plan_err};
use datafusion::error::Result as DfResult;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Extension, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion_proto::bytes::{
    logical_plan_from_bytes_with_extension_codec, logical_plan_to_bytes_with_extension_codec,
};
use datafusion_proto::logical_plan::LogicalExtensionCodec;

use crate::error::{Result, StrataError};

/// Encodes table scans by name only.
#[derive(Debug, Default)]
pub struct ByNameCodec {
    /// Tables a decoded plan may read, by lower-cased name (`table` or `schema.table`).
    tables: HashMap<String, Arc<dyn TableProvider>>,
}

impl ByNameCodec {
    /// A codec for decoding against these tables.
    pub fn with_tables(tables: HashMap<String, Arc<dyn TableProvider>>) -> Self {
        Self { tables }
    }
}

fn key(table_ref: &TableReference) -> String {
    match table_ref.schema() {
        Some(schema) if schema != crate::engine::DEFAULT_SCHEMA => format!("{schema}.{}", table_ref.table()),
        _ => table_ref.table().to_string(),
    }
    .to_ascii_lowercase()
}

impl LogicalExtensionCodec for ByNameCodec {
    fn try_decode(&self, _buf: &[u8], _inputs: &[LogicalPlan], _ctx: &TaskContext) -> DfResult<Extension> {
        plan_err!("shipped plans may not contain extension nodes")
    }

    fn try_encode(&self, _node: &Extension, _buf: &mut Vec<u8>) -> DfResult<()> {
        plan_err!("shipped plans may not contain extension nodes")
    }

    fn try_decode_table_provider(
        &self,
        _buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        _ctx: &TaskContext,
    ) -> DfResult<Arc<dyn TableProvider>> {
        let Some(provider) = self.tables.get(&key(table_ref)) else {
            return plan_err!("table `{table_ref}` is not served by this tier");
        };
        // The sender planned against the schema it was advertised; refuse a drifted table
        // rather than read columns by the wrong position.
        if provider.schema().fields() != schema.fields() {
            return plan_err!(
                "table `{table_ref}` changed schema since the sender's catalog was read; retry after it refreshes"
            );
        }
        Ok(Arc::clone(provider))
    }

    fn try_encode_table_provider(
        &self,
        _table_ref: &TableReference,
        _node: Arc<dyn TableProvider>,
        _buf: &mut Vec<u8>,
    ) -> DfResult<()> {
        Ok(())
    }
}

/// Serializes a plan whose tables are named (see the module docs).
pub fn encode_plan(plan: &LogicalPlan) -> Result<bytes::Bytes> {
    Ok(logical_plan_to_bytes_with_extension_codec(plan, &ByNameCodec::default())?)
}

/// Deserializes a shipped plan against the tables of `ctx`'s default catalog.
pub async fn decode_plan(bytes: &[u8], ctx: &SessionContext) -> Result<LogicalPlan> {
    let mut tables = HashMap::new();
    if let Some(catalog) = ctx.catalog(crate::engine::CATALOG) {
        for schema_name in catalog.schema_names() {
            let Some(schema) = catalog.schema(&schema_name) else { continue };
            for table in schema.table_names() {
                if let Ok(Some(provider)) = schema.table(&table).await {
                    let name = if schema_name == crate::engine::DEFAULT_SCHEMA {
                        table.to_ascii_lowercase()
                    } else {
                        format!("{schema_name}.{table}").to_ascii_lowercase()
                    };
                    tables.insert(name, provider);
                }
            }
        }
    }
    let codec = ByNameCodec::with_tables(tables);
    logical_plan_from_bytes_with_extension_codec(bytes, &ctx.task_ctx(), &codec)
        .map_err(|e| StrataError::Plan(format!("cannot decode the shipped plan: {e}")))
}
