//! Hash indexes on declared keys of an accelerated copy: a lookup by key finds its rows
//! in a few hundred instructions, whatever the table's size, where scanning even the one
//! batch the zone maps keep costs tens of thousands.
//!
//! An index maps the hash of a key to row positions and keeps nothing else: the keys stay
//! in the snapshot's batches, and a probe compares them there. So it costs about five
//! bytes per row and no copy of the key column. It belongs to one snapshot (built with it,
//! immutable after); an append refresh copies the previous index and adds the new rows, a
//! refresh that found nothing new shares it.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::common::hash_utils::{RandomState, create_hashes};
use hashbrown::HashTable;

use crate::error::{Result, StrataError};

/// Seed of every index's hash: any fixed value, so an index and its probes agree.
const SEED: u64 = 0x5157_a7a1_d3c4_b00b;

/// Whether a column of this type can be a key: types whose equality is exactly bit
/// equality (floats are not: `-0.0 = 0.0` and NaN).
pub fn indexable(data_type: &DataType) -> bool {
    use DataType::*;
    matches!(
        data_type,
        Int8 | Int16
            | Int32
            | Int64
            | UInt8
            | UInt16
            | UInt32
            | UInt64
            | Date32
            | Date64
            | Timestamp(_, _)
            | Decimal128(_, _)
            | Utf8
            | LargeUtf8
            | Utf8View
            | Binary
            | LargeBinary
            | BinaryView
    )
}

/// The key columns of one index, as positions in the table's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub columns: Vec<usize>,
}

impl KeySpec {
    /// Resolves column names against `schema`, refusing an unknown column or a type that
    /// cannot be a key; `what` names the declaration in the message (a config path).
    pub fn resolve(names: &[String], schema: &SchemaRef, what: &str) -> Result<Self> {
        if names.is_empty() {
            return Err(StrataError::Config(format!("{what}: an index needs at least one column")));
        }
        let mut columns = Vec::with_capacity(names.len());
        for name in names {
            let index = schema
                .fields()
                .iter()
                .position(|f| f.name() == name)
                .or_else(|| schema.fields().iter().position(|f| f.name().eq_ignore_ascii_case(name)))
                .ok_or_else(|| StrataError::Config(format!("{what}: column `{name}` is not in the dataset")))?;
            let data_type = schema.field(index).data_type();
            if !indexable(data_type) {
                return Err(StrataError::Config(format!(
                    "{what}: column `{name}` is {data_type}; an index takes integer, decimal, date, timestamp, string or binary keys"
                )));
            }
            if columns.contains(&index) {
                return Err(StrataError::Config(format!("{what}: column `{name}` is named twice")));
            }
            columns.push(index);
        }
        Ok(Self { columns })
    }

    /// The same columns in any order.
    pub fn covers_exactly(&self, columns: &[usize]) -> bool {
        columns.len() == self.columns.len() && self.columns.iter().all(|c| columns.contains(c))
    }
}

/// A hash index over one snapshot's batches.
#[derive(Debug, Clone)]
pub struct KeyIndex {
    spec: KeySpec,
    /// Global row numbers (batch starts below), by the hash of their key. Rows with a null
    /// key are left out: `key = value` never matches them.
    rows: HashTable<u32>,
    /// The global row number each batch starts at, ascending.
    starts: Vec<u32>,
    /// Rows covered (the sum of the batches' rows).
    covered: u32,
}

impl KeyIndex {
    /// Indexes every row of `batches`. Fails only when they hold more rows than a `u32`
    /// numbers (an index is then not worth its memory anyway).
    pub fn build(spec: KeySpec, batches: &[RecordBatch]) -> Result<Self> {
        let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let mut rows = HashTable::new();
        // Sized once, while empty: see `add`.
        rows.reserve(total, |_| 0);
        let mut index = Self { spec, rows, starts: Vec::new(), covered: 0 };
        index.add(batches)?;
        Ok(index)
    }

    /// The index of `batches`, which begin with the ones this index covers: a copy with
    /// the rest added when its table has room for them, else built anew (so growth, rare
    /// as the table doubles, costs one rebuild).
    pub fn extended(&self, batches: &[RecordBatch]) -> Result<Self> {
        let added = &batches[self.batches().min(batches.len())..];
        let rows: usize = added.iter().map(RecordBatch::num_rows).sum();
        if self.rows.capacity() - self.rows.len() < rows {
            return Self::build(self.spec.clone(), batches);
        }
        let mut index = self.clone();
        index.add(added)?;
        Ok(index)
    }

    pub fn spec(&self) -> &KeySpec {
        &self.spec
    }

    /// Batches covered, in order: the prefix of a snapshot this index was built over.
    pub fn batches(&self) -> usize {
        self.starts.len()
    }

    /// Memory the index holds, in bytes.
    pub fn bytes(&self) -> usize {
        self.rows.allocation_size() + self.starts.capacity() * std::mem::size_of::<u32>()
    }

    fn add(&mut self, batches: &[RecordBatch]) -> Result<()> {
        let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let too_many = || StrataError::NotSupported("an index covers at most 4,294,967,295 rows".into());
        let total_u32 = u32::try_from(total).map_err(|_| too_many())?;
        self.covered.checked_add(total_u32).ok_or_else(too_many)?;
        // The table stores row numbers only, so it cannot rehash its entries to grow: the
        // callers size it beforehand (`build` while empty, `extended` checks the room).
        if self.rows.capacity() - self.rows.len() < total {
            return Err(StrataError::Internal("a key index was not sized for its rows".into()));
        }
        let state = RandomState::with_seed(SEED);
        let mut hashes = Vec::new();
        for batch in batches {
            let keys: Vec<&ArrayRef> = self.spec.columns.iter().map(|&c| batch.column(c)).collect();
            hashes.clear();
            hashes.resize(batch.num_rows(), 0);
            create_hashes(keys.iter().map(|k| k.as_ref()), &state, &mut hashes)?;
            let start = self.covered;
            for (row, &hash) in hashes.iter().enumerate() {
                if keys.iter().any(|k| k.is_null(row)) {
                    continue;
                }
                // Room was checked above: the hasher callback is never asked to rehash.
                self.rows.insert_unique(hash, start + row as u32, |_| 0);
            }
            self.starts.push(start);
            self.covered += batch.num_rows() as u32;
        }
        Ok(())
    }

    /// The rows of `batches` (the snapshot this index was built over) whose key equals
    /// `key` (one value per key column, in the spec's order, each of its column's type), as
    /// (batch, row) in table order. A null in the key matches nothing.
    pub fn find(&self, batches: &[RecordBatch], key: &[ScalarValue]) -> Result<Vec<(usize, usize)>> {
        if key.len() != self.spec.columns.len() || key.iter().any(ScalarValue::is_null) {
            return Ok(Vec::new());
        }
        let probe: Vec<ArrayRef> = key.iter().map(|v| v.to_array_of_size(1)).collect::<Result<_, _>>()?;
        let mut hash = [0u64];
        create_hashes(probe.iter().map(|p| p.as_ref()), &RandomState::with_seed(SEED), &mut hash)?;
        let mut found: Vec<(usize, usize)> = Vec::new();
        for &global in self.rows.iter_hash(hash[0]) {
            let batch = self.starts.partition_point(|&s| s <= global) - 1;
            let row = (global - self.starts[batch]) as usize;
            let Some(data) = batches.get(batch) else {
                return Err(StrataError::Internal("an index outlived its snapshot".into()));
            };
            let matches =
                self.spec.columns.iter().zip(&probe).all(|(&c, probe)| same_value(data.column(c).as_ref(), row, probe));
            if matches {
                found.push((batch, row));
            }
        }
        // Probing visits a hash's rows in table order except after collisions; sort so
        // answers come in the order a scan reads them.
        found.sort_unstable();
        Ok(found)
    }
}

/// `column[row] == probe[0]`, both of the same (indexable) type, `column[row]` not null.
fn same_value(column: &dyn Array, row: usize, probe: &dyn Array) -> bool {
    use arrow::datatypes::*;
    macro_rules! primitive {
        ($t:ty) => {
            column.as_primitive::<$t>().value(row) == probe.as_primitive::<$t>().value(0)
        };
    }
    if column.is_null(row) {
        return false;
    }
    match column.data_type() {
        DataType::Int8 => primitive!(Int8Type),
        DataType::Int16 => primitive!(Int16Type),
        DataType::Int32 => primitive!(Int32Type),
        DataType::Int64 => primitive!(Int64Type),
        DataType::UInt8 => primitive!(UInt8Type),
        DataType::UInt16 => primitive!(UInt16Type),
        DataType::UInt32 => primitive!(UInt32Type),
        DataType::UInt64 => primitive!(UInt64Type),
        DataType::Date32 => primitive!(Date32Type),
        DataType::Date64 => primitive!(Date64Type),
        DataType::Decimal128(_, _) => primitive!(Decimal128Type),
        DataType::Timestamp(TimeUnit::Second, _) => primitive!(TimestampSecondType),
        DataType::Timestamp(TimeUnit::Millisecond, _) => primitive!(TimestampMillisecondType),
        DataType::Timestamp(TimeUnit::Microsecond, _) => primitive!(TimestampMicrosecondType),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => primitive!(TimestampNanosecondType),
        DataType::Utf8 => column.as_string::<i32>().value(row) == probe.as_string::<i32>().value(0),
        DataType::LargeUtf8 => column.as_string::<i64>().value(row) == probe.as_string::<i64>().value(0),
        DataType::Utf8View => column.as_string_view().value(row) == probe.as_string_view().value(0),
        DataType::Binary => column.as_binary::<i32>().value(row) == probe.as_binary::<i32>().value(0),
        DataType::LargeBinary => column.as_binary::<i64>().value(row) == probe.as_binary::<i64>().value(0),
        DataType::BinaryView => column.as_binary_view().value(row) == probe.as_binary_view().value(0),
        _ => false,
    }
}

/// The indexes of a new snapshot: shared with `previous` when it holds the same batches,
/// extended from it when it only appended, built anew otherwise.
pub fn indexes_for(
    specs: &[KeySpec],
    batches: &[RecordBatch],
    previous: Option<(&[RecordBatch], &[Arc<KeyIndex>])>,
) -> Result<Vec<Arc<KeyIndex>>> {
    specs
        .iter()
        .map(|spec| {
            let earlier = previous.and_then(|(old_batches, indexes)| {
                let index = indexes.iter().find(|i| i.spec() == spec)?;
                let prefix = index.batches();
                let same_prefix = prefix == old_batches.len()
                    && prefix <= batches.len()
                    && old_batches.iter().zip(batches).all(|(a, b)| same_batch(a, b));
                same_prefix.then_some(index)
            });
            match earlier {
                Some(index) if index.batches() == batches.len() => Ok(Arc::clone(index)),
                Some(index) => Ok(Arc::new(index.extended(batches)?)),
                None => Ok(Arc::new(KeyIndex::build(spec.clone(), batches)?)),
            }
        })
        .collect()
}

/// The same batch (shared columns), not merely equal contents: cheap to check.
fn same_batch(a: &RecordBatch, b: &RecordBatch) -> bool {
    a.num_rows() == b.num_rows()
        && a.num_columns() == b.num_columns()
        && a.columns().iter().zip(b.columns()).all(|(x, y)| Arc::ptr_eq(x, y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, Int64Array, StringViewArray};
    use arrow::datatypes::{Field, Schema};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("region", DataType::Utf8View, false),
            Field::new("n", DataType::Int32, false),
            Field::new("x", DataType::Float64, false),
        ]))
    }

    fn batch(ids: Vec<Option<i64>>, regions: Vec<&str>) -> RecordBatch {
        let n = ids.len();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringViewArray::from_iter_values(regions)),
                Arc::new(Int32Array::from_iter_values(0..n as i32)),
                Arc::new(arrow::array::Float64Array::from_iter_values((0..n).map(|i| i as f64))),
            ],
        )
        .expect("batch")
    }

    #[test]
    fn finds_every_row_of_a_key_and_none_of_a_null() {
        let batches = vec![
            batch(vec![Some(1), Some(2), None, Some(2)], vec!["eu", "us", "eu", "eu"]),
            batch(vec![Some(2), Some(3)], vec!["us", "eu-long-region-name"]),
        ];
        let by_id =
            KeyIndex::build(KeySpec::resolve(&["id".into()], &schema(), "t").expect("spec"), &batches).expect("index");
        assert_eq!(by_id.find(&batches, &[ScalarValue::Int64(Some(2))]).expect("find"), [(0, 1), (0, 3), (1, 0)]);
        assert_eq!(by_id.find(&batches, &[ScalarValue::Int64(Some(9))]).expect("find"), []);
        assert_eq!(by_id.find(&batches, &[ScalarValue::Int64(None)]).expect("find"), [], "null matches nothing");

        let spec = KeySpec::resolve(&["region".into(), "ID".into()], &schema(), "t").expect("spec");
        let both = KeyIndex::build(spec, &batches).expect("index");
        let key = |r: &str, id| [ScalarValue::Utf8View(Some(r.into())), ScalarValue::Int64(Some(id))];
        assert_eq!(both.find(&batches, &key("eu", 2)).expect("find"), [(0, 3)]);
        assert_eq!(both.find(&batches, &key("eu-long-region-name", 3)).expect("find"), [(1, 1)]);
        assert_eq!(both.find(&batches, &key("us", 3)).expect("find"), []);
    }

    #[test]
    fn declarations_name_what_is_wrong() {
        let err = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            KeySpec::resolve(&names, &schema(), "datasets[0].acceleration.indexes[1]").expect_err("refused").to_string()
        };
        assert!(err(&["nope"]).contains("indexes[1]: column `nope` is not in the dataset"), "{}", err(&["nope"]));
        assert!(err(&["x"]).contains("column `x` is Float64"), "{}", err(&["x"]));
        assert!(err(&["id", "id"]).contains("named twice"), "{}", err(&["id", "id"]));
        assert!(err(&[]).contains("at least one column"));
    }

    #[test]
    fn an_appended_snapshot_extends_the_index_and_an_unchanged_one_shares_it() {
        let spec = KeySpec::resolve(&["id".into()], &schema(), "t").expect("spec");
        let first = vec![batch(vec![Some(1), Some(2)], vec!["a", "b"])];
        let indexes = indexes_for(std::slice::from_ref(&spec), &first, None).expect("build");

        let same = indexes_for(std::slice::from_ref(&spec), &first, Some((&first, &indexes))).expect("same");
        assert!(Arc::ptr_eq(&same[0], &indexes[0]), "nothing new: the index is shared");

        let mut appended = first.clone();
        appended.push(batch(vec![Some(2), Some(7)], vec!["c", "d"]));
        let grown = indexes_for(std::slice::from_ref(&spec), &appended, Some((&first, &indexes))).expect("grow");
        assert_eq!(grown[0].find(&appended, &[ScalarValue::Int64(Some(2))]).expect("find"), [(0, 1), (1, 0)]);
        assert_eq!(grown[0].find(&appended, &[ScalarValue::Int64(Some(7))]).expect("find"), [(1, 1)]);
        assert_eq!(indexes[0].find(&first, &[ScalarValue::Int64(Some(7))]).expect("find"), [], "old one unchanged");

        // Different batches (a full refresh): built anew over exactly what it holds.
        let replaced = vec![batch(vec![Some(7)], vec!["z"])];
        let rebuilt = indexes_for(std::slice::from_ref(&spec), &replaced, Some((&first, &indexes))).expect("new");
        assert_eq!(rebuilt[0].find(&replaced, &[ScalarValue::Int64(Some(1))]).expect("find"), []);
        assert_eq!(rebuilt[0].find(&replaced, &[ScalarValue::Int64(Some(7))]).expect("find"), [(0, 0)]);
    }

    #[test]
    fn many_rows_with_colliding_hash_prefixes_are_all_found() {
        let ids: Vec<Option<i64>> = (0..100_000).map(|i| Some(i * 7919 % 100_003)).collect();
        let regions = vec!["r"; ids.len()];
        let batches = vec![
            batch(ids[..60_000].to_vec(), regions[..60_000].to_vec()),
            batch(ids[60_000..].to_vec(), regions[60_000..].to_vec()),
        ];
        let index =
            KeyIndex::build(KeySpec::resolve(&["id".into()], &schema(), "t").expect("spec"), &batches).expect("index");
        for (i, id) in ids.iter().enumerate().step_by(997) {
            let want = if i < 60_000 { (0, i) } else { (1, i - 60_000) };
            assert_eq!(index.find(&batches, &[ScalarValue::Int64(*id)]).expect("find"), [want]);
        }
        assert!(index.bytes() >= 100_000 * 4, "{} bytes", index.bytes());
    }
}
