//! The key-lookup fast path: a query that only selects columns of the rows of one
//! accelerated table whose indexed key equals given values is answered from the index,
//! without physical planning or execution (which cost a lookup ten times what finding
//! and copying its rows does).
//!
//! It recognizes the optimized, bound logical plan, not the SQL, so every spelling that
//! plans the same way takes it (`k = $1`, `$1 = k`, literal keys, aliases, `LIMIT`), and
//! anything it does not recognize exactly (another predicate, an expression in the select
//! list, a join, an edge's unconfirmed writes on top of the replica) takes the general path.
//! Answers are the general path's rows, in table order, in the plan's schema.

use std::sync::Arc;

use arrow::array::{RecordBatch, UInt32Array};
use arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::{Column, DFSchema, ScalarValue, TableReference};
use datafusion::datasource::source_as_provider;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, FetchType, LogicalPlan, Operator, SkipType};

use crate::accelerator::AcceleratedTable;

/// What a key column must equal: a value, or a parameter of a generic plan (`$1` is 0).
#[derive(Debug, Clone)]
enum KeyValue {
    Literal(ScalarValue),
    Parameter(usize),
}

/// A plan recognized as a key lookup.
#[derive(Debug)]
pub struct KeyLookup {
    provider: Arc<dyn TableProvider>,
    /// The table the plan scans, as planned (a sidecar's router says which local copy
    /// answers it, see [`KeyLookup::recognize_generic`]).
    table: TableReference,
    /// (column in the table's schema, the value it must equal).
    key: Vec<(usize, KeyValue)>,
    /// The table's columns the answer holds, in order.
    output: Vec<usize>,
    schema: SchemaRef,
    skip: usize,
    fetch: Option<usize>,
}

impl KeyLookup {
    /// `plan` as a key lookup of an accelerated table, if it is exactly one (see the
    /// module's doc).
    pub fn recognize(plan: &LogicalPlan) -> Option<Self> {
        Self::recognize_generic(plan).filter(|lookup| lookup.provider.downcast_ref::<AcceleratedTable>().is_some())
    }

    /// `plan` as a key lookup of whatever table it scans: on a tier with a router, a
    /// generic plan scans the upstream's table, and the router says, per query, which
    /// local copy of it answers (see [`KeyLookup::answer_from`]).
    pub fn recognize_generic(plan: &LogicalPlan) -> Option<Self> {
        let mut node = plan;
        let (mut limit, mut projection) = (None, None);
        // Above the filter: at most one LIMIT and one projection, and aliases, in any order.
        // None of them moves a column: every schema down to the filter's orders its
        // columns as the filter's input does.
        loop {
            match node {
                LogicalPlan::Limit(l) if limit.is_none() => {
                    let SkipType::Literal(skip) = l.get_skip_type().ok()? else { return None };
                    let FetchType::Literal(fetch) = l.get_fetch_type().ok()? else { return None };
                    limit = Some((skip, fetch));
                    node = &l.input;
                }
                LogicalPlan::Projection(p) if projection.is_none() => {
                    projection = Some((&p.expr, p.input.schema()));
                    node = &p.input;
                }
                LogicalPlan::SubqueryAlias(alias) => node = &alias.input,
                _ => break,
            }
        }
        let LogicalPlan::Filter(filter) = node else { return None };
        let rows_schema = filter.input.schema();
        let mut below = filter.input.as_ref();
        while let LogicalPlan::SubqueryAlias(alias) = below {
            below = &alias.input;
        }
        let LogicalPlan::TableScan(scan) = below else { return None };
        if scan.fetch.is_some() {
            return None;
        }
        // A column of the rows of `schema` (the filter's input, or a schema above it that
        // orders its columns alike), as a position in the table's schema.
        let table_column = |column: &Column, schema: &DFSchema| -> Option<usize> {
            let position = schema.index_of_column(column).ok()?;
            scan.projection.as_ref().map_or(Some(position), |p| p.get(position).copied())
        };
        let mut key = Vec::new();
        for conjunct in split_conjunction(&filter.predicate) {
            let Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) = conjunct else { return None };
            let (column, value) = match (left.as_ref(), right.as_ref()) {
                (Expr::Column(c), Expr::Literal(v, _)) | (Expr::Literal(v, _), Expr::Column(c)) => {
                    (c, KeyValue::Literal(v.clone()))
                }
                (Expr::Column(c), Expr::Placeholder(p)) | (Expr::Placeholder(p), Expr::Column(c)) => {
                    let number: usize = p.id.strip_prefix('$')?.parse().ok()?;
                    (c, KeyValue::Parameter(number.checked_sub(1)?))
                }
                _ => return None,
            };
            let column = table_column(column, rows_schema)?;
            if key.iter().any(|(c, _)| *c == column) {
                return None;
            }
            key.push((column, value));
        }
        let output = match projection {
            Some((exprs, input)) => exprs
                .iter()
                .map(|e| match e {
                    Expr::Column(c) => table_column(c, input),
                    Expr::Alias(alias) => match alias.expr.as_ref() {
                        Expr::Column(c) => table_column(c, input),
                        _ => None,
                    },
                    _ => None,
                })
                .collect::<Option<Vec<usize>>>()?,
            None => (0..rows_schema.fields().len())
                .map(|p| table_column(&Column::from(rows_schema.qualified_field(p)), rows_schema))
                .collect::<Option<_>>()?,
        };
        let schema = Arc::clone(plan.schema().inner());
        if schema.fields().len() != output.len() {
            return None;
        }
        let provider = source_as_provider(&scan.source).ok()?;
        let (skip, fetch) = limit.unwrap_or((0, None));
        Some(Self { provider, table: scan.table_name.clone(), key, output, schema, skip, fetch })
    }

    /// The answer from the table's current snapshot, or `None` when the general path must
    /// answer (no index on exactly this key, a value of another type than its column, the
    /// first load not finished: the general path says so properly).
    pub fn answer(&self) -> Option<Vec<RecordBatch>> {
        self.answer_with(&[])
    }

    /// [`KeyLookup::answer`] for a generic plan, with its parameters' values: each cast to
    /// its key column's type, as binding it into the plan would (one that does not cast
    /// leaves the query to the general path, which reports why).
    pub fn answer_with(&self, params: &[ScalarValue]) -> Option<Vec<RecordBatch>> {
        self.answer_on(self.provider.downcast_ref::<AcceleratedTable>()?, params)
    }

    /// [`KeyLookup::answer_with`] from `copy`, a local copy of the table the plan scans
    /// (a sidecar's replica of its upstream's table), which must have its very schema.
    pub fn answer_from(&self, copy: &AcceleratedTable, params: &[ScalarValue]) -> Option<Vec<RecordBatch>> {
        let planned = self.provider.schema();
        let schema = copy.schema_ref();
        (Arc::ptr_eq(&planned, schema) || planned == *schema).then_some(())?;
        self.answer_on(copy, params)
    }

    /// Whether the table this plan scans is accelerated and indexed on this lookup's key.
    pub fn is_indexed(&self) -> bool {
        self.provider.downcast_ref::<AcceleratedTable>().is_some_and(|table| self.is_indexed_in(table))
    }

    /// Whether `copy`'s current snapshot is indexed on this lookup's key.
    pub fn is_indexed_in(&self, copy: &AcceleratedTable) -> bool {
        let columns: Vec<usize> = self.key.iter().map(|(c, _)| *c).collect();
        copy.snapshot().is_some_and(|snapshot| snapshot.index_on(&columns).is_some())
    }

    /// The table this lookup's plan scans.
    pub fn table(&self) -> &TableReference {
        &self.table
    }

    fn answer_on(&self, table: &AcceleratedTable, params: &[ScalarValue]) -> Option<Vec<RecordBatch>> {
        let snapshot = table.snapshot()?;
        let columns: Vec<usize> = self.key.iter().map(|(c, _)| *c).collect();
        let index = snapshot.index_on(&columns)?;
        let fields = table.schema_ref().fields();
        let mut values = Vec::with_capacity(columns.len());
        for column in &index.spec().columns {
            let (_, value) = self.key.iter().find(|(c, _)| c == column)?;
            let data_type = fields[*column].data_type();
            let value = match value {
                KeyValue::Literal(value) if value.data_type() == *data_type || value.is_null() => value.clone(),
                KeyValue::Literal(_) => return None,
                KeyValue::Parameter(i) => match params.get(*i)? {
                    value if value.data_type() == *data_type => value.clone(),
                    value => value.cast_to(data_type).ok()?,
                },
            };
            values.push(value);
        }
        let found = index.find(&snapshot.batches, &values).ok()?;
        let end = self.fetch.map_or(found.len(), |f| self.skip.saturating_add(f).min(found.len()));
        let found = found.get(self.skip.min(end)..end).unwrap_or_default();
        let mut answer = Vec::new();
        for group in found.chunk_by(|a, b| a.0 == b.0) {
            let batch = &snapshot.batches[group[0].0];
            let rows = UInt32Array::from_iter_values(group.iter().map(|(_, row)| *row as u32));
            let columns = self
                .output
                .iter()
                .map(|&c| arrow::compute::take(batch.column(c).as_ref(), &rows, None))
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            answer.push(RecordBatch::try_new(Arc::clone(&self.schema), columns).ok()?);
        }
        Some(answer)
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accelerator::Snapshot;
    use crate::key_index::KeySpec;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::prelude::SessionContext;

    async fn setup(indexed: bool) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("grp", DataType::Int64, false),
            Field::new("v", DataType::Utf8, true),
        ]));
        let batches: Vec<RecordBatch> = (0..4)
            .map(|b| {
                let ids: Vec<i64> = (b * 50..b * 50 + 50).collect();
                RecordBatch::try_new(
                    Arc::clone(&schema),
                    vec![
                        Arc::new(Int64Array::from_iter_values(ids.iter().copied())),
                        Arc::new(Int64Array::from_iter_values(ids.iter().map(|i| i % 7))),
                        Arc::new(StringArray::from_iter(ids.iter().map(|i| (i % 5 != 0).then(|| format!("v{i}"))))),
                    ],
                )
                .expect("batch")
            })
            .collect();
        let mut keys = Vec::new();
        if indexed {
            keys.push(KeySpec::resolve(&["id".into()], &schema, "t").expect("id"));
            keys.push(KeySpec::resolve(&["grp".into()], &schema, "t").expect("grp"));
        }
        let table = AcceleratedTable::new("t", Arc::clone(&schema)).with_indexes(keys);
        table.swap(Snapshot::new(batches, 1));
        let ctx = SessionContext::new();
        ctx.register_table("t", Arc::new(table)).expect("register");
        ctx
    }

    async fn optimized(ctx: &SessionContext, sql: &str) -> LogicalPlan {
        ctx.sql(sql).await.expect("plan").into_optimized_plan().expect("optimize")
    }

    #[tokio::test]
    async fn recognizes_lookups_by_key_and_nothing_else() {
        let ctx = setup(true).await;
        for sql in [
            "SELECT v FROM t WHERE id = 7",
            "SELECT * FROM t WHERE 7 = id",
            "SELECT v AS value, id FROM t AS x WHERE x.id = 7 LIMIT 3",
            "SELECT v FROM t WHERE grp = 3 LIMIT 2 OFFSET 1",
        ] {
            let plan = optimized(&ctx, sql).await;
            assert!(KeyLookup::recognize(&plan).is_some(), "{sql}\n{}", plan.display_indent());
        }
        for sql in [
            "SELECT v FROM t WHERE id = 7 AND v = 'x'",
            "SELECT upper(v) FROM t WHERE id = 7",
            "SELECT v FROM t WHERE id > 7",
            "SELECT v FROM t WHERE id = 7 OR id = 8",
            "SELECT count(*) FROM t WHERE id = 7",
            "SELECT v FROM t WHERE id = 7 ORDER BY v",
            "SELECT id FROM t WHERE grp = 3 LIMIT 0",
        ] {
            let plan = optimized(&ctx, sql).await;
            assert!(KeyLookup::recognize(&plan).and_then(|l| l.answer()).is_none(), "{sql}");
        }
    }

    /// The rows of `batches` sorted by their first column (`id`), for answers whose order
    /// SQL leaves open (several rows without ORDER BY).
    fn sorted(schema: &SchemaRef, batches: &[RecordBatch]) -> RecordBatch {
        let all = arrow::compute::concat_batches(schema, batches).expect("concat");
        if all.num_rows() == 0 {
            return all;
        }
        let order = arrow::compute::sort_to_indices(all.column(0), None, None).expect("sort");
        arrow::compute::take_record_batch(&all, &order).expect("take")
    }

    #[tokio::test]
    async fn answers_equal_the_general_path() {
        let ctx = setup(true).await;
        for sql in [
            "SELECT v FROM t WHERE id = 7",
            "SELECT v FROM t WHERE id = 10",
            "SELECT * FROM t WHERE id = 199",
            "SELECT id, v AS value FROM t AS x WHERE x.id = 7 LIMIT 3",
            "SELECT id, v FROM t WHERE grp = 3",
            "SELECT v FROM t WHERE id = 1000",
        ] {
            let plan = optimized(&ctx, sql).await;
            let fast = KeyLookup::recognize(&plan).and_then(|l| l.answer()).expect(sql);
            let general = ctx.sql(sql).await.expect("plan").collect().await.expect("run");
            assert_eq!(sorted(plan.schema().inner(), &fast), sorted(plan.schema().inner(), &general), "{sql}");
        }
        // LIMIT without ORDER BY may return any of the rows: as many, all of them matching.
        let plan = optimized(&ctx, "SELECT id FROM t WHERE grp = 3 LIMIT 4 OFFSET 2").await;
        let fast =
            sorted(plan.schema().inner(), &KeyLookup::recognize(&plan).and_then(|l| l.answer()).expect("answer"));
        assert_eq!(fast.num_rows(), 4);
        let ids = fast.column(0).as_any().downcast_ref::<Int64Array>().expect("ids");
        assert!(ids.iter().all(|id| id.is_some_and(|id| id % 7 == 3)), "{ids:?}");

        // Without an index on the key, the general path answers.
        let plain = setup(false).await;
        let plan = optimized(&plain, "SELECT v FROM t WHERE id = 7").await;
        assert!(KeyLookup::recognize(&plan).expect("shape").answer().is_none());
    }
}
