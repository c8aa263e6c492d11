//! A replica's copy on disk (edge agents): Arrow IPC files plus a manifest, so the copy
//! survives restarts and is served, memory-mapped, before the platform is reachable again.
//!
//! Every version is one immutable file (`NNNNNNNNNNNNNNNNNNNN.arrow`): a full snapshot, or
//! the rows one append added. `manifest.json` lists the files that make up the current
//! version with its epoch, version, age and home region; it is replaced atomically
//! (write-temp, fsync, rename, fsync the directory), so a crash leaves the old version or the
//! new one, never a mix. Files the manifest no longer names are deleted afterwards.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::buffer::Buffer;
use arrow::datatypes::SchemaRef;
use arrow::ipc::convert::fb_to_schema;
use arrow::ipc::reader::{FileDecoder, read_footer_length};
use arrow::ipc::root_as_footer;
use arrow::ipc::writer::FileWriter;
use serde::{Deserialize, Serialize};
use strata_core::StrataError;

/// What the manifest records about the current version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub epoch: u64,
    pub version: u64,
    pub refreshed_at_unix_ms: u64,
    pub home_region: String,
    /// Files of the current version, oldest first.
    pub files: Vec<String>,
    /// The keys the copy is indexed on, so a restored replica indexes them before the
    /// platform is reachable (absent from manifests written before indexes existed).
    #[serde(default)]
    pub indexes: Vec<Vec<String>>,
}

/// The directory of one replica, under a root shared by all replicas and bounded in size.
#[derive(Debug, Clone)]
pub struct DiskStore {
    dir: PathBuf,
    root: PathBuf,
    max_bytes: u64,
}

/// Bytes of the files under `dir`, recursively (0 for a directory that does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A failed read or write of the store; a cause that is not an I/O error (a corrupt file)
/// is kept as `InvalidData`.
fn io<E: Into<Box<dyn std::error::Error + Send + Sync>>>(what: &str, path: &Path, e: E) -> StrataError {
    let source = match e.into().downcast::<std::io::Error>() {
        Ok(io) => *io,
        Err(other) => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
    };
    StrataError::storage(format!("replica store: {what}"), path, source)
}

impl DiskStore {
    /// The store of replica `name` under `root`, all replicas together bounded by `max_bytes`.
    pub fn new(root: &Path, name: &str, max_bytes: u64) -> Self {
        Self { dir: root.join(name), root: root.to_path_buf(), max_bytes }
    }

    /// The stored version, its schema and its rows (memory-mapped), if any.
    pub fn load(&self) -> Result<Option<(Manifest, SchemaRef, Vec<RecordBatch>)>, StrataError> {
        let path = self.dir.join("manifest.json");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("cannot read", &path, e)),
        };
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| io("corrupt", &path, e))?;
        let mut schema = None;
        let mut batches = Vec::new();
        for name in &manifest.files {
            let (file_schema, mut rows) = map_file(&self.dir.join(name))?;
            schema.get_or_insert(file_schema);
            batches.append(&mut rows);
        }
        let Some(schema) = schema else { return Err(io("no files in", &path, "manifest")) };
        Ok(Some((manifest, schema, batches)))
    }

    /// Stores a version: `batches` as a new file, then the manifest naming `keep` plus it.
    /// Returns the rows read back memory-mapped, so the copy in use lives in the page cache.
    pub fn write(
        &self,
        schema: &SchemaRef,
        batches: &[RecordBatch],
        mut manifest: Manifest,
    ) -> Result<(Manifest, Vec<RecordBatch>), StrataError> {
        // Checked before anything is written: running out leaves the stored version intact.
        let incoming: u64 = batches.iter().map(|b| b.get_array_memory_size() as u64).sum();
        let replaced = if manifest.files.is_empty() { dir_bytes(&self.dir) } else { 0 };
        let used = dir_bytes(&self.root).saturating_sub(replaced);
        if used + incoming > self.max_bytes {
            return Err(StrataError::ResourcesExhausted(format!(
                "replica store full: version {} needs about {incoming} bytes, {used} of {} are used (edge.max_disk); the previous version keeps serving",
                manifest.version, self.max_bytes
            )));
        }
        fs::create_dir_all(&self.dir).map_err(|e| io("cannot create", &self.dir, e))?;
        let name = format!("{:020}.arrow", manifest.version);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        {
            let file = File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
            let mut writer = FileWriter::try_new(file, schema)?;
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            let file = writer.into_inner()?;
            file.sync_all().map_err(|e| io("cannot sync", &tmp, e))?;
        }
        fs::rename(&tmp, &path).map_err(|e| io("cannot rename", &tmp, e))?;
        manifest.files.push(name);
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| io("cannot encode", &self.dir, e))?;
        let manifest_tmp = self.dir.join("manifest.json.tmp");
        let mut f = File::create(&manifest_tmp).map_err(|e| io("cannot create", &manifest_tmp, e))?;
        f.write_all(&text).map_err(|e| io("cannot write", &manifest_tmp, e))?;
        f.sync_all().map_err(|e| io("cannot sync", &manifest_tmp, e))?;
        fs::rename(&manifest_tmp, self.dir.join("manifest.json")).map_err(|e| io("cannot rename", &manifest_tmp, e))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| io("cannot sync", &self.dir, e))?;
        // Files of older versions: no longer named, so safe to drop (open mappings stay valid).
        for entry in fs::read_dir(&self.dir).map_err(|e| io("cannot list", &self.dir, e))?.flatten() {
            let file_name = entry.file_name().to_string_lossy().to_string();
            if file_name.ends_with(".arrow") && !manifest.files.contains(&file_name) {
                let _ = fs::remove_file(entry.path());
            }
        }
        let (_, rows) = map_file(&path)?;
        Ok((manifest, rows))
    }

    /// Bytes of this replica's files.
    pub fn bytes(&self) -> u64 {
        dir_bytes(&self.dir)
    }
}

/// Reads an Arrow IPC file without copying: the batches point into the mapping.
fn map_file(path: &Path) -> Result<(SchemaRef, Vec<RecordBatch>), StrataError> {
    let file = File::open(path).map_err(|e| io("cannot open", path, e))?;
    // SAFETY: the mapping is only sound while nobody changes the file. Replica files are
    // written once under a temporary name and renamed into place, never modified after;
    // older ones are only unlinked, which leaves existing mappings intact on Unix. The data
    // directory belongs to this agent alone (documented in docs/configuration.md).
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io("cannot map", path, e))?;
    let buffer = Buffer::from(bytes::Bytes::from_owner(map));
    if buffer.len() < 10 {
        return Err(io("too short", path, format!("{} bytes", buffer.len())));
    }
    let trailer_start = buffer.len() - 10;
    let mut trailer = [0u8; 10];
    trailer.copy_from_slice(&buffer[trailer_start..]);
    let footer_len = read_footer_length(trailer)?;
    let footer_start = trailer_start
        .checked_sub(footer_len)
        .ok_or_else(|| io("corrupt footer in", path, format!("footer length {footer_len}")))?;
    let footer = root_as_footer(&buffer[footer_start..trailer_start])
        .map_err(|e| io("corrupt footer in", path, e.to_string()))?;
    let schema: SchemaRef = Arc::new(fb_to_schema(footer.schema().ok_or_else(|| io("no schema in", path, ""))?));
    let mut decoder = FileDecoder::new(Arc::clone(&schema), footer.version());
    let slice = |block: &arrow::ipc::Block| {
        buffer.slice_with_length(block.offset() as usize, block.metaDataLength() as usize + block.bodyLength() as usize)
    };
    for block in footer.dictionaries().iter().flatten() {
        decoder.read_dictionary(block, &slice(block))?;
    }
    let mut batches = Vec::new();
    for block in footer.recordBatches().iter().flatten() {
        if let Some(batch) = decoder.read_record_batch(block, &slice(block))? {
            batches.push(batch);
        }
    }
    Ok((schema, batches))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn versions_round_trip_through_the_manifest() {
        let dir = tempfile::tempdir().expect("dir");
        let store = DiskStore::new(dir.path(), "orders", 1 << 30);
        assert!(store.load().expect("load").is_none());
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let batch =
            |v: Vec<i64>| RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(v))]).expect("batch");
        let base = Manifest {
            epoch: 7,
            version: 1,
            refreshed_at_unix_ms: 1,
            home_region: "eu".into(),
            files: vec![],
            indexes: vec![],
        };
        let (m1, rows) = store.write(&schema, &[batch(vec![1, 2])], base).expect("snapshot");
        assert_eq!(rows, vec![batch(vec![1, 2])]);
        let append = Manifest { version: 2, ..m1.clone() };
        let (m2, _) = store.write(&schema, &[batch(vec![3])], append).expect("append");
        assert_eq!(m2.files.len(), 2);
        let (manifest, loaded_schema, rows) = store.load().expect("load").expect("stored");
        assert_eq!((manifest.epoch, manifest.version), (7, 2));
        assert_eq!(loaded_schema, schema);
        assert_eq!(rows, vec![batch(vec![1, 2]), batch(vec![3])]);
        // A new snapshot replaces the files.
        let fresh = Manifest { version: 3, files: vec![], ..manifest };
        store.write(&schema, &[batch(vec![9])], fresh).expect("snapshot");
        let (_, _, rows) = store.load().expect("load").expect("stored");
        assert_eq!(rows, vec![batch(vec![9])]);
        assert_eq!(fs::read_dir(dir.path().join("orders")).expect("list").count(), 2, "one data file and the manifest");

        // Out of space: a clear error, and the stored version is untouched.
        let small = DiskStore::new(dir.path(), "orders", 100);
        let next = Manifest { version: 4, files: vec![], ..store.load().expect("load").expect("stored").0 };
        let err = small.write(&schema, &[batch((0..1000).collect())], next).expect_err("over the bound");
        assert!(err.to_string().contains("edge.max_disk"), "{err}");
        let (manifest, _, rows) = store.load().expect("load").expect("stored");
        assert_eq!((manifest.version, rows), (3, vec![batch(vec![9])]));
    }
}
