//! Functions whose output can be far larger than their input (`repeat('x', 2000000000)`,
//! `array_repeat(1, 500000000)`, `lpad('a', 2000000000)`, `range(0, 1e10)`), bounded by
//! the memory pool. DataFusion folds constant calls while it optimizes, outside any
//! operator, so their output is charged to no pool and no timeout can interrupt them: one
//! such call of a few bytes of SQL grew a tier to 11 GB.
//!
//! Each of these functions is registered here wrapped: before it runs, the wrapper works out
//! an upper bound of the bytes it will produce from its arguments (lengths and counts, no
//! evaluation) and reserves them from the query memory pool (`limits.memory_limit`, shared
//! by every running query) for as long as the call runs. A call that cannot reserve fails
//! at once with the memory limit's error instead of allocating.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef};
use arrow::datatypes::{DataType, FieldRef};
use datafusion::common::{Result as DfResult, ScalarValue};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool};
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use datafusion::prelude::SessionContext;

/// An upper bound of a call's output bytes from its arguments and row count, or `None`
/// when it cannot be bounded cheaply (the call then runs unchecked, as before).
type OutputBound = fn(&[ColumnarValue], usize) -> Option<u128>;

/// The functions bounded, by name, with their bound.
const BOUNDED: &[(&str, OutputBound)] = &[
    ("repeat", repeat_bound),
    ("lpad", pad_bound),
    ("rpad", pad_bound),
    ("replace", replace_bound),
    ("regexp_replace", replace_bound),
    ("array_repeat", array_repeat_bound),
    ("array_resize", array_resize_bound),
    ("range", range_bound),
    ("generate_series", range_bound),
];

/// Replaces each function of [`BOUNDED`] registered in `ctx` by its bounded twin, charged to
/// `pool`.
pub fn register(ctx: &SessionContext, pool: Arc<dyn MemoryPool>) {
    let registered = ctx.state().scalar_functions().clone();
    for (name, bound) in BOUNDED {
        let Some(inner) = registered.get(*name).cloned() else { continue };
        ctx.register_udf(ScalarUDF::new_from_impl(Bounded { inner, bound: *bound, pool: Arc::clone(&pool) }));
    }
}

#[derive(Debug)]
struct Bounded {
    inner: Arc<ScalarUDF>,
    bound: OutputBound,
    pool: Arc<dyn MemoryPool>,
}

impl PartialEq for Bounded {
    fn eq(&self, other: &Self) -> bool {
        self.inner == other.inner
    }
}

impl Eq for Bounded {}

impl std::hash::Hash for Bounded {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.inner.hash(state);
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn schema_name(&self, args: &[Expr]) -> DfResult<String> {
        self.inner.inner().schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DfResult<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> DfResult<ExprSimplifyResult> {
        self.inner.simplify(args, info)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let _reservation = match (self.bound)(&args.args, args.number_rows) {
            Some(bytes) => {
                let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
                let reservation = MemoryConsumer::new(self.name()).register(&self.pool);
                reservation.try_grow(bytes).map_err(|e| {
                    datafusion::error::DataFusionError::ResourcesExhausted(format!(
                        "{}() would produce up to {bytes} bytes ({})",
                        self.name(),
                        e.strip_backtrace()
                    ))
                })?;
                Some(reservation)
            }
            None => None,
        };
        self.inner.invoke_with_args(args)
    }
}

/// Rows the call produces: the length of any array argument, else `number_rows`.
fn rows(args: &[ColumnarValue], number_rows: usize) -> u128 {
    args.iter()
        .find_map(|a| match a {
            ColumnarValue::Array(array) => Some(array.len()),
            ColumnarValue::Scalar(_) => None,
        })
        .unwrap_or(number_rows)
        .max(1) as u128
}

fn as_array(arg: &ColumnarValue) -> Option<ArrayRef> {
    match arg {
        ColumnarValue::Array(array) => Some(Arc::clone(array)),
        ColumnarValue::Scalar(scalar) => scalar.to_array().ok(),
    }
}

/// The longest value of a string, binary or list argument, in bytes or elements.
fn max_len(arg: &ColumnarValue) -> Option<u128> {
    let lengths = arrow::compute::kernels::length::length(as_array(arg)?.as_ref()).ok()?;
    let lengths = arrow::compute::cast(&lengths, &DataType::Int64).ok()?;
    let max = arrow::compute::max(lengths.as_any().downcast_ref::<arrow::array::Int64Array>()?);
    Some(max.unwrap_or(0).max(0) as u128)
}

/// The largest value of an integer argument, clamped at 0.
fn max_int(arg: &ColumnarValue) -> Option<u128> {
    let values = arrow::compute::cast(&as_array(arg)?, &DataType::Int64).ok()?;
    let max = arrow::compute::max(values.as_any().downcast_ref::<arrow::array::Int64Array>()?);
    Some(max.unwrap_or(0).max(0) as u128)
}

/// Bytes per value of an array element argument.
fn element_bytes(arg: &ColumnarValue) -> u128 {
    let fixed = match arg {
        ColumnarValue::Array(a) => a.data_type().primitive_width(),
        ColumnarValue::Scalar(s) => s.data_type().primitive_width(),
    };
    fixed.map_or_else(|| max_len(arg).unwrap_or(0) + 16, |w| w as u128).max(1)
}

/// `repeat(s, n)`: |s| * n per row.
fn repeat_bound(args: &[ColumnarValue], number_rows: usize) -> Option<u128> {
    let [s, n] = args else { return None };
    Some(rows(args, number_rows) * max_len(s)?.saturating_mul(max_int(n)?))
}

/// `lpad(s, n [, fill])`: n characters of up to 4 bytes each per row.
fn pad_bound(args: &[ColumnarValue], number_rows: usize) -> Option<u128> {
    let n = args.get(1)?;
    Some(rows(args, number_rows) * max_int(n)?.saturating_mul(4))
}

/// `replace(s, from, to)`: at worst `to` inserted at every character boundary of `s`
/// (an empty `from` matches there), plus `s` itself.
fn replace_bound(args: &[ColumnarValue], number_rows: usize) -> Option<u128> {
    let (s, to) = (args.first()?, args.get(2)?);
    let s = max_len(s)?;
    Some(rows(args, number_rows) * (s + (s + 1).saturating_mul(max_len(to)?)))
}

/// `array_repeat(element, count)`: count copies of the element per row.
fn array_repeat_bound(args: &[ColumnarValue], number_rows: usize) -> Option<u128> {
    let [element, count] = args else { return None };
    Some(rows(args, number_rows) * max_int(count)?.saturating_mul(element_bytes(element)))
}

/// `array_resize(array, size [, value])`: `size` elements per row.
fn array_resize_bound(args: &[ColumnarValue], number_rows: usize) -> Option<u128> {
    let size = args.get(1)?;
    Some(rows(args, number_rows) * max_int(size)?.saturating_mul(16))
}

/// `range(start, stop [, step])` with constant integer arguments: its element count per row.
/// Temporal ranges are bounded through the step's length in nanoseconds.
fn range_bound(args: &[ColumnarValue], number_rows: usize) -> Option<u128> {
    let scalars: Vec<&ScalarValue> = args
        .iter()
        .map(|a| match a {
            ColumnarValue::Scalar(s) => Some(s),
            ColumnarValue::Array(_) => None,
        })
        .collect::<Option<_>>()?;
    let (start, stop, step) = match scalars.as_slice() {
        [stop] => (ScalarValue::Int64(Some(0)), (*stop).clone(), None),
        [start, stop] => ((*start).clone(), (*stop).clone(), None),
        [start, stop, step] => ((*start).clone(), (*stop).clone(), Some((*step).clone())),
        _ => return None,
    };
    let span = nanos_or_int(&stop)?.abs_diff(nanos_or_int(&start)?) as u128;
    let step = match step {
        None => 1,
        Some(ScalarValue::IntervalMonthDayNano(Some(i))) => {
            let nanos = i128::from(i.months) * 30 * 86_400_000_000_000
                + i128::from(i.days) * 86_400_000_000_000
                + i128::from(i.nanoseconds);
            nanos.unsigned_abs().max(1)
        }
        Some(ScalarValue::IntervalDayTime(Some(i))) => {
            (i128::from(i.days) * 86_400_000_000_000 + i128::from(i.milliseconds) * 1_000_000).unsigned_abs().max(1)
        }
        Some(ScalarValue::IntervalYearMonth(Some(m))) => {
            (i128::from(m) * 30 * 86_400_000_000_000).unsigned_abs().max(1)
        }
        Some(other) => nanos_or_int(&other)?.unsigned_abs().max(1) as u128,
    };
    Some(rows(args, number_rows) * (span / step + 1).saturating_mul(8))
}

/// An integer as itself, a date or timestamp as nanoseconds since the epoch.
fn nanos_or_int(value: &ScalarValue) -> Option<i64> {
    let target = if value.data_type().is_temporal() {
        DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None)
    } else {
        DataType::Int64
    };
    match value.cast_to(&target).ok()? {
        ScalarValue::Int64(v) => v,
        ScalarValue::TimestampNanosecond(v, _) => v,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::memory_pool::GreedyMemoryPool;

    use super::*;

    async fn run(ctx: &SessionContext, sql: &str) -> Result<usize, String> {
        let df = ctx.sql(sql).await.map_err(|e| e.to_string())?;
        let batches = df.collect().await.map_err(|e| e.to_string())?;
        Ok(batches.iter().map(|b| b.num_rows()).sum())
    }

    #[tokio::test]
    async fn huge_outputs_are_refused_before_allocating_and_small_ones_run() {
        let ctx = SessionContext::new();
        register(&ctx, Arc::new(GreedyMemoryPool::new(64 << 20)));
        for sql in [
            "SELECT repeat('x', 2000000000)",
            "SELECT lpad('a', 2000000000, 'b')",
            "SELECT rpad('a', 2000000000)",
            "SELECT array_repeat(1, 500000000)",
            "SELECT range(0, 10000000000)",
            "SELECT generate_series(1, 10000000000, 1)",
            "SELECT replace(repeat('x', 1000000), 'x', repeat('y', 1000))",
            "SELECT range(TIMESTAMP '1970-01-01', TIMESTAMP '2100-01-01', INTERVAL '1 second')",
            "SELECT array_resize([1], 500000000, 0)",
        ] {
            let err = run(&ctx, sql).await.expect_err(sql);
            assert!(err.contains("would produce up to"), "{sql}: {err}");
        }
        for sql in [
            "SELECT repeat('ab', 3)",
            "SELECT lpad('a', 5, 'b')",
            "SELECT array_repeat(1, 3)",
            "SELECT range(0, 10)",
            "SELECT replace('abc', 'b', 'x')",
            "SELECT repeat(column1, 2) FROM (VALUES ('a'), ('bb'))",
        ] {
            assert!(run(&ctx, sql).await.is_ok(), "{sql}");
        }
    }
}
