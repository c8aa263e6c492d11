//! Sub-plans shipped between tiers as datafusion-proto bytes. Tables travel by name: the
//! sending tier's placeholder for a remote table encodes nothing, and the receiving tier
//! resolves the name against its own catalog, so a plan can only read what the receiver serves.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::catalog::{CatalogProvider, TableProvider};
use datafusion::common::{TableReference, plan_err};
use datafusion::error::Result as DfResult;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Extension, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion_proto::bytes::{
    logical_plan_from_bytes_with_extension_codec, logical_plan_to_bytes_with_extension_codec,
};
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use futures::FutureExt;

use crate::error::{Result, StrataError};

/// Encodes table scans by name only; decodes them against a catalog, looking up just the
/// tables the plan names.
#[derive(Debug, Default)]
pub struct ByNameCodec {
    catalog: Option<Arc<dyn CatalogProvider>>,
}

impl ByNameCodec {
    /// A codec for decoding against the tables of `catalog`.
    pub fn with_catalog(catalog: Arc<dyn CatalogProvider>) -> Self {
        Self { catalog: Some(catalog) }
    }

    fn lookup(&self, table_ref: &TableReference) -> Option<Arc<dyn TableProvider>> {
        let catalog = self.catalog.as_ref()?;
        let schema_name = table_ref.schema().unwrap_or(crate::engine::DEFAULT_SCHEMA);
        let schema = catalog.schema(schema_name).or_else(|| catalog.schema(&schema_name.to_ascii_lowercase()))?;
        let table = table_ref.table();
        // The engine's schemas are in memory: their lookups complete on the first poll.
        let find = |name: &str| schema.table(name).now_or_never().and_then(|r| r.ok()).flatten();
        find(table).or_else(|| find(&table.to_ascii_lowercase()))
    }
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
        let Some(provider) = self.lookup(table_ref) else {
            return plan_err!("table `{table_ref}` is not served by this tier");
        };
        // The sender planned against the schema it was advertised; refuse a drifted table
        // rather than read columns by the wrong position.
        if provider.schema().fields() != schema.fields() {
            return plan_err!(
                "table `{table_ref}` changed schema since the sender's catalog was read; retry after it refreshes"
            );
        }
        Ok(provider)
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
pub fn decode_plan(bytes: &[u8], ctx: &SessionContext, task_ctx: &TaskContext) -> Result<LogicalPlan> {
    let catalog =
        ctx.catalog(crate::engine::CATALOG).ok_or_else(|| StrataError::Internal("default catalog missing".into()))?;
    logical_plan_from_bytes_with_extension_codec(bytes, task_ctx, &ByNameCodec::with_catalog(catalog))
        .map_err(|e| StrataError::Plan(format!("cannot decode the shipped plan: {e}")))
}
