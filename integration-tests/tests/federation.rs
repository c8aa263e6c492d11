//! PostgreSQL federation and acceleration against a real, throwaway PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int32Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::parquet::arrow::ArrowWriter;
use serde_json::Value;
use strata_integration_tests::postgres::PgServer;
use strata_integration_tests::tier::Tier;

async fn seed(pg: &PgServer) {
    let client = pg.connect().await;
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int, price numeric(10,2));
             INSERT INTO items SELECT g, 'item ' || g, g % 97, (g * 1.25)::numeric(10,2) FROM generate_series(1, 1000) g;
             CREATE TABLE events (id int PRIMARY KEY, ts timestamp NOT NULL, v text);
             INSERT INTO events SELECT g, timestamp '2025-01-01' + (g / 2) * interval '1 minute', 'e' || g FROM generate_series(1, 100) g;",
        )
        .await
        .expect("seed");
}

fn write_categories(path: &std::path::Path) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("qty", DataType::Int32, false),
        Field::new("category", DataType::Utf8, false),
    ]));
    let qty: Vec<i32> = (0..97).collect();
    let cat: Vec<String> =
        qty.iter().map(|q| if q % 2 == 0 { "even".to_string() } else { "odd".to_string() }).collect();
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![Arc::new(Int32Array::from(qty)), Arc::new(StringArray::from(cat))],
    )
    .expect("batch");
    let file = std::fs::File::create(path).expect("parquet file");
    let mut writer = ArrowWriter::try_new(file, schema, None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
}

fn platform_config(pg: &PgServer, parquet: &std::path::Path) -> String {
    let p = pg.params_yaml();
    format!(
        r#"datasets:
  - name: items
    from: postgres:public.items
    params: {p}
  - name: categories
    from: file:{parquet}
  - name: items_fast
    from: postgres:public.items
    params: {p}
    acceleration: {{refresh: full}}
  - name: events
    from: postgres:public.events
    params: {p}
    acceleration:
      refresh: append
      time_column: ts
      append_overlap: 1m
      primary_key: [id]
"#,
        parquet = parquet.display()
    )
}

/// Rows of a PostgreSQL query as JSON values, for comparison with Strata's JSON rows.
async fn pg_rows(pg: &PgServer, sql: &str) -> Vec<Value> {
    let client = pg.connect().await;
    let wrapped = format!("SELECT coalesce(json_agg(t), '[]'::json)::text FROM ({sql}) t");
    let row = client.query_one(&wrapped, &[]).await.expect("pg query");
    let text: String = row.get(0);
    serde_json::from_str::<Vec<Value>>(&text).expect("json")
}

/// Normalises numbers so PostgreSQL's `12.50` and Arrow's `"12.50"` or `12.5` compare equal.
fn normalise(rows: Vec<Value>) -> Vec<Value> {
    rows.into_iter()
        .map(|row| match row {
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| {
                        let v = match &v {
                            Value::String(s) => s.parse::<f64>().map(Value::from).unwrap_or(v),
                            Value::Number(n) => n.as_f64().map(Value::from).unwrap_or(v),
                            _ => v,
                        };
                        (k, v)
                    })
                    .collect(),
            ),
            other => other,
        })
        .collect()
}

#[tokio::test]
async fn federation_acceleration_and_refresh() {
    let mut pg = PgServer::start();
    seed(&pg).await;
    let dir = tempfile::tempdir().expect("dir");
    let parquet = dir.path().join("categories.parquet");
    write_categories(&parquet);
    let tier = Tier::start("platform-service", &platform_config(&pg, &parquet)).await;
    tier.wait_ready(Duration::from_secs(30)).await;

    // Federated results equal PostgreSQL's own answers.
    for (strata_sql, pg_sql) in [
        (
            "SELECT id, name, qty FROM items WHERE qty > 90 AND name LIKE 'item 1%' ORDER BY id LIMIT 7",
            "SELECT id, name, qty FROM items WHERE qty > 90 AND name LIKE 'item 1%' ORDER BY id LIMIT 7",
        ),
        (
            "SELECT qty, count(*) AS n, sum(price) AS total FROM items GROUP BY qty ORDER BY qty LIMIT 5",
            "SELECT qty, count(*) AS n, sum(price) AS total FROM items GROUP BY qty ORDER BY qty LIMIT 5",
        ),
        ("SELECT id AS k FROM items ORDER BY id DESC LIMIT 3", "SELECT id AS k FROM items ORDER BY id DESC LIMIT 3"),
    ] {
        assert_eq!(normalise(tier.rows(strata_sql).await), normalise(pg_rows(&pg, pg_sql).await), "{strata_sql}");
    }

    // Projection, filter and limit reach PostgreSQL: the plan shows the SQL sent to it.
    let plan = tier.rows("EXPLAIN SELECT name FROM items WHERE qty > 90 LIMIT 5").await;
    let text = plan.iter().map(|r| r["plan"].as_str().unwrap_or_default().to_string()).collect::<Vec<_>>().join("\n");
    assert!(text.contains("WHERE") && text.contains("90"), "filter not pushed down:\n{text}");
    assert!(text.contains("LIMIT 5"), "limit not pushed down:\n{text}");
    assert!(!text.contains("price"), "projection not pushed down:\n{text}");

    // A PostgreSQL table joined with a Parquet file.
    let joined = tier
        .rows("SELECT c.category, count(*) AS n FROM items i JOIN categories c ON i.qty = c.qty GROUP BY c.category ORDER BY c.category")
        .await;
    let expected = pg_rows(&pg, "SELECT CASE WHEN qty % 2 = 0 THEN 'even' ELSE 'odd' END AS category, count(*) AS n FROM items GROUP BY 1 ORDER BY 1").await;
    assert_eq!(normalise(joined), normalise(expected));

    // The accelerated copy changes only on refresh.
    let client = pg.connect().await;
    client.batch_execute("DELETE FROM items WHERE id > 900").await.expect("delete");
    assert_eq!(tier.rows("SELECT count(*) AS n FROM items_fast").await[0]["n"], 1000);
    assert_eq!(tier.rows("SELECT count(*) AS n FROM items").await[0]["n"], 900, "federated reads are live");
    let (code, status) = tier.post("/v1/datasets/items_fast/refresh").await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["version"], 2);
    assert_eq!(tier.rows("SELECT count(*) AS n FROM items_fast").await[0]["n"], 900);

    // Append refresh fetches only the overlap window and new rows, and rows sharing the
    // newest timestamp are neither lost nor duplicated.
    let before = tier.dataset("events").await;
    assert_eq!(before["rows"], 100);
    client
        .batch_execute(
            "INSERT INTO events SELECT g, timestamp '2025-01-01' + interval '50 minutes', 'late' || g FROM generate_series(101, 110) g;
             INSERT INTO events SELECT g, timestamp '2025-01-01' + interval '2 hours', 'new' || g FROM generate_series(111, 130) g;",
        )
        .await
        .expect("insert events");
    let (code, after) = tier.post("/v1/datasets/events/refresh").await;
    assert_eq!(code, 200, "{after}");
    assert_eq!(after["rows"], 130);
    // Overlap window = rows with ts >= 49 minutes (ids 98..100 and the 10 late ones), plus 20 new.
    let overlap =
        pg_rows(&pg, "SELECT count(*) AS n FROM events WHERE ts >= timestamp '2025-01-01' + interval '49 minutes'")
            .await;
    assert_eq!(after["last_fetched_rows"], overlap[0]["n"], "append read more than the overlap and new rows");
    assert!(after["last_fetched_rows"].as_u64().unwrap_or(u64::MAX) < 130);
    let dupes = tier.rows("SELECT count(*) AS n FROM (SELECT id FROM events GROUP BY id HAVING count(*) > 1)").await;
    assert_eq!(dupes[0]["n"], 0);

    // Source down during refresh: the last good copy keeps serving, the error is reported.
    pg.stop();
    let (code, err) = tier.post("/v1/datasets/items_fast/refresh").await;
    assert_eq!(code, 503, "{err}");
    assert_eq!(tier.rows("SELECT count(*) AS n FROM items_fast").await[0]["n"], 900);
    let status = tier.dataset("items_fast").await;
    assert!(status["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{status}");
    assert!(status["staleness_seconds"].as_f64().is_some(), "{status}");
    assert_eq!(status["state"], "ready");
    let (code, _) = tier.get_json("/health").await;
    assert_eq!(code, 200, "a source outage never fails /health");
    pg.resume();
    // The pool may still hold connections to the stopped server; the refresh recovers on its
    // own (here: on a retry, in production: at the next interval) without a restart.
    let status = tier
        .wait_for(Duration::from_secs(5), "a refresh to succeed after the source resumed", || async {
            let (code, status) = tier.post("/v1/datasets/items_fast/refresh").await;
            (code == 200).then_some(status)
        })
        .await;
    assert_eq!(status["last_error"], Value::Null);
}

#[tokio::test]
async fn readiness_waits_for_the_first_load() {
    let mut pg = PgServer::start();
    seed(&pg).await;
    pg.stop();
    let dir = tempfile::tempdir().expect("dir");
    let parquet = dir.path().join("categories.parquet");
    write_categories(&parquet);
    let tier = Tier::start("platform-service", &platform_config(&pg, &parquet)).await;
    let (health, _) = tier.get_json("/health").await;
    assert_eq!(health, 200, "health answers at once");
    let (ready, body) = tier.get_json("/v1/ready").await;
    assert_eq!(ready, 503, "not ready before the accelerated datasets load: {body}");
    let (code, err) = tier.sql("SELECT count(*) FROM items_fast").await;
    assert_eq!(code, 503, "{err}");
    assert!(err["error"]["message"].as_str().unwrap_or_default().contains("items_fast"), "{err}");
    pg.resume();
    tier.wait_ready(Duration::from_secs(30)).await;
    assert_eq!(tier.rows("SELECT count(*) AS n FROM items_fast").await[0]["n"], 1000);
}

/// Each common PostgreSQL type either arrives exactly or fails with an error naming the
/// column and its type; it is never dropped or silently changed.
#[tokio::test]
async fn postgres_types_round_trip_or_fail_loudly() {
    let pg = PgServer::start();
    let cases: &[(&str, &str, &str)] = &[
        ("smallint", "-12", "-12"),
        ("integer", "123456", "123456"),
        ("bigint", "9007199254740993", "9007199254740993"),
        ("numeric(12,3)", "123456789.123", "123456789.123"),
        ("real", "1.5", "1.5"),
        ("double precision", "3.141592653589793", "3.141592653589793"),
        ("text", "'héllo'", "héllo"),
        ("varchar(10)", "'abc'", "abc"),
        // PostgreSQL itself treats char(n) padding as insignificant and drops it when the
        // value becomes text (`'ab'::char(5)::text = 'ab'`); Strata answers the same.
        ("char(5)", "'ab'", "ab"),
        ("boolean", "true", "true"),
        ("date", "'2024-02-29'", "2024-02-29"),
        ("time", "'13:14:15.123456'", "13:14:15.123456"),
        ("timestamp", "'2024-02-29 13:14:15.123456'", "2024-02-29T13:14:15.123456"),
        ("timestamptz", "'2024-02-29 13:14:15.123456+02'", "2024-02-29T11:14:15.123456"),
        ("interval", "'1 year 2 mons 3 days 04:05:06'", "14 mons 3 days 4 hours 5 mins 6.000000000 secs"),
        ("uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ("jsonb", "'{\"a\": 1}'", "{\"a\": 1}"),
        ("bytea", "'\\x010203'", "010203"),
        ("integer[]", "'{1,2,3}'", "[1, 2, 3]"),
        ("text[]", "'{a,b}'", "[a, b]"),
    ];
    let client = pg.connect().await;
    let mut datasets = String::from("datasets:\n");
    for (i, (ty, literal, _)) in cases.iter().enumerate() {
        client
            .batch_execute(&format!("CREATE TABLE t{i} (c{i} {ty}); INSERT INTO t{i} VALUES ({literal}::{ty});"))
            .await
            .expect("create type table");
        datasets
            .push_str(&format!("  - name: t{i}\n    from: postgres:public.t{i}\n    params: {}\n", pg.params_yaml()));
    }
    let tier = Tier::start("platform-service", &datasets).await;
    let mut report = Vec::new();
    let mut altered = Vec::new();
    for (i, (ty, _, expected)) in cases.iter().enumerate() {
        let column = format!("c{i}");
        // Federated datasets connect in the background: wait until this one has, or has
        // said why it cannot (a type with no faithful Arrow mapping never connects).
        let result = tier
            .wait_for(Duration::from_secs(20), &format!("t{i} to connect or refuse"), || async {
                let result = tier.flight_query(&format!("SELECT {column} FROM t{i}")).await;
                match &result {
                    Err(e) if e.message().contains("unsupported data type") => Some(result),
                    Err(e) if e.message().contains("not available") || e.message().contains("not found") => None,
                    _ => Some(result),
                }
            })
            .await;
        match result {
            Ok(batches) => {
                let batch = batches.iter().find(|b| b.num_rows() > 0).unwrap_or_else(|| panic!("{ty}: no rows"));
                assert_eq!(batch.num_columns(), 1, "{ty}: column count");
                let options = FormatOptions::default();
                let formatter = ArrayFormatter::try_new(batch.column(0).as_ref(), &options).expect("formatter");
                let got = formatter.value(0).to_string();
                let got = got.trim_end_matches('Z').trim_end_matches("+00:00").to_string();
                let arrow_type = batch.schema().field(0).data_type().clone();
                report.push(format!("{ty}: {got} ({arrow_type})"));
                if &got != expected {
                    altered.push(format!("{ty} arrived as `{got}` ({arrow_type}), expected `{expected}`"));
                }
            }
            Err(err) => {
                let message = err.message().to_string();
                report.push(format!("{ty}: error {message}"));
                if !(message.contains(&column) && message.contains(ty.split('(').next().unwrap_or(ty))) {
                    altered.push(format!("{ty}: the error does not name the column and its type: {message}"));
                }
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(altered.is_empty(), "{}", altered.join("\n"));
}
