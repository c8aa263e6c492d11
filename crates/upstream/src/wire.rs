//! Conversions between the tier protocol's generated types and the engine's domain types.
//! Generated types stop here: nothing past this module sees them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::{FlightData, IpcMessage, SchemaAsIpc};
use bytes::Bytes;
use datafusion::common::ScalarValue;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::{Stream, TryStreamExt};
use strata_core::StrataError;
use strata_core::encoded::{IpcFrame, IpcFrames};
use strata_core::results_cache::CacheControl;
use strata_core::routing::{CatalogEntry, QueryOptions};
use strata_core::trace_context::{self, TraceParent};
use strata_proto::v1::{ArrowFrame, DatasetInfo, IndexKey, QueryContext};

/// gRPC metadata key naming the [`StrataError`] kind of a failed call, so a downstream tier
/// can tell "the platform refused the query" from "the platform is unreachable".
pub const ERROR_KIND_HEADER: &str = "strata-error-kind";
/// Response headers of forwarded queries and of every tier's answers.
pub const ROUTE_HEADER: &str = "strata-route";
pub const ROUTE_REASON_HEADER: &str = "strata-route-reason";
pub const VERSIONS_HEADER: &str = "strata-versions";
/// Request header asking for the authoritative copy.
pub const CONSISTENCY_HEADER: &str = "strata-consistency";

/// The Arrow IPC schema message.
pub fn schema_to_ipc(schema: &Schema) -> Result<Bytes, StrataError> {
    let message = IpcMessage::try_from(SchemaAsIpc::new(schema, &IpcWriteOptions::default()))?;
    Ok(message.0)
}

pub fn schema_from_ipc(bytes: &[u8]) -> Result<SchemaRef, StrataError> {
    Ok(Arc::new(arrow::ipc::convert::try_schema_from_ipc_buffer(bytes)?))
}

fn millis_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The context a forwarded call carries.
pub fn context(options: &QueryOptions, tier: &str, region: &str, deadline: Option<SystemTime>) -> QueryContext {
    // The calling span's context (the forward's), so the callee's spans hang under it.
    let trace = trace_context::outgoing(&tracing::Span::current(), &options.trace);
    QueryContext {
        origin_tier: if options.origin_tier.is_empty() { tier.to_string() } else { options.origin_tier.clone() },
        origin_region: if options.origin_region.is_empty() {
            region.to_string()
        } else {
            options.origin_region.clone()
        },
        // The end client's tenant: the one this tier carried for, else its own caller's.
        tenant: if options.on_behalf_of.is_empty() { options.tenant.clone() } else { options.on_behalf_of.clone() },
        traceparent: trace.traceparent,
        tracestate: trace.tracestate,
        deadline_unix_ms: deadline.map_or(0, millis_since_epoch),
        strong_consistency: options.strong_consistency,
        hops: options.hops + 1,
        bypass_cache: options.cache_control.no_cache,
        max_stale_ms: options.cache_control.max_stale.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        only_if_cached: options.cache_control.only_if_cached,
        distribute: match options.distribute {
            Some(true) => "on".into(),
            Some(false) => "off".into(),
            None => String::new(),
        },
    }
}

/// Writes a call's W3C trace context as `traceparent` / `tracestate` metadata (skipping
/// empty or non-header-safe values), for proxies and meshes between the tiers.
pub fn insert_trace_headers(metadata: &mut tonic::metadata::MetadataMap, traceparent: &str, tracestate: &str) {
    for (name, value) in [("traceparent", traceparent), ("tracestate", tracestate)] {
        if let (false, Ok(value)) = (value.is_empty(), value.parse()) {
            metadata.insert(name, value);
        }
    }
}

/// Options and deadline of a call received from another tier. The tenant it carried is
/// who that tier acts for (`on_behalf_of`); who is calling (`tenant`) is the server's to set
/// from the caller's credential.
pub fn options(context: Option<QueryContext>) -> (QueryOptions, Option<SystemTime>) {
    let c = context.unwrap_or_default();
    let deadline = (c.deadline_unix_ms > 0).then(|| from_millis(c.deadline_unix_ms));
    (
        QueryOptions {
            strong_consistency: c.strong_consistency,
            tenant: String::new(),
            on_behalf_of: c.tenant,
            trace: TraceParent::new(c.traceparent, c.tracestate),
            origin_tier: c.origin_tier,
            origin_region: c.origin_region,
            hops: c.hops,
            deadline,
            cache_control: CacheControl {
                no_cache: c.bypass_cache,
                max_stale: c.max_stale_ms.map(|ms| match ms {
                    u64::MAX => Duration::MAX,
                    ms => Duration::from_millis(ms),
                }),
                only_if_cached: c.only_if_cached,
            },
            distribute: match c.distribute.as_str() {
                "on" => Some(true),
                "off" => Some(false),
                _ => None,
            },
        },
        deadline,
    )
}

pub fn dataset_info(entry: &CatalogEntry) -> Result<DatasetInfo, StrataError> {
    Ok(DatasetInfo {
        name: entry.name.clone(),
        schema: schema_to_ipc(&entry.schema)?,
        home_region: entry.home_region.clone(),
        version: entry.version,
        rows: entry.rows,
        refreshed_at_unix_ms: entry.refreshed_at.map_or(0, |t| millis_since_epoch(t) as i64),
        accelerated: entry.accelerated,
        writable: entry.writable,
        indexes: entry.indexes.iter().map(|columns| IndexKey { columns: columns.clone() }).collect(),
    })
}

pub fn catalog_entry(info: &DatasetInfo) -> Result<CatalogEntry, StrataError> {
    if info.name.is_empty() {
        return Err(StrataError::Protocol("upstream listed a dataset without a name".into()));
    }
    Ok(CatalogEntry {
        name: info.name.clone(),
        schema: schema_from_ipc(&info.schema)
            .map_err(|e| StrataError::Protocol(format!("schema of upstream dataset `{}`: {e}", info.name)))?,
        home_region: info.home_region.clone(),
        version: info.version,
        rows: info.rows,
        refreshed_at: (info.refreshed_at_unix_ms > 0).then(|| from_millis(info.refreshed_at_unix_ms as u64)),
        accelerated: info.accelerated,
        writable: info.writable,
        indexes: info.indexes.iter().map(|key| key.columns.clone()).collect(),
    })
}

/// Positional parameters as an Arrow IPC stream of one row.
pub fn params_to_ipc(params: &[ScalarValue]) -> Result<Bytes, StrataError> {
    if params.is_empty() {
        return Ok(Bytes::new());
    }
    let mut fields = Vec::with_capacity(params.len());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(params.len());
    for (i, value) in params.iter().enumerate() {
        fields.push(Field::new(format!("${}", i + 1), value.data_type(), true));
        columns.push(value.to_array()?);
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    let mut out = Vec::new();
    let mut writer = StreamWriter::try_new(&mut out, &batch.schema())?;
    writer.write(&batch)?;
    writer.finish()?;
    drop(writer);
    Ok(Bytes::from(out))
}

/// Parameters from another tier: an IPC stream of one row, at most `max` bytes (the limit
/// named `limits.max_message_size`), checked before anything is allocated for it.
pub fn params_from_ipc(bytes: &[u8], max: usize) -> Result<Vec<ScalarValue>, StrataError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let mut values = Vec::new();
    for batch in strata_core::ipc::read_batches(bytes, max, "limits.max_message_size")? {
        if batch.num_rows() != 1 {
            return Err(StrataError::Plan("parameters must be one row".into()));
        }
        for column in batch.columns() {
            values.push(ScalarValue::try_from_array(column, 0)?);
        }
    }
    Ok(values)
}

/// Record batches as one Arrow IPC stream (an edge upload).
pub fn batches_to_ipc(schema: &Schema, batches: &[RecordBatch]) -> Result<Bytes, StrataError> {
    let mut out = Vec::new();
    let mut writer = StreamWriter::try_new(&mut out, schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    drop(writer);
    Ok(Bytes::from(out))
}

/// Record batches of an edge upload, at most `max` bytes, checked before decoding.
pub fn batches_from_ipc(bytes: &[u8], max: usize) -> Result<Vec<RecordBatch>, StrataError> {
    strata_core::ipc::read_batches(bytes, max, "limits.max_message_size")
}

/// Decodes a stream of frames into record batches of the schema the frames announce.
pub fn decode_frames<S>(frames: S, expected: SchemaRef) -> SendableRecordBatchStream
where
    S: Stream<Item = Result<ArrowFrame, tonic::Status>> + Send + 'static,
{
    let data = frames.map_ok(FlightData::from).map_err(|status| FlightError::Tonic(Box::new(status)));
    decode_flight_data(data, expected)
}

/// The tier protocol's frames as the engine's IPC messages (the buffers move, nothing is
/// decoded): a forwarded answer, passed on or decoded later by [`decode_ipc_frames`].
pub fn ipc_frames<S>(frames: S) -> IpcFrames
where
    S: Stream<Item = Result<ArrowFrame, tonic::Status>> + Send + 'static,
{
    Box::pin(
        frames
            .map_ok(|frame| IpcFrame { header: frame.data_header, body: frame.data_body })
            .map_err(|s| status_error(&s)),
    )
}

/// Decodes IPC messages from [`ipc_frames`] into record batches (the [`EncodedAnswer`]
/// decoder of a forwarded answer read as rows).
///
/// [`EncodedAnswer`]: strata_core::encoded::EncodedAnswer
pub fn decode_ipc_frames(frames: IpcFrames, expected: SchemaRef) -> SendableRecordBatchStream {
    let data = frames
        .map_ok(|frame| FlightData {
            flight_descriptor: None,
            data_header: frame.header,
            data_body: frame.body,
            app_metadata: Bytes::new(),
        })
        .map_err(|err| FlightError::ExternalError(Box::new(err)));
    decode_flight_data(data, expected)
}

fn decode_flight_data<S>(data: S, expected: SchemaRef) -> SendableRecordBatchStream
where
    S: Stream<Item = Result<FlightData, FlightError>> + Send + 'static,
{
    let batches = FlightRecordBatchStream::new_from_flight_data(data)
        .map_err(|e| datafusion::error::DataFusionError::from(flight_error(e)));
    // Arrow's Flight decoder panics on some malformed messages: a broken or hostile upstream
    // fails this query with an error, never the task serving it.
    let batches = strata_core::contained_panic::Contained::new(Box::pin(batches), || {
        Err(datafusion::error::DataFusionError::Execution(
            "the upstream's answer is malformed (the Arrow decoder failed)".into(),
        ))
    });
    Box::pin(RecordBatchStreamAdapter::new(expected, batches))
}

/// Encodes record batches as frames (schema first, dictionaries as needed).
pub fn encode_frames<S>(schema: SchemaRef, batches: S) -> impl Stream<Item = Result<ArrowFrame, FlightError>> + Send
where
    S: Stream<Item = Result<RecordBatch, FlightError>> + Send + 'static,
{
    use futures::StreamExt;
    let compact =
        batches.map(|batch| batch.map(|b| futures::stream::iter(compact_views(b).into_iter().map(Ok)))).try_flatten();
    FlightDataEncoderBuilder::new().with_schema(schema).build(compact).map_ok(ArrowFrame::from)
}

/// Bytes per frame we aim for when a batch holds string or binary views.
const VIEW_SLICE_BYTES: usize = 1 << 20;

/// A batch with string/binary view columns, cut into slices whose view buffers hold only
/// their own bytes. The encoder would otherwise split the batch itself and send every
/// shared data buffer again with each slice (measured: 3.4x the bytes on the wire and disk).
pub fn compact_views(batch: RecordBatch) -> Vec<RecordBatch> {
    use arrow::array::{ArrayRef, AsArray};
    use arrow::datatypes::DataType;
    let has_views = batch.columns().iter().any(|c| matches!(c.data_type(), DataType::Utf8View | DataType::BinaryView));
    if !has_views || batch.num_rows() == 0 {
        return vec![batch];
    }
    let bytes = batch.get_array_memory_size().max(1);
    // Small enough for one frame: only view columns pinning buffers they do not use are
    // rewritten (a one-row answer filtered out of a whole batch), not every view column.
    if bytes <= VIEW_SLICE_BYTES {
        return vec![strata_core::accelerator::compact_views(batch)];
    }
    let rows_per_slice = (batch.num_rows() * VIEW_SLICE_BYTES / bytes).clamp(1, batch.num_rows());
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < batch.num_rows() {
        let len = rows_per_slice.min(batch.num_rows() - offset);
        let slice = batch.slice(offset, len);
        let columns: Vec<ArrayRef> = slice
            .columns()
            .iter()
            .map(|c| match c.data_type() {
                DataType::Utf8View => Arc::new(c.as_string_view().gc()) as ArrayRef,
                DataType::BinaryView => Arc::new(c.as_binary_view().gc()) as ArrayRef,
                _ => Arc::clone(c),
            })
            .collect();
        out.push(RecordBatch::try_new(slice.schema(), columns).unwrap_or(slice));
        offset += len;
    }
    out
}

/// An error of a call to another tier, as the engine's error.
pub fn flight_error(err: FlightError) -> StrataError {
    match err {
        FlightError::Tonic(status) => status_error(&status),
        FlightError::ExternalError(e) => match e.downcast::<StrataError>() {
            Ok(strata) => *strata,
            Err(other) => StrataError::Execution(other.to_string()),
        },
        other => StrataError::Execution(format!("upstream stream: {other}")),
    }
}

/// Maps a status from another tier back to the error it reported; a status without the
/// kind header never reached a Strata server: the upstream is unavailable.
pub fn status_error(status: &tonic::Status) -> StrataError {
    let kind = status.metadata().get(ERROR_KIND_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let message = status.message().to_string();
    match kind {
        Some(kind) => StrataError::from_kind(&kind, message),
        None => match status.code() {
            tonic::Code::DeadlineExceeded => {
                StrataError::UpstreamUnavailable(format!("no answer before the deadline ({message})"))
            }
            tonic::Code::Unimplemented => StrataError::UpstreamUnavailable(format!(
                "the upstream does not speak the strata.v1 tier protocol ({message})"
            )),
            // Refused by its authentication layer: this tier's own key is the problem, not
            // the client's query.
            tonic::Code::Unauthenticated => StrataError::UpstreamUnavailable(format!(
                "the upstream refused this tier's credential ({message}); check upstream.credential / credential_file"
            )),
            _ => StrataError::UpstreamUnavailable(message),
        },
    }
}

/// Whether a status means the call never reached a working server (worth a retry elsewhere,
/// and a failure for the circuit breaker).
pub fn is_unreachable(status: &tonic::Status) -> bool {
    status.metadata().get(ERROR_KIND_HEADER).is_none()
        && matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_headers_carry_the_calls_context_and_skip_what_a_header_cannot_hold() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        insert_trace_headers(&mut metadata, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "");
        assert_eq!(
            metadata.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert!(metadata.get("tracestate").is_none());
        let mut metadata = tonic::metadata::MetadataMap::new();
        insert_trace_headers(&mut metadata, "bad\nvalue", "k=v");
        assert!(metadata.get("traceparent").is_none());
        assert_eq!(metadata.get("tracestate").and_then(|v| v.to_str().ok()), Some("k=v"));
    }

    #[test]
    fn cache_control_travels_with_a_forwarded_query() {
        for control in [
            CacheControl::default(),
            CacheControl { no_cache: true, ..Default::default() },
            CacheControl { max_stale: Some(Duration::from_secs(30)), only_if_cached: true, no_cache: false },
            CacheControl { max_stale: Some(Duration::MAX), ..Default::default() },
            CacheControl { max_stale: Some(Duration::ZERO), ..Default::default() },
        ] {
            let sent = QueryOptions { cache_control: control, ..Default::default() };
            let (received, _) = options(Some(context(&sent, "app-sidecar", "eu", None)));
            assert_eq!(received.cache_control, control);
        }
    }

    #[test]
    fn parameters_round_trip_as_one_ipc_row() {
        let params =
            vec![ScalarValue::Int64(Some(42)), ScalarValue::Utf8(Some("eu".into())), ScalarValue::Float64(None)];
        let bytes = params_to_ipc(&params).expect("encode");
        assert_eq!(params_from_ipc(&bytes, 1 << 20).expect("decode"), params);
        assert!(params_from_ipc(&params_to_ipc(&[]).expect("empty"), 1 << 20).expect("decode").is_empty());
    }

    #[test]
    fn a_status_without_a_kind_means_the_upstream_is_unreachable() {
        let refused = tonic::Status::unavailable("tcp connect error: Connection refused");
        assert!(is_unreachable(&refused));
        assert!(matches!(status_error(&refused), StrataError::UpstreamUnavailable(_)));

        let mut refused_query = tonic::Status::invalid_argument("SQL parse error: near FROM");
        refused_query.metadata_mut().insert(ERROR_KIND_HEADER, "parse".parse().expect("value"));
        assert!(!is_unreachable(&refused_query));
        let err = status_error(&refused_query);
        assert_eq!((err.kind().as_str(), err.to_string().as_str()), ("parse", "SQL parse error: near FROM"));
    }
}
