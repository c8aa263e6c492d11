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

    /// The provider this tier serves under `table_ref`, if any.
    pub fn lookup(&self, table_ref: &TableReference) -> Option<Arc<dyn TableProvider>> {
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

/// Deserializes a shipped plan against the tables of `ctx`'s default catalog, and refuses
/// it unless every leaf is a table of that catalog resolved by name (see [`check_leaves`]).
///
/// datafusion-proto decodes file scans, views and inline values itself, without asking our
/// codec, and some of its decoders panic on malformed input (an empty CSV delimiter): a
/// panic while decoding is caught here and reported as a bad plan, never as a crash.
pub fn decode_plan(bytes: &[u8], ctx: &SessionContext, task_ctx: &TaskContext) -> Result<LogicalPlan> {
    let catalog =
        ctx.catalog(crate::engine::CATALOG).ok_or_else(|| StrataError::Internal("default catalog missing".into()))?;
    let codec = ByNameCodec::with_catalog(Arc::clone(&catalog));
    let decoded =
        crate::contained_panic::contain(|| logical_plan_from_bytes_with_extension_codec(bytes, task_ctx, &codec))
            .map_err(|_| StrataError::InvalidRequest("the shipped plan is malformed (its decoder failed)".into()))?;
    let plan = decoded.map_err(|e| StrataError::InvalidRequest(format!("cannot decode the shipped plan: {e}")))?;
    check_leaves(&plan, &codec)?;
    Ok(plan)
}

/// Refuses a plan unless each of its leaves (subqueries included) is a scan of a table this
/// tier serves, the very provider its catalog holds under that name, or an empty relation.
/// A shipped plan that scans files, memory tables, views or inline values could read
/// anything the process can (`/etc/passwd`) or carry data of any size.
pub fn check_leaves(plan: &LogicalPlan, codec: &ByNameCodec) -> Result<()> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut refused: Option<String> = None;
    plan.apply_with_subqueries(|node| {
        let problem = match node {
            LogicalPlan::TableScan(scan) => {
                let served = codec.lookup(&scan.table_name);
                let provider = datafusion::catalog::default_table_source::source_as_provider(&scan.source).ok();
                match (served, provider) {
                    (Some(served), Some(provider)) if Arc::ptr_eq(&served, &provider) => None,
                    (_, provider) => Some(format!(
                        "a scan of `{}` that is not this tier's table of that name ({})",
                        scan.table_name,
                        provider.map_or_else(|| "an unknown source".to_string(), |p| leaf_kind(p.as_ref()))
                    )),
                }
            }
            LogicalPlan::Values(_) => Some("inline VALUES".to_string()),
            LogicalPlan::Extension(_) => Some("an extension node".to_string()),
            LogicalPlan::RecursiveQuery(_) => Some("a recursive query".to_string()),
            _ => None,
        };
        if let Some(problem) = problem {
            refused = Some(problem);
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    match refused {
        Some(problem) => Err(StrataError::InvalidRequest(format!(
            "shipped plans may only read tables of this tier's catalog by name; refused {problem}"
        ))),
        None => Ok(()),
    }
}

/// A short name of a table provider's kind, for the error that refuses it.
fn leaf_kind(provider: &dyn TableProvider) -> String {
    use datafusion::datasource::listing::ListingTable;
    use datafusion::datasource::{MemTable, ViewTable};
    if let Some(listing) = provider.downcast_ref::<ListingTable>() {
        let paths: Vec<String> = listing.table_paths().iter().map(|p| p.to_string()).collect();
        format!("a file scan of {}", paths.join(", "))
    } else if provider.downcast_ref::<MemTable>().is_some() {
        "an inline memory table".to_string()
    } else if provider.downcast_ref::<ViewTable>().is_some() {
        "a view".to_string()
    } else {
        format!("a {:?} table", provider.table_type())
    }
}
