//! Where a query runs. A tier with an upstream installs a [`Router`]; the engine asks it,
//! per query, whether to answer locally, forward the whole query, or run a mixed plan whose
//! remote tables execute upstream. Every answer carries the decision and the versions it read.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::logical_expr::LogicalPlan;
use serde::Serialize;

use crate::error::Result;

/// Where a query ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Every table was read from this tier's own copies or sources.
    Local,
    /// The whole query ran upstream.
    Forwarded,
    /// Local tables here, remote tables upstream, joined here.
    Mixed,
    /// Planned here and run by the platform's replicas together (`cluster:`).
    Distributed,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Local => "local",
            Route::Forwarded => "forwarded",
            Route::Mixed => "mixed",
            Route::Distributed => "distributed",
        }
    }
}

/// Why a query took its route; a short stable label for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteReason {
    /// Every table is served here and the query is inside every local subset.
    Local,
    /// A table is not replicated or accelerated here.
    NotAccelerated,
    /// A table is replicated here but its first copy has not arrived yet.
    ColdStart,
    /// The query may need rows outside a table's local subset.
    OutsideSubset,
    /// A table is homed in another region.
    CrossRegion,
    /// The client asked for the authoritative copy.
    StrongConsistency,
}

impl RouteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::Local => "local",
            RouteReason::NotAccelerated => "not_accelerated",
            RouteReason::ColdStart => "cold_start",
            RouteReason::OutsideSubset => "outside_subset",
            RouteReason::CrossRegion => "cross_region",
            RouteReason::StrongConsistency => "strong_consistency",
        }
    }

    pub const ALL: [RouteReason; 6] = [
        RouteReason::Local,
        RouteReason::NotAccelerated,
        RouteReason::ColdStart,
        RouteReason::OutsideSubset,
        RouteReason::CrossRegion,
        RouteReason::StrongConsistency,
    ];
}

/// One dataset version a query read, and how old it was.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionRead {
    pub dataset: String,
    /// 0 for a table read live from its source (no copy, always current).
    pub version: u64,
    /// Milliseconds since that version was made.
    pub age_ms: u64,
}

/// The route a query took, for the client (headers / metadata) and metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteInfo {
    pub route: Route,
    pub reason: RouteReason,
    /// Human-readable detail: which table and why.
    pub detail: String,
    pub versions: Vec<VersionRead>,
    /// Something the client should know about the answer (a copy past its max staleness).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// Whether the answer came from the results cache (only for answers it may hold).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<crate::results_cache::CacheStatus>,
    /// For a STALE answer: milliseconds since the oldest version it read was replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_ms: Option<u64>,
    /// The replicas a distributed query could run on (route `distributed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// The trace this answer belongs to (32 hex digits), when the query was traced here or
    /// its caller sent a trace context: what to look up in the trace store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl RouteInfo {
    pub fn local(detail: impl Into<String>) -> Self {
        Self {
            route: Route::Local,
            reason: RouteReason::Local,
            detail: detail.into(),
            versions: Vec::new(),
            warning: None,
            cache: None,
            stale_ms: None,
            workers: None,
            trace_id: None,
        }
    }

    /// A query sent whole to an upstream tier; its versions come with the answer.
    pub fn forwarded(reason: RouteReason, detail: impl Into<String>) -> Self {
        Self { route: Route::Forwarded, reason, ..Self::local(detail) }
    }

    /// `dataset=version@age_ms` pairs, comma separated: the `strata-versions` header.
    pub fn versions_header(&self) -> String {
        // Written piece by piece, the integers by itoa: this header is made for every
        // answer, and `write!` cost 885 instructions for one dataset where this costs 262.
        let mut header = String::with_capacity(self.versions.len() * 32);
        let mut digits = itoa::Buffer::new();
        for (i, v) in self.versions.iter().enumerate() {
            if i > 0 {
                header.push(',');
            }
            header.push_str(&v.dataset);
            header.push('=');
            header.push_str(digits.format(v.version));
            header.push('@');
            header.push_str(digits.format(v.age_ms));
            header.push_str("ms");
        }
        header
    }

    /// Parses [`RouteInfo::versions_header`]; malformed entries are skipped.
    pub fn parse_versions(header: &str) -> Vec<VersionRead> {
        header
            .split(',')
            .filter_map(|entry| {
                let (dataset, rest) = entry.trim().split_once('=')?;
                let (version, age) = rest.split_once('@')?;
                Some(VersionRead {
                    dataset: dataset.to_string(),
                    version: version.parse().ok()?,
                    age_ms: age.trim_end_matches("ms").parse().ok()?,
                })
            })
            .collect()
    }
}

impl fmt::Display for RouteInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}: {})", self.route.as_str(), self.reason.as_str(), self.detail)
    }
}

/// Who asks, and how: carried with a query from the client through every tier it crosses.
#[derive(Debug, Clone, Default)]
pub struct QueryOptions {
    /// Read the authoritative copy in each dataset's home region, even when a local copy exists.
    pub strong_consistency: bool,
    /// Who is asking. With `auth:` configured the server sets it from the caller's key
    /// (a client's own claim is ignored); without, it is only a label.
    pub tenant: String,
    /// The tenant another tier carried for its own client (`QueryContext.tenant`), when the
    /// caller is a tier: the answer holds only what both tenants are granted.
    pub on_behalf_of: String,
    /// W3C trace context of the caller, if any: the query's span is its child.
    pub trace: crate::trace_context::TraceParent,
    pub origin_tier: String,
    pub origin_region: String,
    /// Platforms already crossed (loop guard).
    pub hops: u32,
    /// When the caller stops waiting (a downstream tier's own deadline): the query ends by
    /// then even if `limits.query_timeout` would allow longer.
    pub deadline: Option<std::time::SystemTime>,
    /// The caller's `Cache-Control`: `no-cache`/`no-store` keep the results cache out of
    /// this query, `max-stale` accepts a stale cached answer, `only-if-cached` refuses to
    /// run it; on every tier it crosses.
    pub cache_control: crate::results_cache::CacheControl,
    /// `strata-distribute: on|off`: run this query over the platform's replicas, or only on
    /// the one that received it, whatever its size. Unset: by `cluster.distribute_above`.
    pub distribute: Option<bool>,
}

/// What the router decided for one planned query.
pub enum Routing {
    /// Run this plan here (its remote tables, if any, already point upstream).
    Run { plan: LogicalPlan, info: RouteInfo },
    /// Send the whole query to the router's upstream number `upstream`.
    Forward { info: RouteInfo, upstream: usize },
}

/// The whole client query, when it may be forwarded as written.
pub struct ForwardQuery<'a> {
    pub sql: &'a str,
    pub params: &'a [ScalarValue],
    /// The result schema as planned here; the upstream runs the same DataFusion.
    pub schema: arrow::datatypes::SchemaRef,
}

/// Decides routes and runs forwarded queries. Implemented by the tier crates; the engine
/// never sees the protocol.
#[async_trait]
pub trait Router: Send + Sync {
    /// Decides where an optimized plan runs. `can_forward` is false for plans that did not
    /// come from client SQL (sub-plans); they must run here.
    fn route(&self, plan: LogicalPlan, options: &QueryOptions, can_forward: bool) -> Result<Routing>;

    /// The forward a query takes whatever its filters say (a cross-region table, strong
    /// consistency), decided from the tables an unoptimized plan scans: such a query goes
    /// upstream without being optimized here. `None` when that is not certain; [`Router::route`]
    /// then decides on the optimized plan.
    fn forced_forward(&self, _plan: &LogicalPlan, _options: &QueryOptions) -> Result<Option<(RouteInfo, usize)>> {
        Ok(None)
    }

    /// The local copy that answers every read of `table`, whatever a query's filters say (a
    /// whole replica, loaded, of a table homed in this region, with no local writes over it
    /// and not past a `max_staleness` that refuses), with the route of an answer read from
    /// it: a key lookup on it needs no route decided on its values, so its generic plan
    /// answers it from the copy's index. `None`: route the bound plan ([`Router::route`]).
    fn whole_local_copy(
        &self,
        _table: &datafusion::common::TableReference,
        _options: &QueryOptions,
    ) -> Result<Option<(Arc<crate::accelerator::AcceleratedTable>, RouteInfo)>> {
        Ok(None)
    }

    /// Runs a whole query upstream. The returned info reports the upstream's own versions;
    /// the answer may stay as the upstream encoded it (see [`crate::encoded`]).
    async fn forward(
        &self,
        query: ForwardQuery<'_>,
        options: &QueryOptions,
        info: RouteInfo,
        upstream: usize,
        deadline: std::time::SystemTime,
    ) -> Result<(crate::encoded::Answer, RouteInfo)>;

    /// When a route decided now for a query that read `info.versions` here stops holding by
    /// the passage of time alone (a replica it read passes its `max_staleness`, and is then
    /// warned about or refused); `None`: only a change does that (see [`crate::generation`]).
    fn local_route_expires(&self, _info: &RouteInfo) -> Option<std::time::SystemTime> {
        None
    }

    /// Datasets this tier knows from upstream, for its own catalog listing.
    fn remote_catalog(&self) -> Vec<CatalogEntry>;

    /// Status of the datasets replicated here, for `/v1/datasets` and metrics.
    fn replica_statuses(&self) -> Vec<crate::dataset::DatasetStatus>;

    /// Every upstream endpoint with its circuit breaker and retry counts, for metrics.
    fn upstream_health(&self) -> Vec<UpstreamHealth> {
        Vec::new()
    }
}

/// One upstream endpoint as the metrics show it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamHealth {
    /// Which upstream (`platform`, or a peer region's label).
    pub upstream: String,
    pub endpoint: String,
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    /// Calls retried on another pick (they never reached a server), over all endpoints of
    /// this upstream, and retries the budget refused.
    pub retries: u64,
    pub retries_refused: u64,
}

/// One dataset as a tier advertises it to the tiers below.
#[derive(Debug, Clone)]
pub struct CatalogEntry {
    pub name: String,
    pub schema: arrow::datatypes::SchemaRef,
    pub home_region: String,
    /// 0 when no copy is loaded.
    pub version: u64,
    pub rows: u64,
    pub refreshed_at: Option<std::time::SystemTime>,
    /// Whether downstream tiers can replicate it.
    pub accelerated: bool,
    /// Whether it accepts edge writes; `None` when the tier that listed it did not say.
    pub writable: Option<bool>,
    /// The keys its accelerated copy is indexed on, as column names.
    pub indexes: Vec<Vec<String>>,
}

/// The dataset a table reference names: `table`, or `schema.table` outside the default schema.
pub fn dataset_name(table: &datafusion::common::TableReference) -> String {
    match table.schema() {
        Some(schema) if schema != crate::engine::DEFAULT_SCHEMA => format!("{schema}.{}", table.table()),
        _ => table.table().to_string(),
    }
}

/// Names of the tables a plan scans, lower-cased, without catalog/schema when it is the default.
pub fn scanned_tables(plan: &LogicalPlan) -> Vec<String> {
    let mut names = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let name = dataset_name(&scan.table_name);
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    names
}

/// A shared router handle.
pub type SharedRouter = Arc<dyn Router>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_header_round_trips() {
        let mut info = RouteInfo::local("x");
        info.versions = vec![
            VersionRead { dataset: "orders".into(), version: 7, age_ms: 1200 },
            VersionRead { dataset: "eu.sensors".into(), version: 0, age_ms: 0 },
        ];
        let header = info.versions_header();
        assert_eq!(header, "orders=7@1200ms,eu.sensors=0@0ms");
        assert_eq!(RouteInfo::parse_versions(&header), info.versions);
        assert!(RouteInfo::parse_versions("garbage,orders=x@1ms").is_empty());
    }
}
