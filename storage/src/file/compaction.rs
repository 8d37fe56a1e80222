//! Compaction: rewrite the records still needed from a mostly-dead sealed segment to the end of
//! the log, then delete the segment file.
//!
//! It runs a slice at a time (`compact_step(max_bytes)` scans at most about `max_bytes` of the
//! victim) so a shard can interleave it with serving writes. Writes between slices are safe: a
//! record is copied only if the index still points at it when the scan reaches it. Copies keep
//! their `seq`, so list order survives. Before the old file goes, the copies are synced (they
//! are then the only ones), and its removal is made durable before tombstones that only hid
//! records in it are dropped (else a crash could bring the old records back without them).

use std::fs;
use std::mem;

use super::record::{self, Decoded, Kind};
use super::segment;
use super::FileStore;
use crate::StoreError;

/// Where an unfinished compaction stands.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cursor {
    seg: u32,
    offset: u64,
}

/// What one `compact_step` did.
#[derive(Debug, Clone, PartialEq)]
pub enum CompactProgress {
    /// No sealed segment is over the dead-bytes threshold.
    Idle,
    /// Part of `segment` was processed; call again to go on.
    InProgress { segment: u32, scanned: u64, copied: u64 },
    /// `segment` was rewritten and its file deleted.
    Reclaimed { segment: u32, freed_bytes: u64 },
    /// The step failed (the store is unchanged and readable); a later call retries.
    Failed(StoreError),
}

impl FileStore {
    /// Does at most about `max_bytes` of compaction work (see module doc).
    pub fn compact_step(&mut self, max_bytes: usize) -> CompactProgress {
        let Some(mut cursor) = self
            .compaction
            .take()
            .or_else(|| self.pick_victim().map(|seg| Cursor { seg, offset: 0 }))
        else {
            return CompactProgress::Idle;
        };
        let mut scanned = 0;
        let mut copied = 0;
        let result = self.copy_live(&mut cursor, max_bytes as u64, &mut scanned, &mut copied);
        if let Err(err) = result {
            self.compaction = Some(cursor);
            return CompactProgress::Failed(err);
        }
        if cursor.offset < self.segments[&cursor.seg].len {
            self.compaction = Some(cursor);
            return CompactProgress::InProgress {
                segment: cursor.seg,
                scanned,
                copied,
            };
        }
        match self.remove_segment(cursor.seg) {
            Ok(freed_bytes) => CompactProgress::Reclaimed {
                segment: cursor.seg,
                freed_bytes,
            },
            Err(err) => {
                if self.segments.contains_key(&cursor.seg) {
                    self.compaction = Some(cursor);
                }
                CompactProgress::Failed(err)
            }
        }
    }

    /// The sealed segment with the most dead bytes among those over the threshold.
    fn pick_victim(&self) -> Option<u32> {
        let threshold = self.options.compaction_threshold;
        self.segments
            .values()
            .filter(|seg| seg.id != self.active)
            .filter(|seg| {
                let total = seg.usage.live + seg.usage.dead;
                seg.usage.dead > 0 && seg.usage.dead as f64 > threshold * total as f64
            })
            .max_by_key(|seg| (seg.usage.dead, std::cmp::Reverse(seg.id)))
            .map(|seg| seg.id)
    }

    fn copy_live(
        &mut self,
        cursor: &mut Cursor,
        max_bytes: u64,
        scanned: &mut u64,
        copied: &mut u64,
    ) -> Result<(), StoreError> {
        let seg_len = self.segments[&cursor.seg].len;
        if self.segments[&cursor.seg].usage.live == 0 {
            // Nothing in it is referenced: no need to read it record by record.
            *scanned += seg_len - cursor.offset;
            cursor.offset = seg_len;
            return Ok(());
        }
        while cursor.offset < seg_len && *scanned < max_bytes {
            let here = |loc: &super::index::Loc| loc.seg == cursor.seg && loc.offset == cursor.offset;
            let seg = &self.segments[&cursor.seg];
            let Decoded::Record(rec) = record::decode(&seg.bytes()[cursor.offset as usize..]) else {
                return Err(StoreError(format!(
                    "compaction found a corrupt record in {} at byte offset {}",
                    seg.path.display(),
                    cursor.offset
                )));
            };
            let live = match rec.kind {
                Kind::Set => self
                    .index
                    .get(rec.stream, rec.group, rec.item)
                    .is_some_and(|e| here(&e.loc)),
                Kind::Delete => self
                    .index
                    .tomb(rec.stream, rec.group, rec.item)
                    .is_some_and(|t| here(&t.loc)),
            };
            let (len, value_len) = (rec.len, rec.value.len());
            if live {
                let start = cursor.offset as usize;
                let mut raw = mem::take(&mut self.scratch);
                raw.clear();
                raw.extend_from_slice(&seg.bytes()[start..start + len]);
                let appended = self.append_raw(&raw, value_len);
                self.scratch = raw;
                let new = appended?;
                let Decoded::Record(rec) = record::decode(&self.scratch) else {
                    unreachable!("copied an intact record")
                };
                let old = match rec.kind {
                    Kind::Set => {
                        let entry = self
                            .index
                            .get_mut(rec.stream, rec.group, rec.item)
                            .expect("live item");
                        mem::replace(&mut entry.loc, new)
                    }
                    Kind::Delete => {
                        let tomb = self
                            .index
                            .tomb_mut(rec.stream, rec.group, rec.item)
                            .expect("live tombstone");
                        mem::replace(&mut tomb.loc, new)
                    }
                };
                self.kill(old);
                self.add_live(new);
                *copied += len as u64;
            }
            cursor.offset += len as u64;
            *scanned += len as u64;
        }
        Ok(())
    }

    /// Deletes a fully copied segment; returns the bytes freed on disk. If only the directory
    /// sync fails, the segment is gone but its tombstones are kept until a later removal.
    fn remove_segment(&mut self, id: u32) -> Result<u64, StoreError> {
        self.sync.sync().map_err(|err| self.io_error(err))?;
        let seg = &self.segments[&id];
        let (path, freed) = (seg.path.clone(), seg.capacity);
        fs::remove_file(&path).map_err(|err| self.io_error(err))?;
        self.segments.remove(&id);
        segment::sync_dir(&self.dir).map_err(|err| self.io_error(err))?;
        self.prune_tombs();
        Ok(freed)
    }
}
