//! Injection against a real PostgreSQL source: identifiers and literals with quotes,
//! backslashes, comment markers, dollar quotes, NUL and bytes that are not UTF-8, in SQL
//! text and in bound parameters. Filters reach PostgreSQL as SQL generated from the plan
//! (never the client's text), so each value matches exactly its own row, and nothing a
//! client sends runs as SQL of its own.

use std::time::Duration;

use serde_json::Value;
use strata_integration_tests::postgres::PgServer;
use strata_integration_tests::tier::Tier;

/// Values that break naive quoting, each stored in its own row.
const NASTY: &[&str] = &[
    "O'Brien",
    "''; DROP TABLE notes; --",
    "back\\slash\\",
    "\\'; DROP TABLE notes; --",
    "-- not a comment",
    "/* not a comment */ x",
    "$$dollar$$",
    "$tag$ tagged $tag$",
    "\"double\" quotes",
    "semi;colon",
    "new\nline\ttab",
    "unicode ünïcødé 🙂",
    "%_ like wildcards",
];

/// `value` as an SQL string literal.
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[tokio::test]
async fn quotes_comments_and_dollar_quotes_reach_postgresql_as_data() {
    let pg = PgServer::start();
    let client = pg.connect().await;
    client
        .batch_execute(
            r#"CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL, "we""ird -- col" text, "select" int);"#,
        )
        .await
        .expect("create");
    for (i, value) in NASTY.iter().enumerate() {
        client
            .execute(
                r#"INSERT INTO notes VALUES ($1, $2, $3, $4)"#,
                &[&(i as i32), value, &format!("w{i}"), &(i as i32 * 10)],
            )
            .await
            .expect("insert");
    }
    let config =
        format!("datasets:\n  - name: notes\n    from: postgres:public.notes\n    params: {}\n", pg.params_yaml());
    let tier = Tier::start("platform-service", &config).await;
    tier.wait_ready(Duration::from_secs(30)).await;

    for (i, value) in NASTY.iter().enumerate() {
        // In the SQL text, as a literal (pushed down to PostgreSQL as a filter).
        let sql = format!("SELECT id FROM notes WHERE body = {}", literal(value));
        let (code, body) = tier.sql(&sql).await;
        assert_eq!(code, 200, "{sql}: {body}");
        assert_eq!(body, serde_json::json!([{ "id": i }]), "{sql}");
        // In a filter no plan shape shares (the literal inside an expression).
        let sql = format!("SELECT id FROM notes WHERE body || '!' = {} || '!'", literal(value));
        let (code, body) = tier.sql(&sql).await;
        assert_eq!((code, body.clone()), (200, serde_json::json!([{ "id": i }])), "{sql}: {body}");
        // In LIKE and IN too.
        let sql = format!("SELECT count(*) AS n FROM notes WHERE body IN ({}, 'nothing')", literal(value));
        assert_eq!(tier.sql(&sql).await.1[0]["n"], 1, "{sql}");
        // As a bound parameter over Flight SQL.
        let mut flight = tier.flight().await;
        let mut statement = flight.prepare("SELECT id FROM notes WHERE body = $1".into(), None).await.expect("prepare");
        let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
            "$1",
            arrow::datatypes::DataType::Utf8,
            false,
        )]));
        let params = arrow::array::RecordBatch::try_new(
            schema,
            vec![std::sync::Arc::new(arrow::array::StringArray::from(vec![*value]))],
        )
        .expect("params");
        statement.set_parameters(params).expect("bind");
        let info = statement.execute().await.expect("execute");
        let ticket = info.endpoint[0].ticket.clone().expect("ticket");
        let batches: Vec<arrow::array::RecordBatch> =
            futures::TryStreamExt::try_collect(flight.do_get(ticket).await.expect("do_get")).await.expect("rows");
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1, "parameter {value:?}");
    }

    // Identifiers that need quoting, in projections and filters.
    let (code, body) = tier.sql(r#"SELECT "we""ird -- col" AS w, "select" FROM notes WHERE "select" = 20"#).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, serde_json::json!([{ "w": "w2", "select": 20 }]));
    let (code, body) = tier.sql(r#"SELECT id FROM notes WHERE "we""ird -- col" = 'w3'"#).await;
    assert_eq!((code, body), (200, serde_json::json!([{ "id": 3 }])));

    // NUL cannot be stored in PostgreSQL text: a clear error or no match, never a crash.
    let (code, body) = tier.sql("SELECT id FROM notes WHERE body = 'a' || chr(0) || 'b'").await;
    assert!(code == 200 && body == serde_json::json!([]) || code >= 400, "{code} {body}");
    // SQL text that is not UTF-8 is refused as such.
    let response = reqwest::Client::new()
        .post(tier.url("/v1/sql"))
        .body(b"SELECT id FROM notes WHERE body = '\xff\xfe'".to_vec())
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 400);
    let text = response.text().await.expect("body");
    assert!(text.to_lowercase().contains("utf-8"), "{text}");

    // Nothing ran as SQL of its own: the table and its rows are intact.
    let count: i64 = client.query_one("SELECT count(*) FROM notes", &[]).await.expect("count").get(0);
    assert_eq!(count, NASTY.len() as i64);
    let (code, body) = tier.sql("SELECT count(*) AS n FROM notes").await;
    assert_eq!((code, body[0]["n"].clone()), (200, Value::from(NASTY.len())));
}
