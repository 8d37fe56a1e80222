//! One segment file: `seg-NNNNNN.log`, mapped into memory.
//!
//! The active segment is pre-allocated to its full capacity (`posix_fallocate`, not a sparse
//! `set_len`: a write through a mapping into a hole that the file system cannot allocate kills
//! the process with SIGBUS, while a failed allocation here is an ordinary error) and mapped
//! read-write; records are copied into the map at the write offset. Unwritten space reads as
//! zeros, and a zero magic byte ends the log. A sealed segment is truncated to its records and
//! mapped read-only.
//!
//! Safety of the mappings: the store owns its directory; files are changed only through this
//! module, and a file is never shortened below the range of a live mapping that is read or
//! written (`seal` maps the shorter range before truncating, recovery drops its map before
//! truncating). The prefault helper may still hold the old read-write mapping of a just-sealed
//! segment, but it only passes it to `madvise`, which fails with EFAULT past the end of the file
//! instead of raising SIGBUS.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapOptions, MmapRaw};

use super::prefault::Prefaulter;

/// Live and dead record bytes of a segment: what compaction decides by.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub live: u64,
    pub dead: u64,
}

enum Map {
    /// Shared with the prefault helper while it populates pages ahead of the cursor.
    Active(Arc<MmapRaw>),
    Sealed(Mmap),
    /// A zero-length file cannot be mapped.
    Empty,
}

pub struct Segment {
    pub id: u32,
    pub path: PathBuf,
    pub file: Arc<File>,
    map: Map,
    /// Bytes of records: the write offset while active.
    pub len: u64,
    /// Length of the file (and of the map).
    pub capacity: u64,
    pub usage: Usage,
    /// End of the range the prefault helper was asked to populate (active segment only).
    populated: usize,
    /// End of the range handed to the helper for writeback (active segment only).
    written_behind: usize,
}

pub fn file_name(id: u32) -> String {
    format!("seg-{id:06}.log")
}

/// The id in a segment file name, or `None` for any other file.
pub fn parse_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Ids of the segment files in `dir`, ascending.
pub fn list(dir: &Path) -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(id) = entry.file_name().to_str().and_then(parse_file_name) {
            if entry.file_type()?.is_file() {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Makes creations, renames and removals in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Takes the directory's `LOCK` file, so that two stores (or a store and `repair`) never write
/// the same segments; released when the returned file is dropped (or the process dies).
pub fn lock_dir(dir: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("LOCK"))?;
    // SAFETY: plain syscall on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the store directory is in use by another open store",
            ));
        }
        return Err(err);
    }
    Ok(file)
}

/// Reserves the blocks of `[0, len)` so that writes through the map cannot hit ENOSPC.
pub fn allocate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on a file descriptor we own.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

fn map_rw(file: &File, len: u64) -> io::Result<Arc<MmapRaw>> {
    let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    Ok(Arc::new(MmapOptions::new().len(len).map_raw(file)?))
}

fn map_ro(file: &File, len: u64) -> io::Result<Map> {
    if len == 0 {
        return Ok(Map::Empty);
    }
    let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: see the module doc.
    Ok(Map::Sealed(unsafe { MmapOptions::new().len(len).map(file)? }))
}

fn open_rw(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .open(path)
}

/// `made`, or its error after removing the half-made file at `path`.
fn removing_on_error<T>(path: &Path, made: io::Result<T>) -> io::Result<T> {
    if made.is_err() {
        let _ = fs::remove_file(path);
    }
    made
}

impl Segment {
    fn new(id: u32, path: PathBuf, file: File, map: Map, capacity: u64) -> Segment {
        Segment {
            id,
            path,
            file: Arc::new(file),
            map,
            len: 0,
            capacity,
            usage: Usage::default(),
            populated: 0,
            written_behind: 0,
        }
    }

    /// A new, empty, active segment of `capacity` bytes, durable (file and directory entry)
    /// before it is used, so records written to it cannot outlive its name.
    pub fn create(dir: &Path, id: u32, capacity: u64) -> io::Result<Segment> {
        let path = dir.join(file_name(id));
        let file = open_rw(&path, true)?;
        let made = (|| {
            allocate(&file, capacity)?;
            file.sync_all()?;
            sync_dir(dir)?;
            map_rw(&file, capacity)
        })();
        let map = removing_on_error(&path, made)?;
        Ok(Segment::new(id, path, file, Map::Active(map), capacity))
    }

    /// A new active segment made from a ready spare file (see `spare`): renamed to its name,
    /// which is made durable before the segment is used. On failure nothing is left under the
    /// new name.
    pub fn reuse(dir: &Path, id: u32, capacity: u64, spare: &Path) -> io::Result<Segment> {
        let path = dir.join(file_name(id));
        fs::rename(spare, &path)?;
        let made = (|| {
            sync_dir(dir)?;
            let file = open_rw(&path, false)?;
            let map = map_rw(&file, capacity)?;
            Ok((file, map))
        })();
        let (file, map) = removing_on_error(&path, made)?;
        Ok(Segment::new(id, path, file, Map::Active(map), capacity))
    }

    /// An existing segment, mapped read-only for recovery; `len` is set by the scan.
    pub fn open_existing(dir: &Path, id: u32) -> io::Result<Segment> {
        let path = dir.join(file_name(id));
        let file = open_rw(&path, false)?;
        let capacity = file.metadata()?.len();
        let map = map_ro(&file, capacity)?;
        Ok(Segment::new(id, path, file, map, capacity))
    }

    /// The mapped bytes: records up to `len`, zeros after.
    pub fn bytes(&self) -> &[u8] {
        match &self.map {
            // SAFETY: the mapping lives as long as `self.map`; only `append` (through `&mut
            // self`) writes to it, and the prefault helper changes no byte.
            Map::Active(map) => unsafe { std::slice::from_raw_parts(map.as_ptr(), map.len()) },
            Map::Sealed(map) => map,
            Map::Empty => &[],
        }
    }

    /// Recovery of the last segment: discards everything from `len` on (a torn tail must not
    /// resurface after later records are written over part of it) and makes the segment
    /// writable with at least `min_capacity` bytes.
    pub fn activate(&mut self, min_capacity: u64) -> io::Result<()> {
        let capacity = self.capacity.max(min_capacity);
        self.map = Map::Empty;
        self.file.set_len(self.len)?;
        allocate(&self.file, capacity)?;
        self.file.sync_all()?;
        self.map = Map::Active(map_rw(&self.file, capacity)?);
        self.capacity = capacity;
        self.populated = 0;
        self.written_behind = 0;
        Ok(())
    }

    pub fn room(&self) -> u64 {
        self.capacity - self.len
    }

    /// Appends `len` bytes written by `fill`; returns their offset. The caller checked `room`.
    pub fn append(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> u64 {
        let Map::Active(map) = &self.map else {
            panic!("append to sealed segment {}", self.id)
        };
        let offset = self.len;
        let start = offset as usize;
        assert!(start + len <= map.len(), "append past the end of segment {}", self.id);
        // SAFETY: in bounds (checked above); `&mut self` makes this the only reference to these
        // bytes, and the prefault helper does not write them.
        fill(unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr().add(start), len) });
        self.len += len as u64;
        offset
    }

    /// Keeps the pages ahead of the write cursor populated and those far behind it on their
    /// way to disk (see `prefault`).
    pub fn prefault(&mut self, prefaulter: &Prefaulter) {
        if let Map::Active(map) = &self.map {
            let len = self.len as usize;
            self.populated = prefaulter.ahead(map, len, self.populated);
            self.written_behind = prefaulter.behind(map, &self.file, len, self.written_behind);
        }
    }

    /// Unmaps the pages of the active map (their contents stay in the page cache), so that a
    /// following sync does not have to write-protect each one again: on a multi-core host that
    /// costs a TLB shootdown per page, one batched shootdown here.
    pub fn unmap_pages(&self) {
        if let Map::Active(map) = &self.map {
            // SAFETY: MADV_DONTNEED on a shared file mapping drops page-table entries only; the
            // next access faults the same page-cache page back in, so no byte changes.
            unsafe { libc::madvise(map.as_mut_ptr().cast(), map.len(), libc::MADV_DONTNEED) };
        }
    }

    /// Ends writing to this segment: maps just its records read-only and gives back the unused
    /// tail. Both steps are best effort (a failure leaves a longer, zero-tailed file, which
    /// recovery reads the same way), so sealing cannot fail once the successor exists.
    pub fn seal(&mut self) {
        if let Ok(map) = map_ro(&self.file, self.len) {
            self.map = map;
            if self.file.set_len(self.len).is_ok() {
                self.capacity = self.len;
            }
        }
    }
}
