//! The file store (`store_method: file_based`): one shard's items in a Bitcask-style log.
//!
//! Every `set` and `delete` appends a checksummed record (see `record`) to the active segment
//! file, written through a memory map; an in-memory index (see `index`) points at the latest
//! record of each live item, and values are read straight from the mapped segments. When the
//! active segment is full it is synced, sealed and a new one started, on a reclaimed file when
//! one is ready (see `spare`). `open` rebuilds the index by scanning the segments (see
//! `recovery`), `compact_step` rewrites the live records of mostly-dead sealed segments and
//! removes them (see `compaction`), `repair` salvages a damaged directory. Helper threads keep
//! pages ahead of the writer populated and start writeback behind it (see `prefault`). The store never syncs on its own behalf for a write: the caller decides with a
//! [`FlushHandle`] (see `sync`).

mod compaction;
mod index;
mod prefault;
mod record;
mod recovery;
mod repair;
mod segment;
mod spare;
mod sync;

#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Json, KvStore, StoreError};

pub use compaction::CompactProgress;
pub use record::FormatError;
pub use prefault::Populate;
pub use repair::{repair, RepairReport};
pub use recovery::{recover_segment_bytes, RecoveredBytes};
pub use sync::FlushHandle;

use index::{Entry, Index, Loc, Tomb};
use record::Kind;
use segment::Segment;

/// Tuning of a [`FileStore`]; any values open any existing directory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FileOptions {
    /// Size of a new segment file. A record larger than this gets a segment of its own size.
    pub segment_size: u64,
    /// A sealed segment is compacted once more than this fraction of its bytes is dead.
    pub compaction_threshold: f64,
    /// How pages ahead of the write cursor are prepared (see `prefault`).
    pub populate: Populate,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            segment_size: 64 << 20,
            compaction_threshold: 0.5,
            populate: Populate::Read,
        }
    }
}

/// Byte counts of a store, for metrics and for deciding on compaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Bytes of records still needed: the latest `set` of each live item, needed tombstones.
    pub live_bytes: u64,
    /// Bytes of superseded records, waiting for compaction.
    pub dead_bytes: u64,
    pub segments: usize,
    /// Length of all segment files (the active one is allocated in full).
    pub disk_bytes: u64,
    pub rolls: RollStats,
}

/// Segments sealed since open, how many of their successors reused the spare file, and the
/// total and longest time the writer spent in a roll (sync of the old segment included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RollStats {
    pub count: u64,
    pub on_spare: u64,
    pub total_us: u64,
    pub max_us: u64,
}

/// `(stream, group, item, value)` of an item that belongs to another store.
pub type ForeignItem = (String, String, String, Json);

/// An unfinished write that `open` found at the end of the log and cut off: it was never synced,
/// so never acknowledged (see `recovery`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    /// Where the cut-off bytes started: the new end of the log.
    pub offset: u64,
    /// How many non-zero bytes were dropped from there on.
    pub bytes: u64,
}

/// Why a store directory cannot be opened.
#[derive(Debug)]
pub enum OpenError {
    Io {
        path: PathBuf,
        source: io::Error,
    },
    /// A damaged record that a crash cannot explain; `ringcast repair` salvages the rest.
    Corrupt {
        file: PathBuf,
        offset: u64,
    },
}

impl OpenError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> OpenError + '_ {
        move |source| OpenError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Io { path, source } => {
                write!(f, "cannot open file store {}: {source}", path.display())
            }
            OpenError::Corrupt { file, offset } => {
                let dir = file.parent().unwrap_or(Path::new("."));
                write!(
                    f,
                    "corrupt record in {} at byte offset {offset}; run `ringcast repair {}` to salvage the intact records",
                    file.display(),
                    dir.display()
                )
            }
        }
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OpenError::Io { source, .. } => Some(source),
            OpenError::Corrupt { .. } => None,
        }
    }
}

/// A [`KvStore`] in a directory of memory-mapped, append-only segment files; one per shard.
pub struct FileStore {
    dir: PathBuf,
    options: FileOptions,
    segments: BTreeMap<u32, Segment>,
    /// Id of the segment being written (always the highest).
    active: u32,
    index: Index,
    /// `seq` of the next item to enter a group.
    next_seq: u64,
    sync: Arc<sync::Shared>,
    compaction: Option<compaction::Cursor>,
    /// Reused buffer for records that compaction copies.
    scratch: Vec<u8>,
    prefaulter: prefault::Prefaulter,
    /// Segments that compaction emptied, removed after the next roll (see `compaction`).
    retired: Vec<u32>,
    /// The write count at the previous compaction step: unchanged means the writer is idle.
    written_at_last_step: u64,
    /// A reclaimed segment file being prepared for reuse, or ready.
    spare: Option<spare::Spare>,
    rolls: RollStats,
    /// What open cut off the end of the last segment (a write a crash left unfinished).
    torn_tail: Option<TornTail>,
    /// Held while open: one store per directory.
    _lock: fs::File,
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("dir", &self.dir)
            .field("stats", &self.stats())
            .finish()
    }
}

impl FileStore {
    /// Opens (creating if needed) the store in `dir`: scans every segment, verifies each
    /// record, rebuilds the index and cuts off a torn tail of the last segment.
    pub fn open(dir: &Path, options: FileOptions) -> Result<FileStore, OpenError> {
        recovery::open(dir, options)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A handle that makes this store's writes durable from another thread.
    pub fn flush_handle(&self) -> FlushHandle {
        FlushHandle {
            shared: self.sync.clone(),
        }
    }

    /// Makes every write so far durable, on the owner's thread.
    pub fn sync(&mut self) -> io::Result<()> {
        self.sync.sync()
    }

    /// The unfinished write that `open` cut off the end of the log, if there was one.
    pub fn torn_tail(&self) -> Option<&TornTail> {
        self.torn_tail.as_ref()
    }

    /// Why the store stopped serving (an `fdatasync` failed), if it did; see `sync`.
    pub fn failure(&self) -> Option<&str> {
        self.sync.failure()
    }

    /// Fault injection for tests only: after `after` more successful `fdatasync` calls, every
    /// sync fails with EIO. See [`FlushHandle::inject_sync_failure_after`].
    #[doc(hidden)]
    pub fn inject_sync_failure_after(&self, after: u64) {
        self.sync.fail_syncs_after(after);
    }

    /// Fail-stop: once a sync failed, nothing is read or written (see `sync`).
    fn check_healthy(&self) -> Result<(), StoreError> {
        match self.sync.failure() {
            None => Ok(()),
            Some(why) => Err(StoreError::Failed {
                dir: self.dir.clone(),
                why: why.to_owned(),
            }),
        }
    }

    pub fn stats(&self) -> StoreStats {
        let mut stats = StoreStats {
            segments: self.segments.len(),
            rolls: self.rolls,
            ..StoreStats::default()
        };
        for seg in self.segments.values() {
            stats.live_bytes += seg.usage.live;
            stats.dead_bytes += seg.usage.dead;
            stats.disk_bytes += seg.capacity;
        }
        stats
    }

    /// Every item whose (stream, group) `keep` rejects, in list order, for re-homing after a
    /// change of shard count (see [`rehome`]). Changes nothing.
    pub fn foreign_items(&self, keep: impl Fn(&str, &str) -> bool) -> Vec<ForeignItem> {
        let mut foreign: Vec<(&str, &str, &index::Group)> = self
            .index
            .groups()
            .filter(|(stream, group, _)| !keep(stream, group))
            .collect();
        foreign.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let mut out = Vec::new();
        for (stream, group, items) in foreign {
            for (item, entry) in items {
                out.push((stream.to_owned(), group.to_owned(), item.clone(), self.read(entry.loc)));
            }
        }
        out
    }

    fn io_error(&self, err: io::Error) -> StoreError {
        StoreError::Io {
            dir: self.dir.clone(),
            source: err,
        }
    }

    /// The value of the record at `loc`, copied out of the map.
    fn read(&self, loc: Loc) -> Json {
        value_at(&self.segments[&loc.seg], loc)
    }

    /// The value of a record that a newer one (or a delete) replaces, read before it counts as
    /// dead.
    fn supersede(&mut self, loc: Loc) -> Json {
        let seg = self.segments.get_mut(&loc.seg).expect("record in a known segment");
        let value = value_at(seg, loc);
        seg.usage.live -= u64::from(loc.len);
        seg.usage.dead += u64::from(loc.len);
        value
    }

    fn add_live(&mut self, loc: Loc) {
        self.segments
            .get_mut(&loc.seg)
            .expect("record in a known segment")
            .usage
            .live += u64::from(loc.len);
    }

    fn add_dead(&mut self, loc: Loc) {
        self.segments
            .get_mut(&loc.seg)
            .expect("record in a known segment")
            .usage
            .dead += u64::from(loc.len);
    }

    /// A record that was live is now superseded.
    fn kill(&mut self, loc: Loc) {
        let usage = &mut self
            .segments
            .get_mut(&loc.seg)
            .expect("record in a known segment")
            .usage;
        usage.live -= u64::from(loc.len);
        usage.dead += u64::from(loc.len);
    }

    /// Whether a tombstone still hides a `set` in some older segment (and tightens its range).
    fn tomb_needed(segments: &BTreeMap<u32, Segment>, tomb: &mut Tomb) -> bool {
        match segments.range(tomb.oldest..tomb.loc.seg).next() {
            Some((&id, _)) => {
                tomb.oldest = id;
                true
            }
            None => false,
        }
    }

    /// Re-checks every tombstone after a segment went away.
    fn prune_tombs(&mut self) {
        let segments = &self.segments;
        let dropped = self.index.prune_tombs(|tomb| Self::tomb_needed(segments, tomb));
        for loc in dropped {
            self.kill(loc);
        }
    }

    /// Makes room for a record of `len` bytes and says where it will go; `write` puts it
    /// there, with nothing appended in between.
    fn reserve(&mut self, len: usize, value_len: usize) -> Result<Loc, StoreError> {
        let active = &self.segments[&self.active];
        let offset = if active.room() >= len as u64 {
            active.len
        } else {
            self.roll(len).map_err(|err| self.io_error(err))?;
            0
        };
        Ok(Loc {
            seg: self.active,
            offset,
            len: len as u32,
            value_len: value_len as u32,
        })
    }

    /// Writes the record reserved at `loc`; returns the byte counts of its segment, which the
    /// caller updates.
    fn write(&mut self, loc: Loc, fill: impl FnOnce(&mut [u8])) -> &mut segment::Usage {
        let seg = self.segments.get_mut(&loc.seg).expect("active segment");
        let offset = seg.append(loc.len as usize, fill);
        debug_assert_eq!(offset, loc.offset);
        seg.prefault(&self.prefaulter);
        self.sync.note_write();
        &mut seg.usage
    }

    /// Appends a record; nothing changes if it fails.
    fn append(
        &mut self,
        kind: Kind,
        seq: u64,
        stream: &str,
        group: &str,
        item: &str,
        value: &str,
    ) -> Result<Loc, StoreError> {
        let loc = self.reserve(record_len(stream, group, item, value)?, value.len())?;
        self.write(loc, |dst| {
            record::encode_into(dst, kind, seq, stream, group, item, value)
        });
        Ok(loc)
    }

    /// Appends an already encoded record (compaction copies them verbatim, `seq` included).
    fn append_raw(&mut self, raw: &[u8], value_len: usize) -> Result<Loc, StoreError> {
        let loc = self.reserve(raw.len(), value_len)?;
        self.write(loc, |dst| dst.copy_from_slice(raw));
        Ok(loc)
    }

    /// Starts a new active segment big enough for `needed` bytes.
    ///
    /// The old one is synced first, before its successor exists: recovery may then treat any
    /// damage in a segment that is not the last as corruption rather than as a torn write.
    /// If this fails, the old segment stays active and the store unchanged.
    fn roll(&mut self, needed: usize) -> io::Result<()> {
        let started = std::time::Instant::now();
        let rolled = self.roll_segment(needed);
        if rolled.is_ok() {
            self.rolls.count += 1;
            let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.rolls.max_us = self.rolls.max_us.max(took);
            self.rolls.total_us = self.rolls.total_us.saturating_add(took);
        }
        rolled
    }

    fn roll_segment(&mut self, needed: usize) -> io::Result<()> {
        let old_id = self.active;
        let old = &self.segments[&old_id];
        if old.len > 0 {
            old.unmap_pages();
            self.sync.sync_file(&old.file)?;
        }
        let new_id = old_id
            .checked_add(1)
            .ok_or_else(|| io::Error::other("segment ids exhausted"))?;
        let capacity = self.options.segment_size.max(needed as u64);
        let new = self.next_segment(new_id, capacity)?;
        self.sync.set_active(new.file.clone());
        self.segments.insert(new_id, new);
        self.active = new_id;
        let old = self.segments.get_mut(&old_id).expect("old active segment");
        if old.len == 0 {
            // Too small for its first record: holds nothing, so it can simply go.
            let path = old.path.clone();
            self.segments.remove(&old_id);
            let _ = fs::remove_file(path);
        } else {
            old.seal();
        }
        // Everything written so far is durable now (the old segment was just synced, earlier
        // ones at their own rolls): retired segments can go without a sync of their own.
        self.sync.mark_synced();
        if !self.retired.is_empty() {
            // Best effort: what fails stays retired for a later try.
            let _ = self.remove_retired();
        }
        Ok(())
    }

    /// The next active segment: the spare file when it is ready and of the right size, else a
    /// new file.
    fn next_segment(&mut self, id: u32, capacity: u64) -> io::Result<Segment> {
        let spare_fits = capacity == self.options.segment_size;
        if spare_fits && self.spare.as_ref().is_some_and(|spare| spare.is_ready()) {
            let spare = self.spare.take().expect("checked");
            match Segment::reuse(&self.dir, id, capacity, spare.path()) {
                Ok(seg) => {
                    self.rolls.on_spare += 1;
                    return Ok(seg);
                }
                Err(_) => spare.discard(),
            }
        }
        Segment::create(&self.dir, id, capacity)
    }

    /// Takes a reclaimed segment's file out of the log: it becomes the spare when there is
    /// none yet (see `spare`), else it is deleted. The caller syncs the directory.
    fn retire_file(&mut self, id: u32) -> io::Result<()> {
        if self.spare.as_ref().is_some_and(|spare| spare.has_failed()) {
            self.spare.take().expect("checked").discard();
        }
        let seg = &self.segments[&id];
        let size = self.options.segment_size;
        if self.spare.is_none() && seg.len <= size {
            if let Ok((spare, preparation)) = spare::Spare::adopt(&self.dir, &seg.path, seg.len, size) {
                // Its map goes before the helper writes over the file.
                self.segments.remove(&id);
                if self.prefaulter.recycle(preparation) {
                    self.spare = Some(spare);
                } else {
                    spare.discard();
                }
                return Ok(());
            }
        }
        match fs::remove_file(&seg.path) {
            // Already gone if a failed `adopt` got as far as its own cleanup.
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        self.segments.remove(&id);
        Ok(())
    }

    /// Stores an item recovered by `repair` with its original `seq` (it must be absent).
    fn restore(
        &mut self,
        stream: &str,
        group: &str,
        item: &str,
        value: &str,
        seq: u64,
    ) -> Result<(), StoreError> {
        debug_assert!(self.index.get(stream, group, item).is_none());
        let loc = self.append(Kind::Set, seq, stream, group, item, value)?;
        self.add_live(loc);
        self.index.insert(
            stream,
            group,
            item,
            Entry {
                loc,
                seq,
                oldest: loc.seg,
            },
        );
        self.next_seq = self.next_seq.max(seq + 1);
        Ok(())
    }
}

/// The value of the record at `loc` of `seg`, copied out of the map.
fn value_at(seg: &Segment, loc: Loc) -> Json {
    let bytes = &seg.bytes()[loc.value_range()];
    // Always valid UTF-8: written from a `&str` or verified by the scan at open, and the mapped
    // bytes of a record never change afterwards (see `segment`).
    debug_assert!(std::str::from_utf8(bytes).is_ok());
    // SAFETY: as said above.
    Json::from(unsafe { std::str::from_utf8_unchecked(bytes) })
}

/// Encoded length of a record, or why it cannot be stored.
fn record_len(stream: &str, group: &str, item: &str, value: &str) -> Result<usize, StoreError> {
    Ok(record::encoded_len(stream.len(), group.len(), item.len(), value.len())?)
}

/// Moves every item to the store that owns its group after a change of shard count:
/// `owner(stream, group)` is the index in `stores` of the store that keeps it (stores past the
/// last owner are emptied). Returns how many items moved.
///
/// Crash-safe by order: every copy is written and synced at its new owner before any delete
/// record is written at a source, so a crash or error at any point leaves each item at its
/// source, at its owner, or in both; the next run moves what is left. A failed step stops the
/// re-homing with the error (nothing is deleted whose copy is not durable).
pub fn rehome(stores: &mut [FileStore], owner: impl Fn(&str, &str) -> usize) -> Result<usize, StoreError> {
    let moves: Vec<(usize, Vec<ForeignItem>)> = stores
        .iter()
        .enumerate()
        .map(|(index, store)| (index, store.foreign_items(|s, g| owner(s, g) == index)))
        .filter(|(_, items)| !items.is_empty())
        .collect();
    let mut moved = 0;
    let mut targets = vec![false; stores.len()];
    for (_, items) in &moves {
        for (stream, group, item, value) in items {
            let to = owner(stream, group);
            let Some(target) = stores.get_mut(to) else {
                return Err(StoreError::NoOwner {
                    to,
                    stream: stream.clone(),
                    group: group.clone(),
                });
            };
            target.set(stream, group, item, value.clone())?;
            if let Some(t) = targets.get_mut(to) {
                *t = true;
            }
        }
    }
    for (store, _) in stores.iter_mut().zip(&targets).filter(|(_, &t)| t) {
        store.sync().map_err(|err| store.io_error(err))?;
    }
    for (from, items) in &moves {
        let Some(source) = stores.get_mut(*from) else { continue };
        for (stream, group, item, _) in items {
            source.delete(stream, group, item)?;
            moved += 1;
        }
        source.sync().map_err(|err| source.io_error(err))?;
    }
    Ok(moved)
}

impl KvStore for FileStore {
    fn get(&self, stream: &str, group: &str, item: &str) -> Option<Json> {
        self.index.get(stream, group, item).map(|e| self.read(e.loc))
    }

    fn set(
        &mut self,
        stream: &str,
        group: &str,
        item: &str,
        value: Json,
    ) -> Result<Option<Json>, StoreError> {
        self.check_healthy()?;
        let loc = self.reserve(record_len(stream, group, item, &value)?, value.len())?;
        // The record's place is known before it is written: one index lookup serves both.
        let existing = self.index.get_mut(stream, group, item).map(|entry| {
            let old = *entry;
            entry.loc = loc;
            old
        });
        let seq = existing.map_or(self.next_seq, |e| e.seq);
        self.write(loc, |dst| {
            record::encode_into(dst, Kind::Set, seq, stream, group, item, &value)
        })
        .live += u64::from(loc.len);
        match existing {
            Some(old) => Ok(Some(self.supersede(old.loc))),
            None => {
                self.next_seq += 1;
                // Re-inserted after a delete: its old records are now hidden by this one.
                let oldest = match self.index.take_tomb(stream, group, item) {
                    Some(tomb) => {
                        self.kill(tomb.loc);
                        tomb.oldest
                    }
                    None => loc.seg,
                };
                self.index.insert(stream, group, item, Entry { loc, seq, oldest });
                Ok(None)
            }
        }
    }

    fn delete(&mut self, stream: &str, group: &str, item: &str) -> Result<Option<Json>, StoreError> {
        self.check_healthy()?;
        let Some(old) = self.index.get(stream, group, item).copied() else {
            return Ok(None);
        };
        let loc = self.append(Kind::Delete, 0, stream, group, item, "")?;
        let previous = self.supersede(old.loc);
        self.index.remove(stream, group, item);
        let mut tomb = Tomb {
            loc,
            oldest: old.oldest,
        };
        if Self::tomb_needed(&self.segments, &mut tomb) {
            self.add_live(loc);
            self.index.put_tomb(stream, group, item, tomb);
        } else {
            // Every older record of the item is in this same segment and goes with it.
            self.add_dead(loc);
        }
        Ok(Some(previous))
    }

    fn list(&self, stream: &str, group: &str) -> Vec<Json> {
        self.index
            .group(stream, group)
            .map(|items| items.values().map(|e| self.read(e.loc)).collect())
            .unwrap_or_default()
    }

    fn list_groups(&self, stream: &str) -> Vec<String> {
        self.index.list_groups(stream)
    }

    fn list_streams(&self) -> Vec<(String, Vec<String>)> {
        self.index.list_streams()
    }

    fn health(&self) -> Result<(), StoreError> {
        self.check_healthy()
    }
}
