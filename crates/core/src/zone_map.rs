//! Zone maps: the min, max and null count of every column of every batch of a snapshot,
//! computed once when the snapshot is made, so a scan skips the batches its filters rule
//! out. A lookup by key then reads the one batch whose range holds the key instead of the
//! whole copy, and a range filter on a time column reads only the batches of that range.
//!
//! The statistics feed DataFusion's own `PruningPredicate` (the one that prunes Parquet row
//! groups), so every predicate it understands (comparisons, `IN`, `BETWEEN`, `IS NULL`,
//! conjunctions and disjunctions of those) prunes here too.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::stats::Precision;
use datafusion::common::{Column, ColumnStatistics, DFSchema, ScalarValue, pruning::PruningStatistics};
use datafusion::functions_aggregate::min_max::{MaxAccumulator, MinAccumulator};
use datafusion::logical_expr::Operator;
use datafusion::logical_expr::{Accumulator, Expr, utils::conjunction};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, CaseExpr, Literal};
use datafusion::physical_optimizer::pruning::PruningPredicateBuilder;

/// Statistics of one batch: per column `(min, max)`, `None` where the type has no tracked
/// order (nested types) or the column is all null; and per column the null count.
#[derive(Debug)]
pub struct BatchZone {
    bounds: Vec<Option<(ScalarValue, ScalarValue)>>,
    nulls: Vec<u64>,
    rows: u64,
}

impl BatchZone {
    /// Reads one pass over every column of `batch`.
    pub fn of(batch: &RecordBatch) -> Self {
        let bounds = batch.columns().iter().map(bounds_of).collect();
        let nulls = batch.columns().iter().map(|c| c.null_count() as u64).collect();
        Self { bounds, nulls, rows: batch.num_rows() as u64 }
    }
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

/// The zones of one run of batches (a scan partition's), to check predicates against again
/// and again as they change (a join's runtime filter); their arrays are built on the first
/// check that can prune, once.
#[derive(Debug)]
pub struct ZoneStatistics {
    table_schema: SchemaRef,
    zones: Vec<Arc<BatchZone>>,
    arrays: OnceLock<ZoneArrays>,
}

impl ZoneStatistics {
    pub fn new(table_schema: SchemaRef, zones: Vec<Arc<BatchZone>>) -> Self {
        Self { table_schema, zones, arrays: OnceLock::new() }
    }

    /// Which of the batches may hold rows matching `predicate`, a static physical expression
    /// (a runtime filter as it is now: its snapshot) over `predicate_schema`, whose columns
    /// are the table's by name (a scan's projection). `None` when the predicate cannot rule
    /// a batch out.
    pub fn matching(&self, predicate: Arc<dyn PhysicalExpr>, predicate_schema: &SchemaRef) -> Option<Vec<bool>> {
        let predicate = relaxed_for_pruning(predicate, predicate_schema);
        let pruning = PruningPredicateBuilder::new()
            .with_file_schema(Arc::clone(predicate_schema))
            .with_max_in_list_size(MAX_PRUNING_IN_LIST)
            .build(predicate)?;
        let arrays = self.arrays.get_or_init(|| ZoneArrays::of(&self.table_schema, &self.zones));
        let stats = SnapshotStatistics { schema: &self.table_schema, arrays };
        pruning.prune(&stats).ok().filter(|keep| keep.len() == self.zones.len())
    }
}

/// `predicate` with each boolean `CASE` it holds through `AND` and `OR` replaced by the `OR`
/// of its branches' results: a weaker predicate (a row the `CASE` keeps, one of its branches
/// keeps), which a pruning predicate can read where it cannot read a `CASE`.
///
/// Why: a hash join whose build side is split into partitions publishes its runtime filter
/// as `CASE hash(key) % partitions WHEN 0 THEN <partition 0's bounds and keys> WHEN 1 ...`,
/// routing each row to the keys of the partition it hashes to. Zone maps know nothing of
/// hashes, so pruning would keep every batch; the `OR` of the branches still rules out every
/// batch that holds none of the build side's keys (TPC-H Q18's `IN (subquery)` join over
/// lineitem). Under `NOT` a weaker predicate would be a stronger one, so the rewrite stops
/// at anything but `AND` and `OR`.
fn relaxed_for_pruning(predicate: Arc<dyn PhysicalExpr>, schema: &SchemaRef) -> Arc<dyn PhysicalExpr> {
    if let Some(binary) = predicate.downcast_ref::<BinaryExpr>()
        && matches!(binary.op(), Operator::And | Operator::Or)
    {
        let left = relaxed_for_pruning(Arc::clone(binary.left()), schema);
        let right = relaxed_for_pruning(Arc::clone(binary.right()), schema);
        return Arc::new(BinaryExpr::new(left, *binary.op(), right));
    }
    let Some(case) = predicate.downcast_ref::<CaseExpr>() else { return predicate };
    let is_boolean = |e: &Arc<dyn PhysicalExpr>| e.data_type(schema).is_ok_and(|t| t == DataType::Boolean);
    let boolean =
        case.when_then_expr().iter().all(|(_, then)| is_boolean(then)) && case.else_expr().is_none_or(is_boolean);
    if !boolean {
        return predicate;
    }
    // A missing ELSE is NULL, which keeps no row; so is a literal FALSE.
    let keeps_nothing = |e: &Arc<dyn PhysicalExpr>| {
        e.downcast_ref::<Literal>()
            .is_some_and(|l| matches!(l.value(), ScalarValue::Boolean(Some(false)) | ScalarValue::Boolean(None)))
    };
    let branches = case.when_then_expr().iter().map(|(_, then)| then).chain(case.else_expr());
    branches
        .filter(|e| !keeps_nothing(e))
        .map(|e| relaxed_for_pruning(Arc::clone(e), schema))
        .reduce(|any, next| Arc::new(BinaryExpr::new(any, Operator::Or, next)))
        .unwrap_or_else(|| Arc::new(Literal::new(ScalarValue::Boolean(Some(false)))))
}

impl ZoneMaps {
    /// Zone maps whose leading batches are described by `known`.
    pub fn new(known: &[Arc<BatchZone>]) -> Self {
        Self { known: known.to_vec(), built: OnceLock::new(), table: OnceLock::new() }
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

    /// A runtime filter of a join split by key hash routes each row to its partition's keys
    /// with a `CASE`; pruning reads the `OR` of its branches, and only where that is weaker.
    #[test]
    fn a_case_over_partitions_prunes_as_the_or_of_its_branches() {
        use datafusion::physical_expr::expressions::{CaseExpr, NotExpr, col as column, lit as literal};
        let (schema, data) = batches();
        let zones = ZoneStatistics::new(Arc::clone(&schema), data.iter().map(|b| Arc::new(BatchZone::of(b))).collect());
        let id = column("id", &schema).expect("id");
        let binary = |l: Arc<dyn PhysicalExpr>, op, r: Arc<dyn PhysicalExpr>| -> Arc<dyn PhysicalExpr> {
            Arc::new(BinaryExpr::new(l, op, r))
        };
        let partition = binary(Arc::clone(&id), Operator::Modulo, literal(2i64));
        let is = |key: i64| binary(Arc::clone(&id), Operator::Eq, literal(key));
        let routed = |otherwise: Option<Arc<dyn PhysicalExpr>>| -> Arc<dyn PhysicalExpr> {
            Arc::new(
                CaseExpr::try_new(
                    Some(Arc::clone(&partition)),
                    vec![(literal(0i64), is(150)), (literal(1i64), is(251))],
                    otherwise,
                )
                .expect("case"),
            )
        };
        assert_eq!(zones.matching(routed(None), &schema), Some(vec![false, true, true]));
        assert_eq!(zones.matching(routed(Some(literal(false))), &schema), Some(vec![false, true, true]));
        // Inside a conjunction too.
        let both = binary(routed(None), Operator::And, binary(Arc::clone(&id), Operator::Lt, literal(200i64)));
        assert_eq!(zones.matching(both, &schema), Some(vec![false, true, false]));
        // An ELSE that may keep a row keeps every batch; so does a negated CASE, which the
        // OR of its branches would not bound.
        assert_eq!(zones.matching(routed(Some(literal(true))), &schema), None);
        assert_eq!(zones.matching(Arc::new(NotExpr::new(routed(None))), &schema), None);
        // A CASE that yields numbers is left alone: `CASE .. THEN 1 ELSE 2 END = 1`.
        let numbers: Arc<dyn PhysicalExpr> =
            Arc::new(CaseExpr::try_new(None, vec![(is(150), literal(1i64))], Some(literal(2i64))).expect("case"));
        assert_eq!(zones.matching(binary(numbers, Operator::Eq, literal(1i64)), &schema), None);
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
