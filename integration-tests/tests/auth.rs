//! API keys and tenants against live tiers: every endpoint refuses a missing, wrong,
//! expired or malformed key the same way; a tenant sees and reads only its datasets, in
//! every listing, in queries, through a sidecar that forwards, and in the results cache.

use std::time::Duration;

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, CommandGetCatalogs,
    CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys,
    CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandGetXdbcTypeInfo,
    CommandPreparedStatementQuery, CommandStatementIngest, CommandStatementQuery, CommandStatementUpdate,
    ProstMessageExt,
};
use arrow_flight::{Action, Criteria, Empty, FlightData, FlightDescriptor, HandshakeRequest, Ticket};
use futures::StreamExt;
use prost::Message;
use strata_integration_tests::sample_datasets_yaml as datasets;
use strata_integration_tests::tier::Tier;
use strata_integration_tests::workspace_root;
use strata_proto::v1::tier_service_client::TierServiceClient;
use strata_proto::v1::{
    ExecuteRequest, HealthRequest, IngestRequest, ListDatasetsRequest, QueryContext, SqlQuery, SubscribeRequest,
    execute_request,
};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::Channel;

/// Keys of one test: `shop` may read `orders`, `analytics` `customers` and `orders`, `ops`
/// everything (an operator), `sidecar` everything (a tier's own key); `old` is expired.
struct Keys {
    shop: String,
    analytics: String,
    ops: String,
    sidecar: String,
    old: String,
}

impl Keys {
    fn new() -> (Self, String) {
        let mut yaml = String::from("auth:\n  keys:\n");
        let mut key = |id: &str, tenant: &str, expires: &str| {
            let (key, hash) = strata_core::auth::generate_key().expect("randomness");
            yaml.push_str(&format!("    - {{ id: {id}, tenant: {tenant}, hash: \"{hash}\"{expires} }}\n"));
            key
        };
        let keys = Keys {
            shop: key("shop-1", "shop", ""),
            analytics: key("analytics-1", "analytics", ", expires: \"2999-01-01T00:00:00Z\""),
            ops: key("prometheus", "ops", ""),
            sidecar: key("sidecar-eu", "tiers", ""),
            old: key("analytics-0", "analytics", ", expires: \"2020-01-01T00:00:00Z\""),
        };
        yaml.push_str(
            "tenants:\n  shop: { datasets: [orders], max_result_rows: 3 }\n  analytics: { datasets: [customers, \"ord*\"] }\n  ops: { datasets: [\"*\"], operator: true }\n  tiers: { datasets: [\"*\"] }\n",
        );
        (keys, yaml)
    }
}

/// Sends one fixed `authorization` value (or none) on every call.
#[derive(Clone)]
struct Send(Option<String>);

impl Interceptor for Send {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            let value: MetadataValue<_> = value.parse().map_err(|_| tonic::Status::internal("header"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

type Flight = FlightServiceClient<tonic::service::interceptor::InterceptedService<Channel, Send>>;
type TierClient = TierServiceClient<tonic::service::interceptor::InterceptedService<Channel, Send>>;

async fn channel(tier: &Tier) -> Channel {
    Channel::from_shared(format!("http://{}", tier.flight_addr)).expect("uri").connect().await.expect("connect")
}

fn descriptor(command: impl ProstMessageExt) -> FlightDescriptor {
    FlightDescriptor::new_cmd(command.as_any().encode_to_vec())
}

/// Every Flight SQL command a client can send in a descriptor or ticket.
fn commands() -> Vec<(&'static str, FlightDescriptor)> {
    let query = CommandStatementQuery { query: "SELECT 1".into(), transaction_id: None };
    let tables =
        CommandGetTables { include_schema: true, catalog: None, db_schema_filter_pattern: None, ..Default::default() };
    vec![
        ("CommandStatementQuery", descriptor(query)),
        (
            "CommandPreparedStatementQuery",
            descriptor(CommandPreparedStatementQuery { prepared_statement_handle: b"SELECT 1".to_vec().into() }),
        ),
        ("CommandGetCatalogs", descriptor(CommandGetCatalogs {})),
        ("CommandGetDbSchemas", descriptor(CommandGetDbSchemas::default())),
        ("CommandGetTables", descriptor(tables)),
        ("CommandGetTableTypes", descriptor(CommandGetTableTypes {})),
        ("CommandGetSqlInfo", descriptor(CommandGetSqlInfo { info: vec![] })),
        ("CommandGetPrimaryKeys", descriptor(CommandGetPrimaryKeys { table: "orders".into(), ..Default::default() })),
        ("CommandGetExportedKeys", descriptor(CommandGetExportedKeys { table: "orders".into(), ..Default::default() })),
        ("CommandGetImportedKeys", descriptor(CommandGetImportedKeys { table: "orders".into(), ..Default::default() })),
        (
            "CommandGetCrossReference",
            descriptor(CommandGetCrossReference {
                pk_table: "orders".into(),
                fk_table: "customers".into(),
                ..Default::default()
            }),
        ),
        ("CommandGetXdbcTypeInfo", descriptor(CommandGetXdbcTypeInfo { data_type: None })),
        ("path descriptor", FlightDescriptor::new_path(vec!["orders".into()])),
    ]
}

/// The status of every gRPC endpoint of a tier called with `authorization` (or without):
/// each Flight RPC (with each Flight SQL command and action), each tier RPC, reflection.
async fn call_everything(tier: &Tier, authorization: Option<String>) -> Vec<(String, Result<(), tonic::Status>)> {
    let channel = channel(tier).await;
    let send = Send(authorization);
    let mut flight: Flight = FlightServiceClient::with_interceptor(channel.clone(), send.clone());
    let mut tiers: TierClient = TierServiceClient::with_interceptor(channel.clone(), send.clone());
    let mut results: Vec<(String, Result<(), tonic::Status>)> = Vec::new();
    let handshake = futures::stream::iter([HandshakeRequest::default()]);
    results.push(("Handshake".into(), flight.handshake(handshake).await.map(ok)));
    results.push(("ListFlights".into(), flight.list_flights(Criteria::default()).await.map(ok)));
    results.push(("ListActions".into(), flight.list_actions(Empty {}).await.map(ok)));
    for (name, descriptor) in commands() {
        results.push((format!("GetFlightInfo {name}"), flight.get_flight_info(descriptor.clone()).await.map(ok)));
        results.push((format!("PollFlightInfo {name}"), flight.poll_flight_info(descriptor.clone()).await.map(ok)));
        results.push((format!("GetSchema {name}"), flight.get_schema(descriptor.clone()).await.map(ok)));
        results.push((format!("DoGet {name}"), flight.do_get(Ticket::new(descriptor.cmd.clone())).await.map(ok)));
    }
    results.push(("DoGet JSON ticket".into(), flight.do_get(Ticket::new(r#"{"sql":"SELECT 1"}"#)).await.map(ok)));
    let puts = [
        (
            "CommandStatementUpdate",
            descriptor(CommandStatementUpdate { query: "SELECT 1".into(), transaction_id: None }),
        ),
        ("CommandStatementIngest", descriptor(CommandStatementIngest { table: "orders".into(), ..Default::default() })),
        (
            "CommandPreparedStatementQuery",
            descriptor(CommandPreparedStatementQuery { prepared_statement_handle: b"x".to_vec().into() }),
        ),
    ];
    for (name, descriptor) in puts {
        let data = FlightData { flight_descriptor: Some(descriptor), ..Default::default() };
        results.push((format!("DoPut {name}"), flight.do_put(futures::stream::iter([data])).await.map(ok)));
    }
    let exchange = futures::stream::iter([FlightData::default()]);
    results.push(("DoExchange".into(), flight.do_exchange(exchange).await.map(ok)));
    let actions = [
        (
            "CreatePreparedStatement",
            ActionCreatePreparedStatementRequest { query: "SELECT 1".into(), transaction_id: None }
                .as_any()
                .encode_to_vec(),
        ),
        (
            "ClosePreparedStatement",
            ActionClosePreparedStatementRequest { prepared_statement_handle: b"x".to_vec().into() }
                .as_any()
                .encode_to_vec(),
        ),
        ("GetSessionOptions", Vec::new()),
        ("SetSessionOptions", Vec::new()),
        ("CloseSession", Vec::new()),
        ("BeginTransaction", Vec::new()),
    ];
    for (kind, body) in actions {
        let action = Action { r#type: kind.into(), body: body.into() };
        results.push((format!("DoAction {kind}"), flight.do_action(action).await.map(ok)));
    }
    let context = || Some(QueryContext { tenant: "ops".into(), ..Default::default() });
    results.push((
        "Tier ListDatasets".into(),
        tiers.list_datasets(ListDatasetsRequest { context: context() }).await.map(ok),
    ));
    let subscribe = SubscribeRequest { dataset: "orders".into(), context: context(), ..Default::default() };
    results.push(("Tier Subscribe".into(), tiers.subscribe(subscribe).await.map(ok)));
    let execute = ExecuteRequest {
        context: context(),
        query: Some(execute_request::Query::Sql(SqlQuery { sql: "SELECT 1".into(), ..Default::default() })),
    };
    results.push(("Tier Execute".into(), tiers.execute(execute).await.map(ok)));
    results.push(("Tier Health".into(), tiers.health(HealthRequest {}).await.map(ok)));
    let ingest = IngestRequest { edge_id: "e1".into(), context: context(), ..Default::default() };
    results.push(("Tier Ingest".into(), tiers.ingest(ingest).await.map(ok)));
    for path in [
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ] {
        results.push((path.into(), raw_streaming_call(channel.clone(), send.clone(), path).await));
    }
    results
}

/// Any answer at all: what matters is whether the call was let in.
fn ok<T>(_: T) {}

/// A streaming call of `path` with one empty message: reflection has no client here, and
/// the authentication layer answers before any message is read.
async fn raw_streaming_call(channel: Channel, send: Send, path: &'static str) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(tonic::service::interceptor::InterceptedService::new(channel, send));
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Empty, Empty>::default();
    let request = tonic::Request::new(futures::stream::iter([Empty {}]));
    let mut stream =
        grpc.streaming(request, tonic::codegen::http::uri::PathAndQuery::from_static(path), codec).await?.into_inner();
    stream.message().await.map(|_| ())
}

#[tokio::test]
async fn every_endpoint_refuses_a_missing_wrong_expired_or_malformed_key_alike() {
    let (keys, auth) = Keys::new();
    let tier = Tier::start("platform-service", &format!("{auth}{}", datasets())).await.with_key(&keys.ops);
    tier.wait_ready(Duration::from_secs(20)).await;
    let basic = |password: &str| {
        use base64::Engine as _;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("user:{password}")))
    };
    let refused_cases = [
        ("no key", None),
        ("unknown key", Some("Bearer strata_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_string())),
        ("expired key", Some(format!("Bearer {}", keys.old))),
        ("key without scheme", Some(keys.ops.clone())),
        ("truncated key", Some(format!("Bearer {}", &keys.ops[..keys.ops.len() - 1]))),
        ("empty bearer", Some("Bearer ".to_string())),
        ("basic with a wrong password", Some(basic("strata_wrong"))),
    ];
    let mut messages = std::collections::BTreeSet::new();
    let mut endpoints = 0;
    for (case, header) in refused_cases {
        let results = call_everything(&tier, header).await;
        endpoints = results.len();
        for (endpoint, result) in results {
            let status = result.expect_err(&format!("{endpoint} answered with {case}"));
            assert_eq!(status.code(), Code::Unauthenticated, "{endpoint} with {case}: {status:?}");
            assert!(!status.message().to_lowercase().contains("expire"), "{endpoint}: {}", status.message());
            if case != "no key" {
                messages.insert(status.message().to_string());
            }
        }
    }
    assert!(endpoints >= 70, "only {endpoints} endpoints enumerated");
    // Every refused credential gets the same words: nothing tells an expired key from a wrong one.
    assert_eq!(messages.len(), 1, "{messages:?}");
    // With a valid key nothing is refused for its credentials (some calls fail for their
    // deliberately empty payloads, with other codes).
    for header in [format!("Bearer {}", keys.ops), format!("bearer {}", keys.ops), basic(&keys.ops)] {
        for (endpoint, result) in call_everything(&tier, Some(header.clone())).await {
            if let Err(status) = result {
                // Basic credentials are for the handshake only.
                let basic_elsewhere = header.starts_with("Basic") && endpoint != "Handshake";
                assert!(
                    (status.code() == Code::Unauthenticated) == basic_elsewhere,
                    "{endpoint} with `{}`: {status:?}",
                    &header[..6]
                );
            }
        }
    }

    // HTTP: every route but /health.
    let http = reqwest::Client::new();
    let routes = [
        ("GET", "/v1/ready"),
        ("GET", "/v1/datasets"),
        ("GET", "/metrics"),
        ("POST", "/v1/sql"),
        ("POST", "/v1/datasets/orders/refresh"),
        ("POST", "/v1/ingest/orders"),
        ("GET", "/no/such/route"),
    ];
    for (method, path) in routes {
        for header in [None, Some("Bearer strata_wrong".to_string()), Some(format!("Bearer {}", keys.old))] {
            if path == "/v1/ready" && header.is_none() {
                continue; // open to probes: below
            }
            let mut request = http.request(method.parse().expect("method"), tier.url(path)).body("SELECT 1");
            if let Some(header) = &header {
                request = request.header("authorization", header);
            }
            let response = request.send().await.expect("http");
            assert_eq!(response.status(), 401, "{method} {path} with {header:?}");
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
            let body: serde_json::Value = response.json().await.expect("json");
            assert_eq!(body["error"]["kind"], "unauthenticated", "{body}");
        }
    }
    let health = http.get(tier.url("/health")).send().await.expect("health");
    assert_eq!(health.status(), 200, "/health answers probes without a key");
    // /v1/ready answers a probe without a key (Kubernetes probes carry none), naming no
    // dataset, even for a client that claims a tenant.
    let ready = http.get(tier.url("/v1/ready")).header("strata-tenant", "ops").send().await.expect("ready");
    assert!([200, 503].contains(&ready.status().as_u16()), "{ready:?}");
    let body: serde_json::Value = ready.json().await.expect("json");
    assert_eq!(body["pending"], serde_json::json!([]), "{body}");
    for (name, value) in [("authorization", format!("Bearer {}", keys.ops)), ("x-api-key", keys.ops.clone())] {
        let response =
            http.post(tier.url("/v1/sql")).header(name, value).body("SELECT 1 AS one").send().await.expect("sql");
        assert_eq!(response.status(), 200, "{name}");
    }
    // Refusals are counted, and the tier still answers.
    let (_, metrics, _) = http_as(&tier, &keys.ops, "GET", "/metrics", "").await;
    let metrics = metrics.as_str().expect("text").to_string();
    assert!(metrics.contains("strata_auth_refused_total{interface=\"grpc\"}"), "{metrics}");
    let (code, body) = tier.sql("SELECT 1 AS one").await;
    assert_eq!((code, body[0]["one"].as_i64()), (200, Some(1)));
}

/// One HTTP request to `tier` as the holder of `key`: the status, the body as JSON (or as
/// a string when it is not JSON) and the headers.
async fn http_as(
    tier: &Tier,
    key: &str,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
    let response = reqwest::Client::new()
        .request(method.parse().expect("method"), tier.url(path))
        .bearer_auth(key)
        .body(body.to_string())
        .send()
        .await
        .expect("http");
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    let text = response.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, value, headers)
}

async fn sql_as(tier: &Tier, key: &str, sql: &str) -> (u16, serde_json::Value) {
    let (status, body, _) = http_as(tier, key, "POST", "/v1/sql", sql).await;
    (status, body)
}

/// The `strata-cache` answer header of `sql` asked by the holder of `key`.
async fn cache_status(tier: &Tier, key: &str, sql: &str) -> String {
    let (status, body, headers) = http_as(tier, key, "POST", "/v1/sql", sql).await;
    assert_eq!(status, 200, "{body}");
    headers["strata-cache"].to_str().expect("ascii").to_string()
}

async fn flight_tables(tier: &Tier, key: &str) -> Vec<String> {
    let mut client = tier.flight().await;
    client.set_token(key.to_string());
    let info =
        client.get_tables(CommandGetTables { include_schema: false, ..Default::default() }).await.expect("tables");
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    let batches: Vec<_> = client
        .do_get(ticket)
        .await
        .expect("do_get")
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("batches");
    let mut names = Vec::new();
    for batch in batches {
        let schemas = batch.column_by_name("db_schema_name").expect("schema column");
        let tables = batch.column_by_name("table_name").expect("table column");
        let schemas = arrow::array::AsArray::as_string::<i32>(schemas);
        let tables = arrow::array::AsArray::as_string::<i32>(tables);
        for i in 0..batch.num_rows() {
            names.push(format!("{}.{}", schemas.value(i), tables.value(i)));
        }
    }
    names
}

async fn flight_error(tier: &Tier, key: &str, sql: &str) -> tonic::Status {
    let mut client = tier.flight().await;
    client.set_token(key.to_string());
    match client.execute(sql.to_string(), None).await {
        Ok(_) => panic!("`{sql}` planned for a tenant that may not read it"),
        Err(arrow_flight::error::FlightError::Tonic(status)) => *status,
        Err(other) => panic!("{other}"),
    }
}

#[tokio::test]
async fn a_tenant_sees_and_reads_only_its_datasets() {
    let (keys, auth) = Keys::new();
    let tier = Tier::start("platform-service", &format!("{auth}{}", datasets())).await.with_key(&keys.ops);
    tier.wait_ready(Duration::from_secs(20)).await;

    // Listings: Flight SQL GetTables and GetDbSchemas, /v1/datasets, the tier protocol.
    assert_eq!(flight_tables(&tier, &keys.shop).await, vec!["public.orders"]);
    assert_eq!(flight_tables(&tier, &keys.ops).await, vec!["public.customers", "public.orders"]);
    let (code, body, _) = http_as(&tier, &keys.shop, "GET", "/v1/datasets", "").await;
    assert_eq!(code, 200);
    let names: Vec<_> = body["datasets"].as_array().expect("list").iter().map(|d| d["name"].clone()).collect();
    assert_eq!(names, vec![serde_json::json!("orders")], "{body}");
    assert!(body.get("dead_letter").is_none(), "operator details for a tenant: {body}");
    let send = Send(Some(format!("Bearer {}", keys.shop)));
    let mut tiers: TierClient = TierServiceClient::with_interceptor(channel(&tier).await, send);
    let listed = tiers.list_datasets(ListDatasetsRequest { context: None }).await.expect("list").into_inner();
    assert_eq!(listed.datasets.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), vec!["orders"]);
    // A tenant claimed in the context cannot widen a key's grants.
    let claimed = Some(QueryContext { tenant: "ops".into(), ..Default::default() });
    let listed = tiers.list_datasets(ListDatasetsRequest { context: claimed }).await.expect("list").into_inner();
    assert_eq!(listed.datasets.len(), 1);
    let subscribe = SubscribeRequest { dataset: "customers".into(), ..Default::default() };
    assert_eq!(tiers.subscribe(subscribe).await.err().map(|s| s.code()), Some(Code::NotFound));

    // Queries: another tenant's dataset fails exactly as a missing one, whatever else the
    // query gets wrong, over Flight SQL and HTTP; information_schema would list everything.
    for (hidden, missing) in [
        ("SELECT * FROM customers", "SELECT * FROM nosuch"),
        ("SELECT no_such_column FROM customers", "SELECT no_such_column FROM nosuch"),
        (
            "SELECT * FROM orders o JOIN customers c ON o.customer_id = c.customer_id",
            "SELECT * FROM orders o JOIN nosuch c ON o.customer_id = c.customer_id",
        ),
        ("SELECT * FROM strata.public.customers", "SELECT * FROM strata.public.nosuch"),
    ] {
        let a = flight_error(&tier, &keys.shop, hidden).await;
        let b = flight_error(&tier, &keys.shop, missing).await;
        assert_eq!(
            (a.code(), a.message().replace("customers", "X")),
            (b.code(), b.message().replace("nosuch", "X")),
            "{hidden}"
        );
        let (code_a, body_a) = sql_as(&tier, &keys.shop, hidden).await;
        let (code_b, body_b) = sql_as(&tier, &keys.shop, missing).await;
        assert_eq!(code_a, code_b);
        assert_eq!(body_a.to_string().replace("customers", "X"), body_b.to_string().replace("nosuch", "X"));
    }
    let status = flight_error(&tier, &keys.shop, "SELECT table_name FROM information_schema.tables").await;
    assert!(status.message().contains("not found"), "{status:?}");
    // Prepared statements and schemas are held to the same grants.
    let mut client = tier.flight().await;
    client.set_token(keys.shop.clone());
    assert!(client.prepare("SELECT * FROM customers".into(), None).await.is_err());
    assert!(client.prepare("SELECT * FROM orders WHERE order_id = $1".into(), None).await.is_ok());

    // Per-tenant limits and operator endpoints.
    let (code, body) = sql_as(&tier, &keys.shop, "SELECT * FROM orders").await;
    assert_eq!(code, 422, "{body}");
    assert!(body.to_string().contains("tenants.shop.max_result_rows"), "{body}");
    let (code, _) = sql_as(&tier, &keys.shop, "SELECT * FROM orders LIMIT 3").await;
    assert_eq!(code, 200);
    assert_eq!(http_as(&tier, &keys.shop, "GET", "/metrics", "").await.0, 403);
    assert_eq!(http_as(&tier, &keys.shop, "POST", "/v1/datasets/orders/refresh", "").await.0, 403);
    assert_eq!(http_as(&tier, &keys.shop, "POST", "/v1/datasets/customers/refresh", "").await.0, 404);
    assert_eq!(http_as(&tier, &keys.ops, "GET", "/metrics", "").await.0, 200, "an operator key reads the metrics");

    // The results cache never answers one tenant with another's entry.
    let sql = "SELECT count(*) AS n FROM orders WHERE amount > 10";
    assert_eq!(cache_status(&tier, &keys.analytics, sql).await, "MISS");
    assert_eq!(cache_status(&tier, &keys.analytics, sql).await, "HIT");
    assert_eq!(cache_status(&tier, &keys.shop, sql).await, "MISS", "shop got analytics' cached answer");
    assert_eq!(cache_status(&tier, &keys.shop, sql).await, "HIT");
}

#[tokio::test]
async fn a_sidecar_uses_its_own_key_and_the_platform_enforces_the_tenant_again() {
    let (keys, auth) = Keys::new();
    let platform =
        Tier::start("platform-service", &format!("region: eu\n{auth}{}", datasets())).await.with_key(&keys.ops);
    platform.wait_ready(Duration::from_secs(20)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("platform-key");
    std::fs::write(&key_file, "strata_not_the_key\n").expect("write key");
    // The sidecar's own tenants are deliberately generous: `shop` may read anything here.
    // The platform must still hold the forwarded query to `shop`'s grants there.
    let (sidecar_keys, sidecar_auth) = Keys::new();
    let sidecar_auth =
        sidecar_auth.replace("shop: { datasets: [orders], max_result_rows: 3 }", "shop: { datasets: [\"*\"] }");
    let sidecar_config = format!(
        "region: eu\n{sidecar_auth}upstream:\n  endpoints: [\"http://{}\"]\n  credential_file: {}\n",
        platform.flight_addr,
        key_file.display()
    );
    let sidecar = Tier::start("app-sidecar", &sidecar_config).await;

    // A wrong key: the platform's catalog cannot be read, the sidecar says why and stays
    // not ready, and queries of the platform's datasets fail.
    let shop = &sidecar_keys.shop;
    sidecar
        .wait_for(Duration::from_secs(10), "the refusal in the log", || async {
            sidecar.logs().contains("refused this tier's credential").then_some(())
        })
        .await;
    assert_eq!(http_as(&sidecar, shop, "GET", "/v1/ready", "").await.0, 503);
    let (code, body) = sql_as(&sidecar, shop, "SELECT count(*) AS n FROM orders").await;
    assert_ne!(code, 200, "{body}");

    // The key rotated in the file is used without a restart.
    std::fs::write(&key_file, format!("{}\n", keys.sidecar)).expect("write key");
    let rows = sidecar
        .wait_for(Duration::from_secs(15), "the rotated key to be used", || async {
            let (code, body) = sql_as(&sidecar, shop, "SELECT count(*) AS n FROM orders").await;
            (code == 200).then_some(body)
        })
        .await;
    assert!(rows[0]["n"].as_i64().expect("count") > 0, "{rows}");
    // `shop` may not read customers on the platform, whatever the sidecar grants.
    let (code, body) = sql_as(&sidecar, shop, "SELECT count(*) AS n FROM customers").await;
    assert_ne!(code, 200, "{body}");
    assert!(body.to_string().contains("not found"), "{body}");
    // `analytics` may, through the same sidecar.
    let (code, body) = sql_as(&sidecar, &sidecar_keys.analytics, "SELECT count(*) AS n FROM customers").await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn python_clients_connect_with_a_key_over_tls() {
    let python = std::env::var("STRATA_PYTHON").unwrap_or_else(|_| {
        panic!("STRATA_PYTHON is not set: run the tests with scripts/test.sh, which installs the Python clients")
    });
    let (keys, auth) = Keys::new();
    // `analytics` without `orders` here: one granted dataset, one hidden.
    let auth = auth.replace("analytics: { datasets: [customers, \"ord*\"] }", "analytics: { datasets: [customers] }");
    let dir = tempfile::tempdir().expect("dir");
    let ca = strata_integration_tests::certs::TestCa::new(dir.path(), "clients");
    let tls = ca.server("server").server_yaml(None, false);
    let config = format!("server:\n{tls}{auth}{}", datasets());
    let tier = Tier::builder("platform-service").config(&config).tls(&ca.ca_file).start().await.with_key(&keys.ops);
    tier.wait_ready(Duration::from_secs(20)).await;
    let test_file = workspace_root().join("integration-tests/python/test_auth.py");
    let uri = format!("grpc+tls://{}", tier.flight_addr);
    let ca_file = ca.ca_file.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(test_file)
            .env("STRATA_FLIGHT_URI", uri)
            .env("STRATA_CA_FILE", ca_file)
            .env("STRATA_KEY", &keys.analytics)
            .env("STRATA_EXPIRED_KEY", &keys.old)
            .output()
    })
    .await
    .expect("join")
    .expect("run pytest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "Python auth tests failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        tier.logs()
    );
    assert!(stdout.contains("10 passed") && !stdout.contains("skipped"), "{stdout}");
}

#[tokio::test]
async fn a_tenant_at_its_concurrency_limit_is_refused_while_others_run() {
    let (keys, auth) = Keys::new();
    let auth = auth.replace(
        "analytics: { datasets: [customers, \"ord*\"] }",
        "analytics: { datasets: [customers, \"ord*\"], max_concurrent_queries: 1 }",
    );
    let tier = Tier::start("platform-service", &format!("{auth}{}", datasets())).await.with_key(&keys.ops);
    tier.wait_ready(Duration::from_secs(20)).await;
    // A query that runs for seconds (8 billion joined rows counted), holding analytics' slot.
    let spawn_slow = || {
        let (url, key) = (tier.url("/v1/sql"), keys.analytics.clone());
        tokio::spawn(async move {
            let sql = "SELECT count(*) FROM orders a, orders b, customers c WHERE a.amount + b.amount > c.customer_id";
            reqwest::Client::new().post(url).bearer_auth(key).body(sql).send().await.map(|r| r.status().as_u16())
        })
    };
    let mut slow = spawn_slow();
    let mut refused = None;
    for _ in 0..500 {
        if slow.is_finished() {
            // The probe below took the slot first and the slow query was the one refused.
            assert_eq!(slow.await.expect("join").expect("response"), 429);
            slow = spawn_slow();
            continue;
        }
        let (code, body) = sql_as(&tier, &keys.analytics, "SELECT 1 AS one").await;
        if code == 429 {
            refused = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = refused.expect("analytics' second query was refused while its first ran");
    assert!(refused.to_string().contains("tenants.analytics.max_concurrent_queries"), "{refused}");
    // Another tenant is not held up by analytics' limit.
    let (code, body) = sql_as(&tier, &keys.shop, "SELECT count(*) AS n FROM orders").await;
    assert_eq!(code, 200, "{body}");
    // The slot comes back when the slow query goes away.
    slow.abort();
    tier.wait_for(Duration::from_secs(30), "analytics' slot to come back", || async {
        (sql_as(&tier, &keys.analytics, "SELECT 1 AS one").await.0 == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_tenant_past_its_memory_limit_fails_while_another_runs_the_same_query() {
    let (keys, auth) = Keys::new();
    let auth = auth.replace(
        "analytics: { datasets: [customers, \"ord*\"] }",
        "analytics: { datasets: [customers, \"ord*\"], memory_limit: 1MiB }",
    );
    let tier = Tier::start("platform-service", &format!("{auth}{}", datasets())).await.with_key(&keys.ops);
    tier.wait_ready(Duration::from_secs(20)).await;
    // 400,000 distinct values: a hash table of several MiB.
    let sql =
        "SELECT count(DISTINCT a.order_id * 10000 + b.order_id) AS n FROM orders a, orders b WHERE b.order_id <= 200";
    let (code, body) = sql_as(&tier, &keys.analytics, sql).await;
    assert_eq!(code, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("tenants.analytics.memory_limit"), "the error names the tenant's limit: {body}");
    // The shared pool was not exhausted: the same query of a tenant without a limit runs.
    let (code, body) = sql_as(&tier, &keys.shop, sql).await;
    assert_eq!(code, 200, "{body}");
    // And the limited tenant's memory came back: a small query of it runs.
    let (code, body) = sql_as(&tier, &keys.analytics, "SELECT count(*) AS n FROM orders").await;
    assert_eq!(code, 200, "{body}");
}
