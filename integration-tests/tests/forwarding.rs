//! A sidecar forwarding queries whole passes the platform's Arrow messages on to its Flight
//! clients without decoding and encoding them again, and still holds them to its own
//! limits: these tests check the answers against the platform's own over every client path,
//! and what a broken or lying upstream gets (a clear error, never wrong rows).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, TimestampMicrosecondArray,
};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions};
use bytes::Bytes;
use futures::Stream;
use strata_integration_tests::free_port;
use strata_integration_tests::tier::Tier;
use strata_proto::v1::tier_service_server::{TierService, TierServiceServer};
use strata_proto::v1::{
    ArrowFrame, ExecuteRequest, HealthRequest, HealthResponse, IngestRequest, IngestResponse, ListDatasetsRequest,
    ListDatasetsResponse, SubscribeEvent, SubscribeRequest, execute_request,
};
use strata_upstream::wire;
use tonic::{Request, Response, Status};

const ROWS: i64 = 150_000;

/// A Parquet file of every common column type, nulls and non-ASCII text among them,
/// written in several row groups so answers span several batches.
fn write_wide(path: &std::path::Path) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("grp", DataType::Int32, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("price", DataType::Decimal128(12, 2), true),
        Field::new("ratio", DataType::Float64, true),
        Field::new("flag", DataType::Boolean, true),
        Field::new("day", DataType::Date32, true),
        Field::new("at", DataType::Timestamp(TimeUnit::Microsecond, None), true),
    ]));
    let file = std::fs::File::create(path).expect("create parquet");
    let properties = datafusion::parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(40_000))
        .build();
    let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(file, Arc::clone(&schema), Some(properties))
        .expect("parquet writer");
    let chunk = 50_000;
    for start in (0..ROWS).step_by(chunk as usize) {
        let ids: Vec<i64> = (start..(start + chunk).min(ROWS)).collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(ids.clone())),
            Arc::new(Int32Array::from_iter(ids.iter().map(|i| (i % 7 != 3).then_some((i % 100) as i32)))),
            Arc::new(StringArray::from_iter(ids.iter().map(|i| match i % 5 {
                0 => None,
                1 => Some(format!("Zürich ✓ {i}")),
                _ => Some(format!("name-{i}")),
            }))),
            Arc::new(
                Decimal128Array::from_iter(ids.iter().map(|i| (i % 11 != 0).then_some(i128::from(*i) * 37 - 5_000)))
                    .with_precision_and_scale(12, 2)
                    .expect("decimal"),
            ),
            Arc::new(Float64Array::from_iter(ids.iter().map(|i| (i % 13 != 0).then_some(*i as f64 / 3.0)))),
            Arc::new(BooleanArray::from_iter(ids.iter().map(|i| (i % 17 != 0).then_some(i % 2 == 0)))),
            Arc::new(Date32Array::from_iter(ids.iter().map(|i| (i % 19 != 0).then_some((i % 20_000) as i32)))),
            Arc::new(TimestampMicrosecondArray::from_iter(
                ids.iter().map(|i| (i % 23 != 0).then_some(1_700_000_000_000_000 + i * 1_000_003)),
            )),
        ];
        writer.write(&RecordBatch::try_new(Arc::clone(&schema), columns).expect("batch")).expect("write");
    }
    writer.close().expect("close parquet");
}

fn concat(batches: &[RecordBatch]) -> Option<RecordBatch> {
    let schema = batches.first()?.schema();
    Some(concat_batches(&schema, batches).expect("concat"))
}

/// A forwarded answer over Flight SQL and plain Flight is the platform's, row for row and
/// type for type, however many batches it spans; over HTTP (decoded there) the same rows;
/// and the sidecar's own `max_result_rows` still stops one that is too long.
#[tokio::test]
async fn forwarded_answers_are_the_platforms_and_keep_the_sidecars_limits() {
    let dir = tempfile::tempdir().expect("dir");
    write_wide(&dir.path().join("wide.parquet"));
    let platform = Tier::start(
        "platform-service",
        &format!("region: eu\ndatasets:\n  - name: wide\n    from: file:{}/wide.parquet\n", dir.path().display()),
    )
    .await;
    platform.wait_ready(Duration::from_secs(30)).await;
    let sidecar = Tier::start(
        "app-sidecar",
        &format!(
            "region: eu\nlimits:\n  max_result_rows: 100000\nupstream:\n  endpoints: [http://{}]\n",
            platform.flight_addr
        ),
    )
    .await;
    sidecar.wait_ready(Duration::from_secs(30)).await;
    sidecar
        .wait_for(Duration::from_secs(30), "the sidecar to learn the platform's catalog", || async {
            sidecar.flight_query("SELECT count(*) FROM wide").await.ok()
        })
        .await;

    let queries = [
        "SELECT * FROM wide WHERE id < 90000 ORDER BY id",
        "SELECT * FROM wide WHERE id % 1000 = 7 ORDER BY id",
        "SELECT * FROM wide WHERE id < 0",
        "SELECT grp, count(*) AS n, sum(price) AS total, max(name) AS last, min(at) AS first FROM wide GROUP BY grp ORDER BY grp NULLS FIRST",
        "SELECT name, day FROM wide WHERE name LIKE 'Zürich%' AND flag ORDER BY id DESC LIMIT 25",
    ];
    for sql in queries {
        let direct = platform.flight_query(sql).await.unwrap_or_else(|e| panic!("platform `{sql}`: {e}"));
        let forwarded = sidecar.flight_query(sql).await.unwrap_or_else(|e| panic!("sidecar `{sql}`: {e}"));
        let rows = |b: &[RecordBatch]| b.iter().map(RecordBatch::num_rows).sum::<usize>();
        assert_eq!(rows(&forwarded), rows(&direct), "rows of `{sql}`");
        if let (Some(direct), Some(forwarded)) = (concat(&direct), concat(&forwarded)) {
            assert_eq!(forwarded.schema().fields(), direct.schema().fields(), "schema of `{sql}`");
            assert_eq!(forwarded, direct, "`{sql}` forwarded differs from the platform's answer");
        }
        // Over HTTP the sidecar decodes the same messages into JSON rows.
        if rows(&direct) <= 1000 {
            assert_eq!(sidecar.rows(sql).await, platform.rows(sql).await, "`{sql}` over HTTP");
        }
    }
    let (_, route, reason) = sidecar.routed("SELECT count(*) FROM wide", &[]).await;
    assert_eq!((route.as_str(), reason.as_str()), ("forwarded", "not_accelerated"));

    // Plain Flight with the SQL in the ticket: the same answer, and the route in app_metadata.
    let sql = "SELECT * FROM wide WHERE id BETWEEN 1000 AND 1999 ORDER BY id";
    let mut flight = arrow_flight::flight_service_client::FlightServiceClient::new(sidecar.channel().await);
    let ticket = arrow_flight::Ticket::new(serde_json::json!({ "sql": sql }).to_string());
    let response = flight.do_get(ticket).await.expect("do_get");
    assert_eq!(response.metadata().get("strata-route").and_then(|v| v.to_str().ok()), Some("forwarded"));
    let mut messages = response.into_inner();
    let first = futures::StreamExt::next(&mut messages).await.expect("a message").expect("ok");
    let route: serde_json::Value = serde_json::from_slice(&first.app_metadata).expect("app_metadata is JSON");
    assert_eq!(route["route"], "forwarded", "{route}");
    let rest: Vec<arrow_flight::FlightData> =
        futures::TryStreamExt::try_collect(messages).await.expect("the rest of the answer");
    let data = futures::stream::iter(std::iter::once(first).chain(rest).map(Ok));
    let batches: Vec<RecordBatch> =
        futures::TryStreamExt::try_collect(arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(data))
            .await
            .expect("decode the passed-on messages");
    assert_eq!(concat(&batches), concat(&platform.flight_query(sql).await.expect("platform")));

    // The sidecar's row limit holds on messages it never decodes (the platform's is larger).
    let sql = "SELECT id, name FROM wide";
    assert_eq!(
        platform.flight_query(sql).await.expect("platform answers all").iter().map(|b| b.num_rows()).sum::<usize>(),
        ROWS as usize
    );
    let err = sidecar.flight_query(sql).await.expect_err("over the sidecar's limit");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("limits.max_result_rows"), "{err}");
    sidecar.flight_query("SELECT 1").await.expect("the sidecar still answers");
}

/// What the fake upstream answers: chosen by a word in the forwarded SQL.
#[derive(Clone)]
struct Lying {
    schema: SchemaRef,
}

type Frames = Pin<Box<dyn Stream<Item = Result<ArrowFrame, Status>> + Send>>;

impl Lying {
    fn schema_frame(schema: &Schema) -> ArrowFrame {
        let encoded = IpcDataGenerator::default().schema_to_bytes_with_dictionary_tracker(
            schema,
            &mut DictionaryTracker::new(false),
            &IpcWriteOptions::default(),
        );
        ArrowFrame {
            data_header: Bytes::from(encoded.ipc_message),
            data_body: Bytes::new(),
            app_metadata: Bytes::new(),
        }
    }

    fn batch_frame(batch: &RecordBatch) -> ArrowFrame {
        let (_, encoded) = IpcDataGenerator::default()
            .encode(
                batch,
                &mut DictionaryTracker::new(false),
                &IpcWriteOptions::default(),
                &mut IpcWriteContext::default(),
            )
            .expect("encode");
        ArrowFrame {
            data_header: Bytes::from(encoded.ipc_message),
            data_body: Bytes::from(encoded.arrow_data),
            app_metadata: Bytes::new(),
        }
    }

    fn batch(&self, ids: Vec<i64>) -> RecordBatch {
        let names: Vec<String> = ids.iter().map(|i| format!("row {i}")).collect();
        RecordBatch::try_new(
            Arc::clone(&self.schema),
            vec![Arc::new(Int64Array::from(ids)), Arc::new(StringArray::from(names))],
        )
        .expect("batch")
    }

    /// The messages answering `sql`.
    fn answer(&self, sql: &str) -> Vec<ArrowFrame> {
        let good = Self::batch_frame(&self.batch(vec![1, 2, 3]));
        if sql.contains("retyped") {
            let retyped =
                Schema::new(vec![Field::new("id", DataType::Int32, false), Field::new("name", DataType::Utf8, true)]);
            return vec![Self::schema_frame(&retyped), good];
        }
        if sql.contains("batch_first") {
            return vec![good.clone(), Self::schema_frame(&self.schema), good];
        }
        if sql.contains("garbage") {
            let garbage = ArrowFrame { data_header: Bytes::from_static(&[0xA5; 48]), ..good.clone() };
            return vec![Self::schema_frame(&self.schema), garbage];
        }
        if sql.contains("endless") {
            // One message whose header claims 2^40 rows over a three-row body.
            let mut frame = Self::batch_frame(&self.batch(vec![1, 2, 3]));
            frame.data_header = patch_length(&frame.data_header, 3, 1 << 40);
            return vec![Self::schema_frame(&self.schema), frame];
        }
        if sql.contains("nothing") {
            return Vec::new();
        }
        vec![Self::schema_frame(&self.schema), good, Self::batch_frame(&self.batch(vec![4, 5]))]
    }
}

/// `header` with every little-endian i64 equal to `from` replaced by `to`: a record batch
/// header's `length` and its columns' lengths, made to lie (its buffers' offsets and sizes
/// are multiples of 8 and its null counts 0, so none of them is `from = 3`).
fn patch_length(header: &[u8], from: i64, to: i64) -> Bytes {
    let (needle, mut out) = (from.to_le_bytes(), header.to_vec());
    let mut patched = 0;
    let mut at = 0;
    while at + 8 <= out.len() {
        if out[at..at + 8] == needle {
            out[at..at + 8].copy_from_slice(&to.to_le_bytes());
            patched += 1;
            at += 8;
        } else {
            at += 1;
        }
    }
    assert!(patched > 0, "the length is in the header");
    Bytes::from(out)
}

#[tonic::async_trait]
impl TierService for Lying {
    async fn list_datasets(&self, _: Request<ListDatasetsRequest>) -> Result<Response<ListDatasetsResponse>, Status> {
        let info = strata_proto::v1::DatasetInfo {
            name: "items".into(),
            schema: wire::schema_to_ipc(&self.schema).map_err(|e| Status::internal(e.to_string()))?,
            home_region: "eu".into(),
            ..Default::default()
        };
        Ok(Response::new(ListDatasetsResponse { region: "eu".into(), datasets: vec![info] }))
    }

    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeEvent, Status>> + Send>>;

    async fn subscribe(&self, _: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("no replication here"))
    }

    type ExecuteStream = Frames;

    async fn execute(&self, request: Request<ExecuteRequest>) -> Result<Response<Frames>, Status> {
        let Some(execute_request::Query::Sql(query)) = request.into_inner().query else {
            return Err(Status::invalid_argument("SQL only"));
        };
        let frames = self.answer(&query.sql).into_iter().map(Ok);
        let mut response = Response::new(Box::pin(futures::stream::iter(frames)) as Frames);
        response.metadata_mut().insert("strata-route", "local".parse().expect("header"));
        Ok(response)
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse { tier: "platform".into(), region: "eu".into(), ready: true }))
    }

    async fn ingest(&self, _: Request<IngestRequest>) -> Result<Response<IngestResponse>, Status> {
        Err(Status::unimplemented("no ingest here"))
    }
}

/// An upstream whose messages break or lie fails the query with an error that says so,
/// over Flight and over HTTP alike: columns of other types than announced in its catalog,
/// a batch before the schema, a header that is not a flatbuffer, a batch claiming 2^40 rows
/// (stopped by the row limit, read from the header), an answer with no schema at all. A
/// well-formed answer from the same upstream passes.
#[tokio::test]
async fn an_upstream_whose_messages_lie_gets_a_clear_error_not_wrong_rows() {
    let schema =
        Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("name", DataType::Utf8, true)]));
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let upstream = Lying { schema };
    let server =
        tokio::spawn(tonic::transport::Server::builder().add_service(TierServiceServer::new(upstream)).serve(addr));
    let sidecar = Tier::start(
        "app-sidecar",
        &format!("region: eu\nlimits:\n  max_result_rows: 1000\nupstream:\n  endpoints: [http://{addr}]\n"),
    )
    .await;
    sidecar.wait_ready(Duration::from_secs(30)).await;
    let good = sidecar
        .wait_for(Duration::from_secs(30), "the sidecar to learn the fake catalog", || async {
            sidecar.flight_query("SELECT id, name FROM items").await.ok()
        })
        .await;
    let ids: Vec<i64> = good
        .iter()
        .flat_map(|b| b.column(0).as_any().downcast_ref::<Int64Array>().expect("ids").values().to_vec())
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    assert_eq!(sidecar.rows("SELECT id, name FROM items").await.len(), 5, "the same over HTTP");

    let cases = [
        ("retyped", "other than planned here"),
        ("batch_first", "before its schema"),
        ("garbage", "malformed"),
        ("endless", "limits.max_result_rows"),
        ("nothing", "ended before its schema"),
    ];
    for (word, expected) in cases {
        let sql = format!("SELECT id, name FROM items WHERE name <> '{word}'");
        let err = sidecar.flight_query(&sql).await.expect_err(word);
        assert!(err.message().contains(expected), "{word} over Flight: {err}");
        let (status, body) = sidecar.sql(&sql).await;
        assert!(status >= 400, "{word} over HTTP answered {status}: {body}");
    }
    sidecar.flight_query("SELECT id, name FROM items").await.expect("still answers");
    let log = sidecar.logs();
    assert!(!log.contains("panicked"), "the sidecar panicked:\n{log}");
    server.abort();
}
