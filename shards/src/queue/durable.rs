//! The file store behind a shard's queues (when the stream adapter is `file_based`): a separate
//! instance of the stream store's crash-safe log, in `<file_path>/queues/shard-<index>`, holding
//! one record per waiting or dead-lettered message (see `records`). Messages are acknowledged
//! after the store's durability point (an fdatasync under `batch`/`always`).

use super::records::{Record, DEAD, PENDING};
use super::state::StoreOp;
use super::QueueStoreSettings;
use crate::store::StoreStartError;
use ringcast_storage::file::{CompactProgress, FileOptions, FileStore, FlushHandle, OpenError, Populate};
use ringcast_storage::{KvStore, StoreError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Directory of shard `index`'s queue store.
pub fn shard_dir(settings: &QueueStoreSettings, index: usize) -> PathBuf {
    settings.root.join(format!("shard-{index}"))
}

fn options(settings: &QueueStoreSettings) -> FileOptions {
    let populate = if settings.commit.is_none() { Populate::Write } else { Populate::Read };
    FileOptions { segment_size: settings.segment_size, compaction_threshold: settings.compaction_threshold, populate }
}

fn open(dir: &Path, settings: &QueueStoreSettings) -> Result<FileStore, OpenError> {
    let store = FileStore::open(dir, options(settings))?;
    if let Some(torn) = store.torn_tail() {
        tracing::warn!(
            file = %torn.file.display(),
            offset = torn.offset,
            "queue store: cut off an unfinished write at the end of the log (left by a crash, never acknowledged)"
        );
    }
    Ok(store)
}

/// Before the shards start: opens every queue store directory and moves each queue's records
/// to the shard that owns it now (the shard count may have changed), removing directories of
/// shards that no longer exist.
pub fn prepare(settings: &QueueStoreSettings, shards: usize) -> Result<(), StoreStartError> {
    let root = settings.root.as_path();
    std::fs::create_dir_all(root).map_err(|source| StoreStartError::CreateDir { dir: root.to_owned(), source })?;
    let mut present: Vec<usize> = std::fs::read_dir(root)
        .map(|entries| {
            entries.flatten().filter_map(|e| e.file_name().to_str()?.strip_prefix("shard-")?.parse().ok()).collect()
        })
        .unwrap_or_default();
    present.sort_unstable();
    let stale: Vec<usize> = present.into_iter().filter(|&i| i >= shards).collect();
    let mut stores: Vec<FileStore> =
        (0..shards).chain(stale.iter().copied()).map(|i| open(&shard_dir(settings, i), settings)).collect::<Result<_, _>>()?;
    let moved = ringcast_storage::file::rehome(&mut stores, |queue, _| super::queue_shard(queue, shards))?;
    drop(stores);
    for index in stale {
        let dir = shard_dir(settings, index);
        std::fs::remove_dir_all(&dir).map_err(|source| StoreStartError::RemoveDir { dir: dir.clone(), source })?;
    }
    if moved > 0 {
        tracing::info!(moved, shards, "queue store: moved messages to their queues' new shards");
    }
    Ok(())
}

/// What a queue store held at start: per queue, its waiting messages (enqueue order) and its
/// dead letters.
#[derive(Default)]
pub struct Loaded {
    pub queues: HashMap<String, (Vec<Record>, Vec<Record>)>,
    /// Highest sequence number seen.
    pub max_seq: u64,
}

/// One shard's queue store.
pub struct QueueStore {
    store: FileStore,
}

impl QueueStore {
    /// Opens shard `index`'s queue store (`prepare` has verified it moments ago).
    pub fn open(settings: &QueueStoreSettings, index: usize) -> Result<QueueStore, StoreStartError> {
        let store = open(&shard_dir(settings, index), settings)
            .map_err(|e| StoreStartError::Shard { shard: index, source: Box::new(StoreStartError::Open(e)) })?;
        if let Some(after) = std::env::var(crate::store::FAIL_SYNC_AFTER_ENV).ok().and_then(|v| v.parse().ok()) {
            store.inject_sync_failure_after(after);
        }
        Ok(QueueStore { store })
    }

    pub fn flush_handle(&self) -> FlushHandle {
        self.store.flush_handle()
    }

    /// Reads every message back. A record that cannot be read is logged and left alone (it
    /// stays in the store for `ringcast repair` or inspection; it is never delivered changed).
    /// A message found both waiting and dead (a crash between the two writes of a move) is
    /// kept waiting and its dead copy removed.
    pub fn load(&mut self) -> Loaded {
        let mut loaded = Loaded::default();
        let mut duplicates = Vec::new();
        for (queue, _) in self.store.list_streams() {
            let read = |group: &str| -> Vec<Record> {
                self.store
                    .list(&queue, group)
                    .iter()
                    .filter_map(|text| match Record::decode(text) {
                        Ok(r) => Some(r),
                        Err(e) => {
                            tracing::error!(queue = %queue, "queue store: skipping a message that cannot be read: {e}");
                            None
                        }
                    })
                    .collect()
            };
            let mut waiting = read(PENDING);
            let dead = read(DEAD);
            waiting.sort_by_key(|r| r.seq);
            let waiting_ids: std::collections::HashSet<&str> = waiting.iter().map(|r| r.id.as_str()).collect();
            let (dead, both): (Vec<Record>, Vec<Record>) = dead.into_iter().partition(|r| !waiting_ids.contains(r.id.as_str()));
            duplicates.extend(both.into_iter().map(|r| (queue.clone(), r.id)));
            loaded.max_seq = waiting.iter().chain(dead.iter()).map(|r| r.seq).fold(loaded.max_seq, u64::max);
            loaded.queues.insert(queue, (waiting, dead));
        }
        for (queue, id) in duplicates {
            if let Err(e) = self.store.delete(&queue, DEAD, &id) {
                tracing::error!(queue = %queue, "queue store: cannot remove a duplicate dead letter: {e}");
            }
        }
        loaded
    }

    /// Writes `ops` of `queue` in order.
    pub fn apply(&mut self, queue: &str, ops: &[StoreOp]) -> Result<(), StoreError> {
        for op in ops {
            match op {
                StoreOp::Put(r) => self.put(queue, PENDING, r)?,
                StoreOp::PutDead(r) => self.put(queue, DEAD, r)?,
                StoreOp::Delete(id) => {
                    self.store.delete(queue, PENDING, id)?;
                }
                StoreOp::DeleteDead(id) => {
                    self.store.delete(queue, DEAD, id)?;
                }
            }
        }
        Ok(())
    }

    fn put(&mut self, queue: &str, group: &str, record: &Record) -> Result<(), StoreError> {
        let text = record.encode().map_err(|e| StoreError::Io { dir: self.store.dir().to_owned(), source: std::io::Error::other(e) })?;
        self.store.set(queue, group, &record.id, text.into())?;
        Ok(())
    }

    /// One bounded slice of compaction (delivered messages leave dead records behind).
    pub fn compact_step(&mut self) {
        if let CompactProgress::Failed(e) = self.store.compact_step(4 << 20) {
            tracing::warn!("queue store compaction failed: {e}");
        }
    }
}
