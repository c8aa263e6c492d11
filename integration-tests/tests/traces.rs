//! One trace across the tiers: a Flight SQL client with its own `traceparent` asks a
//! sidecar, which forwards to its platform, which forwards to the peer platform of the
//! table's region, which reads PostgreSQL. Every tier exports to an
//! OTLP receiver in this process; the test rebuilds the trace from what it received.
//! And a collector that is down or hangs costs dropped spans, never a failed query.

use std::time::Duration;

use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::StreamExt;
use strata_integration_tests::otlp::{OtlpReceiver, ReceivedSpan, span_tree};
use strata_integration_tests::postgres::PgServer;
use strata_integration_tests::tier::Tier;
use strata_integration_tests::wait_until;
use tonic::transport::Channel;

const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

fn telemetry(endpoint: &str) -> String {
    format!("telemetry:\n  otlp_endpoint: {endpoint}\n  export_interval: 100ms\n  export_timeout: 300ms\n")
}

/// Walks from `span` up through its parents (within `spans`), returning the names.
fn ancestry<'a>(spans: &'a [ReceivedSpan], span: &'a ReceivedSpan) -> Vec<(&'a str, &'a str)> {
    let mut chain = vec![(span.name.as_str(), span.service.as_str())];
    let mut current = span;
    while let Some(parent) = spans.iter().find(|s| s.span_id == current.parent_span_id) {
        chain.push((parent.name.as_str(), parent.service.as_str()));
        current = parent;
    }
    chain
}

#[tokio::test]
async fn one_trace_from_the_client_through_sidecar_platform_and_peer_to_postgres() {
    let receiver = OtlpReceiver::start().await;
    let pg = PgServer::start();
    pg.connect()
        .await
        .batch_execute(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL);
             INSERT INTO accounts SELECT g, 'owner-' || g FROM generate_series(1, 100) g;",
        )
        .await
        .expect("seed");
    // The table lives in region us, read live from PostgreSQL (no accelerated copy); the
    // sidecar's platform is in eu and reaches it through its peer.
    let us = Tier::start(
        "platform-service",
        &format!(
            "region: us\ndatasets:\n  - name: accounts\n    from: postgres:public.accounts\n    params: {}\n{}  service_name: platform-us\n",
            pg.params_yaml(),
            telemetry(&receiver.endpoint())
        ),
    )
    .await;
    us.wait_ready(Duration::from_secs(30)).await;
    let eu = Tier::start(
        "platform-service",
        &format!(
            "region: eu\npeers:\n  - region: us\n    endpoint: http://{}\n{}  service_name: platform-eu\n",
            us.flight_addr,
            telemetry(&receiver.endpoint())
        ),
    )
    .await;
    eu.wait_ready(Duration::from_secs(30)).await;
    let sidecar = Tier::start(
        "app-sidecar",
        &format!(
            "region: eu\nupstream:\n  endpoints: [http://{}]\n{}",
            eu.flight_addr,
            telemetry(&receiver.endpoint())
        ),
    )
    .await;
    sidecar
        .wait_for(Duration::from_secs(30), "the platform's catalog", || async {
            (sidecar.sql("SELECT count(*) FROM accounts").await.0 == 200).then_some(())
        })
        .await;

    // The client's own span context, as an instrumented application would send it.
    let channel =
        Channel::from_shared(format!("http://{}", sidecar.flight_addr)).expect("uri").connect().await.expect("connect");
    let mut client = FlightSqlServiceClient::new(channel);
    client.set_header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"));
    client.set_header("tracestate", "client=1");
    let sql = "SELECT owner FROM accounts WHERE id = 42";
    let info = client.execute(sql.to_string(), None).await.expect("GetFlightInfo");
    let mut rows = 0;
    for endpoint in info.endpoint {
        let mut stream = client.do_get(endpoint.ticket.expect("ticket")).await.expect("DoGet");
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            batches.push(batch.expect("batch"));
        }
        // The answer names its trace, so a client can look it up.
        let trace_id = stream.headers().get("strata-trace-id").and_then(|v| v.to_str().ok());
        assert_eq!(trace_id, Some(CLIENT_TRACE));
        rows += batches.iter().map(|b| b.num_rows()).sum::<usize>();
    }
    assert_eq!(rows, 1);

    // Spans arrive in batches every 100 ms; wait for the source read at the far end.
    wait_until(Duration::from_secs(20), "the peer platform's source read span", || async {
        receiver.trace(CLIENT_TRACE).iter().any(|s| s.name == "source_read" && s.service == "platform-us").then_some(())
    })
    .await;
    // Let the sidecar's query span (closed when its stream ended) arrive too.
    let spans = wait_until(Duration::from_secs(10), "the sidecar's query span", || async {
        let spans = receiver.trace(CLIENT_TRACE);
        spans.iter().any(|s| s.name == "query" && s.service == "sidecar").then_some(spans)
    })
    .await;
    eprintln!("trace {CLIENT_TRACE}:\n{}", span_tree(&spans));

    // Every span of both tiers for this query carries the client's trace id ...
    let all = receiver.spans();
    let ours = |s: &&ReceivedSpan| s.attributes.get("sql").is_some_and(|sql| sql.contains("id = 42"));
    let other_traces: Vec<_> = all.iter().filter(ours).filter(|s| s.trace_id != CLIENT_TRACE).collect();
    assert!(other_traces.is_empty(), "spans of this query outside the client's trace: {other_traces:?}");
    // ... the client's span is the parent of the sidecar's query span (the root here) ...
    let sidecar_query = spans.iter().find(|s| s.name == "query" && s.service == "sidecar").expect("sidecar query");
    assert_eq!(sidecar_query.parent_span_id, CLIENT_SPAN, "{}", span_tree(&spans));
    assert_eq!(sidecar_query.attributes.get("route").map(String::as_str), Some("forwarded"));
    assert_eq!(sidecar_query.attributes.get("rows").map(String::as_str), Some("1"));
    // ... and the source read hangs under the peer's query, the eu platform's forward and
    // query, the sidecar's forward and query, in that order.
    let read = spans.iter().find(|s| s.name == "source_read").expect("source read");
    let chain = ancestry(&spans, read);
    let expected = [
        ("source_read", "platform-us"),
        ("query", "platform-us"),
        ("forward", "platform-eu"),
        ("query", "platform-eu"),
        ("forward", "sidecar"),
        ("query", "sidecar"),
    ];
    let positions: Vec<Option<usize>> = expected.iter().map(|want| chain.iter().position(|hop| hop == want)).collect();
    assert!(
        positions.iter().all(Option::is_some) && positions.windows(2).all(|w| w[0] < w[1]),
        "source read ancestry {chain:?}\n{}",
        span_tree(&spans)
    );
    assert_eq!(chain.last(), Some(&("query", "sidecar")), "the sidecar's query is the root: {chain:?}");
    assert!(read.attributes.get("sql").is_some_and(|sql| sql.contains("accounts")), "{read:?}");
    // Each hop's call upstream names its endpoint, attempt and the breaker it went through.
    let calls: Vec<_> = spans.iter().filter(|s| s.name == "upstream_call").collect();
    assert_eq!(calls.len(), 2, "{}", span_tree(&spans));
    for call in calls {
        let attr = |k: &str| call.attributes.get(k).map(String::as_str);
        assert_eq!((attr("rpc"), attr("attempt"), attr("breaker")), (Some("Execute"), Some("1"), Some("closed")));
        assert!(attr("endpoint").is_some_and(|e| e.starts_with("http://127.0.0.1:")), "{call:?}");
    }

    // A DBA finds the trace id in pg_stat_activity: the statement carried it as a comment.
    let seen = pg
        .connect()
        .await
        .query("SELECT query FROM pg_stat_activity WHERE query LIKE '%traceparent=%'", &[])
        .await
        .expect("pg_stat_activity");
    let texts: Vec<String> = seen.iter().map(|r| r.get(0)).collect();
    assert!(
        texts.iter().any(|q| q.contains(CLIENT_TRACE) && q.contains("accounts")),
        "statements seen by PostgreSQL: {texts:?}"
    );
}

#[tokio::test]
async fn a_collector_that_is_down_or_hangs_costs_dropped_spans_not_queries() {
    // Nothing listens on a freshly closed port; a listener that never answers is a hung collector.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hung_addr = hung.local_addr().expect("addr");
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            open.push(socket);
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("t.csv"), "id,v\n1,a\n2,b\n").expect("csv");
    for collector in [closed, hung_addr] {
        let tier = Tier::start(
            "platform-service",
            &format!(
                "datasets:\n  - name: t\n    from: file:{}/t.csv\n    acceleration: {{}}\n{}  queue_size: 8\n  batch_size: 4\n",
                dir.path().display(),
                telemetry(&format!("http://{collector}"))
            ),
        )
        .await;
        tier.wait_ready(Duration::from_secs(30)).await;
        for i in 0..50 {
            let rows = tier.rows(&format!("SELECT v FROM t WHERE id = {}", i % 2 + 1)).await;
            assert_eq!(rows.len(), 1);
        }
        let dropped = tier
            .wait_for(Duration::from_secs(20), "dropped spans to be counted", || async {
                let text = reqwest::get(tier.url("/metrics")).await.ok()?.text().await.ok()?;
                let total: f64 = text
                    .lines()
                    .filter(|l| l.starts_with("strata_trace_spans_dropped_total{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum();
                (total > 0.0).then_some(total)
            })
            .await;
        eprintln!("collector {collector}: {dropped} spans dropped, every query answered");
    }
}
