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
//!
//! A failed `fdatasync` is final (fail-stop): Linux reports a writeback error once per file and
//! may have dropped the dirty pages it could not write, so a later sync that succeeds proves
//! nothing about them. The first failure latches `failed`; from then on every sync answers that
//! error without touching the disk, the durable mark never moves again, and the store refuses
//! reads and writes (see `FileStore::check_healthy`). Only a restart, which re-reads what is on
//! disk, clears it.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub(super) struct Shared {
    active: Mutex<Arc<File>>,
    /// Records appended so far (bumped by the owner after each append).
    pub(super) written: AtomicU64,
    /// The highest `written` value known durable.
    pub(super) synced: AtomicU64,
    /// Set once by the first failed sync (see module doc); says why.
    failure: OnceLock<String>,
    /// Quick check of `failure` on the write and read paths.
    failed: AtomicBool,
    /// Whether the failure was handed out for the operator's log (see `failure_to_report`).
    reported: AtomicBool,
    /// Test hook: this many more syncs succeed, then they fail (`u64::MAX`: never).
    fail_after: AtomicU64,
}

impl Shared {
    pub fn new(active: Arc<File>) -> Arc<Shared> {
        Arc::new(Shared {
            active: Mutex::new(active),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            failure: OnceLock::new(),
            failed: AtomicBool::new(false),
            reported: AtomicBool::new(false),
            fail_after: AtomicU64::new(u64::MAX),
        })
    }

    /// Why the store stopped, once a sync has failed.
    pub fn failure(&self) -> Option<&str> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.failure.get().map(String::as_str)
    }

    /// The failure, the first time it is asked for after the store stopped; then `None`. Lets
    /// every thread that sees an error log it without logging it twice.
    pub fn failure_to_report(&self) -> Option<&str> {
        let why = self.failure()?;
        (!self.reported.swap(true, Ordering::AcqRel)).then_some(why)
    }

    /// The error every sync answers once the store has stopped.
    fn failed_error(&self) -> Option<io::Error> {
        self.failure().map(|why| io::Error::other(format!("the store failed earlier ({why}); restart the engine")))
    }

    /// `fdatasync` of `file`, latching the store failed if it fails (see module doc). Every
    /// data sync of the store goes through here, at rolls too.
    pub fn sync_file(&self, file: &std::fs::File) -> io::Result<()> {
        if let Some(err) = self.failed_error() {
            return Err(err);
        }
        // Counts down to 0, then stays there: every later sync fails.
        let injected = self
            .fail_after
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n != u64::MAX && n != 0).then(|| n - 1))
            == Err(0);
        let result = if injected {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            file.sync_data()
        };
        if let Err(err) = &result {
            let _ = self.failure.set(format!("fdatasync failed: {err}"));
            self.failed.store(true, Ordering::Release);
        }
        result
    }

    /// Test hook: after `after` more successful syncs, every sync fails with EIO.
    pub fn fail_syncs_after(&self, after: u64) {
        self.fail_after.store(after, Ordering::Release);
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
        if let Some(err) = self.failed_error() {
            return Err(err);
        }
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let file = self.active.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.sync_file(&file)?;
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

    /// Why the store stopped taking reads and writes (a sync failed), if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure().map(str::to_owned)
    }

    /// The failure, only to the first caller that asks after the store stopped: for one log line.
    pub fn failure_to_report(&self) -> Option<String> {
        self.shared.failure_to_report().map(str::to_owned)
    }

    /// Fault injection for tests only: after `after` more successful `fdatasync` calls, every
    /// sync of this store fails with EIO (as a disk write error would), at a commit or a roll.
    #[doc(hidden)]
    pub fn inject_sync_failure_after(&self, after: u64) {
        self.shared.fail_syncs_after(after);
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
