//! The store behind each shard (`kv` adapter: in memory or the file store) and what start-up
//! does to a file store directory: verify every shard's data and re-home items when the shard
//! count changed, so nothing is lost or hidden.

use crate::config::{CommitMode, StoreLocation, StoreSettings};
use ringcast_storage::file::{FileOptions, FileStore, FlushHandle, Populate};
use ringcast_storage::memory::MemoryStore;
use ringcast_storage::{Json, KvStore, StoreError};
use std::path::{Path, PathBuf};

/// One shard's store.
pub enum ShardStore {
    Memory(MemoryStore),
    /// Boxed: a file store is several hundred bytes of bookkeeping.
    File(Box<FileStore>),
}

fn options(segment_size: u64, compaction_threshold: f64, commit: CommitMode) -> FileOptions {
    // Pages populated writable ahead of the cursor would be written out by every fdatasync.
    let populate = if commit == CommitMode::Immediate { Populate::Write } else { Populate::Read };
    FileOptions { segment_size, compaction_threshold, populate }
}

fn shard_dir(root: &Path, shard: usize) -> PathBuf {
    root.join(format!("shard-{shard}"))
}

/// Test-only fault injection: when set to a number N, every file store a shard opens fails its
/// fdatasync calls after N successful ones (as a disk write error would). For the fault tests
/// (tests/faults_disk.rs); never set it in production.
pub const FAIL_SYNC_AFTER_ENV: &str = "RINGCAST_TEST_FAIL_SYNC_AFTER";

/// Why a shard's store could not be made ready at start-up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreStartError {
    /// A shard directory cannot be opened (I/O, or corruption a crash cannot explain).
    #[error("iii-stream: {0}")]
    Open(#[from] ringcast_storage::file::OpenError),
    #[error("iii-stream: cannot create {}: {source}", dir.display())]
    CreateDir { dir: PathBuf, source: std::io::Error },
    #[error("iii-stream: re-homing failed: {0}")]
    Rehome(#[from] ringcast_storage::StoreError),
    #[error("iii-stream: cannot remove {}: {source}", dir.display())]
    RemoveDir { dir: PathBuf, source: std::io::Error },
    /// A shard's own directory, opened by `prepare` moments before, fails now.
    #[error("shard {shard}: cannot open its store: {source}")]
    Shard { shard: usize, source: Box<StoreStartError> },
}

/// Opens a file store directory, logging a torn tail that recovery cut off.
fn open_file_store(dir: &Path, options: FileOptions) -> Result<FileStore, StoreStartError> {
    let store = FileStore::open(dir, options)?;
    if let Some(torn) = store.torn_tail() {
        tracing::warn!(
            file = %torn.file.display(),
            offset = torn.offset,
            bytes = torn.bytes,
            "file store: cut off an unfinished write at the end of the log (left by a crash, never acknowledged)"
        );
    }
    Ok(store)
}

/// Logs a store's failure once (whichever thread sees it first), as one clear line.
fn report_failure(store: &FileStore) {
    if let Some(why) = store.flush_handle().failure_to_report() {
        report_failure_text(store.dir().display(), &why);
    }
}

/// Logs that the file store `store` failed, and what that means for writes and reads.
pub(crate) fn report_failure_text(store: impl std::fmt::Display, why: &str) {
    tracing::error!(
        "file store {store} failed ({why}): writes since the last successful sync may not be on disk; \
         it now refuses reads and writes with STREAM_STORE_ERROR until the engine is restarted"
    );
}

impl ShardStore {
    /// Opens shard `index`'s store as configured.
    pub fn open(settings: &StoreSettings, index: usize) -> Result<ShardStore, StoreStartError> {
        match &settings.location {
            // Under `redis` the memory store is the mirror of the subscribed groups.
            StoreLocation::Memory | StoreLocation::Redis { .. } => Ok(ShardStore::Memory(MemoryStore::new())),
            &StoreLocation::File { ref root, segment_size, compaction_threshold } => {
                let options = options(segment_size, compaction_threshold, settings.commit);
                let store = open_file_store(&shard_dir(root, index), options)?;
                if let Some(after) = std::env::var(FAIL_SYNC_AFTER_ENV).ok().and_then(|v| v.parse().ok()) {
                    tracing::warn!("{FAIL_SYNC_AFTER_ENV}={after}: fdatasync fault injection is on (tests only)");
                    store.inject_sync_failure_after(after);
                }
                Ok(ShardStore::File(Box::new(store)))
            }
        }
    }

    fn kv(&self) -> &dyn KvStore {
        match self {
            ShardStore::Memory(s) => s,
            ShardStore::File(s) => s.as_ref(),
        }
    }

    fn kv_mut(&mut self) -> &mut dyn KvStore {
        match self {
            ShardStore::Memory(s) => s,
            ShardStore::File(s) => s.as_mut(),
        }
    }

    /// A handle that syncs from another thread, for group commit.
    pub fn flush_handle(&self) -> Option<FlushHandle> {
        match self {
            ShardStore::Memory(_) => None,
            ShardStore::File(s) => Some(s.flush_handle()),
        }
    }

    /// One bounded slice of background compaction.
    pub fn compact_step(&mut self) {
        if let ShardStore::File(s) = self {
            if let ringcast_storage::file::CompactProgress::Failed(e) = s.compact_step(4 << 20) {
                tracing::warn!("compaction failed: {e}");
            }
        }
    }
}

impl KvStore for ShardStore {
    fn get(&self, stream: &str, group: &str, item: &str) -> Option<Json> {
        self.kv().get(stream, group, item)
    }
    fn set(&mut self, stream: &str, group: &str, item: &str, value: Json) -> Result<Option<Json>, StoreError> {
        let result = self.kv_mut().set(stream, group, item, value);
        self.report_if_failed(&result);
        result
    }
    fn delete(&mut self, stream: &str, group: &str, item: &str) -> Result<Option<Json>, StoreError> {
        let result = self.kv_mut().delete(stream, group, item);
        self.report_if_failed(&result);
        result
    }
    fn list(&self, stream: &str, group: &str) -> Vec<Json> {
        self.kv().list(stream, group)
    }
    fn list_groups(&self, stream: &str) -> Vec<String> {
        self.kv().list_groups(stream)
    }
    fn list_streams(&self) -> Vec<(String, Vec<String>)> {
        self.kv().list_streams()
    }
    fn health(&self) -> Result<(), StoreError> {
        self.kv().health()
    }
}

impl ShardStore {
    /// A write can stop the store itself (a failed sync at a segment roll): log that once.
    fn report_if_failed<T>(&self, result: &Result<T, StoreError>) {
        if let (Err(_), ShardStore::File(store)) = (result, self) {
            report_failure(store);
        }
    }
}

/// Shard directories present under `root`, by index.
fn existing_shards(root: &Path) -> Vec<usize> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut found: Vec<usize> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("shard-")?.parse().ok())
        .collect();
    found.sort_unstable();
    found
}

/// Before the shards start: opens (and so verifies) every shard directory and moves items whose
/// group now belongs to another shard — including everything in directories of shards that no
/// longer exist — then removes those directories. Nothing to do for an in-memory store.
pub fn prepare(settings: &StoreSettings, shards: usize) -> Result<(), StoreStartError> {
    let &StoreLocation::File { ref root, segment_size, compaction_threshold } = &settings.location else { return Ok(()) };
    let root = root.as_path();
    let options = options(segment_size, compaction_threshold, settings.commit);
    std::fs::create_dir_all(root).map_err(|source| StoreStartError::CreateDir { dir: root.to_owned(), source })?;
    let open = |index: usize| open_file_store(&shard_dir(root, index), options);
    let stale: Vec<usize> = existing_shards(root).into_iter().filter(|&i| i >= shards).collect();
    // Current shards first (index = shard), then the stale ones, which own nothing.
    let mut stores: Vec<FileStore> = (0..shards).chain(stale.iter().copied()).map(open).collect::<Result<_, _>>()?;
    // Copies are synced at their owners before any source deletes (see `rehome`).
    let moved = ringcast_storage::file::rehome(&mut stores, |s, g| crate::routing::owner_shard(s, g, shards))?;
    drop(stores);
    for index in stale {
        let dir = shard_dir(root, index);
        std::fs::remove_dir_all(&dir).map_err(|source| StoreStartError::RemoveDir { dir: dir.clone(), source })?;
    }
    if moved > 0 {
        tracing::info!(moved, shards, "file store: re-homed items for the new shard count");
    }
    Ok(())
}

/// Opens shard `index`'s store; the error is the message for the start-up failure (`prepare`
/// opened this directory moments ago, so failing now is an environment fault). Returned, not
/// exited on, so boot reports it like any other start-up failure.
pub fn open_for_shard(settings: &StoreSettings, index: usize) -> Result<ShardStore, StoreStartError> {
    ShardStore::open(settings, index).map_err(|e| StoreStartError::Shard { shard: index, source: Box::new(e) })
}
