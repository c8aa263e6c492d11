//! A platform's side of edge uploads: batches an edge agent uploaded are applied to their
//! dataset's PostgreSQL table exactly once per `(edge_id, seq)` (see [`crate::sink`]) and,
//! when the dataset is accelerated, appended to its local copy at once.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;

use crate::dataset::Dataset;
use crate::error::{Result, StrataError};
use crate::sink::{Applied, EdgeBatch, PostgresSink};

/// The writers of a platform's `writable` datasets, by lower-cased name.
pub(crate) struct EdgeIngest {
    sinks: HashMap<String, Arc<PostgresSink>>,
}

impl EdgeIngest {
    pub(crate) fn new(config: &crate::Config) -> Self {
        let sinks = config
            .datasets
            .iter()
            .filter_map(|d| PostgresSink::new(d).map(|s| (d.name.to_ascii_lowercase(), Arc::new(s))))
            .collect();
        EdgeIngest { sinks }
    }

    /// Whether `dataset` takes edge writes here (the catalog's `writable`).
    pub(crate) fn accepts(&self, dataset: &str) -> bool {
        self.sinks.contains_key(&dataset.to_ascii_lowercase())
    }

    /// Applies consecutive uploaded batches; runs of one dataset share a transaction, and the
    /// result is per request. `find` looks a configured dataset up by name.
    pub(crate) async fn apply<'a>(
        &self,
        edge_id: &str,
        batches: Vec<(u64, String, Vec<RecordBatch>)>,
        find: impl Fn(&str) -> Option<&'a Arc<Dataset>>,
    ) -> Result<Applied> {
        let mut total = Applied::default();
        let mut offset = 0;
        let mut batches = batches.into_iter().peekable();
        while let Some((seq, dataset, rows)) = batches.next() {
            let mut run = vec![(seq, rows)];
            while let Some((seq, _, rows)) = batches.next_if(|(_, d, _)| d.eq_ignore_ascii_case(&dataset)) {
                run.push((seq, rows));
            }
            let applied = self.apply_run(edge_id, &dataset, find(&dataset), run.clone()).await?;
            total.fresh.extend(applied.fresh.iter().map(|i| i + offset));
            total.rows += applied.rows;
            offset += run.len();
        }
        Ok(total)
    }

    async fn apply_run(
        &self,
        edge_id: &str,
        dataset: &str,
        ds: Option<&Arc<Dataset>>,
        mut run: Vec<EdgeBatch>,
    ) -> Result<Applied> {
        let sink = self.sinks.get(&dataset.to_ascii_lowercase()).ok_or_else(|| {
            StrataError::NotSupported(format!(
                "dataset `{dataset}` does not accept edge writes (set `writable: true` on a PostgreSQL dataset)"
            ))
        })?;
        let ds = ds.ok_or_else(|| StrataError::UnknownDataset(dataset.to_string()))?;
        if let Some(provider) = ds.provider() {
            let expected = provider.schema();
            for (_, batches) in &mut run {
                *batches = batches
                    .iter()
                    .map(|b| crate::writes::conform(b, &expected, dataset))
                    .collect::<Result<Vec<_>>>()?;
            }
        }
        let applied = sink.apply(edge_id, &run).await?;
        let added: Vec<RecordBatch> = applied.fresh.iter().flat_map(|i| std::mem::take(&mut run[*i].1)).collect();
        if let Some(first) = added.first() {
            // One batch per upload keeps the copy's batch count proportional to uploads, not writes.
            let one = arrow::compute::concat_batches(&first.schema(), &added)?;
            ds.append_rows(vec![one]).await;
        }
        Ok(applied)
    }
}
