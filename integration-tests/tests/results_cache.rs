//! The results cache: a repeated query over an accelerated copy is a HIT with the same rows;
//! after a refresh the next answer is fresh (never a stale hit) unless the dataset allows
//! `stale_while_revalidate` or the client `max-stale`, and then the answer says STALE and
//! what it read; identical concurrent misses run once; an answer larger than an entry
//! streams uncached; answers read live from a source are never cached; `only-if-cached`
//! never runs a query.

use std::time::Duration;

use serde_json::Value;
use strata_integration_tests::postgres::PgServer;
use strata_integration_tests::tier::Tier;

const DASHBOARD: &str = "SELECT grp, count(*) AS n, sum(amount) AS total FROM sales GROUP BY grp ORDER BY grp";

async fn query(tier: &Tier, sql: &str) -> (Vec<Value>, String) {
    let (status, body, headers) = tier.sql_with(sql, &[]).await;
    assert_eq!(status, 200, "{body}");
    let cache = headers.get("strata-cache").and_then(|v| v.to_str().ok()).unwrap_or("none").to_string();
    (body.as_array().cloned().expect("rows"), cache)
}

fn counter(metrics: &str, result: &str) -> u64 {
    let prefix = format!("strata_results_cache_total{{result=\"{result}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn results_cache_hits_until_the_data_changes_and_coalesces_concurrent_misses() {
    let pg = PgServer::start();
    pg.connect()
        .await
        .batch_execute(
            "CREATE TABLE sales (id bigint PRIMARY KEY, grp int NOT NULL, amount double precision NOT NULL);
             INSERT INTO sales SELECT i, i % 10, i * 0.25 FROM generate_series(1, 200000) i;",
        )
        .await
        .expect("seed");
    let config = format!(
        "results_cache:\n  max_entry_bytes: 64KiB\ndatasets:\n  - name: sales\n    from: postgres:public.sales\n    params: {p}\n    acceleration: {{refresh: full}}\n  - name: live_sales\n    from: postgres:public.sales\n    params: {p}\n",
        p = pg.params_yaml()
    );
    let tier = Tier::start("platform-service", &config).await;
    tier.wait_ready(Duration::from_secs(30)).await;

    let (first, status) = query(&tier, DASHBOARD).await;
    assert_eq!(status, "MISS");
    let (again, status) = query(&tier, DASHBOARD).await;
    assert_eq!(status, "HIT");
    assert_eq!(first, again);
    // The key is the optimized plan, not the text: the same question spelled differently hits.
    let (respelled, status) = query(&tier, &DASHBOARD.to_lowercase().replace("group by grp", "GROUP  BY  grp")).await;
    assert_eq!((respelled, status.as_str()), (first.clone(), "HIT"));

    // A change of the data invalidates exactly: the next answer sees it.
    pg.connect().await.batch_execute("INSERT INTO sales VALUES (200001, 3, 1000.0)").await.expect("insert");
    let (code, _) = tier.post("/v1/datasets/sales/refresh").await;
    assert_eq!(code, 200);
    let (fresh, status) = query(&tier, DASHBOARD).await;
    assert_eq!(status, "MISS", "a refresh must never leave a stale hit");
    assert_eq!(fresh[3]["n"].as_i64(), first[3]["n"].as_i64().map(|n| n + 1));

    // Identical concurrent misses run once: after another refresh, 8 clients at once give one MISS.
    pg.connect().await.batch_execute("INSERT INTO sales VALUES (200002, 4, 1.0)").await.expect("insert");
    tier.post("/v1/datasets/sales/refresh").await;
    let before = reqwest::get(tier.url("/metrics")).await.expect("metrics").text().await.expect("text");
    let answers = futures::future::join_all((0..8).map(|_| query(&tier, DASHBOARD))).await;
    let after = reqwest::get(tier.url("/metrics")).await.expect("metrics").text().await.expect("text");
    assert_eq!(counter(&after, "MISS") - counter(&before, "MISS"), 1, "concurrent misses were not coalesced");
    assert_eq!(counter(&after, "HIT") - counter(&before, "HIT"), 7);
    assert!(
        answers
            .iter()
            .all(|(rows, _)| rows == &answers[0].0 && rows[4]["n"] == fresh[4]["n"].as_i64().map_or(0, |n| n + 1))
    );
    assert!(after.contains("strata_results_cache_bytes"), "{after}");

    // Larger than an entry (64 KiB here): streamed, complete, not cached.
    for _ in 0..2 {
        let (rows, status) = query(&tier, "SELECT id, amount FROM sales WHERE id <= 20000").await;
        assert_eq!((rows.len(), status.as_str()), (20_000, "BYPASS"));
    }
    // Read live from the source: never cached, it has no version to key by.
    let (_, status) = query(&tier, "SELECT count(*) AS n FROM live_sales").await;
    assert_eq!(status, "none");
}

#[tokio::test]
async fn results_cache_can_be_turned_off() {
    let dir = tempfile::tempdir().expect("dir");
    let csv = dir.path().join("t.csv");
    std::fs::write(&csv, "a,b\n1,2\n3,4\n").expect("csv");
    let tier = Tier::start(
        "platform-service",
        &format!(
            "results_cache:\n  max_bytes: 0\ndatasets:\n  - name: t\n    from: file:{}\n    acceleration: {{}}\n",
            csv.display()
        ),
    )
    .await;
    tier.wait_ready(Duration::from_secs(30)).await;
    for _ in 0..2 {
        let (rows, status) = query(&tier, "SELECT sum(a) AS s FROM t").await;
        assert_eq!((rows[0]["s"].as_i64(), status.as_str()), (Some(4), "none"));
    }
}

/// One `POST /v1/sql` asking for `accept`: its Content-Type, `strata-cache` and raw body.
async fn raw_answer(tier: &Tier, sql: &str, accept: &str) -> (String, String, Vec<u8>) {
    let response = reqwest::Client::new()
        .post(tier.url("/v1/sql"))
        .header("accept", accept)
        .body(sql.to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let get = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("none").to_string();
    let (content_type, cache) = (get("content-type"), get("strata-cache"));
    (content_type, cache, response.bytes().await.expect("body").to_vec())
}

/// A platform accelerating `t` from a CSV file whose values need quoting, a NULL and a
/// two-byte character; the file's path, for tests that change it, and its directory.
async fn platform_with_awkward_csv() -> (tempfile::TempDir, std::path::PathBuf, Tier) {
    let dir = tempfile::tempdir().expect("dir");
    let csv = dir.path().join("t.csv");
    std::fs::write(&csv, "a,b\n1,\"x, \"\"y\"\"\"\n2,\n3,é\n").expect("csv");
    let config =
        format!("datasets:\n  - name: t\n    from: file:{}\n    acceleration: {{refresh: full}}\n", csv.display());
    let tier = Tier::start("platform-service", &config).await;
    tier.wait_ready(Duration::from_secs(30)).await;
    (dir, csv, tier)
}

#[tokio::test]
async fn a_hit_sends_the_bytes_its_miss_sent_in_the_format_each_request_asks_for() {
    let (_dir, csv, tier) = platform_with_awkward_csv().await;
    let sql = "SELECT a, b FROM t ORDER BY a";

    // JSON first (a MISS, whose body is kept), then CSV and Arrow of the same cached answer:
    // each format's own bytes, the same on every hit.
    let (json_type, status, json) = raw_answer(&tier, sql, "application/json").await;
    assert_eq!((json_type.as_str(), status.as_str()), ("application/json", "MISS"));
    let rows: Value = serde_json::from_slice(&json).expect("JSON");
    assert_eq!(rows, serde_json::json!([{"a": 1, "b": "x, \"y\""}, {"a": 2, "b": null}, {"a": 3, "b": "é"}]));
    let (csv_type, status, csv_body) = raw_answer(&tier, sql, "text/csv").await;
    assert_eq!((csv_type.as_str(), status.as_str()), ("text/csv; charset=utf-8", "HIT"));
    assert_eq!(String::from_utf8(csv_body.clone()).expect("UTF-8"), "a,b\n1,\"x, \"\"y\"\"\"\n2,\n3,é\n");
    let (arrow_type, status, arrow_body) = raw_answer(&tier, sql, "application/vnd.apache.arrow.stream").await;
    assert_eq!((arrow_type.as_str(), status.as_str()), ("application/vnd.apache.arrow.stream", "HIT"));
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(arrow_body.clone()), None).expect("IPC");
    let batches: Vec<_> = reader.collect::<Result<_, _>>().expect("batches");
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 3);
    for (accept, first) in
        [("application/json", &json), ("text/csv", &csv_body), ("application/vnd.apache.arrow.stream", &arrow_body)]
    {
        for _ in 0..2 {
            let (_, status, again) = raw_answer(&tier, sql, accept).await;
            assert_eq!(status, "HIT", "{accept}");
            assert!(&again == first, "{accept}: a hit's body differs from the first one's");
        }
    }

    // New data is a new answer: its body is made from its own rows, not a kept one.
    std::fs::write(&csv, "a,b\n1,z\n").expect("csv");
    let (code, body) = tier.post("/v1/datasets/t/refresh").await;
    assert_eq!(code, 200, "{body}");
    let (_, status, fresh) = raw_answer(&tier, sql, "application/json").await;
    assert_eq!(status, "MISS");
    assert_eq!(serde_json::from_slice::<Value>(&fresh).expect("JSON"), serde_json::json!([{"a": 1, "b": "z"}]));
    let (_, status, fresh_csv) = raw_answer(&tier, sql, "text/csv").await;
    assert_eq!((status.as_str(), fresh_csv.as_slice()), ("HIT", &b"a,b\n1,z\n"[..]));
}

#[tokio::test]
async fn cache_control_no_cache_gets_a_fresh_answer_and_leaves_the_entry() {
    let dir = tempfile::tempdir().expect("dir");
    let csv = dir.path().join("t.csv");
    std::fs::write(&csv, "a,b\n1,2\n3,4\n").expect("csv");
    let tier = Tier::start(
        "platform-service",
        &format!("datasets:\n  - name: t\n    from: file:{}\n    acceleration: {{}}\n", csv.display()),
    )
    .await;
    tier.wait_ready(Duration::from_secs(30)).await;
    let sql = "SELECT sum(a) AS s FROM t";
    assert_eq!(query(&tier, sql).await.1, "MISS");
    assert_eq!(query(&tier, sql).await.1, "HIT");
    for directive in ["no-cache", "max-age=0, No-Store"] {
        let (status, body, headers) = tier.sql_with(sql, &[("cache-control", directive)]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body[0]["s"].as_i64(), Some(4));
        assert_eq!(headers.get("strata-cache").and_then(|v| v.to_str().ok()), Some("BYPASS"), "{directive}");
    }
    // The entry is still there for everyone else.
    assert_eq!(query(&tier, sql).await.1, "HIT");
}

/// Status, rows and the headers that describe an answer's freshness.
struct Answer {
    code: u16,
    body: Value,
    cache: String,
    versions: String,
    staleness: String,
    warning: String,
}

async fn ask(tier: &Tier, sql: &str, headers: &[(&str, &str)]) -> Answer {
    let (code, body, h) = tier.sql_with(sql, headers).await;
    let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("none").to_string();
    Answer {
        code,
        body,
        cache: get("strata-cache"),
        versions: get("strata-versions"),
        staleness: get("strata-staleness"),
        warning: get("strata-warning"),
    }
}

async fn metrics(tier: &Tier) -> String {
    reqwest::get(tier.url("/metrics")).await.expect("metrics").text().await.expect("text")
}

async fn refresh(tier: &Tier, dataset: &str) {
    let (code, body) = tier.post(&format!("/v1/datasets/{dataset}/refresh")).await;
    assert_eq!(code, 200, "{body}");
}

fn sum_of(answer: &Answer) -> Option<i64> {
    answer.body[0]["s"].as_i64()
}

#[tokio::test]
async fn stale_while_revalidate_answers_from_the_replaced_version_while_one_query_computes_the_new() {
    let dir = tempfile::tempdir().expect("dir");
    let (swr, plain, log) = (dir.path().join("swr.csv"), dir.path().join("plain.csv"), dir.path().join("log.csv"));
    for file in [&swr, &plain] {
        std::fs::write(file, "a,b\n1,2\n3,4\n").expect("csv");
    }
    std::fs::write(&log, "seq,a\n1,10\n2,20\n").expect("csv");
    let config = format!(
        "datasets:\n  - name: swr\n    from: file:{}\n    acceleration: {{refresh: full, stale_while_revalidate: 10m}}\n  - name: plain\n    from: file:{}\n    acceleration: {{refresh: full}}\n  - name: log\n    from: file:{}\n    acceleration: {{refresh: append, time_column: seq}}\n",
        swr.display(),
        plain.display(),
        log.display()
    );
    let tier = Tier::start("platform-service", &config).await;
    tier.wait_ready(Duration::from_secs(30)).await;
    let dashboard = "SELECT sum(a) AS s FROM swr";

    let first = ask(&tier, dashboard, &[]).await;
    assert_eq!((first.cache.as_str(), sum_of(&first)), ("MISS", Some(4)));
    assert!(first.versions.starts_with("swr=1@"), "{}", first.versions);

    // A refresh publishes version 2: the next answer is version 1's, and says so.
    std::fs::write(&swr, "a,b\n1,2\n3,4\n5,6\n").expect("csv");
    refresh(&tier, "swr").await;
    let before = metrics(&tier).await;
    let stale = ask(&tier, dashboard, &[]).await;
    assert_eq!((stale.code, stale.cache.as_str(), sum_of(&stale)), (200, "STALE", Some(4)), "{}", stale.body);
    assert!(stale.versions.starts_with("swr=1@"), "the versions it read: {}", stale.versions);
    assert!(stale.staleness.ends_with("ms"), "{}", stale.staleness);
    assert!(stale.warning.contains("`swr` version 1 (now 2)"), "{}", stale.warning);

    // Many clients at once: none waits for the engine; each gets version 1 (STALE) or, once
    // the one background query has finished, version 2 (HIT). Never a MISS.
    let answers = futures::future::join_all((0..8).map(|_| ask(&tier, dashboard, &[]))).await;
    for answer in &answers {
        match answer.cache.as_str() {
            "STALE" => assert_eq!((sum_of(answer), &answer.versions[..6]), (Some(4), "swr=1@")),
            "HIT" => assert_eq!((sum_of(answer), &answer.versions[..6]), (Some(9), "swr=2@")),
            other => panic!("{other}: {}", answer.body),
        }
    }
    let fresh = tier
        .wait_for(Duration::from_secs(10), "the revalidated answer", || async {
            let answer = ask(&tier, dashboard, &[]).await;
            (answer.cache == "HIT").then_some(answer)
        })
        .await;
    assert_eq!(sum_of(&fresh), Some(9));
    assert!(fresh.versions.starts_with("swr=2@") && fresh.staleness == "none", "{}", fresh.versions);
    let after = metrics(&tier).await;
    assert_eq!(counter(&after, "MISS"), counter(&before, "MISS"), "a refresh must not send clients to the engine");
    assert!(counter(&after, "STALE") > counter(&before, "STALE"));

    // Without `stale_while_revalidate` a new version is a miss...
    let plain_sql = "SELECT sum(a) AS s FROM plain";
    assert_eq!(ask(&tier, plain_sql, &[]).await.cache, "MISS");
    std::fs::write(&plain, "a,b\n1,2\n3,4\n5,6\n").expect("csv");
    refresh(&tier, "plain").await;
    let missed = ask(&tier, plain_sql, &[]).await;
    assert_eq!((missed.cache.as_str(), sum_of(&missed)), ("MISS", Some(9)));
    // ... unless the client accepts a stale answer (`max-stale`), and only within its bound.
    std::fs::write(&plain, "a,b\n1,2\n").expect("csv");
    refresh(&tier, "plain").await;
    let bounded = ask(&tier, plain_sql, &[("cache-control", "max-stale=0")]).await;
    assert_eq!((bounded.cache.as_str(), sum_of(&bounded)), ("MISS", Some(1)), "max-stale=0 accepts nothing stale");
    std::fs::write(&plain, "a,b\n7,2\n").expect("csv");
    refresh(&tier, "plain").await;
    let accepted = ask(&tier, plain_sql, &[("cache-control", "max-stale=3600")]).await;
    assert_eq!((accepted.cache.as_str(), sum_of(&accepted)), ("STALE", Some(1)), "{}", accepted.body);
    let refreshed = tier
        .wait_for(Duration::from_secs(10), "the fresh answer after max-stale", || async {
            let answer = ask(&tier, plain_sql, &[]).await;
            (answer.cache == "HIT").then_some(answer)
        })
        .await;
    assert_eq!(sum_of(&refreshed), Some(7));

    // A refresh that finds nothing new keeps the cached answers.
    let log_sql = "SELECT sum(a) AS s FROM log";
    assert_eq!(ask(&tier, log_sql, &[]).await.cache, "MISS");
    refresh(&tier, "log").await;
    let kept = ask(&tier, log_sql, &[]).await;
    assert_eq!((kept.cache.as_str(), sum_of(&kept)), ("HIT", Some(30)));
}

#[tokio::test]
async fn only_if_cached_answers_from_the_cache_or_fails_without_running_the_query() {
    let pg = PgServer::start();
    pg.connect()
        .await
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, v int); INSERT INTO items VALUES (1, 10), (2, 20);")
        .await
        .expect("seed");
    let config = format!(
        "datasets:\n  - name: items\n    from: postgres:public.items\n    params: {p}\n    acceleration: {{primary_key: [id]}}\n  - name: live_items\n    from: postgres:public.items\n    params: {p}\n",
        p = pg.params_yaml()
    );
    let tier = Tier::start("platform-service", &config).await;
    tier.wait_ready(Duration::from_secs(30)).await;
    let only = [("cache-control", "only-if-cached")];
    let sql = "SELECT sum(v) AS s FROM items";

    let before = metrics(&tier).await;
    let refused = ask(&tier, sql, &only).await;
    assert_eq!(refused.code, 504, "{}", refused.body);
    assert_eq!(refused.body["error"]["kind"], "not_cached", "{}", refused.body);
    assert!(refused.body["error"]["message"].as_str().is_some_and(|m| m.contains("only-if-cached")));
    assert_eq!(counter(&metrics(&tier).await, "MISS"), counter(&before, "MISS"), "nothing may run");

    assert_eq!(ask(&tier, sql, &[]).await.cache, "MISS");
    let cached = ask(&tier, sql, &only).await;
    assert_eq!((cached.code, cached.cache.as_str(), sum_of(&cached)), (200, "HIT", Some(30)));

    // Answers the cache never holds: read live from the source (the error says why), or a
    // key lookup answered from the index.
    let live = ask(&tier, "SELECT sum(v) AS s FROM live_items", &only).await;
    assert_eq!(live.code, 504, "{}", live.body);
    let message = live.body["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("not one the results cache holds"), "{message}");
    let lookup = ask(&tier, "SELECT v FROM items WHERE id = 1", &only).await;
    assert_eq!((lookup.code, &lookup.body["error"]["kind"]), (504, &Value::from("not_cached")), "{}", lookup.body);
    assert_eq!(ask(&tier, "SELECT v FROM items WHERE id = 1", &[]).await.body[0]["v"], 10);

    // Over Flight SQL the header is gRPC metadata; the refusal is FAILED_PRECONDITION.
    let mut flight = tier.flight().await;
    flight.set_header("cache-control", "only-if-cached");
    let status = match flight.execute("SELECT max(v) FROM items".to_string(), None).await {
        Ok(info) => {
            let ticket = info.endpoint[0].ticket.clone().expect("ticket");
            match flight.do_get(ticket).await {
                Ok(stream) => futures::TryStreamExt::try_collect::<Vec<_>>(stream).await.err().map(|e| e.to_string()),
                Err(e) => Some(e.to_string()),
            }
        }
        Err(e) => Some(e.to_string()),
    };
    let status = status.expect("only-if-cached must refuse an uncached query over Flight SQL");
    // tonic's words for FAILED_PRECONDITION.
    assert!(status.contains("not in a state required for the operation"), "{status}");
    assert!(status.contains("not cached"), "{status}");
}

/// A platform accelerating `csv` (written with two rows, `a,b` = 1,2 and 3,4) as dataset `t`
/// with full refreshes, and a sidecar replicating `t` with `replica_options` (YAML lines
/// under the replica's name).
async fn platform_and_sidecar_of_t(csv: &std::path::Path, replica_options: &str) -> (Tier, Tier) {
    std::fs::write(csv, "a,b\n1,2\n3,4\n").expect("csv");
    let platform = Tier::start(
        "platform-service",
        &format!(
            "region: eu\ndatasets:\n  - name: t\n    from: file:{}\n    acceleration: {{refresh: full}}\n",
            csv.display()
        ),
    )
    .await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let sidecar = Tier::start(
        "app-sidecar",
        &format!(
            "region: eu\nupstream:\n  endpoints: [http://{}]\nreplicas:\n  - name: t{replica_options}\n",
            platform.flight_addr
        ),
    )
    .await;
    sidecar.wait_ready(Duration::from_secs(60)).await;
    (platform, sidecar)
}

/// A repeated query is answered from the cache by its text, before it is planned or routed;
/// the shortcut must never outlive what the route was decided on: a new version of the
/// replica, or the replica passing its `max_staleness` (refused here).
#[tokio::test]
async fn a_query_answered_by_its_text_still_sees_new_versions_and_the_replicas_staleness() {
    let dir = tempfile::tempdir().expect("dir");
    let csv = dir.path().join("t.csv");
    let (platform, sidecar) = platform_and_sidecar_of_t(&csv, "\n    max_staleness: 3s\n    on_stale: refuse").await;
    let sql = "SELECT sum(a) AS s FROM t";
    let version = || async { sidecar.find_dataset("t").await.and_then(|d| d["version"].as_u64()) };

    // A new version of the data: the next answer reads it (MISS), the one after is a HIT.
    // The copy is only fresh for 3 s, so on a slow machine the pair is tried again.
    let mut fresh_pair = None;
    for round in 2..=6i64 {
        std::fs::write(&csv, format!("a,b\n1,2\n3,4\n{round},0\n")).expect("csv");
        refresh(&platform, "t").await;
        let want = platform.dataset("t").await["version"].as_u64();
        sidecar
            .wait_for(Duration::from_secs(20), "the new version at the sidecar", || async {
                (version().await == want).then_some(())
            })
            .await;
        let (first, second) = (ask(&sidecar, sql, &[]).await, ask(&sidecar, sql, &[]).await);
        if (first.code, second.code) == (200, 200) {
            assert_eq!((first.cache.as_str(), second.cache.as_str()), ("MISS", "HIT"), "{}", sidecar.logs());
            assert_eq!((sum_of(&first), sum_of(&second)), (Some(4 + round), Some(4 + round)));
            let version = |a: &Answer| a.versions.split('@').next().unwrap_or_default().to_string();
            assert_eq!((version(&first), version(&second)), (format!("t={}", want.unwrap_or(0)), version(&first)));
            fresh_pair = Some(round);
            break;
        }
    }
    assert!(fresh_pair.is_some(), "never answered twice within 3 s of a new version:\n{}", sidecar.logs());

    // Nothing new arrives: once the copy is past its max_staleness the cached answer is
    // refused like any other, although its text, snapshot and cache entry are unchanged.
    let refused = sidecar
        .wait_for(Duration::from_secs(15), "the copy to pass its max_staleness", || async {
            let answer = ask(&sidecar, sql, &[]).await;
            (answer.code != 200).then_some(answer)
        })
        .await;
    assert_eq!(refused.code, 503, "{}", refused.body);
    assert!(refused.body.to_string().contains("max_staleness"), "{}", refused.body);
}

/// What one Flight SQL query got: its first value, the `strata-cache` header of its DoGet,
/// and whether GetFlightInfo started it early (its ticket names a run).
struct FlightAnswer {
    value: Option<i64>,
    cache: String,
    started_early: bool,
}

async fn flight_answer(
    client: &mut arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
    info: arrow_flight::FlightInfo,
) -> FlightAnswer {
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    let started_early = String::from_utf8_lossy(&ticket.ticket).contains("\"run\":");
    let stream = client.do_get(ticket).await.expect("DoGet");
    let cache = stream.headers().get("strata-cache").and_then(|v| v.to_str().ok()).unwrap_or("none").to_string();
    let batches: Vec<arrow::array::RecordBatch> = futures::TryStreamExt::try_collect(stream).await.expect("rows");
    let value = batches.first().filter(|b| b.num_rows() > 0).map(|b| {
        let column = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Int64).expect("cast");
        arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(&column).value(0)
    });
    FlightAnswer { value, cache, started_early }
}

async fn run_statement(
    client: &mut arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
    sql: &str,
) -> FlightAnswer {
    let info = client.execute(sql.to_string(), None).await.expect("GetFlightInfo");
    flight_answer(client, info).await
}

/// Over Flight SQL a repeated query is a HIT that GetFlightInfo announces from the cached
/// answer: neither planned nor started early (the ticket of a hit names no run; a sidecar's
/// miss is started at GetFlightInfo), a prepared statement's answers stay those of each
/// parameter value, and a new version of the data is a MISS with its rows.
#[tokio::test]
async fn flight_sql_hits_are_not_started_early_and_stay_per_parameter_value() {
    let dir = tempfile::tempdir().expect("dir");
    let csv = dir.path().join("t.csv");
    let (platform, sidecar) = platform_and_sidecar_of_t(&csv, "").await;
    sidecar
        .wait_for(Duration::from_secs(30), "the replica loaded", || async {
            sidecar.find_dataset("t").await.is_some_and(|d| d["state"] == "ready").then_some(())
        })
        .await;
    let mut flight = sidecar.flight().await;
    let sql = "SELECT sum(a) AS s FROM t";

    let miss = run_statement(&mut flight, sql).await;
    assert_eq!((miss.value, miss.cache.as_str(), miss.started_early), (Some(4), "MISS", true));
    let hit = run_statement(&mut flight, sql).await;
    assert_eq!((hit.value, hit.cache.as_str(), hit.started_early), (Some(4), "HIT", false));

    // A prepared statement: each parameter value its own answer, hit or not.
    let mut prepared = flight.prepare("SELECT b FROM t WHERE a = $1".to_string(), None).await.expect("prepare");
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new(
        "$1",
        arrow::datatypes::DataType::Int64,
        false,
    )]));
    for (a, want, cache, early) in
        [(1, 2, "MISS", true), (1, 2, "HIT", false), (3, 4, "MISS", true), (3, 4, "HIT", false)]
    {
        let params = arrow::array::RecordBatch::try_new(
            std::sync::Arc::clone(&schema),
            vec![std::sync::Arc::new(arrow::array::Int64Array::from(vec![a]))],
        )
        .expect("params");
        prepared.set_parameters(params).expect("bind");
        let info = prepared.execute().await.expect("GetFlightInfo");
        let answer = flight_answer(&mut flight, info).await;
        assert_eq!((answer.value, answer.cache.as_str(), answer.started_early), (Some(want), cache, early), "a = {a}");
    }

    // A new version: the cached text is not used, the answer has the new row.
    std::fs::write(&csv, "a,b\n1,2\n3,4\n5,6\n").expect("csv");
    refresh(&platform, "t").await;
    let want = platform.dataset("t").await["version"].as_u64();
    sidecar
        .wait_for(Duration::from_secs(20), "the new version at the sidecar", || async {
            (sidecar.find_dataset("t").await.and_then(|d| d["version"].as_u64()) == want).then_some(())
        })
        .await;
    let fresh = run_statement(&mut flight, sql).await;
    assert_eq!((fresh.value, fresh.cache.as_str()), (Some(9), "MISS"));
    assert_eq!(run_statement(&mut flight, sql).await.value, Some(9));
}

/// GetFlightInfo and DoGet of `sql` with a raw Flight client: the DoGet's `strata-cache`
/// header and its messages as they came over the wire.
async fn flight_messages(tier: &Tier, sql: &str) -> (String, Vec<arrow_flight::FlightData>) {
    use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
    let mut client = arrow_flight::flight_service_client::FlightServiceClient::new(tier.channel().await);
    let command = CommandStatementQuery { query: sql.to_string(), transaction_id: None };
    let descriptor = arrow_flight::FlightDescriptor::new_cmd(prost::Message::encode_to_vec(&command.as_any()));
    let info = client.get_flight_info(descriptor).await.expect("GetFlightInfo").into_inner();
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    let answer = client.do_get(ticket).await.expect("DoGet");
    let cache = answer.metadata().get("strata-cache").and_then(|v| v.to_str().ok()).unwrap_or("none").to_string();
    let messages = futures::TryStreamExt::try_collect(answer.into_inner()).await.expect("messages");
    (cache, messages)
}

/// A Flight SQL hit sends the messages its first DoGet encoded (kept with the cached
/// answer): byte for byte the miss's, hit after hit, each with its own route in the first
/// message's `app_metadata`; new data is a new answer with its own messages.
#[tokio::test]
async fn flight_sql_hits_send_the_messages_the_miss_sent() {
    let (_dir, csv, tier) = platform_with_awkward_csv().await;
    let sql = "SELECT a, b FROM t ORDER BY a";
    let payload = |messages: &[arrow_flight::FlightData]| -> Vec<(bytes::Bytes, bytes::Bytes)> {
        messages.iter().map(|m| (m.data_header.clone(), m.data_body.clone())).collect()
    };
    let route = |messages: &[arrow_flight::FlightData]| -> Value {
        serde_json::from_slice(&messages[0].app_metadata).expect("the first message's app_metadata is JSON")
    };

    let (cache, miss) = flight_messages(&tier, sql).await;
    assert_eq!(cache, "MISS");
    assert_eq!(route(&miss)["cache"], "MISS");
    let batches = arrow_flight::utils::flight_data_to_batches(&miss).expect("the miss's messages decode");
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 3);
    for call in 0..3 {
        let (cache, hit) = flight_messages(&tier, sql).await;
        assert_eq!(cache, "HIT", "hit {call}");
        assert_eq!(route(&hit)["cache"], "HIT", "hit {call}: its own route, not the miss's");
        assert_eq!(payload(&hit), payload(&miss), "hit {call}: not the bytes the miss sent");
        assert!(hit[1..].iter().all(|m| m.app_metadata.is_empty()), "hit {call}: route only on the first message");
        let decoded = arrow_flight::utils::flight_data_to_batches(&hit).expect("a hit's messages decode");
        assert_eq!(decoded, batches, "hit {call}");
    }

    // New data: a miss with the new rows, and hits that send those, not the old messages.
    std::fs::write(&csv, "a,b\n1,z\n").expect("csv");
    let (code, body) = tier.post("/v1/datasets/t/refresh").await;
    assert_eq!(code, 200, "{body}");
    let (cache, fresh) = flight_messages(&tier, sql).await;
    assert_eq!(cache, "MISS");
    for _ in 0..2 {
        let (cache, hit) = flight_messages(&tier, sql).await;
        assert_eq!(cache, "HIT");
        assert_eq!(payload(&hit), payload(&fresh));
        let rows = arrow_flight::utils::flight_data_to_batches(&hit).expect("decode");
        assert_eq!(rows.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    }
}
