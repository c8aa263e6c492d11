//! The query-path half of the router: per scan, whether a local replica can answer it
//! (replicated, loaded, inside its subset, fresh enough) or it must read upstream; per
//! query, from those scans, whether it runs here, mixed, or is forwarded whole.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use datafusion::common::TableReference;
use datafusion::common::tree_node::Transformed;
use datafusion::datasource::provider_as_source;
use datafusion::logical_expr::{Expr, LogicalPlan};
use strata_core::StrataError;
use strata_core::accelerator::AcceleratedTable;
use strata_core::routing::{
    QueryOptions, Route, RouteInfo, RouteReason, Routing, VersionRead, dataset_name, scanned_tables,
};

use super::{MAX_HOPS, Remote, TierRouter, key};
use crate::replica::Replica;
use crate::table::WithLocalWrites;

/// A route decision for one scan.
enum ScanRoute {
    Local(Arc<Replica>),
    Remote { reason: RouteReason, detail: String, forces_forward: bool },
}

fn check_hops(options: &QueryOptions) -> strata_core::Result<()> {
    if options.hops > MAX_HOPS {
        return Err(StrataError::Plan(format!("query crossed more than {MAX_HOPS} platforms; check `peers:`")));
    }
    Ok(())
}

impl TierRouter {
    /// Routes an optimized plan: each remote scan is pointed at a local replica when one can
    /// answer it; the first scan that cannot names the reason the query leaves this tier.
    /// `can_forward` is false for sub-plans, which must run here.
    pub(super) fn decide(
        &self,
        plan: LogicalPlan,
        options: &QueryOptions,
        can_forward: bool,
    ) -> strata_core::Result<Routing> {
        check_hops(options)?;
        let remote = self.remote.read().unwrap_or_else(|p| p.into_inner());
        let replicas = self.replicas.read().unwrap_or_else(|p| p.into_inner());
        let local_writes = self.local_writes.read().unwrap_or_else(|p| p.into_inner());
        let mut with_local_writes = false;
        let mut stale_warning: Option<String> = None;
        let mut local_scans = 0usize;
        let mut remote_upstreams = HashSet::new();
        let mut first_miss: Option<(RouteReason, String)> = None;
        let mut forced: Option<(RouteReason, String)> = None;
        let mut versions: Vec<VersionRead> = Vec::new();
        let now = SystemTime::now();
        let age = |t: Option<SystemTime>| t.map_or(0, |t| now.duration_since(t).unwrap_or_default().as_millis() as u64);

        let plan = plan
            .transform_up_with_subqueries(|node| {
                let LogicalPlan::TableScan(mut scan) = node else { return Ok(Transformed::no(node)) };
                let name = dataset_name(&scan.table_name);
                let name_key = key(&name);
                let Some(r) = remote.get(&name_key) else {
                    local_scans += 1;
                    return Ok(Transformed::no(LogicalPlan::TableScan(scan)));
                };
                let (decision, stale) = self
                    .scan_route(&name, r, replicas.get(&name_key), &scan.filters, options)
                    .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
                if stale.is_some() {
                    stale_warning = stale;
                }
                // Rows written here and not yet confirmed upstream are read along with the table.
                let with_local = match local_writes.get(&name_key) {
                    None => None,
                    Some(rows) => {
                        with_local_writes = true;
                        let base: Arc<dyn datafusion::catalog::TableProvider> = match &decision {
                            ScanRoute::Local(replica) => replica.table(),
                            ScanRoute::Remote { .. } => {
                                datafusion::catalog::default_table_source::source_as_provider(&scan.source)?
                            }
                        };
                        Some(provider_as_source(Arc::new(WithLocalWrites::new(base, Arc::clone(rows)))))
                    }
                };
                match decision {
                    ScanRoute::Local(replica) => {
                        local_scans += 1;
                        if let Some(s) = replica.snapshot() {
                            versions.push(VersionRead {
                                dataset: replica.name().to_string(),
                                version: s.version,
                                age_ms: age(Some(s.refreshed_at)),
                            });
                        }
                        scan.source = with_local.unwrap_or_else(|| provider_as_source(replica.table()));
                        Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
                    }
                    ScanRoute::Remote { reason, detail, forces_forward } => {
                        if let Some(source) = with_local {
                            scan.source = source;
                        }
                        remote_upstreams.insert(r.upstream);
                        versions.push(VersionRead {
                            dataset: r.entry.name.clone(),
                            version: r.entry.version,
                            age_ms: age(r.entry.refreshed_at),
                        });
                        if forces_forward && forced.is_none() {
                            forced = Some((reason, detail));
                        } else if first_miss.is_none() {
                            first_miss = Some((reason, detail));
                        }
                        Ok(Transformed::no(LogicalPlan::TableScan(scan)))
                    }
                }
            })?
            .data;

        let Some((reason, detail)) = forced.clone().or(first_miss) else {
            let mut info = RouteInfo::local("every table is answered from this tier's copies");
            info.versions = versions;
            info.warning = stale_warning;
            return Ok(Routing::Run { plan, info });
        };
        let single_upstream = (local_scans == 0 && remote_upstreams.len() == 1)
            .then(|| remote_upstreams.iter().next().copied())
            .flatten();
        let target = match (forced.is_some(), self.default_upstream, single_upstream) {
            (true, Some(default), _) => Some(default),
            (_, _, Some(single)) => Some(single),
            _ => None,
        };
        match target {
            Some(upstream) if can_forward && !with_local_writes => {
                Ok(Routing::Forward { info: RouteInfo::forwarded(reason, detail), upstream })
            }
            _ => Ok(Routing::Run {
                plan,
                info: RouteInfo {
                    route: Route::Mixed,
                    reason,
                    detail,
                    versions,
                    warning: stale_warning,
                    ..RouteInfo::local("")
                },
            }),
        }
    }

    /// Reads only the scanned names: see [`strata_core::routing::Router::forced_forward`].
    pub(super) fn decide_forced(
        &self,
        plan: &LogicalPlan,
        options: &QueryOptions,
    ) -> strata_core::Result<Option<(RouteInfo, usize)>> {
        check_hops(options)?;
        let remote = self.remote.read().unwrap_or_else(|p| p.into_inner());
        let local_writes = self.local_writes.read().unwrap_or_else(|p| p.into_inner());
        let mut forced = None;
        let mut upstreams = HashSet::new();
        let mut unforced_scans = 0usize;
        for name in scanned_tables(plan) {
            let name_key = key(&name);
            if local_writes.contains_key(&name_key) {
                return Ok(None);
            }
            match remote.get(&name_key) {
                Some(r) => match self.forced_reason(&name, r, options) {
                    Some(reason) => {
                        upstreams.insert(r.upstream);
                        forced.get_or_insert(reason);
                    }
                    None => unforced_scans += 1,
                },
                None => unforced_scans += 1,
            }
        }
        let Some((reason, detail)) = forced else { return Ok(None) };
        let single_upstream = (unforced_scans == 0 && upstreams.len() == 1).then(|| upstreams.into_iter().next());
        let Some(upstream) = self.default_upstream.or(single_upstream.flatten()) else { return Ok(None) };
        Ok(Some((RouteInfo::forwarded(reason, detail), upstream)))
    }

    /// The whole, loaded replica of `table` that answers a read of it whatever its filters,
    /// or `None` when the route depends on them (a subset), on another tier (not replicated,
    /// cold, forced upstream), or on rows written here. See
    /// [`strata_core::routing::Router::whole_local_copy`].
    pub(super) fn decide_whole_copy(
        &self,
        table: &TableReference,
        options: &QueryOptions,
    ) -> strata_core::Result<Option<(Arc<AcceleratedTable>, RouteInfo)>> {
        check_hops(options)?;
        let name = dataset_name(table);
        let name_key = key(&name);
        // The locks in the order `decide` takes them.
        let remote = self.remote.read().unwrap_or_else(|p| p.into_inner());
        let replicas = self.replicas.read().unwrap_or_else(|p| p.into_inner());
        let local_writes = self.local_writes.read().unwrap_or_else(|p| p.into_inner());
        let (Some(r), Some(replica)) = (remote.get(&name_key), replicas.get(&name_key)) else { return Ok(None) };
        if replica.predicate_sql().is_some() || local_writes.contains_key(&name_key) {
            return Ok(None);
        }
        let (ScanRoute::Local(replica), warning) = self.scan_route(&name, r, Some(replica), &[], options)? else {
            return Ok(None);
        };
        let Some(snapshot) = replica.snapshot() else { return Ok(None) };
        let mut info = RouteInfo::local("every table is answered from this tier's copies");
        info.versions = vec![VersionRead {
            dataset: replica.name().to_string(),
            version: snapshot.version,
            age_ms: snapshot.refreshed_at.elapsed().unwrap_or_default().as_millis() as u64,
        }];
        info.warning = warning;
        Ok(Some((replica.table(), info)))
    }

    /// Why a scan of remote table `name` must go upstream whatever the query's filters say.
    fn forced_reason(&self, name: &str, r: &Remote, options: &QueryOptions) -> Option<(RouteReason, String)> {
        if r.entry.home_region != self.origin.region {
            Some((RouteReason::CrossRegion, format!("`{name}` is homed in region `{}`", r.entry.home_region)))
        } else if options.strong_consistency {
            Some((RouteReason::StrongConsistency, "the client asked for strong consistency".into()))
        } else {
            None
        }
    }

    /// Where one scan of remote table `name` reads, and the staleness warning of a local
    /// replica past its `max_staleness` (one set to refuse fails the query instead).
    fn scan_route(
        &self,
        name: &str,
        r: &Remote,
        replica: Option<&Arc<Replica>>,
        filters: &[Expr],
        options: &QueryOptions,
    ) -> strata_core::Result<(ScanRoute, Option<String>)> {
        if let Some((reason, detail)) = self.forced_reason(name, r, options) {
            return Ok((ScanRoute::Remote { reason, detail, forces_forward: true }, None));
        }
        let remote = |reason, detail| Ok((ScanRoute::Remote { reason, detail, forces_forward: false }, None));
        match replica {
            None => remote(RouteReason::NotAccelerated, format!("`{name}` is not replicated here")),
            Some(replica) if replica.snapshot().is_none() => {
                remote(RouteReason::ColdStart, format!("the first copy of `{name}` has not arrived yet"))
            }
            Some(replica) if !replica.covers(filters) => remote(
                RouteReason::OutsideSubset,
                format!(
                    "the query may need rows of `{name}` outside the local subset `{}`",
                    replica.predicate_sql().unwrap_or_default()
                ),
            ),
            Some(replica) => {
                let stale = match replica.staleness() {
                    Some(message) if replica.on_stale() == strata_core::config::OnStale::Refuse => {
                        return Err(StrataError::DatasetUnavailable { name: name.to_string(), reason: message });
                    }
                    stale => stale,
                };
                Ok((ScanRoute::Local(Arc::clone(replica)), stale))
            }
        }
    }
}
