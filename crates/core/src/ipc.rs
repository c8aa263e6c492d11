//! Arrow IPC streams that arrive from outside (edge ingest bodies, parameters, uploads from
//! other tiers), decoded only once their framing has been checked against the bytes that
//! really arrived.
//!
//! Arrow's stream reader allocates each message's metadata and body at the length the
//! message claims before reading them: a 72-byte message claiming a 2 GiB body makes it
//! allocate 2 GiB only to fail on the short read. Walking the framing first (lengths and
//! the flatbuffer header, no allocation) refuses such a message with a clear error.

use std::io::Cursor;

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;

use crate::error::{Result, StrataError};

/// Every record batch of `bytes`, an Arrow IPC stream at most `max` bytes long (`limit`
/// names the configured limit in the error), whose every message fits in the bytes that
/// follow it. Decoding runs under [`guarded`]: Arrow's reader panics on some malformed
/// messages (a buffer claiming bytes past the body, an integer type of width 0).
pub fn read_batches(bytes: &[u8], max: usize, limit: &str) -> Result<Vec<RecordBatch>> {
    if bytes.len() > max {
        return Err(StrataError::InvalidRequest(format!(
            "the Arrow IPC stream is {} bytes, over {limit} ({max} bytes)",
            bytes.len()
        )));
    }
    check_framing(bytes)?;
    guarded("the Arrow IPC stream", || {
        StreamReader::try_new(Cursor::new(bytes), None)?.collect::<std::result::Result<Vec<_>, _>>()
    })
    .map_err(|e| match e {
        StrataError::InvalidRequest(_) => e,
        other => StrataError::InvalidRequest(format!("cannot read the Arrow IPC stream: {other}")),
    })
}

/// Runs `decode` over bytes from outside; a panic inside it (Arrow's IPC and Flight decoders
/// panic on some malformed input rather than returning an error) becomes an
/// `InvalidRequest` naming `what`, never a crashed request task or process. `decode` must
/// only read its input: whatever it built is dropped.
pub fn guarded<T>(what: &str, decode: impl FnOnce() -> std::result::Result<T, arrow::error::ArrowError>) -> Result<T> {
    match crate::contained_panic::contain(decode) {
        Ok(result) => result.map_err(StrataError::from),
        Err(_) => Err(StrataError::InvalidRequest(format!("{what} is malformed (its decoder failed)"))),
    }
}

/// Walks the messages of an IPC stream: `[0xFFFFFFFF] length:i32 | metadata | body`, until
/// the end-of-stream marker or the end of the bytes, checking that each claimed length fits.
pub fn check_framing(bytes: &[u8]) -> Result<()> {
    let bad = |what: String| Err(StrataError::InvalidRequest(format!("malformed Arrow IPC stream: {what}")));
    let word = |at: usize| bytes.get(at..at + 4).map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    let mut pos = 0;
    while pos < bytes.len() {
        let Some(mut length) = word(pos) else { return bad(format!("a message prefix is cut at byte {pos}")) };
        let mut prefix = 4;
        if length == -1 {
            let Some(next) = word(pos + 4) else { return bad(format!("a message prefix is cut at byte {pos}")) };
            length = next;
            prefix = 8;
        }
        if length == 0 {
            return Ok(());
        }
        let remaining = bytes.len() - pos - prefix;
        let Ok(meta_len) = usize::try_from(length) else {
            return bad(format!("the message at byte {pos} claims a negative metadata length ({length})"));
        };
        if meta_len > remaining {
            return bad(format!(
                "the message at byte {pos} claims {meta_len} bytes of metadata, but only {remaining} bytes follow"
            ));
        }
        let start = pos + prefix;
        let message = arrow::ipc::root_as_message(&bytes[start..start + meta_len])
            .map_err(|e| StrataError::InvalidRequest(format!("malformed Arrow IPC message at byte {pos}: {e}")))?;
        let remaining = remaining - meta_len;
        let body = message.bodyLength();
        match usize::try_from(body) {
            Ok(body) if body <= remaining => pos = start + meta_len + body,
            _ => {
                return bad(format!(
                    "the message at byte {pos} claims a body of {body} bytes, but only {remaining} bytes follow"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::ipc::writer::StreamWriter;

    use super::*;

    fn stream() -> Vec<u8> {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        let batch =
            RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(Int64Array::from(vec![Some(1), None, Some(3)]))])
                .expect("batch");
        let mut out = Vec::new();
        let mut writer = StreamWriter::try_new(&mut out, &schema).expect("writer");
        writer.write(&batch).expect("write");
        writer.finish().expect("finish");
        drop(writer);
        out
    }

    #[test]
    fn lying_buffers_and_types_inside_messages_are_refused_not_panicked_on() {
        // Found by fuzzing: a buffer whose offset or length points past the message body,
        // or a schema with an integer of width 0, made Arrow's reader panic.
        let bytes = stream();
        for at in 0..bytes.len().saturating_sub(4) {
            for liar in [0u32, 1, 0x7FFF_FFFF, 0xFFFF_FFFF, 0x0001_0000] {
                let mut lying = bytes.clone();
                lying[at..at + 4].copy_from_slice(&liar.to_le_bytes());
                let _ = read_batches(&lying, 1 << 20, "x");
            }
        }
    }

    #[test]
    fn a_well_formed_stream_reads_back() {
        let batches = read_batches(&stream(), 1 << 20, "limits.max_request_body").expect("read");
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 3);
    }

    /// The stream with its record batch message rewritten to claim a body of `claim` bytes
    /// (the bytes that follow stay what they were).
    fn lying(claim: i64) -> Vec<u8> {
        let mut bytes = stream();
        let schema_len = i32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
        let at = 8 + schema_len;
        let meta_len = i32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        let meta = at + 8..at + 8 + meta_len;
        let real = arrow::ipc::root_as_message(&bytes[meta.clone()]).expect("message").bodyLength();
        // The body length is an i64 in the flatbuffer table; the buffers' offsets and lengths
        // (validity and values, 0/8 and 1/24) differ from the body's 32, so it matches once.
        let needle = real.to_le_bytes();
        let offset = bytes[meta.clone()].windows(8).position(|w| w == needle).expect("body length field");
        bytes[meta.start + offset..meta.start + offset + 8].copy_from_slice(&claim.to_le_bytes());
        assert_eq!(arrow::ipc::root_as_message(&bytes[meta]).expect("patched").bodyLength(), claim);
        bytes
    }

    #[test]
    fn a_message_claiming_more_than_arrived_is_refused_before_allocating() {
        let err = read_batches(&lying(2 << 30), 1 << 20, "limits.max_request_body").expect_err("lying length");
        assert!(err.to_string().contains("claims a body of 2147483648 bytes"), "{err}");
    }

    #[test]
    fn truncated_negative_and_oversized_streams_are_refused() {
        let bytes = stream();
        for cut in [3, 6, 20, bytes.len() - 9] {
            assert!(read_batches(&bytes[..cut], 1 << 20, "x").is_err(), "cut at {cut}");
        }
        let mut negative = bytes.clone();
        negative[4..8].copy_from_slice(&(-5i32).to_le_bytes());
        assert!(read_batches(&negative, 1 << 20, "x").expect_err("negative").to_string().contains("negative"));
        let mut huge_meta = bytes.clone();
        huge_meta[4..8].copy_from_slice(&i32::MAX.to_le_bytes());
        assert!(read_batches(&huge_meta, 1 << 20, "x").expect_err("meta").to_string().contains("metadata"));
        let err = read_batches(&bytes, 16, "limits.max_request_body").expect_err("over the limit");
        assert!(err.to_string().contains("limits.max_request_body"), "{err}");
    }
}
