//! Writes the platform refused for good (the dataset does not accept edge writes there, or
//! no longer has these columns), set aside under `data_dir/dead-letter` so that they block
//! no later write and are never silently lost.
//!
//! Each refused batch is one Arrow IPC stream file `<seq>.<dataset>.arrows` (written to a
//! temporary name, synced, renamed, directory synced) beside `<seq>.<dataset>.reason`, the
//! platform's error. They are counted in `/v1/datasets` and `/metrics`. When the agent
//! starts, each is sent once more with its original sequence number (its idempotency key,
//! so it is applied at most once): after the platform's config is fixed, a restart delivers
//! them; one still refused stays here. An operator can also replay a file with
//! `POST /v1/ingest/<dataset>` (`Content-Type: application/vnd.apache.arrow.stream`) and
//! delete it.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use strata_core::StrataError;
use strata_core::writes::DeadLetterStatus;

use crate::log::Entry;

const SUFFIX: &str = ".arrows";

pub struct DeadLetters {
    dir: PathBuf,
    by_dataset: Mutex<BTreeMap<String, DeadLetterStatus>>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StrataError {
    StrataError::storage(format!("dead-letter area: {what}"), path, e)
}

impl DeadLetters {
    /// Opens (or creates) the area in `dir` and counts what it holds. Blocking I/O.
    pub fn open(dir: &Path) -> Result<Self, StrataError> {
        fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let letters = Self { dir: dir.to_path_buf(), by_dataset: Mutex::new(BTreeMap::new()) };
        for file in fs::read_dir(dir).map_err(|e| io("cannot list", dir, e))?.filter_map(|e| e.ok()) {
            let path = file.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(SUFFIX)) else {
                continue;
            };
            let Some((_, dataset)) = name.split_once('.') else { continue };
            let bytes = fs::read(&path).map_err(|e| io("cannot read", &path, e))?;
            let rows = strata_core::ipc::read_batches(&bytes, bytes.len(), "the dead-letter file")
                .map(|b| b.iter().map(|b| b.num_rows() as u64).sum())
                .unwrap_or(0);
            let reason = fs::read_to_string(path.with_extension("reason")).unwrap_or_default();
            letters.count(dataset, rows, &reason);
        }
        Ok(letters)
    }

    fn count(&self, dataset: &str, rows: u64, reason: &str) {
        let mut map = self.by_dataset.lock().unwrap_or_else(|p| p.into_inner());
        let status = map
            .entry(dataset.to_string())
            .or_insert_with(|| DeadLetterStatus { dataset: dataset.to_string(), ..DeadLetterStatus::default() });
        status.records += 1;
        status.rows += rows;
        status.last_error = reason.to_string();
    }

    /// Stores `entry` durably with the platform's `reason`. Blocking I/O.
    pub fn store(&self, entry: &Entry, reason: &str) -> Result<(), StrataError> {
        let schema = entry
            .batches
            .first()
            .map(|b| b.schema())
            .ok_or_else(|| StrataError::Internal("an empty batch cannot be set aside".into()))?;
        let bytes = strata_upstream::wire::batches_to_ipc(&schema, &entry.batches)?;
        let stem = format!("{:020}.{}", entry.seq, entry.dataset);
        let path = self.dir.join(format!("{stem}{SUFFIX}"));
        let temporary = self.dir.join(format!("{stem}{SUFFIX}.tmp"));
        let write = |path: &Path, data: &[u8]| -> Result<(), StrataError> {
            let mut file = fs::File::create(path).map_err(|e| io("cannot create", path, e))?;
            file.write_all(data).map_err(|e| io("cannot write", path, e))?;
            file.sync_all().map_err(|e| io("cannot sync", path, e))
        };
        write(&self.dir.join(format!("{stem}.reason")), reason.as_bytes())?;
        write(&temporary, &bytes)?;
        fs::rename(&temporary, &path).map_err(|e| io("cannot rename", &path, e))?;
        fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| io("cannot sync", &self.dir, e))?;
        let rows = entry.batches.iter().map(|b| b.num_rows() as u64).sum();
        self.count(&entry.dataset, rows, reason);
        Ok(())
    }

    /// Every batch set aside, oldest first, with its original sequence number (its
    /// idempotency key: the platform applies it at most once, whenever it is sent).
    /// Blocking I/O.
    pub fn stored(&self) -> Result<Vec<Entry>, StrataError> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map_err(|e| io("cannot list", &self.dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(SUFFIX)))
            .collect();
        files.sort();
        let mut entries = Vec::new();
        for path in files {
            let Some((seq, dataset)) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.split_once('.'))
                .and_then(|(seq, d)| Some((seq.parse::<u64>().ok()?, d.to_string())))
            else {
                continue;
            };
            let bytes = fs::read(&path).map_err(|e| io("cannot read", &path, e))?;
            let batches = strata_core::ipc::read_batches(&bytes, bytes.len(), "the dead-letter file")?;
            entries.push(Entry { seq, dataset, batches, bytes: bytes.len() as u64 });
        }
        Ok(entries)
    }

    /// Forgets `entry` once the platform applied it. Blocking I/O.
    pub fn remove(&self, entry: &Entry) -> Result<(), StrataError> {
        let stem = format!("{:020}.{}", entry.seq, entry.dataset);
        let path = self.dir.join(format!("{stem}{SUFFIX}"));
        fs::remove_file(&path).map_err(|e| io("cannot remove", &path, e))?;
        let _ = fs::remove_file(self.dir.join(format!("{stem}.reason")));
        let mut map = self.by_dataset.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(status) = map.get_mut(&entry.dataset) {
            status.records = status.records.saturating_sub(1);
            status.rows = status.rows.saturating_sub(entry.batches.iter().map(|b| b.num_rows() as u64).sum());
            if status.records == 0 {
                map.remove(&entry.dataset);
            }
        }
        Ok(())
    }

    /// What the area holds, by dataset.
    pub fn statuses(&self) -> Vec<DeadLetterStatus> {
        self.by_dataset.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }
}
