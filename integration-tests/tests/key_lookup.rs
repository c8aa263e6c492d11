//! The key-lookup fast path against the general path: the same Parquet file accelerated
//! twice in one engine, once with indexes and once without, and thousands of random
//! lookups (prepared with each client's parameter types, and literal), composite keys,
//! lookups with another predicate, LIMITs and range queries through both. Every answer must
//! be the general path's, byte for byte once the order SQL leaves open is fixed; and the
//! lookups must really have taken the fast path.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::common::ScalarValue;
use datafusion::parquet::arrow::ArrowWriter;
use futures::TryStreamExt;
use strata_core::{Config, Engine};
use strata_integration_tests::sqlgen::Rng;

const ROWS: i64 = 20_000;

/// `id` unique (shuffled, so zone maps prune little), `grp` with ~200 rows per value,
/// `name` unique strings, `tag` nullable with repeats, `ts` a timestamp.
fn write_table(path: &std::path::Path) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("grp", DataType::Int32, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("tag", DataType::Utf8, true),
        Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), false),
    ]));
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(path).expect("file"), Arc::clone(&schema), None).expect("writer");
    for start in (0..ROWS).step_by(1_000) {
        let rows: Vec<i64> = (start..start + 1_000).collect();
        let id = |r: i64| r * 7_919 % ROWS;
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|&r| id(r)))),
                Arc::new(Int32Array::from_iter_values(rows.iter().map(|&r| (id(r) % 97) as i32))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|&r| format!("name-{}", id(r))))),
                Arc::new(StringArray::from_iter(
                    rows.iter().map(|&r| (id(r) % 11 != 0).then(|| format!("t{}", id(r) % 13))),
                )),
                Arc::new(TimestampMicrosecondArray::from_iter_values(
                    rows.iter().map(|&r| 1_700_000_000_000_000 + id(r) * 1_000_000),
                )),
            ],
        )
        .expect("batch");
        writer.write(&batch).expect("write");
    }
    writer.close().expect("close");
}

/// The rows of an answer as sorted text lines: the order SQL leaves open is fixed, the
/// values and the schema (the header line) are compared exactly.
async fn answer(engine: &Engine, sql: &str, params: Vec<ScalarValue>) -> Result<Vec<String>, String> {
    let stream = engine.execute(sql, params).await.map_err(|e| e.to_string())?;
    let schema = stream.schema();
    let batches: Vec<RecordBatch> = stream.try_collect().await.map_err(|e| e.to_string())?;
    let all = arrow::compute::concat_batches(&schema, &batches).map_err(|e| e.to_string())?;
    let fields: Vec<String> =
        schema.fields().iter().map(|f| format!("{}:{}:{}", f.name(), f.data_type(), f.is_nullable())).collect();
    let mut lines: Vec<String> = arrow::util::pretty::pretty_format_batches(&[all])
        .map_err(|e| e.to_string())?
        .to_string()
        .lines()
        .skip(3)
        .map(str::to_string)
        .collect();
    lines.sort();
    lines.insert(0, fields.join(","));
    Ok(lines)
}

#[tokio::test]
async fn thousands_of_random_lookups_answer_as_the_general_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("items.parquet");
    write_table(&path);
    let yaml = format!(
        "region: eu
datasets:
  - name: fast
    from: file:{p}
    acceleration:
      primary_key: [id]
      indexes: [grp, name, [tag, grp], ts]
  - name: slow
    from: file:{p}
    acceleration: {{}}
",
        p = path.display()
    );
    let (engine, _stop) = strata_integration_tests::loaded_engine(&yaml, Duration::from_secs(60)).await;
    let status = engine.datasets().into_iter().find(|d| d.name == "fast").expect("fast");
    let indexed: Vec<Vec<String>> = status.indexes.iter().map(|i| i.columns.clone()).collect();
    assert_eq!(indexed, [vec!["id"], vec!["grp"], vec!["name"], vec!["tag", "grp"], vec!["ts"]]);
    assert!(status.indexes.iter().all(|i| i.bytes >= 4 * ROWS as usize / 2), "{:?}", status.indexes);

    let mut rng = Rng::new(0x5eed_1dea);
    let mut compared = 0;
    for _ in 0..3_000 {
        // Keys inside and just outside the table.
        let id = rng.below(ROWS as usize + 50) as i64 - 25;
        let grp = rng.below(100) as i64;
        let tag = format!("t{}", rng.below(14));
        let (sql, params): (String, Vec<ScalarValue>) = match rng.below(13) {
            0 => ("SELECT * FROM {t} WHERE id = $1".into(), vec![ScalarValue::Int64(Some(id))]),
            // pyarrow/ADBC bind Python ints as 64-bit, JDBC setInt as 32-bit, some send text.
            1 => ("SELECT name, id FROM {t} WHERE id = $1".into(), vec![ScalarValue::Int32(Some(id as i32))]),
            2 => ("SELECT name FROM {t} WHERE id = $1".into(), vec![ScalarValue::Utf8(Some(id.to_string()))]),
            3 => ("SELECT name FROM {t} WHERE id = $1".into(), vec![ScalarValue::Int64(None)]),
            4 => (format!("SELECT ts, tag FROM {{t}} WHERE id = {id}"), vec![]),
            5 => (format!("SELECT id FROM {{t}} WHERE grp = {grp}"), vec![]),
            6 => (
                "SELECT id, tag FROM {t} x WHERE x.tag = $1 AND x.grp = $2".into(),
                vec![ScalarValue::Utf8(Some(tag)), ScalarValue::Int64(Some(grp))],
            ),
            7 => (format!("SELECT * FROM {{t}} WHERE name = 'name-{id}'"), vec![]),
            8 => (format!("SELECT id FROM {{t}} WHERE id = {id} AND grp = {grp}"), vec![]),
            9 => (format!("SELECT id, name FROM {{t}} WHERE id = {id} LIMIT 1"), vec![]),
            10 => {
                (format!("SELECT id, grp FROM {{t}} WHERE id BETWEEN {id} AND {}", id + rng.below(40) as i64), vec![])
            }
            11 => (
                format!("SELECT id FROM {{t}} WHERE ts = TIMESTAMP '2023-11-14 22:13:20' + INTERVAL '{id} seconds'"),
                vec![],
            ),
            _ => (format!("SELECT count(*) AS n FROM {{t}} WHERE grp = {grp}"), vec![]),
        };
        let fast = answer(&engine, &sql.replace("{t}", "fast"), params.clone()).await;
        let slow = answer(&engine, &sql.replace("{t}", "slow"), params).await;
        match (&fast, &slow) {
            (Ok(f), Ok(s)) => assert_eq!(f, s, "{sql}"),
            (Err(f), Err(s)) => assert_eq!(f.replace("fast", "slow"), *s, "{sql}: both refuse, alike"),
            _ => panic!("{sql}: fast {fast:?} but general {slow:?}"),
        }
        compared += 1;
    }
    assert_eq!(compared, 3_000);
    let fast_answers = engine.index_lookups();
    // Lookups by an indexed key (kinds 0 to 7, 9 and 11: about 10 in 13) took the fast path;
    // the rest (another predicate, a range, an aggregate) could not.
    assert!((1_900..=2_600).contains(&fast_answers), "{fast_answers} answers from the index");
}

#[tokio::test]
async fn a_bad_index_declaration_names_the_dataset_and_the_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("items.parquet");
    write_table(&path);
    let config = Config::parse(
        &format!(
            "region: eu\ndatasets:\n  - name: items\n    from: file:{}\n    acceleration:\n      indexes: [id, [grp, nope]]\n",
            path.display()
        ),
        "test",
    )
    .expect("config");
    let engine = Engine::new(&config).expect("engine");
    let _stop = engine.background().token().drop_guard();
    engine.start();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = engine.datasets().into_iter().find(|d| d.name == "items").expect("items");
        if let Some(error) = status.last_error {
            assert!(
                error.contains("datasets (`items`).acceleration.indexes[1]: column `nope` is not in the dataset"),
                "{error}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no error reported: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sidecar's side of the fast path: its replicas index the keys the platform's catalog
/// lists, and a lookup on a whole replica is answered from the index by its generic plan;
/// one on a subset replica is routed by its values first. Random lookups over HTTP (literal
/// keys) and Flight SQL (bound keys) on the indexed replicas must answer exactly as the
/// same queries on an unindexed replica of the same file, and leave the subset replica
/// only when the key's row is outside it.
#[tokio::test]
async fn a_sidecar_answers_lookups_from_its_replicas_as_the_general_path() {
    use strata_integration_tests::tier::Tier;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("items.parquet");
    write_table(&path);
    let indexed = "    acceleration:\n      primary_key: [id]\n      indexes: [name]\n";
    let platform_config = format!(
        "region: eu\ndatasets:\n  - name: fast\n    from: file:{p}\n{indexed}  - name: part\n    from: file:{p}\n{indexed}  - name: slow\n    from: file:{p}\n    acceleration: {{}}\n",
        p = path.display()
    );
    let platform = Tier::start("platform-service", &platform_config).await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let sidecar_config = format!(
        "region: eu\nupstream:\n  endpoints: [http://{}]\nresults_cache:\n  max_bytes: 0\nreplicas:\n  - name: fast\n  - name: part\n    where: grp < 50\n  - name: slow\n",
        platform.flight_addr
    );
    let sidecar = Tier::start("app-sidecar", &sidecar_config).await;
    sidecar
        .wait_for(Duration::from_secs(30), "three loaded replicas", || async {
            let (_, body) = sidecar.get_json("/v1/datasets").await;
            let ready = body["datasets"].as_array().map_or(0, |d| d.iter().filter(|d| d["state"] == "ready").count());
            (ready == 3).then_some(())
        })
        .await;
    let sorted = |mut rows: Vec<serde_json::Value>| {
        rows.sort_by_key(|r| r.to_string());
        rows
    };

    let before = sidecar.metric("strata_index_lookups_total").await;
    let mut rng = Rng::new(0x51de_ca55);
    let mut keyed_on_fast = 0;
    for _ in 0..1_000 {
        let id = rng.below(ROWS as usize + 50) as i64 - 25;
        let kind = rng.below(4);
        let sql = match kind {
            0 => format!("SELECT * FROM {{t}} WHERE id = {id}"),
            1 => format!("SELECT name, grp AS g FROM {{t}} WHERE {id} = id LIMIT 1"),
            2 => format!("SELECT id, tag FROM {{t}} WHERE name = 'name-{id}'"),
            // Not a key lookup (no index on both columns); on the subset replica, inside it
            // when grp < 50.
            _ => format!("SELECT ts FROM {{t}} WHERE id = {id} AND grp = {}", id % 97),
        };
        let general = sorted(sidecar.routed(&sql.replace("{t}", "slow"), &[]).await.0);
        let (fast, route, _) = sidecar.routed(&sql.replace("{t}", "fast"), &[]).await;
        assert_eq!(sorted(fast), general, "{sql}");
        assert_eq!(route, "local", "{sql}");
        keyed_on_fast += usize::from(kind < 3);
        let (part, route, _) = sidecar.routed(&sql.replace("{t}", "part"), &[]).await;
        assert_eq!(sorted(part), general, "{sql} on the subset replica");
        // A key says nothing of `grp`: only a query that keeps to grp < 50 is answered here.
        let inside = kind == 3 && id % 97 < 50;
        assert_eq!(route, if inside { "local" } else { "forwarded" }, "{sql} on the subset replica");
    }
    // Every lookup on `fast` by `id` or by `name` was answered from the index.
    let answered = sidecar.metric("strata_index_lookups_total").await - before;
    assert!(answered >= keyed_on_fast as u64, "{answered} index answers for {keyed_on_fast} key lookups on `fast`");

    // Flight SQL with the key bound, as ADBC sends it (64-bit) and as JDBC's setInt does;
    // `slow` has no index, so its lookups take the general path.
    let mut flight = sidecar.flight().await;
    for (table, data_type) in [("fast", DataType::Int64), ("slow", DataType::Int64), ("fast", DataType::Int32)] {
        let mut statement =
            flight.prepare(format!("SELECT name, ts FROM {table} WHERE id = $1"), None).await.expect("prepare");
        let schema = Arc::new(Schema::new(vec![Field::new("$1", data_type.clone(), false)]));
        for id in [-1i64, 0, 7, 19_999, 20_000] {
            let column: arrow::array::ArrayRef = match data_type {
                DataType::Int32 => Arc::new(Int32Array::from(vec![id as i32])),
                _ => Arc::new(Int64Array::from(vec![id])),
            };
            statement
                .set_parameters(RecordBatch::try_new(Arc::clone(&schema), vec![column]).expect("params"))
                .expect("bind");
            let info = statement.execute().await.expect("GetFlightInfo");
            // GetFlightInfo starts a statement early on a sidecar (its DoGet then takes the
            // run), except a lookup the replica's index answers: DoGet answers that itself.
            let ticket = info.endpoint[0].ticket.as_ref().expect("ticket");
            let started_early = String::from_utf8_lossy(&ticket.ticket).contains("\"run\":");
            assert_eq!(started_early, table == "slow", "{table} id {id}: started at GetFlightInfo");
            let mut rows = 0;
            for endpoint in info.endpoint {
                let stream = flight.do_get(endpoint.ticket.expect("ticket")).await.expect("DoGet");
                let batches: Vec<RecordBatch> = stream.try_collect().await.expect("batches");
                rows += batches.iter().map(|b| b.num_rows()).sum::<usize>();
            }
            assert_eq!(rows, usize::from((0..ROWS).contains(&id)), "{table} id {id} as {data_type}");
        }
    }
}
