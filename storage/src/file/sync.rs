//! Durability, decided outside the store: a [`FlushHandle`] makes everything written before the
//! call durable, from any thread, so a shard can hand the (slow) flush to another thread and
//! acknowledge a batch of writes once it returns (group commit) without blocking its core.
//!
//! Why `fdatasync` of the file is enough for writes made through the shared mapping: on Linux a
//! write into a `MAP_SHARED` file mapping marks the page-cache page dirty at once (the page is
//! write-protected after each writeback, and the write fault, `page_mkwrite`, dirties it), and
//! `fsync`/`fdatasync` write back every dirty page of the file, however it was dirtied. That is
//! also how `msync(MS_SYNC)` is implemented on Linux (it calls `vfs_fsync_range` on the file), so
//! an `msync` first would add nothing. `fdatasync` also persists the block allocation that a
//! first write into preallocated space needs, and the file size, which never changes while a
//! segment is active.
//!
//! Only the active segment can hold unsynced records: the owner syncs a segment before it seals
//! it (see `FileStore::roll`), so the handle needs just the active file, swapped under a mutex
//! at each roll, after the old one was synced.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub(super) struct Shared {
    active: Mutex<Arc<File>>,
    /// Records appended so far (bumped by the owner after each append).
    pub(super) written: AtomicU64,
    /// The highest `written` value known durable.
    pub(super) synced: AtomicU64,
}

impl Shared {
    pub fn new(active: Arc<File>) -> Arc<Shared> {
        Arc::new(Shared {
            active: Mutex::new(active),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
        })
    }

    /// Called by the owner after a record is in the map. Only the owner changes `written`, so
    /// a plain store does (no locked read-modify-write on the write path).
    pub fn note_write(&self) {
        let n = self.written.load(Ordering::Relaxed);
        self.written.store(n + 1, Ordering::Release);
    }

    /// Records appended so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Whether every record appended so far is durable.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire) >= self.written.load(Ordering::Relaxed)
    }

    /// Called by the owner after it synced every record appended so far itself.
    pub fn mark_synced(&self) {
        self.synced.fetch_max(self.written.load(Ordering::Relaxed), Ordering::Release);
    }

    /// Called by the owner at a roll, once the previous active file is synced.
    pub fn set_active(&self, file: Arc<File>) {
        *self.active.lock().unwrap_or_else(|e| e.into_inner()) = file;
    }

    pub fn sync(&self) -> io::Result<()> {
        // Load the count before picking the file: a record counted here is in that file or in
        // one that was synced before it stopped being the active one.
        let target = self.written.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let file = self.active.lock().unwrap_or_else(|e| e.into_inner()).clone();
        file.sync_data()?;
        self.synced.fetch_max(target, Ordering::Release);
        Ok(())
    }
}

/// Makes a store's writes durable from another thread; cheap to clone.
#[derive(Clone)]
pub struct FlushHandle {
    pub(super) shared: Arc<Shared>,
}

impl FlushHandle {
    /// Makes durable every record the store appended before this call; returns at once when
    /// nothing new was written since the last sync.
    pub fn sync(&self) -> io::Result<()> {
        self.shared.sync()
    }
}

impl std::fmt::Debug for FlushHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushHandle")
            .field("written", &self.shared.written.load(Ordering::Relaxed))
            .field("synced", &self.shared.synced.load(Ordering::Relaxed))
            .finish()
    }
}
