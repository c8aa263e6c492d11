//! Zone maps: the min, max and null count of every column of every batch of a snapshot,
//! computed once when the snapshot is made, so a scan skips the batches its filters rule
//! out. A lookup by key then reads the one batch whose range holds the key instead of the
//! whole copy, and a range filter on a time column reads only the batches of that range.
//!
//! The statistics feed DataFusion's own `PruningPredicate` (the one that prunes Parquet row
//! groups), so every predicate it understands (comparisons, `IN`, `BETWEEN`, `IS NULL`,
//! conjunctions and disjunctions of those) prunes here too.
//!
//! They also tell which columns ascend through the whole snapshot (data loaded in key or
//! time order usually does): a scan declares that order, and DataFusion then aggregates,
//! sorts and merges such a column as a stream instead of through a hash table or a sort.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::stats::Precision;
use datafusion::common::{Column, ColumnStatistics, DFSchema, ScalarValue, pruning::PruningStatistics};
use datafusion::functions_aggregate::min_max::{MaxAccumulator, MinAccumulator};
use datafusion::logical_expr::{Accumulator, Expr, utils::conjunction};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::pruning::PruningPredicateBuilder;

/// Statistics of one batch: per column `(min, max)`, `None` where the type has no tracked
/// order (nested types) or the column is all null; and per column the null count.
#[derive(Debug)]
pub struct BatchZone {
    bounds: Vec<Option<(ScalarValue, ScalarValue)>>,
    nulls: Vec<u64>,
    rows: u64,
    /// Per column: whether its values never decrease from one row to the next, checked the
    /// first time a snapshot asks (only for columns whose bounds already ascend).
    ascending: Vec<OnceLock<bool>>,
}

impl BatchZone {
    /// Reads one pass over every column of `batch`.
    pub fn of(batch: &RecordBatch) -> Self {
        let bounds = batch.columns().iter().map(bounds_of).collect();
        let nulls = batch.columns().iter().map(|c| c.null_count() as u64).collect();
        let ascending = batch.columns().iter().map(|_| OnceLock::new()).collect();
        Self { bounds, nulls, rows: batch.num_rows() as u64, ascending }
    }

    /// Whether `column` of `batch` (the batch this zone describes) holds no value smaller
    /// than the one before it.
    fn ascends(&self, batch: &RecordBatch, column: usize) -> bool {
        let Some(once) = self.ascending.get(column) else { return false };
        *once.get_or_init(|| {
            let Some(values) = batch.columns().get(column) else { return false };
            let rows = values.len();
            if rows < 2 {
                return true;
            }
            // Any row smaller than its predecessor breaks the order.
            arrow::compute::kernels::cmp::lt(&values.slice(1, rows - 1), &values.slice(0, rows - 1))
                .is_ok_and(|dropped| dropped.true_count() == 0)
        })
    }
}

/// Types whose ascending order DataFusion's sort and Arrow's comparison kernels agree on and
/// which a zone's min and max bound exactly. Floats are left out (NaN and signed zeros order
/// differently in min/max and in sorts), and so are intervals (no total order).
fn declarable_order(data_type: &DataType) -> bool {
    orderable(data_type) && !data_type.is_floating() && !matches!(data_type, DataType::Interval(_))
}

fn orderable(data_type: &DataType) -> bool {
    data_type.is_primitive()
        || matches!(
            data_type,
            DataType::Boolean
                | DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Binary
                | DataType::LargeBinary
                | DataType::BinaryView
                | DataType::FixedSizeBinary(_)
        )
}

fn bounds_of(column: &ArrayRef) -> Option<(ScalarValue, ScalarValue)> {
    if !orderable(column.data_type()) || column.null_count() == column.len() {
        return None;
    }
    let mut min = MinAccumulator::try_new(column.data_type()).ok()?;
    let mut max = MaxAccumulator::try_new(column.data_type()).ok()?;
    min.update_batch(std::slice::from_ref(column)).ok()?;
    max.update_batch(std::slice::from_ref(column)).ok()?;
    Some((min.evaluate().ok()?, max.evaluate().ok()?))
}

/// The zone maps of one snapshot, computed on its first scan (a copy restored
/// from disk is not read whole at start-up for them) and reusing the zones of the snapshot
/// it appended to.
#[derive(Debug, Default)]
pub struct ZoneMaps {
    /// Zones of leading batches, known from the snapshot this one appended to.
    known: Vec<Arc<BatchZone>>,
    built: OnceLock<Built>,
    /// The whole snapshot's column statistics, folded once.
    table: OnceLock<Arc<Vec<ColumnStatistics>>>,
    /// Columns that ascend through the whole snapshot, found once.
    ascending: OnceLock<Vec<usize>>,
}

#[derive(Debug)]
struct Built {
    zones: Vec<Arc<BatchZone>>,
    arrays: ZoneArrays,
}

/// The zones of a run of batches as one array per statistic and column, one entry per batch:
/// what a [`PruningPredicate`](datafusion::physical_optimizer::pruning::PruningPredicate)
/// evaluates.
#[derive(Debug)]
struct ZoneArrays {
    /// Per column: (min per batch, max per batch, null count per batch).
    columns: Vec<(Option<ArrayRef>, Option<ArrayRef>, ArrayRef)>,
    rows: ArrayRef,
    batches: usize,
}

impl ZoneArrays {
    fn of(schema: &SchemaRef, zones: &[Arc<BatchZone>]) -> Self {
        let columns = schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, field)| {
                let side = |pick: fn(&(ScalarValue, ScalarValue)) -> &ScalarValue| -> Option<ArrayRef> {
                    if zones.iter().all(|z| z.bounds.get(i).is_none_or(Option::is_none)) {
                        return None;
                    }
                    let values = zones.iter().map(|z| match z.bounds.get(i).and_then(Option::as_ref) {
                        Some(b) => pick(b).clone(),
                        None => ScalarValue::try_from(field.data_type()).unwrap_or(ScalarValue::Null),
                    });
                    ScalarValue::iter_to_array(values).ok().filter(|a| a.data_type() == field.data_type())
                };
                let nulls: ArrayRef = Arc::new(UInt64Array::from_iter_values(
                    zones.iter().map(|z| z.nulls.get(i).copied().unwrap_or(z.rows)),
                ));
                (side(|b| &b.0), side(|b| &b.1), nulls)
            })
            .collect();
        let rows = Arc::new(UInt64Array::from_iter_values(zones.iter().map(|z| z.rows)));
        Self { columns, rows, batches: zones.len() }
    }
}

/// Longest `IN` list a pruning predicate expands into per-value range checks. A join's
/// runtime filter is an `IN` list of its build side's keys when that side is small; past
/// this many values only the filter's min/max bounds prune.
const MAX_PRUNING_IN_LIST: usize = 1024;

/// Which of the batches `zones` describe may hold rows matching `predicate`, a physical
/// expression over `predicate_schema` whose columns are `table_schema`'s by name (a scan's
/// projection). Dynamic parts (a join's runtime filter) are read as they are now. `None`
/// when the predicate cannot rule a batch out.
pub fn zones_matching(
    table_schema: &SchemaRef,
    zones: &[Arc<BatchZone>],
    predicate: Arc<dyn PhysicalExpr>,
    predicate_schema: &SchemaRef,
) -> Option<Vec<bool>> {
    let pruning = PruningPredicateBuilder::new()
        .with_file_schema(Arc::clone(predicate_schema))
        .with_max_in_list_size(MAX_PRUNING_IN_LIST)
        .build(predicate)?;
    let arrays = ZoneArrays::of(table_schema, zones);
    let stats = SnapshotStatistics { schema: table_schema, arrays: &arrays };
    pruning.prune(&stats).ok().filter(|keep| keep.len() == zones.len())
}

impl ZoneMaps {
    /// Zone maps whose leading batches are described by `known`.
    pub fn new(known: &[Arc<BatchZone>]) -> Self {
        Self { known: known.to_vec(), built: OnceLock::new(), table: OnceLock::new(), ascending: OnceLock::new() }
    }

    /// The columns (positions in `schema`) whose values never decrease from the first row of
    /// the first batch to the last row of the last: no nulls, each batch ascending, and each
    /// batch starting at or above where the one before ended. Any subsequence of the batches
    /// (what one partition of a scan reads, or what pruning keeps) ascends too, so a scan may
    /// declare this order for every partition.
    ///
    /// Found from the zones first (a column whose batches' ranges overlap is out at once);
    /// only the columns that pass are checked row by row, once per batch and kept with its
    /// zone, so a snapshot that appended checks only its new batches.
    pub fn ascending_columns(&self, schema: &SchemaRef, batches: &[RecordBatch]) -> &[usize] {
        self.ascending.get_or_init(|| {
            let built = self.built(schema, batches);
            let zones = &built.zones;
            if zones.len() != batches.len() {
                return Vec::new();
            }
            let bounds_ascend = |column: usize| {
                let mut previous_max: Option<&ScalarValue> = None;
                for zone in zones {
                    if zone.nulls.get(column).is_none_or(|n| *n > 0) {
                        return false;
                    }
                    let Some(Some((min, max))) = zone.bounds.get(column) else { return false };
                    if previous_max.is_some_and(|p| {
                        !matches!(p.partial_cmp(min), Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal))
                    }) {
                        return false;
                    }
                    previous_max = Some(max);
                }
                true
            };
            schema
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, field)| declarable_order(field.data_type()))
                .map(|(column, _)| column)
                .filter(|&column| bounds_ascend(column))
                .filter(|&column| zones.iter().zip(batches).all(|(zone, batch)| zone.ascends(batch, column)))
                .collect()
        })
    }

    /// The per-batch zones computed so far, to carry over into a snapshot that appends.
    pub fn zones(&self) -> &[Arc<BatchZone>] {
        self.built.get().map_or(&self.known, |b| &b.zones)
    }

    fn built(&self, schema: &SchemaRef, batches: &[RecordBatch]) -> &Built {
        self.built.get_or_init(|| {
            let mut zones: Vec<Arc<BatchZone>> = self.known.iter().take(batches.len()).cloned().collect();
            zones.extend(batches[zones.len()..].iter().map(|b| Arc::new(BatchZone::of(b))));
            let arrays = ZoneArrays::of(schema, &zones);
            Built { zones, arrays }
        })
    }

    /// Per column of `schema`, the min and max of the batches `keep` marks (every batch when
    /// `None`), folded from their zones: what a scan reports to the planner, which
    /// estimates join sizes from them and so picks a join's build side as it does over
    /// Parquet (whose footers carry the same bounds). Inexact, since a scan may stop early.
    /// Null counts and distinct counts are left to the scan (it counts nulls exactly).
    pub fn column_statistics(
        &self,
        schema: &SchemaRef,
        batches: &[RecordBatch],
        keep: Option<&[bool]>,
    ) -> Arc<Vec<ColumnStatistics>> {
        if keep.is_none_or(|k| k.iter().all(|b| *b))
            && let Some(table) = self.table.get()
        {
            return Arc::clone(table);
        }
        let built = self.built(schema, batches);
        let mask = keep.filter(|k| k.len() == built.zones.len()).map(|k| BooleanArray::from(k.to_vec()));
        let fold = |side: &Option<ArrayRef>, accumulator: Option<Box<dyn Accumulator>>| -> Precision<ScalarValue> {
            let (Some(values), Some(mut accumulator)) = (side, accumulator) else { return Precision::Absent };
            let values = match &mask {
                Some(mask) => match arrow::compute::filter(values, mask) {
                    Ok(kept) => kept,
                    Err(_) => return Precision::Absent,
                },
                None => Arc::clone(values),
            };
            match accumulator.update_batch(&[values]).and_then(|_| accumulator.evaluate()) {
                Ok(value) if !value.is_null() => Precision::Inexact(value),
                _ => Precision::Absent,
            }
        };
        let statistics: Vec<ColumnStatistics> = schema
            .fields()
            .iter()
            .zip(&built.arrays.columns)
            .map(|(field, (min, max, _))| {
                let data_type = field.data_type();
                let min_acc = MinAccumulator::try_new(data_type).ok().map(|a| Box::new(a) as Box<dyn Accumulator>);
                let max_acc = MaxAccumulator::try_new(data_type).ok().map(|a| Box::new(a) as Box<dyn Accumulator>);
                let mut column = ColumnStatistics::new_unknown();
                column.min_value = fold(min, min_acc);
                column.max_value = fold(max, max_acc);
                column
            })
            .collect();
        let statistics = Arc::new(statistics);
        if mask.is_none() {
            let _ = self.table.set(Arc::clone(&statistics));
        }
        statistics
    }

    /// Which of `batches` may hold rows matching every one of `filters` (all of them when
    /// the filters cannot be used for pruning). Never drops a batch that could match.
    pub fn keep(
        &self,
        state: &dyn Session,
        schema: &SchemaRef,
        batches: &[RecordBatch],
        filters: &[Expr],
    ) -> Vec<bool> {
        let all = vec![true; batches.len()];
        let Some(predicate) = conjunction(filters.iter().cloned()) else { return all };
        let Ok(df_schema) = DFSchema::try_from(Arc::clone(schema)) else { return all };
        let Ok(physical) = state.create_physical_expr(predicate, &df_schema) else { return all };
        let Some(pruning) = PruningPredicateBuilder::new().with_file_schema(Arc::clone(schema)).build(physical) else {
            return all;
        };
        let stats = SnapshotStatistics { schema, arrays: &self.built(schema, batches).arrays };
        pruning.prune(&stats).ok().filter(|keep| keep.len() == batches.len()).unwrap_or(all)
    }
}

struct SnapshotStatistics<'a> {
    schema: &'a SchemaRef,
    arrays: &'a ZoneArrays,
}

impl SnapshotStatistics<'_> {
    fn column(&self, column: &Column) -> Option<&(Option<ArrayRef>, Option<ArrayRef>, ArrayRef)> {
        let index = self.schema.index_of(&column.name).ok()?;
        self.arrays.columns.get(index)
    }
}

impl PruningStatistics for SnapshotStatistics<'_> {
    fn min_values(&self, column: &Column) -> Option<ArrayRef> {
        self.column(column)?.0.clone()
    }

    fn max_values(&self, column: &Column) -> Option<ArrayRef> {
        self.column(column)?.1.clone()
    }

    fn num_containers(&self) -> usize {
        self.arrays.batches
    }

    fn null_counts(&self, column: &Column) -> Option<ArrayRef> {
        Some(Arc::clone(&self.column(column)?.2))
    }

    fn row_counts(&self) -> Option<ArrayRef> {
        Some(Arc::clone(&self.arrays.rows))
    }

    fn contained(&self, _column: &Column, _values: &HashSet<ScalarValue>) -> Option<BooleanArray> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use datafusion::logical_expr::{col, lit};
    use datafusion::prelude::SessionContext;

    fn batches() -> (SchemaRef, Vec<RecordBatch>) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let batch = |from: i64| {
            let ids: Vec<i64> = (from..from + 100).collect();
            let names: Vec<Option<String>> = ids.iter().map(|i| (i % 7 != 0).then(|| format!("n{i:05}"))).collect();
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(Int64Array::from(ids)), Arc::new(StringArray::from(names))],
            )
            .expect("batch")
        };
        (Arc::clone(&schema), vec![batch(0), batch(100), batch(200)])
    }

    #[test]
    fn keeps_only_batches_that_may_match() {
        let (schema, data) = batches();
        let maps = ZoneMaps::new(&[]);
        let state = SessionContext::new().state();
        let keep = |filter: Expr| maps.keep(&state, &schema, &data, &[filter]);
        assert_eq!(keep(col("id").eq(lit(150i64))), vec![false, true, false]);
        assert_eq!(keep(col("id").gt_eq(lit(199i64))), vec![false, true, true]);
        assert_eq!(keep(col("id").in_list(vec![lit(5i64), lit(250i64)], false)), vec![true, false, true]);
        assert_eq!(keep(col("name").eq(lit("n00150"))), vec![false, true, false]);
        assert_eq!(keep(col("id").eq(lit(1000i64))), vec![false, false, false]);
        // Not prunable: every batch is kept.
        assert_eq!(keep((col("id") % lit(2i64)).eq(lit(0i64))), vec![true; 3]);
        assert_eq!(maps.keep(&state, &schema, &data, &[]), vec![true; 3]);
    }

    #[test]
    fn column_statistics_fold_the_zones_of_the_kept_batches() {
        let (schema, data) = batches();
        let maps = ZoneMaps::new(&[]);
        let all = maps.column_statistics(&schema, &data, None);
        assert_eq!(all[0].min_value, Precision::Inexact(ScalarValue::Int64(Some(0))));
        assert_eq!(all[0].max_value, Precision::Inexact(ScalarValue::Int64(Some(299))));
        assert_eq!(all[1].min_value, Precision::Inexact(ScalarValue::Utf8(Some("n00001".into()))));
        assert_eq!(all[1].max_value, Precision::Inexact(ScalarValue::Utf8(Some("n00299".into()))));
        assert!(Arc::ptr_eq(&all, &maps.column_statistics(&schema, &data, None)), "folded once");
        let middle = maps.column_statistics(&schema, &data, Some(&[false, true, false]));
        assert_eq!(middle[0].min_value, Precision::Inexact(ScalarValue::Int64(Some(100))));
        assert_eq!(middle[0].max_value, Precision::Inexact(ScalarValue::Int64(Some(199))));
    }

    #[test]
    fn appended_snapshots_reuse_known_zones() {
        let (schema, data) = batches();
        let state = SessionContext::new().state();
        let first = ZoneMaps::new(&[]);
        assert_eq!(first.keep(&state, &schema, &data[..2], &[col("id").eq(lit(50i64))]), vec![true, false]);
        let second = ZoneMaps::new(first.zones());
        assert_eq!(second.keep(&state, &schema, &data, &[col("id").eq(lit(250i64))]), vec![false, false, true]);
        assert!(Arc::ptr_eq(&first.zones()[0], &second.zones()[0]));
    }

    /// One batch per slice, of an Int64 column `k` and a Float64 column `f` holding the same values.
    fn keyed(batches: &[&[i64]]) -> (SchemaRef, Vec<RecordBatch>) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("f", DataType::Float64, false),
        ]));
        let data = batches
            .iter()
            .map(|values| {
                let floats: Vec<f64> = values.iter().map(|v| *v as f64).collect();
                RecordBatch::try_new(
                    Arc::clone(&schema),
                    vec![
                        Arc::new(Int64Array::from(values.to_vec())),
                        Arc::new(arrow::array::Float64Array::from(floats)),
                    ],
                )
                .expect("batch")
            })
            .collect();
        (schema, data)
    }

    #[test]
    fn ascending_columns_are_those_no_row_of_any_batch_undercuts() {
        let ascending = |batches: &[&[i64]]| {
            let (schema, data) = keyed(batches);
            ZoneMaps::new(&[]).ascending_columns(&schema, &data).to_vec()
        };
        // Ties inside a batch and across a batch boundary keep the order; floats are never declared.
        assert_eq!(ascending(&[&[1, 2, 2, 5], &[5, 7], &[9]]), vec![0]);
        // Each batch ascends but the second starts below where the first ended.
        assert_eq!(ascending(&[&[1, 2, 8], &[5, 9]]), Vec::<usize>::new());
        // The bounds ascend batch to batch, but one batch is not sorted inside.
        assert_eq!(ascending(&[&[1, 2], &[3, 6, 4, 7], &[8]]), Vec::<usize>::new());
        assert_eq!(ascending(&[&[4]]), vec![0]);

        // A column with nulls is not declared (where its nulls sort is a choice of the query).
        let (schema, data) = batches();
        assert_eq!(ZoneMaps::new(&[]).ascending_columns(&schema, &data), &[0]);

        // A snapshot that appended reuses its known zones and checks the new batches.
        let (schema, data) = keyed(&[&[1, 2], &[3, 4], &[0]]);
        let first = ZoneMaps::new(&[]);
        assert_eq!(first.ascending_columns(&schema, &data[..2]), &[0]);
        let appended = ZoneMaps::new(first.zones());
        assert_eq!(appended.ascending_columns(&schema, &data), &[] as &[usize], "the appended 0 breaks the order");
    }

    #[test]
    fn batches_whose_column_is_all_null_match_no_comparison() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![arrow::array::new_null_array(&DataType::Int64, 4)])
            .expect("batch");
        let maps = ZoneMaps::new(&[]);
        let state = SessionContext::new().state();
        let data = [batch];
        assert_eq!(maps.keep(&state, &schema, &data, &[col("x").eq(lit(1i64))]), vec![false]);
        assert_eq!(maps.keep(&state, &schema, &data, &[col("x").is_not_null()]), vec![false]);
        assert_eq!(maps.keep(&state, &schema, &data, &[col("x").is_null()]), vec![true]);
    }
}
