//! The edge's append-only ingest log: a write is acknowledged only once its record is on
//! disk (fsync), and survives `kill -9` at any moment.
//!
//! Segments `NNNNNNNNNNNNNNNNNNNN.log` (named by their first sequence number) hold records:
//! `magic u32 | body length u32 | crc32(body) u32 | body`, body = `seq u64 | dataset length
//! u16 | dataset | Arrow IPC stream`, all little-endian. On open, a torn or corrupt tail of the
//! last segment (a crash mid-write) is detected by length and checksum, reported and cut off;
//! everything before it is intact. `uploaded` (written atomically) records the highest
//! sequence the platform confirmed; segments wholly below it are deleted.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow::ipc::writer::StreamWriter;
use strata_core::StrataError;
use tracing::{info, warn};

/// The first word of every record ("STRL").
const MAGIC: u32 = 0x4C52_5453;
const HEADER: usize = 12;
/// A new segment starts once the current one is this large.
const SEGMENT_BYTES: u64 = 16 << 20;

/// One durable batch.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub dataset: String,
    pub batches: Vec<RecordBatch>,
    /// Size of the record on disk.
    pub bytes: u64,
}

/// What opening the log found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Records not confirmed by the platform yet, in order.
    pub pending: Vec<Entry>,
    /// Bytes of a torn or corrupt tail that were cut off (0 after a clean stop).
    pub truncated_bytes: u64,
    pub uploaded_through: u64,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    last_seq: u64,
    bytes: u64,
}

struct State {
    segments: Vec<Segment>,
    file: Option<File>,
    next_seq: u64,
    uploaded_through: u64,
    total_bytes: u64,
}

/// The log; every method does blocking file I/O (call it from `spawn_blocking`).
pub struct IngestLog {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Held while one writer fsyncs for everyone who appended before it (group commit).
    sync: Mutex<()>,
    /// Every record up to this sequence number is on disk.
    synced_through: std::sync::atomic::AtomicU64,
    /// Set by a failed fsync: the kernel may have dropped the unsynced pages, so nothing
    /// written since can be trusted until a restart re-reads the log.
    poisoned: std::sync::atomic::AtomicBool,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StrataError {
    StrataError::storage(format!("ingest log: {what}"), path, e)
}

fn encode_batches(batches: &[RecordBatch]) -> Result<Vec<u8>, StrataError> {
    let schema = batches.first().map(|b| b.schema()).unwrap_or_else(|| std::sync::Arc::new(Schema::empty()));
    let mut out = Vec::new();
    let mut writer = StreamWriter::try_new(&mut out, &schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    drop(writer);
    Ok(out)
}

impl IngestLog {
    /// Opens (or creates) the log in `dir`, repairing a torn tail.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Self, Recovery), StrataError> {
        fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let uploaded_through = read_uploaded(dir)?;
        let mut names: Vec<(u64, PathBuf)> = fs::read_dir(dir)
            .map_err(|e| io("cannot list", dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let path = e.path();
                let first = path.file_name()?.to_str()?.strip_suffix(".log")?.parse::<u64>().ok()?;
                Some((first, path))
            })
            .collect();
        names.sort();
        let mut recovery = Recovery { uploaded_through, ..Recovery::default() };
        let mut segments = Vec::new();
        let mut next_seq = uploaded_through + 1;
        let count = names.len();
        for (i, (first_seq, path)) in names.into_iter().enumerate() {
            let data = fs::read(&path).map_err(|e| io("cannot read", &path, e))?;
            let mut offset = 0usize;
            let mut last_seq = first_seq.saturating_sub(1);
            while offset < data.len() {
                match decode_record(&data[offset..]) {
                    Some((seq, dataset, batches, size)) => {
                        if seq > uploaded_through {
                            recovery.pending.push(Entry { seq, dataset, batches, bytes: size as u64 });
                        }
                        last_seq = seq;
                        next_seq = next_seq.max(seq + 1);
                        offset += size;
                    }
                    None if i + 1 == count => {
                        let cut = (data.len() - offset) as u64;
                        warn!(segment = %path.display(), offset, cut, "ingest log: torn or corrupt tail cut off; earlier records are intact");
                        let file =
                            OpenOptions::new().write(true).open(&path).map_err(|e| io("cannot open", &path, e))?;
                        file.set_len(offset as u64).map_err(|e| io("cannot truncate", &path, e))?;
                        file.sync_all().map_err(|e| io("cannot sync", &path, e))?;
                        recovery.truncated_bytes = cut;
                        break;
                    }
                    None => {
                        return Err(StrataError::storage(
                            "ingest log: refusing to start rather than lose or reorder writes: corrupt segment",
                            &path,
                            std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!(
                                    "record at byte {offset} fails its checksum and is not at the end of the last segment"
                                ),
                            ),
                        ));
                    }
                }
            }
            segments.push(Segment { path, last_seq, bytes: offset as u64 });
        }
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let log = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(State { segments, file: None, next_seq, uploaded_through, total_bytes }),
            sync: Mutex::new(()),
            synced_through: std::sync::atomic::AtomicU64::new(next_seq - 1),
            poisoned: std::sync::atomic::AtomicBool::new(false),
        };
        info!(pending = recovery.pending.len(), uploaded_through, "ingest log opened");
        Ok((log, recovery))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one batch durably and returns its sequence number. Refuses (never drops) a
    /// write that would take the log past its bound.
    pub fn append(&self, dataset: &str, batches: &[RecordBatch]) -> Result<Entry, StrataError> {
        let entry = self.append_unsynced(dataset, batches)?;
        self.sync_through(entry.seq)?;
        Ok(entry)
    }

    /// Makes every record up to `seq` durable. Writers that appended while another one was
    /// syncing share its next fsync (group commit): one fsync per group, not per batch.
    pub fn sync_through(&self, seq: u64) -> Result<(), StrataError> {
        use std::sync::atomic::Ordering;
        let _turn = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        self.check_poisoned()?;
        if self.synced_through.load(Ordering::SeqCst) >= seq {
            return Ok(());
        }
        let (file, written) = {
            let state = self.state();
            let file =
                state.file.as_ref().map(File::try_clone).transpose().map_err(|e| io("cannot reopen", &self.dir, e))?;
            (file, state.next_seq - 1)
        };
        if let Some(file) = file
            && let Err(err) = file.sync_data()
        {
            self.poisoned.store(true, Ordering::SeqCst);
            return Err(io("cannot sync", &self.dir, err));
        }
        self.synced_through.store(written, Ordering::SeqCst);
        Ok(())
    }

    /// Every record up to this sequence number is durable (the uploader ships no further).
    pub fn synced_through(&self) -> u64 {
        self.synced_through.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn check_poisoned(&self) -> Result<(), StrataError> {
        if self.poisoned.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StrataError::Internal(
                "ingest log: an fsync failed, so recent records may not be on disk; writes are refused until the agent restarts and re-reads its log".into(),
            ));
        }
        Ok(())
    }

    /// Appends one batch without waiting for the disk; [`IngestLog::sync_through`] its
    /// sequence number before acknowledging it.
    pub fn append_unsynced(&self, dataset: &str, batches: &[RecordBatch]) -> Result<Entry, StrataError> {
        self.check_poisoned()?;
        let ipc = encode_batches(batches)?;
        if u16::try_from(dataset.len()).is_err() {
            return Err(StrataError::Plan("dataset name too long".into()));
        }
        let mut state = self.state();
        let seq = state.next_seq;
        let body = record_body(seq, dataset, &ipc);
        let size = (HEADER + body.len()) as u64;
        if state.total_bytes + size > self.max_bytes {
            return Err(StrataError::LogFull(format!(
                "the ingest log is full ({} of {} bytes, edge.max_log_size) because the platform has not confirmed earlier uploads; retry later",
                state.total_bytes, self.max_bytes
            )));
        }
        let record = frame_record(&body).ok_or_else(|| StrataError::Plan("batch too large".into()))?;

        let rotate = state.segments.last().is_none_or(|s| s.bytes >= SEGMENT_BYTES) || state.file.is_none();
        if rotate {
            // Records of the segment being left behind must be durable before the next
            // segment's are: the sync after this write only covers the new file.
            if let Some(previous) = state.file.as_ref() {
                previous.sync_data().map_err(|e| io("cannot sync", &self.dir, e))?;
            }
            let reuse = state.segments.last().filter(|s| s.bytes < SEGMENT_BYTES).map(|s| s.path.clone());
            let path = reuse.unwrap_or_else(|| self.dir.join(format!("{seq:020}.log")));
            let file =
                OpenOptions::new().create(true).append(true).open(&path).map_err(|e| io("cannot open", &path, e))?;
            if state.segments.last().is_none_or(|s| s.path != path) {
                state.segments.push(Segment { path: path.clone(), last_seq: seq - 1, bytes: 0 });
                sync_dir(&self.dir)?;
            }
            state.file = Some(file);
        }
        let Some(file) = state.file.as_mut() else {
            return Err(StrataError::Internal("ingest log: no segment".into()));
        };
        let path = &self.dir;
        if let Err(err) = file.write_all(&record) {
            // A partial record may be on disk now; only a restart (which cuts it off) may write again.
            self.poisoned.store(true, std::sync::atomic::Ordering::SeqCst);
            return Err(io("cannot write", path, err));
        }
        state.next_seq += 1;
        state.total_bytes += size;
        if let Some(segment) = state.segments.last_mut() {
            segment.last_seq = seq;
            segment.bytes += size;
        }
        Ok(Entry { seq, dataset: dataset.to_string(), batches: batches.to_vec(), bytes: size })
    }

    /// Records that the platform applied everything up to `seq`, and deletes segments that
    /// hold nothing newer.
    pub fn confirm(&self, seq: u64) -> Result<(), StrataError> {
        let mut state = self.state();
        if seq <= state.uploaded_through {
            return Ok(());
        }
        write_uploaded(&self.dir, seq)?;
        state.uploaded_through = seq;
        let mut removed = 0u64;
        let mut keep = Vec::new();
        let last = state.segments.len().saturating_sub(1);
        let mut current_removed = false;
        for (i, segment) in std::mem::take(&mut state.segments).into_iter().enumerate() {
            if segment.last_seq <= seq && segment.bytes > 0 {
                fs::remove_file(&segment.path).map_err(|e| io("cannot delete", &segment.path, e))?;
                removed += segment.bytes;
                current_removed |= i == last;
            } else {
                keep.push(segment);
            }
        }
        if current_removed {
            // The next write starts a new segment.
            state.file = None;
        }
        state.segments = keep;
        state.total_bytes -= removed;
        Ok(())
    }

    /// Bytes on disk now.
    pub fn bytes(&self) -> u64 {
        self.state().total_bytes
    }

    pub fn uploaded_through(&self) -> u64 {
        self.state().uploaded_through
    }
}

/// A record's body: `seq u64 | dataset length u16 | dataset | Arrow IPC stream` (a dataset
/// name is at most 65535 bytes: longer ones are refused before).
pub fn record_body(seq: u64, dataset: &str, ipc: &[u8]) -> Vec<u8> {
    let name = dataset.as_bytes();
    let mut body = Vec::with_capacity(10 + name.len() + ipc.len());
    body.extend_from_slice(&seq.to_le_bytes());
    body.extend_from_slice(&(name.len() as u16).to_le_bytes());
    body.extend_from_slice(name);
    body.extend_from_slice(ipc);
    body
}

/// `body` as a record on disk: magic, body length, checksum, body; `None` past 4 GiB.
pub fn frame_record(body: &[u8]) -> Option<Vec<u8>> {
    let body_len = u32::try_from(body.len()).ok()?;
    let mut record = Vec::with_capacity(HEADER + body.len());
    record.extend_from_slice(&MAGIC.to_le_bytes());
    record.extend_from_slice(&body_len.to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    record.extend_from_slice(body);
    Some(record)
}

fn decode_record(data: &[u8]) -> Option<(u64, String, Vec<RecordBatch>, usize)> {
    if data.len() < HEADER {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    if word(0) != MAGIC {
        return None;
    }
    let len = word(4) as usize;
    let body = data.get(HEADER..HEADER + len)?;
    if crc32fast::hash(body) != word(8) || body.len() < 10 {
        return None;
    }
    let seq = u64::from_le_bytes(body[0..8].try_into().ok()?);
    let name_len = u16::from_le_bytes([body[8], body[9]]) as usize;
    let dataset = std::str::from_utf8(body.get(10..10 + name_len)?).ok()?.to_string();
    // Checked and guarded like any IPC from outside: a record can pass its checksum and
    // still not decode (written by a broken build, or crafted), and must not crash the agent.
    let ipc = body.get(10 + name_len..)?;
    let batches = strata_core::ipc::read_batches(ipc, ipc.len(), "the ingest log record").ok()?;
    Some((seq, dataset, batches, HEADER + len))
}

fn read_uploaded(dir: &Path) -> Result<u64, StrataError> {
    let path = dir.join("uploaded");
    match File::open(&path) {
        Ok(mut f) => {
            let mut text = String::new();
            f.read_to_string(&mut text).map_err(|e| io("cannot read", &path, e))?;
            text.trim()
                .parse()
                .map_err(|_| StrataError::Internal(format!("ingest log: {} is not a number", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io("cannot open", &path, e)),
    }
}

/// Write-temp, fsync, rename, fsync the directory: the file is either old or new, never torn.
fn write_uploaded(dir: &Path, seq: u64) -> Result<(), StrataError> {
    let tmp = dir.join("uploaded.tmp");
    let path = dir.join("uploaded");
    let mut f = File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
    f.write_all(seq.to_string().as_bytes()).map_err(|e| io("cannot write", &tmp, e))?;
    f.sync_all().map_err(|e| io("cannot sync", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| io("cannot rename", &tmp, e))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StrataError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("cannot sync", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field};
    use std::sync::Arc;

    fn batch(values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values.to_vec()))]).expect("batch")
    }

    #[test]
    fn records_survive_reopen_and_confirmed_ones_are_not_pending() {
        let dir = tempfile::tempdir().expect("dir");
        let (log, recovery) = IngestLog::open(dir.path(), 1 << 20).expect("open");
        assert!(recovery.pending.is_empty());
        for i in 0..5 {
            assert_eq!(log.append("readings", &[batch(&[i, i + 1])]).expect("append").seq, i as u64 + 1);
        }
        log.confirm(2).expect("confirm");
        drop(log);
        let (log, recovery) = IngestLog::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(recovery.pending.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(recovery.pending[0].batches[0], batch(&[2, 3]));
        assert_eq!(log.append("readings", &[batch(&[9])]).expect("append").seq, 6, "sequence continues");
    }

    #[test]
    fn concurrent_writers_sharing_fsyncs_lose_and_reorder_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let (log, _) = IngestLog::open(dir.path(), 1 << 26).expect("open");
        let log = Arc::new(log);
        let writers: Vec<_> = (0..8i64)
            .map(|w| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    (0..50i64)
                        .map(|i| {
                            let entry = log.append_unsynced("readings", &[batch(&[w, i])]).expect("append");
                            log.sync_through(entry.seq).expect("sync");
                            assert!(log.synced_through() >= entry.seq, "acknowledged before durable");
                            entry.seq
                        })
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        let mut seqs: Vec<u64> = writers.into_iter().flat_map(|w| w.join().expect("writer")).collect();
        seqs.sort();
        assert_eq!(seqs, (1..=400).collect::<Vec<u64>>());
        drop(log);
        let (_, recovery) = IngestLog::open(dir.path(), 1 << 26).expect("reopen");
        assert_eq!(recovery.pending.len(), 400);
        assert_eq!(recovery.truncated_bytes, 0);
        let mut per_writer: std::collections::HashMap<i64, Vec<i64>> = std::collections::HashMap::new();
        for entry in &recovery.pending {
            let values =
                entry.batches[0].column(0).as_any().downcast_ref::<Int64Array>().expect("i64").values().to_vec();
            per_writer.entry(values[0]).or_default().push(values[1]);
        }
        for (writer, order) in per_writer {
            assert_eq!(order, (0..50).collect::<Vec<i64>>(), "writer {writer}'s records out of order");
        }
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_reported() {
        let dir = tempfile::tempdir().expect("dir");
        let (log, _) = IngestLog::open(dir.path(), 1 << 20).expect("open");
        for i in 0..3 {
            log.append("readings", &[batch(&[i])]).expect("append");
        }
        drop(log);
        let segment = fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "log"))
            .expect("segment");
        let len = fs::metadata(&segment).expect("meta").len();
        // A crash in the middle of the last record: its last 7 bytes never reached the disk.
        OpenOptions::new().write(true).open(&segment).expect("open").set_len(len - 7).expect("cut");
        let (log, recovery) = IngestLog::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(recovery.pending.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert!(recovery.truncated_bytes > 0);
        assert_eq!(
            log.append("readings", &[batch(&[7])]).expect("append").seq,
            3,
            "the lost record's number is reused"
        );
        drop(log);
        // Flipped bytes in the last record are caught by the checksum the same way.
        let len = fs::metadata(&segment).expect("meta").len();
        let mut data = fs::read(&segment).expect("read");
        let at = (len - 3) as usize;
        data[at] ^= 0xFF;
        fs::write(&segment, data).expect("write");
        let (_, recovery) = IngestLog::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!(recovery.pending.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn a_full_log_refuses_writes_until_uploads_are_confirmed() {
        let dir = tempfile::tempdir().expect("dir");
        let (log, _) = IngestLog::open(dir.path(), 2_000).expect("open");
        let mut accepted = 0;
        let err = loop {
            match log.append("readings", &[batch(&[1, 2, 3])]) {
                Ok(_) => accepted += 1,
                Err(err) => break err,
            }
        };
        assert!(accepted > 0);
        assert!(matches!(err, StrataError::LogFull(_)), "{err}");
        assert!(err.to_string().contains("edge.max_log_size"), "{err}");
    }
}
