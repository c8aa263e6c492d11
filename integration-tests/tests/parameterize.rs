//! Literal SQL shares the plan of its shape (automatic parameterization): every answer must
//! be the one DataFusion gives for the SQL as written, including where a literal's type
//! differs from its column's and the engine has to plan the text as it is.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Date32Array, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::util::pretty::pretty_format_batches;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use futures::TryStreamExt;
use strata_core::{Config, Engine};

fn typed_rows() -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("small", DataType::Int32, false),
        Field::new("amount", DataType::Float64, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("day", DataType::Date32, false),
    ]));
    let ids: Vec<i64> = (0..10).collect();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(ids.clone())),
            Arc::new(Int32Array::from_iter_values(ids.iter().map(|i| *i as i32 - 2))),
            Arc::new(Float64Array::from_iter_values(ids.iter().map(|i| *i as f64 * 0.5))),
            Arc::new(StringArray::from_iter_values(ids.iter().map(|i| format!("n{i}")))),
            // 2024-01-01 is day 19723 of the epoch.
            Arc::new(Date32Array::from_iter_values(ids.iter().map(|i| 19_723 + *i as i32))),
        ],
    )
    .expect("batch")
}

/// [`typed_rows`] as a Parquet file in `dir`.
fn write_typed(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("typed.parquet");
    let batch = typed_rows();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(&path).expect("file"), batch.schema(), None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
    path
}

/// Sorted lines of the pretty-printed answer, so row order does not matter.
fn lines(batches: &[RecordBatch]) -> Vec<String> {
    let text = pretty_format_batches(batches).expect("format").to_string();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

#[tokio::test]
async fn literal_sql_answers_as_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_typed(dir.path());

    // The same file accelerated (`typed`) and read live on every query (`typed_live`).
    let config = Config::parse(
        &format!(
            "region: eu\ndatasets:\n  - name: typed\n    from: file:{p}\n    acceleration: {{}}\n  - name: typed_live\n    from: file:{p}\n",
            p = path.display()
        ),
        "test",
    )
    .expect("config");
    let engine = Engine::new(&config).expect("engine");
    engine.start();
    tokio::time::timeout(Duration::from_secs(30), engine.wait_ready()).await.expect("ready");

    let reference = SessionContext::new();
    for table in ["typed", "typed_live"] {
        reference
            .register_parquet(table, path.to_str().expect("utf-8 path"), ParquetReadOptions::default())
            .await
            .expect("register");
    }

    let shapes = [
        // One shape, many keys: each must get its own row, not the first key's.
        "SELECT id, name FROM {t} WHERE id = 3",
        "SELECT id, name FROM {t} WHERE id = 7",
        "SELECT id, name FROM {t} WHERE id = -1",
        // Int32 column: the key fits and binds; out of range it must find nothing.
        "SELECT id FROM {t} WHERE small = 3",
        "SELECT id FROM {t} WHERE small = 5000000000",
        "SELECT id FROM {t} WHERE small > -2 AND small < 4",
        // Float column with an integer literal, and a float literal: planned as written.
        "SELECT id FROM {t} WHERE amount = 2",
        "SELECT id FROM {t} WHERE amount > 1.5",
        "SELECT id FROM {t} WHERE name = 'n3'",
        "SELECT id FROM {t} WHERE name IN ('n1', 'n4', 'zz')",
        "SELECT id FROM {t} WHERE name BETWEEN 'n2' AND 'n5'",
        // A date column compared with a string: the string is parsed as a date.
        "SELECT id FROM {t} WHERE day = '2024-01-03'",
        "SELECT id FROM {t} WHERE day > '2024-01-08'",
        "SELECT id FROM {t} WHERE small = 1 AND day = '2024-01-04'",
        "SELECT id FROM {t} WHERE NOT (id = 2) AND (id < 4 OR id IN (8, 9))",
        "SELECT name, count(*) AS n FROM {t} GROUP BY name HAVING name = 'n5'",
        "SELECT id FROM {t} WHERE 3 = id",
    ];
    for table in ["typed", "typed_live"] {
        for shape in shapes {
            let sql = shape.replace("{t}", table);
            let expected: Vec<RecordBatch> =
                reference.sql(&sql).await.expect("reference plan").collect().await.expect("reference run");
            let got: Vec<RecordBatch> = engine
                .execute(&sql, Vec::new())
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .try_collect()
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert_eq!(lines(&got), lines(&expected), "{sql}");
        }
    }

    // Lookups that differ only in their key share one plan.
    let before = engine.cached_plans();
    for key in 100..150 {
        let sql = format!("SELECT name FROM typed WHERE id = {key} AND name <> 'n{key}'");
        let rows: Vec<RecordBatch> =
            engine.execute(&sql, Vec::new()).await.expect("run").try_collect().await.expect("rows");
        assert_eq!(rows.iter().map(RecordBatch::num_rows).sum::<usize>(), 0, "{sql}");
    }
    assert_eq!(engine.cached_plans(), before + 1, "50 keys of one shape should add one plan");
}

/// Texts that differ only in their literals share a skeleton, and after the first of them
/// are not parsed: their literals are read off their tokens (see `literal_shapes`). Each
/// answer must still be the one DataFusion gives for the text as written, whatever a
/// careless or hostile client puts where the first text had its literals: negative, huge,
/// decimal and quoted values, a changed LIMIT or projected constant, quotes and unicode.
#[tokio::test]
async fn texts_of_one_skeleton_answer_each_as_written() {
    use strata_integration_tests::sqlgen::Rng;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_typed(dir.path());
    let yaml = format!(
        "region: eu\ndatasets:\n  - name: typed\n    from: file:{}\n    acceleration: {{primary_key: [id]}}\n",
        path.display()
    );
    let (engine, _stop) = strata_integration_tests::loaded_engine(&yaml, Duration::from_secs(30)).await;
    let reference = SessionContext::new();
    reference
        .register_parquet("typed", path.to_str().expect("utf-8 path"), ParquetReadOptions::default())
        .await
        .expect("register");

    let mut rng = Rng::new(0x5e1e_70a5);
    let numbers =
        ["0", "3", "9", "-1", "-0", "2147483648", "9223372036854775807", "99999999999999999999", "1.5", "2e0", "007"];
    let strings = ["'n3'", "'n1'", "''", "'it''s'", "'ünï'", "'n3 '", "'2024-01-03'"];
    for _ in 0..400 {
        let mut number = || numbers[rng.below(numbers.len())];
        let (a, b, c) = (number(), number(), number());
        let s = strings[rng.below(strings.len())];
        let limit = 1 + rng.below(3);
        let sql = match rng.below(7) {
            0 => format!("SELECT id, name FROM typed WHERE id = {a}"),
            1 => format!("SELECT id FROM typed WHERE small = {a} OR id = {b}"),
            2 => format!("SELECT id, {a} AS k FROM typed WHERE id > {b} LIMIT {limit}"),
            3 => format!("SELECT id FROM typed WHERE name = {s} AND id < {a}"),
            4 => format!("SELECT id FROM typed WHERE id BETWEEN {a} AND {b} AND small IN ({c}, {a})"),
            5 => format!("SELECT id FROM typed WHERE -{a} < id AND amount > {b}"),
            _ => format!("SELECT count(*) AS n FROM typed WHERE name <> {s} AND day = {s}"),
        };
        let expected = reference.sql(&sql).await.map_err(|e| e.to_string());
        let expected = match expected {
            Ok(frame) => frame.collect().await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let got = match engine.execute(&sql, Vec::new()).await {
            Ok(stream) => stream.try_collect::<Vec<RecordBatch>>().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match (expected, got) {
            (Ok(expected), Ok(got)) if sql.contains("LIMIT") => {
                // LIMIT without ORDER BY may pick any rows: as many, none twice.
                assert_eq!(
                    got.iter().map(RecordBatch::num_rows).sum::<usize>(),
                    expected.iter().map(RecordBatch::num_rows).sum::<usize>(),
                    "{sql}"
                );
            }
            (Ok(expected), Ok(got)) => assert_eq!(lines(&got), lines(&expected), "{sql}"),
            (Err(_), Err(_)) => {}
            (expected, got) => panic!("{sql}: DataFusion {expected:?}, Strata {got:?}"),
        }
    }
}
