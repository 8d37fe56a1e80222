//! Recycling reclaimed segment files, so that new segments reuse page-cache pages.
//!
//! A fresh segment file has no page-cache pages: the first write to each page allocates one and
//! the kernel zeroes it, which on the VMs we measured costs several µs per 4 KiB page (the host
//! backs the guest's freed memory again on first touch), more than the records in it. A file
//! whose segment compaction reclaimed still has its pages cached; reusing it avoids that cost.
//!
//! Recovery needs unwritten space to read as zeros (see `recovery`), so a reclaimed file becomes
//! the spare only after its old records are overwritten with zeros and that is synced:
//! 1. compaction renames `seg-N.log` to `spare.log` (instead of deleting it) and syncs the
//!    directory: for recovery the segment is gone, exactly as after a delete;
//! 2. the helper thread writes zeros over it, extends it to the segment size and syncs it, then
//!    marks it ready;
//! 3. the next roll renames a ready spare to the new segment's name and syncs the directory.
//!    Without a ready spare it creates a fresh file as before.
//!
//! `open` deletes a `spare.log` it finds, since it cannot know whether step 2 finished.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use super::segment;

pub const FILE_NAME: &str = "spare.log";

const PREPARING: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;

/// The spare file of a store and how far its preparation is.
pub struct Spare {
    path: PathBuf,
    state: Arc<AtomicU8>,
}

/// The helper thread's half: zero the file, size it, sync it.
pub struct Preparation {
    file: File,
    dirty_len: u64,
    capacity: u64,
    state: Arc<AtomicU8>,
}

impl Preparation {
    pub fn run(self) {
        let state = match self.zero() {
            Ok(()) => READY,
            Err(_) => FAILED,
        };
        self.state.store(state, Ordering::Release);
    }

    fn zero(&self) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let zeros = vec![0u8; CHUNK];
        let mut at = 0;
        while at < self.dirty_len {
            let n = CHUNK.min((self.dirty_len - at) as usize);
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        if self.capacity < self.dirty_len {
            self.file.set_len(self.capacity)?;
        }
        segment::allocate(&self.file, self.capacity)?;
        self.file.sync_data()
    }
}

impl Spare {
    /// Step 1: takes over the reclaimed segment file at `segment` (`len` bytes used); the
    /// caller syncs the directory and hands the returned preparation to the helper thread.
    pub fn adopt(dir: &Path, segment: &Path, len: u64, capacity: u64) -> io::Result<(Spare, Preparation)> {
        let path = dir.join(FILE_NAME);
        fs::rename(segment, &path)?;
        let state = Arc::new(AtomicU8::new(PREPARING));
        let file = File::options().write(true).open(&path);
        let file = match file {
            Ok(file) => file,
            Err(err) => {
                let _ = fs::remove_file(&path);
                return Err(err);
            }
        };
        let preparation = Preparation { file, dirty_len: len, capacity, state: state.clone() };
        Ok((Spare { path, state }, preparation))
    }

    pub fn is_ready(&self) -> bool {
        self.state.load(Ordering::Acquire) == READY
    }

    pub fn has_failed(&self) -> bool {
        self.state.load(Ordering::Acquire) == FAILED
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Deletes the spare file (a failed preparation, or a store that does without).
    pub fn discard(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// At open: a spare left by the previous run may not be zeroed yet.
pub fn remove_leftover(dir: &Path) -> io::Result<()> {
    match fs::remove_file(dir.join(FILE_NAME)) {
        Ok(()) => segment::sync_dir(dir),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    }
}
