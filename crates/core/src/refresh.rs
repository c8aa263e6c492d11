//! The arithmetic of refresh: which rows an append refresh asks for, which of them are new,
//! and which rows retention drops. Pure functions over Arrow batches, so they are tested
//! without any source.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch};
use arrow::compute::kernels::cmp::gt_eq;
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use arrow::row::{OwnedRow, RowConverter, SortField};
use datafusion::common::ScalarValue;
use datafusion::functions_aggregate::min_max::MaxAccumulator;
use datafusion::logical_expr::Accumulator;

use crate::error::{Result, StrataError};

/// The newest value of `column` across `batches` (the append watermark), if any row has one.
pub fn watermark(batches: &[RecordBatch], column: &str) -> Result<Option<ScalarValue>> {
    let mut best: Option<ScalarValue> = None;
    for batch in batches {
        let array = column_of(batch, column)?;
        let mut max = MaxAccumulator::try_new(array.data_type())?;
        max.update_batch(std::slice::from_ref(array))?;
        let candidate = max.evaluate()?;
        if candidate.is_null() {
            continue;
        }
        best = match best {
            Some(b) if b >= candidate => Some(b),
            _ => Some(candidate),
        };
    }
    Ok(best)
}

/// `value - by`, in the value's own type. Sequences (integers) are not shifted: the overlap
/// is a time span and only applies to time columns.
pub fn shift_back(value: &ScalarValue, by: Duration) -> Result<ScalarValue> {
    let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
    let nanos = i64::try_from(by.as_nanos()).unwrap_or(i64::MAX);
    Ok(match value {
        ScalarValue::TimestampSecond(Some(v), tz) => {
            ScalarValue::TimestampSecond(Some(v.saturating_sub(secs)), tz.clone())
        }
        ScalarValue::TimestampMillisecond(Some(v), tz) => {
            ScalarValue::TimestampMillisecond(Some(v.saturating_sub(nanos / 1_000_000)), tz.clone())
        }
        ScalarValue::TimestampMicrosecond(Some(v), tz) => {
            ScalarValue::TimestampMicrosecond(Some(v.saturating_sub(nanos / 1_000)), tz.clone())
        }
        ScalarValue::TimestampNanosecond(Some(v), tz) => {
            ScalarValue::TimestampNanosecond(Some(v.saturating_sub(nanos)), tz.clone())
        }
        ScalarValue::Date32(Some(v)) => {
            ScalarValue::Date32(Some(v.saturating_sub(i32::try_from((secs + 86_399) / 86_400).unwrap_or(i32::MAX))))
        }
        ScalarValue::Date64(Some(v)) => ScalarValue::Date64(Some(v.saturating_sub(nanos / 1_000_000))),
        other if other.data_type().is_integer() => other.clone(),
        other => {
            return Err(StrataError::Config(format!(
                "time_column must be a timestamp, date or integer column, found {}",
                other.data_type()
            )));
        }
    })
}

/// "Now minus `age`" in the type of `data_type`, for retention. Only time columns age.
pub fn age_cutoff(data_type: &DataType, age: Duration, now: SystemTime) -> Result<ScalarValue> {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default().saturating_sub(age);
    let nanos = i64::try_from(since_epoch.as_nanos()).unwrap_or(i64::MAX);
    Ok(match data_type {
        DataType::Timestamp(unit, tz) => {
            let v = match unit {
                TimeUnit::Second => nanos / 1_000_000_000,
                TimeUnit::Millisecond => nanos / 1_000_000,
                TimeUnit::Microsecond => nanos / 1_000,
                TimeUnit::Nanosecond => nanos,
            };
            match unit {
                TimeUnit::Second => ScalarValue::TimestampSecond(Some(v), tz.clone()),
                TimeUnit::Millisecond => ScalarValue::TimestampMillisecond(Some(v), tz.clone()),
                TimeUnit::Microsecond => ScalarValue::TimestampMicrosecond(Some(v), tz.clone()),
                TimeUnit::Nanosecond => ScalarValue::TimestampNanosecond(Some(v), tz.clone()),
            }
        }
        DataType::Date32 => ScalarValue::Date32(Some(i32::try_from(nanos / 86_400_000_000_000).unwrap_or(i32::MAX))),
        DataType::Date64 => ScalarValue::Date64(Some(nanos / 1_000_000)),
        other => {
            return Err(StrataError::Config(format!("retention needs a timestamp or date time_column, found {other}")));
        }
    })
}

/// Keeps the rows whose `column` is at or after `cutoff` (rows with a null time are dropped).
pub fn keep_since(batches: &[RecordBatch], column: &str, cutoff: &ScalarValue) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::with_capacity(batches.len());
    for batch in batches {
        let mask = since_mask(batch, column, cutoff)?;
        if mask.true_count() == batch.num_rows() {
            out.push(batch.clone());
        } else if mask.true_count() > 0 {
            out.push(filter_record_batch(batch, &mask)?);
        }
    }
    Ok(out)
}

fn since_mask(batch: &RecordBatch, column: &str, cutoff: &ScalarValue) -> Result<BooleanArray> {
    let array = column_of(batch, column)?;
    let cutoff = cutoff.cast_to(array.data_type())?;
    let mask = gt_eq(array, &cutoff.to_scalar()?)?;
    // Null comparisons are "not since": treat them as false rather than null.
    Ok(match mask.nulls() {
        Some(_) => mask.iter().map(|v| Some(v.unwrap_or(false))).collect(),
        None => mask,
    })
}

/// The rows of `fetched` that the copy does not hold yet.
///
/// `existing_tail` is the part of the copy inside the overlap window, the only rows a
/// re-fetch can repeat. Rows are matched on `key` columns (all columns when empty) as a
/// multiset, so two genuinely identical source rows stay two rows.
pub fn new_rows(
    schema: &SchemaRef,
    existing_tail: &[RecordBatch],
    fetched: &[RecordBatch],
    key: &[String],
) -> Result<Option<RecordBatch>> {
    if fetched.iter().all(|b| b.num_rows() == 0) {
        return Ok(None);
    }
    let fetched = concat_batches(schema, fetched)?;
    let key_indices: Vec<usize> = if key.is_empty() {
        (0..schema.fields().len()).collect()
    } else {
        key.iter()
            .map(|k| {
                schema
                    .index_of(k)
                    .map_err(|_| StrataError::Config(format!("primary_key column `{k}` is not in the dataset")))
            })
            .collect::<Result<_>>()?
    };
    let converter =
        RowConverter::new(key_indices.iter().map(|&i| SortField::new(schema.field(i).data_type().clone())).collect())?;
    let keys_of = |batch: &RecordBatch| -> Result<arrow::row::Rows> {
        let cols: Vec<ArrayRef> = key_indices.iter().map(|&i| Arc::clone(batch.column(i))).collect();
        Ok(converter.convert_columns(&cols)?)
    };
    let mut held: HashMap<OwnedRow, usize> = HashMap::new();
    for batch in existing_tail {
        for row in keys_of(batch)?.iter() {
            *held.entry(row.owned()).or_default() += 1;
        }
    }
    let fetched_keys = keys_of(&fetched)?;
    let mask: BooleanArray = fetched_keys
        .iter()
        .map(|row| match held.get_mut(&row.owned()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Some(false)
            }
            _ => Some(true),
        })
        .collect();
    if mask.true_count() == 0 {
        return Ok(None);
    }
    Ok(Some(filter_record_batch(&fetched, &mask)?))
}

fn column_of<'a>(batch: &'a RecordBatch, column: &str) -> Result<&'a ArrayRef> {
    batch
        .column_by_name(column)
        .ok_or_else(|| StrataError::Config(format!("time_column `{column}` is not a column of the dataset")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};

    fn batch(ts: &[i64], names: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), false),
            Field::new("name", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![Arc::new(TimestampMicrosecondArray::from(ts.to_vec())), Arc::new(StringArray::from(names.to_vec()))],
        )
        .expect("batch")
    }

    #[test]
    fn watermark_and_shift() {
        let b = [batch(&[5, 9, 7], &["a", "b", "c"]), batch(&[3], &["d"])];
        let w = watermark(&b, "ts").expect("ok").expect("some");
        assert_eq!(w, ScalarValue::TimestampMicrosecond(Some(9), None));
        let c = shift_back(&w, Duration::from_micros(4)).expect("ok");
        assert_eq!(c, ScalarValue::TimestampMicrosecond(Some(5), None));
        let seq = shift_back(&ScalarValue::Int64(Some(10)), Duration::from_secs(60)).expect("ok");
        assert_eq!(seq, ScalarValue::Int64(Some(10)));
    }

    #[test]
    fn rows_sharing_the_watermark_are_neither_lost_nor_duplicated() {
        // The copy has two rows at t=10; the source now has three at t=10 plus one at t=11.
        let existing = [batch(&[1, 10, 10], &["old", "a", "b"])];
        let cutoff = ScalarValue::TimestampMicrosecond(Some(10), None);
        let tail = keep_since(&existing, "ts", &cutoff).expect("tail");
        let fetched = [batch(&[10, 10, 10, 11], &["a", "b", "c", "d"])];
        let schema = fetched[0].schema();
        let new = new_rows(&schema, &tail, &fetched, &[]).expect("ok").expect("some");
        let names = new.column(1).as_any().downcast_ref::<StringArray>().expect("utf8");
        assert_eq!(names.iter().flatten().collect::<Vec<_>>(), vec!["c", "d"]);
    }

    #[test]
    fn identical_source_rows_are_kept_as_a_multiset() {
        let tail = [batch(&[10], &["x"])];
        let fetched = [batch(&[10, 10], &["x", "x"])];
        let new = new_rows(&fetched[0].schema(), &tail, &fetched, &[]).expect("ok").expect("some");
        assert_eq!(new.num_rows(), 1);
    }

    #[test]
    fn key_columns_decide_identity() {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let mk =
            |v: Vec<i64>| RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(Int64Array::from(v))]).expect("b");
        let new = new_rows(&schema, &[mk(vec![1, 2])], &[mk(vec![2, 3])], &["id".into()]).expect("ok").expect("some");
        assert_eq!(new.num_rows(), 1);
        assert!(new_rows(&schema, &[], &[], &[]).expect("ok").is_none());
    }

    #[test]
    fn retention_cutoff_in_column_unit() {
        let now = UNIX_EPOCH + Duration::from_secs(100);
        let c =
            age_cutoff(&DataType::Timestamp(TimeUnit::Microsecond, None), Duration::from_secs(40), now).expect("ok");
        assert_eq!(c, ScalarValue::TimestampMicrosecond(Some(60_000_000), None));
        assert!(age_cutoff(&DataType::Int64, Duration::from_secs(1), now).is_err());
        let kept = keep_since(&[batch(&[59_000_000, 60_000_000, 61_000_000], &["a", "b", "c"])], "ts", &c).expect("ok");
        assert_eq!(kept[0].num_rows(), 2);
    }
}
