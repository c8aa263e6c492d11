//! Answers still in the Arrow IPC messages another tier sent them in.
//!
//! A sidecar that forwards a query whole has nothing to add to the platform's rows: decoding
//! the platform's messages into batches only to encode the same batches again toward its
//! Flight client cost it more CPU than the rest of the forward. So a forwarded answer stays
//! encoded ([`Answer::Encoded`]) until someone needs rows: a Flight server passes the
//! messages on untouched (see [`crate::QueryStream::into_frames`]), the HTTP API's JSON and
//! anything else that reads batches decode them on their first read, as before.
//!
//! The limits still hold on an answer that is never decoded: the rows of each record batch
//! message are read from its header (a flatbuffer, not its body), and the answer's schema
//! message must announce the column types planned here.

use std::sync::Arc;
use std::task::{Context, Poll};

use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use bytes::Bytes;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::error::StrataError;

/// One Arrow IPC message (a Flight message's `data_header` and `data_body`).
#[derive(Debug, Clone)]
pub struct IpcFrame {
    /// The flatbuffer `Message`: schema, dictionary batch or record batch.
    pub header: Bytes,
    /// The buffers the header describes.
    pub body: Bytes,
}

/// A stream of IPC messages: the schema first, then dictionaries and record batches.
pub type IpcFrames = BoxStream<'static, Result<IpcFrame, StrataError>>;

/// How an encoded answer becomes batches when rows are needed; the tier protocol's own
/// decoder, which the engine does not know.
pub type Decoder = fn(IpcFrames, SchemaRef) -> SendableRecordBatchStream;

/// An answer in the messages another tier sent, with the schema planned here.
pub struct EncodedAnswer {
    schema: SchemaRef,
    frames: IpcFrames,
    decoder: Decoder,
}

impl EncodedAnswer {
    pub fn new(schema: SchemaRef, frames: IpcFrames, decoder: Decoder) -> Self {
        Self { schema, frames, decoder }
    }

    /// The schema planned here, which the messages' own schema must match.
    pub fn schema(&self) -> SchemaRef {
        SchemaRef::clone(&self.schema)
    }

    /// The answer as batches, decoded as they are read (its messages checked first, as
    /// when they are passed on).
    pub fn decode(self) -> SendableRecordBatchStream {
        let checked = Checked::new(self.frames, SchemaRef::clone(&self.schema));
        (self.decoder)(Box::pin(checked.map(|next| next.map(|(frame, _)| frame))), self.schema)
    }

    /// The messages, checked in order, each with the rows it carries.
    pub(crate) fn into_checked(self) -> Checked {
        Checked::new(self.frames, self.schema)
    }
}

/// An upstream's messages checked in order: first a schema with the column types planned
/// here, then dictionaries and record batches, each batch's rows read from its header. The
/// first error ends the stream.
pub(crate) struct Checked {
    frames: IpcFrames,
    planned: SchemaRef,
    schema_seen: bool,
    ended: bool,
}

impl Checked {
    fn new(frames: IpcFrames, planned: SchemaRef) -> Self {
        Self { frames, planned, schema_seen: false, ended: false }
    }

    fn check(&mut self, frame: &IpcFrame) -> Result<u64, StrataError> {
        match read_header(&frame.header)? {
            FrameKind::Schema(announced) if !self.schema_seen => {
                check_schema(&announced, &self.planned)?;
                self.schema_seen = true;
                Ok(0)
            }
            FrameKind::Schema(_) => Err(malformed("a second schema message".into())),
            FrameKind::RecordBatch { .. } | FrameKind::Dictionary if !self.schema_seen => {
                Err(malformed("a batch before its schema".into()))
            }
            FrameKind::RecordBatch { rows } => Ok(rows),
            FrameKind::Dictionary => Ok(0),
        }
    }
}

/// Each message with the rows it carries (none for a schema or dictionary).
impl futures::Stream for Checked {
    type Item = Result<(IpcFrame, u64), StrataError>;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let checked = match futures::ready!(this.frames.poll_next_unpin(cx)) {
            Some(Ok(frame)) => this.check(&frame).map(|rows| (frame, rows)),
            Some(Err(err)) => Err(err),
            None if this.schema_seen => {
                this.ended = true;
                return Poll::Ready(None);
            }
            None => Err(StrataError::Protocol("the upstream's answer ended before its schema".into())),
        };
        this.ended = checked.is_err();
        Poll::Ready(Some(checked))
    }
}

/// A query's answer as it starts streaming: batches made here, or messages from another tier.
pub enum Answer {
    Batches(SendableRecordBatchStream),
    Encoded(EncodedAnswer),
}

impl Answer {
    pub fn schema(&self) -> SchemaRef {
        match self {
            Answer::Batches(stream) => stream.schema(),
            Answer::Encoded(encoded) => encoded.schema(),
        }
    }

    /// The answer as batches, decoding it if it is encoded.
    pub fn into_batches(self) -> SendableRecordBatchStream {
        match self {
            Answer::Batches(stream) => stream,
            Answer::Encoded(encoded) => encoded.decode(),
        }
    }
}

impl From<SendableRecordBatchStream> for Answer {
    fn from(stream: SendableRecordBatchStream) -> Self {
        Answer::Batches(stream)
    }
}

/// What one message carries, read from its header alone.
#[derive(Debug, PartialEq)]
pub enum FrameKind {
    Schema(Schema),
    RecordBatch { rows: u64 },
    Dictionary,
}

/// Reads what `header` announces, verifying the flatbuffer first: the header comes from
/// another process and its lengths are not trusted. Arrow's schema conversion panics on
/// some well-formed flatbuffers it does not support: contained, that is a malformed answer.
pub fn read_header(header: &[u8]) -> Result<FrameKind, StrataError> {
    crate::contained_panic::contain(|| read_header_unchecked(header))
        .unwrap_or_else(|_| Err(malformed("a header Arrow cannot read".into())))
}

fn malformed(what: String) -> StrataError {
    StrataError::Protocol(format!("the upstream's answer is malformed: {what}"))
}

fn read_header_unchecked(header: &[u8]) -> Result<FrameKind, StrataError> {
    use arrow::ipc::MessageHeader;
    let message = arrow::ipc::root_as_message(header).map_err(|e| malformed(format!("message header: {e}")))?;
    match message.header_type() {
        MessageHeader::Schema => {
            let schema =
                message.header_as_schema().ok_or_else(|| malformed("schema message without a schema".into()))?;
            Ok(FrameKind::Schema(arrow::ipc::convert::fb_to_schema(schema)))
        }
        MessageHeader::RecordBatch => {
            let batch = message
                .header_as_record_batch()
                .ok_or_else(|| malformed("record batch message without a batch".into()))?;
            let rows = u64::try_from(batch.length()).map_err(|_| malformed(format!("{} rows", batch.length())))?;
            Ok(FrameKind::RecordBatch { rows })
        }
        MessageHeader::DictionaryBatch => Ok(FrameKind::Dictionary),
        other => Err(malformed(format!("unexpected {other:?} message"))),
    }
}

/// Whether `announced` (an upstream's schema message) has the columns planned here, by
/// position and type: a client decodes the upstream's batches against it. Flight sends
/// dictionary columns as their values, so a planned dictionary matches its value type.
pub fn check_schema(announced: &Schema, planned: &Schema) -> Result<(), StrataError> {
    let types = |s: &Schema| s.fields().iter().map(|f| as_sent(f.data_type())).collect::<Vec<_>>();
    if types(announced) == types(planned) {
        return Ok(());
    }
    Err(StrataError::Protocol(format!(
        "the upstream answered with columns ({}) other than planned here ({})",
        describe(announced),
        describe(planned)
    )))
}

/// `data_type` as Flight's encoder sends it: dictionaries replaced by their values, at any
/// depth.
fn as_sent(data_type: &DataType) -> DataType {
    let field = |f: &FieldRef| Arc::new(Field::clone(f).with_data_type(as_sent(f.data_type())));
    match data_type {
        DataType::Dictionary(_, values) => as_sent(values),
        DataType::List(f) => DataType::List(field(f)),
        DataType::LargeList(f) => DataType::LargeList(field(f)),
        DataType::ListView(f) => DataType::ListView(field(f)),
        DataType::LargeListView(f) => DataType::LargeListView(field(f)),
        DataType::FixedSizeList(f, n) => DataType::FixedSizeList(field(f), *n),
        DataType::Map(f, sorted) => DataType::Map(field(f), *sorted),
        DataType::Struct(fields) => DataType::Struct(fields.iter().map(field).collect()),
        other => other.clone(),
    }
}

fn describe(schema: &Schema) -> String {
    schema.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions};

    use super::*;

    fn schema() -> Schema {
        Schema::new(vec![Field::new("id", DataType::Int64, false), Field::new("name", DataType::Utf8, true)])
    }

    #[test]
    fn headers_say_what_each_message_carries() {
        let planned = Arc::new(schema());
        let options = IpcWriteOptions::default();
        let generator = IpcDataGenerator::default();
        let mut tracker = DictionaryTracker::new(false);
        let encoded = generator.schema_to_bytes_with_dictionary_tracker(&planned, &mut tracker, &options);
        assert_eq!(read_header(&encoded.ipc_message).expect("schema"), FrameKind::Schema(schema()));
        let batch = RecordBatch::try_new(
            Arc::clone(&planned),
            vec![Arc::new(Int64Array::from(vec![1, 2, 3])), Arc::new(StringArray::from(vec!["a", "b", "c"]))],
        )
        .expect("batch");
        let mut context = arrow::ipc::writer::IpcWriteContext::default();
        let (_, message) = generator.encode(&batch, &mut tracker, &options, &mut context).expect("encode the batch");
        assert_eq!(read_header(&message.ipc_message).expect("batch"), FrameKind::RecordBatch { rows: 3 });
    }

    #[test]
    fn headers_that_lie_or_break_are_refused_with_a_protocol_error() {
        for bytes in [&b""[..], &b"\x00\x00\x00\x00"[..], &[0xff; 64][..], &b"hello, this is not a flatbuffer"[..]] {
            let err = read_header(bytes).expect_err("not a message");
            assert!(matches!(err, StrataError::Protocol(_)), "{err:?}");
            assert!(err.to_string().contains("malformed"), "{err}");
        }
    }

    #[test]
    fn an_announced_schema_must_have_the_planned_types() {
        let planned = schema();
        let renamed = Schema::new(vec![Field::new("ID", DataType::Int64, true), Field::new("n", DataType::Utf8, true)]);
        check_schema(&renamed, &planned).expect("names and nullability may differ");
        let retyped =
            Schema::new(vec![Field::new("id", DataType::Int32, false), Field::new("name", DataType::Utf8, true)]);
        let err = check_schema(&retyped, &planned).expect_err("types differ");
        assert!(err.to_string().contains("id Int32, name Utf8"), "{err}");
        let fewer = Schema::new(vec![Field::new("id", DataType::Int64, false)]);
        assert!(check_schema(&fewer, &planned).is_err());
        // A dictionary planned here arrives as its values (Flight hydrates dictionaries).
        let dictionary = DataType::Dictionary(Box::new(DataType::UInt16), Box::new(DataType::Utf8));
        let planned = Schema::new(vec![
            Field::new("part", dictionary.clone(), false),
            Field::new("tags", DataType::List(Arc::new(Field::new("item", dictionary, true))), true),
        ]);
        let sent = Schema::new(vec![
            Field::new("part", DataType::Utf8, false),
            Field::new("tags", DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))), true),
        ]);
        check_schema(&sent, &planned).expect("dictionaries arrive as their values");
    }
}
