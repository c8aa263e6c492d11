//! The background half of the router: the upstream catalog read now and then, its datasets
//! registered as upstream tables, and the configured replicas started (or restored from
//! disk at an edge, before the platform is reachable).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use strata_core::routing::{CatalogEntry, QueryOptions};
use strata_proto::v1::ListDatasetsRequest;
use tracing::{error, info, warn};

use super::{Remote, TierRouter, key};
use crate::replica::Replica;
use crate::table::UpstreamTable;
use crate::wire;

impl TierRouter {
    /// Reads the upstream's catalog now and then, registering new datasets and starting
    /// replicas. `first_catalog` holds readiness back until the first read succeeds.
    pub(super) async fn sync_catalog(
        self: Arc<Self>,
        index: usize,
        interval: Duration,
        mut first_catalog: Option<strata_core::engine::ReadinessGuard>,
    ) {
        let mut first = true;
        let mut backoff = Duration::from_millis(100);
        loop {
            let upstream = &self.upstreams[index];
            let request = ListDatasetsRequest {
                context: Some(wire::context(&QueryOptions::default(), &self.origin.tier, &self.origin.region, None)),
            };
            let wait = match upstream.client.list_datasets(request).await {
                Ok(response) => {
                    self.apply_catalog(index, response.datasets);
                    if std::mem::take(&mut first) {
                        info!(upstream = %upstream.label, "upstream catalog loaded");
                        self.report_missing_replicas();
                        drop(first_catalog.take());
                    }
                    backoff = Duration::from_millis(100);
                    interval
                }
                Err(err) => {
                    warn!(upstream = %upstream.label, error = %err, "cannot read the upstream catalog");
                    backoff = (backoff * 2).min(interval);
                    backoff
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn apply_catalog(&self, index: usize, datasets: Vec<strata_proto::v1::DatasetInfo>) {
        let upstream = &self.upstreams[index];
        let local: HashSet<String> = self.engine.datasets().into_iter().map(|d| key(&d.name)).collect();
        for info in &datasets {
            let entry = match wire::catalog_entry(info) {
                Ok(entry) => entry,
                Err(err) => {
                    warn!(error = %err, "skipping an upstream dataset");
                    continue;
                }
            };
            let name = key(&entry.name);
            if upstream.only_region.as_ref().is_some_and(|r| *r != entry.home_region)
                || (local.contains(&name) && !self.replica_configs.iter().any(|r| key(&r.name) == name))
            {
                continue;
            }
            let mut remote = self.remote.write().unwrap_or_else(|p| p.into_inner());
            let known_schema = remote.get(&name).map(|r| Arc::clone(&r.entry.schema));
            if known_schema.as_ref().is_none_or(|s| s.fields() != entry.schema.fields()) {
                let table = UpstreamTable::new(
                    entry.name.clone(),
                    Arc::clone(&entry.schema),
                    upstream.client.clone(),
                    self.origin.clone(),
                );
                if let Err(err) = self.engine.register_table(&entry.name, Arc::new(table)) {
                    warn!(dataset = %entry.name, error = %err, "cannot register an upstream dataset");
                    continue;
                }
                if known_schema.is_some() {
                    warn!(dataset = %entry.name, "upstream schema changed; the local replica restarts");
                    self.replicas.write().unwrap_or_else(|p| p.into_inner()).remove(&name);
                    strata_core::generation::advance();
                }
            }
            self.start_replica(&name, &entry, index);
            // Where a query on it runs may change: cached shortcuts by query text must be
            // planned again (see `strata_core::generation`).
            let routes_alike = remote.get(&name).is_some_and(|known| {
                known.upstream == index
                    && known.entry.home_region == entry.home_region
                    && known.entry.accelerated == entry.accelerated
            });
            remote.insert(name, Remote { entry, upstream: index });
            if !routes_alike {
                strata_core::generation::advance();
            }
        }
    }

    fn store(&self, name: &str) -> Option<crate::disk::DiskStore> {
        self.disk.as_ref().map(|(root, max)| crate::disk::DiskStore::new(root, &key(name), *max))
    }

    /// Registers and starts every replica found on disk, as the catalog saw it when stored.
    pub(super) fn restore_from_disk(&self) {
        let Some(default) = self.default_upstream else { return };
        for config in &self.replica_configs {
            let Some(store) = self.store(&config.name) else { return };
            let (manifest, schema, batches) = match store.load() {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(err) => {
                    error!(dataset = %config.name, error = %err, "cannot restore the replica from disk; it will be copied again");
                    continue;
                }
            };
            let entry = CatalogEntry {
                name: config.name.clone(),
                schema: Arc::clone(&schema),
                home_region: manifest.home_region.clone(),
                version: manifest.version,
                rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
                refreshed_at: Some(std::time::UNIX_EPOCH + Duration::from_millis(manifest.refreshed_at_unix_ms)),
                accelerated: true,
                writable: None,
                indexes: manifest.indexes.clone(),
            };
            let table = UpstreamTable::new(
                entry.name.clone(),
                Arc::clone(&schema),
                self.upstreams[default].client.clone(),
                self.origin.clone(),
            );
            if let Err(err) = self.engine.register_table(&entry.name, Arc::new(table)) {
                warn!(dataset = %entry.name, error = %err, "cannot register a restored replica");
                continue;
            }
            let name = key(&entry.name);
            self.remote
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone(), Remote { entry: entry.clone(), upstream: default });
            match Replica::with_store(
                config.clone(),
                schema,
                Some(store),
                manifest.home_region.clone(),
                &manifest.indexes,
            ) {
                Ok(replica) => {
                    let replica = Arc::new(replica);
                    replica.restore(manifest, batches);
                    let name_for_task = name.clone();
                    self.replicas.write().unwrap_or_else(|p| p.into_inner()).insert(name, Arc::clone(&replica));
                    strata_core::generation::advance();
                    let client = self.upstreams[default].client.clone();
                    let task = replica.run(client, self.origin.clone(), self.shutdown.child_token());
                    self.engine.background().spawn(format!("replica {name_for_task}"), task);
                }
                Err(err) => warn!(dataset = %entry.name, error = %err, "restored replica not started"),
            }
        }
    }

    /// A replica the platform does not list is a config mistake; say so once, by name.
    fn report_missing_replicas(&self) {
        let remote = self.remote.read().unwrap_or_else(|p| p.into_inner());
        for (i, r) in self.replica_configs.iter().enumerate() {
            if !remote.contains_key(&key(&r.name)) {
                error!(
                    "replicas[{i}]: dataset `{}` is not in the platform's catalog; nothing to replicate (queries naming it fail as unknown tables)",
                    r.name
                );
            }
        }
    }

    fn start_replica(&self, name: &str, entry: &CatalogEntry, index: usize) {
        let Some(config) = self.replica_configs.iter().find(|r| key(&r.name) == name) else { return };
        let mut replicas = self.replicas.write().unwrap_or_else(|p| p.into_inner());
        if replicas.contains_key(name) {
            return;
        }
        if !entry.accelerated {
            warn!(dataset = %entry.name, "the platform does not accelerate this dataset, so it cannot be replicated; queries on it are forwarded");
            return;
        }
        let replica = match Replica::with_store(
            config.clone(),
            Arc::clone(&entry.schema),
            self.store(name),
            entry.home_region.clone(),
            &entry.indexes,
        ) {
            Ok(r) => Arc::new(r),
            Err(err) => {
                warn!(dataset = %entry.name, error = %err, "replica not started; queries on it are forwarded");
                return;
            }
        };
        replicas.insert(name.to_string(), Arc::clone(&replica));
        strata_core::generation::advance();
        let client = self.upstreams[index].client.clone();
        let task = replica.run(client, self.origin.clone(), self.shutdown.child_token());
        self.engine.background().spawn(format!("replica {name}"), task);
    }
}
