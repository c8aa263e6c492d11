//! Flight data in and out: answers encoded under the gRPC message limit, DoPut streams
//! decoded under `limits.max_request_body`, schemas as IPC bytes.

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::sql::server::PeekableFlightDataStream;
use arrow_flight::{FlightData, IpcMessage, SchemaAsIpc};
use futures::{FutureExt, Stream, TryStreamExt};
use prost::Message;
use strata_core::contained_panic::Contained;
use tonic::{Request, Status};

use super::sql_service::DoGetStream;

/// Encodes batches as Flight data, each message under the configured gRPC size limit.
pub(crate) fn encode(
    schema: SchemaRef,
    batches: impl Stream<Item = Result<RecordBatch, FlightError>> + Send + 'static,
    max_message_size: usize,
) -> DoGetStream {
    encode_with_metadata(schema, batches, max_message_size, bytes::Bytes::new())
}

/// [`encode`] with `app_metadata` on the first (schema) message.
pub(crate) fn encode_with_metadata(
    schema: SchemaRef,
    batches: impl Stream<Item = Result<RecordBatch, FlightError>> + Send + 'static,
    max_message_size: usize,
    app_metadata: bytes::Bytes,
) -> DoGetStream {
    // Slices of view arrays would each carry the whole shared data buffers: compact first.
    let batches = batches
        .map_ok(|b| futures::stream::iter(strata_upstream::wire::compact_views(b).into_iter().map(Ok)))
        .try_flatten();
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .with_metadata(app_metadata)
        // About 2 MiB per message, whatever the server accepts: clients decode up to 4 MiB
        // by default (tonic, grpc), and the encoder's split can overshoot its target.
        .with_max_flight_data_size((max_message_size / 2).clamp(64 * 1024, 2 << 20))
        .build(batches)
        .map_err(Status::from);
    Box::pin(stream)
}

/// The parameter rows a client sends with DoPut, at most `max` bytes in all.
pub(super) async fn read_parameters(
    request: Request<PeekableFlightDataStream>,
    max: usize,
) -> Result<Vec<RecordBatch>, Status> {
    read_put(request, max, "bound parameters").await
}

/// Every record batch of a DoPut stream, refused once its messages add up to more than
/// `max` bytes (`limits.max_request_body`): each message is bounded by the gRPC limit, but
/// a stream of them would otherwise be collected without end.
pub(super) async fn read_put(
    request: Request<PeekableFlightDataStream>,
    max: usize,
    what: &str,
) -> Result<Vec<RecordBatch>, Status> {
    let mut total = 0usize;
    let data = request.into_inner().map_err(FlightError::from).and_then(move |data| {
        total += data.data_header.len() + data.data_body.len() + data.app_metadata.len();
        let over = total > max;
        async move {
            if over {
                return Err(FlightError::ExternalError(Box::new(strata_core::StrataError::InvalidRequest(format!(
                    "the DoPut stream is over limits.max_request_body ({max} bytes)"
                )))));
            }
            Ok(data)
        }
    });
    // Arrow's Flight decoder panics on some malformed messages: caught, it is a bad request.
    let decode = arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(data).try_collect::<Vec<_>>();
    let decoded = Contained::new(Box::pin(decode.map(Some)), || None)
        .await
        .ok_or_else(|| Status::invalid_argument(format!("the {what} are malformed (the Arrow decoder failed)")))?;
    decoded.map_err(|e| Status::invalid_argument(format!("cannot read the {what}: {e}")))
}

/// Flight messages as one buffer (each length-delimited, as protobuf frames a stream of
/// messages), to keep with a cached answer.
pub(super) fn join_messages(messages: &[FlightData]) -> bytes::Bytes {
    let mut joined = Vec::with_capacity(messages.iter().map(|m| m.encoded_len() + 10).sum());
    for message in messages {
        // A Vec grows as needed: encoding into it does not fail.
        let _ = message.encode_length_delimited(&mut joined);
    }
    joined.into()
}

/// The messages of [`join_messages`]; their headers and bodies are slices of `joined`, not
/// copies.
pub(super) fn split_messages(mut joined: bytes::Bytes) -> Result<Vec<FlightData>, Status> {
    let mut messages = Vec::new();
    while !joined.is_empty() {
        let message = FlightData::decode_length_delimited(&mut joined)
            .map_err(|e| Status::internal(format!("a kept answer's messages do not read back: {e}")))?;
        messages.push(message);
    }
    Ok(messages)
}

pub(super) fn ipc_schema(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let message: IpcMessage = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: arrow::error::ArrowError| Status::internal(format!("cannot encode schema: {e}")))?;
    Ok(message.0)
}
