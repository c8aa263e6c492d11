//! A file written in key order becomes an accelerated copy in that order, read in parallel,
//! so a join by the key reads only the batches holding the keys it looks for.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::file::properties::WriterProperties;
use futures::TryStreamExt;
use strata_core::Engine;
use strata_integration_tests::loaded_engine;
use strata_integration_tests::sqlgen::Rng;

/// Rows enough for a file past DataFusion's 10 MB threshold for splitting a file's scan
/// into ranges read in parallel (the values are random, so they barely compress).
const ROWS: i64 = 2_000_000;

/// `id` ascending from 0, `v` random, in 200 row groups (many, so that a reader stealing
/// row groups from another partition would do so).
fn write_table(path: &std::path::Path) {
    let schema =
        Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("v", DataType::Int64, false)]));
    let properties = WriterProperties::builder().set_max_row_group_row_count(Some(10_000)).build();
    let file = std::fs::File::create(path).expect("file");
    let mut writer = ArrowWriter::try_new(file, Arc::clone(&schema), Some(properties)).expect("writer");
    let mut rng = Rng::new(0x004d_e4ed);
    for start in (0..ROWS).step_by(50_000) {
        let ids = Int64Array::from_iter_values(start..start + 50_000);
        let values = Int64Array::from_iter_values((0..50_000).map(|_| rng.below(1 << 40) as i64));
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(ids), Arc::new(values)]).expect("batch");
        writer.write(&batch).expect("write");
    }
    writer.close().expect("close");
}

/// The text of every row of an answer, one line each.
async fn lines(engine: &Engine, sql: &str) -> Vec<String> {
    let stream = engine.execute(sql, Vec::new()).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    let batches: Vec<RecordBatch> = stream.try_collect().await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    arrow::util::pretty::pretty_format_batches(&batches)
        .expect("format")
        .to_string()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_file_in_key_order_is_a_copy_in_key_order_whose_joins_read_only_their_keys_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("facts.parquet");
    write_table(&path);
    assert!(std::fs::metadata(&path).expect("file").len() > 10 << 20, "the file is split for parallel reading");
    let yaml =
        format!("region: eu\ndatasets:\n  - name: facts\n    from: file:{}\n    acceleration: {{}}\n", path.display());
    let (engine, _stop) = loaded_engine(&yaml, Duration::from_secs(120)).await;

    // Every row arrived once.
    let totals =
        lines(&engine, "SELECT count(*) AS n, count(DISTINCT id) AS ids, min(id) AS lo, max(id) AS hi FROM facts")
            .await;
    assert_eq!(totals[3], "| 2000000 | 2000000 | 0  | 1999999 |", "{totals:?}");

    // The copy keeps the file's order: the first rows of the copy are the file's first.
    let first = lines(&engine, "SELECT id FROM facts LIMIT 3").await;
    assert_eq!(first[3..6], ["| 0  |", "| 1  |", "| 2  |"], "{first:?}");

    // A join with three keys reads the batches holding them and skips the rest.
    let join = "SELECT f.id FROM facts f JOIN (VALUES (7), (1000000), (1999999)) AS w(id) ON f.id = w.id ORDER BY f.id";
    assert_eq!(lines(&engine, join).await[3..6], ["| 7       |", "| 1000000 |", "| 1999999 |"]);
    let analyzed = lines(&engine, &format!("EXPLAIN ANALYZE {join}")).await.join("\n");
    let skipped: usize = analyzed
        .split("batches_skipped_by_runtime_filters=")
        .skip(1)
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse::<usize>().ok())
        .sum();
    let batches = ROWS as usize / 8192;
    assert!(skipped + 10 > batches, "{skipped} of about {batches} batches skipped:\n{analyzed}");
}
