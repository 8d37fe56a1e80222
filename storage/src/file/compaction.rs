//! Compaction: rewrite the records still needed from a mostly-dead sealed segment to the end of
//! the log, then remove the segment file.
//!
//! It runs a slice at a time (`compact_step(max_bytes)` scans at most about `max_bytes` of the
//! victim) so a shard can interleave it with serving writes. Writes between slices are safe: a
//! record is copied only if the index still points at it when the scan reaches it. Copies keep
//! their `seq`, so list order survives. A segment with no live bytes is not scanned at all.
//!
//! A copied-out segment is *retired*, not removed at once: the copies, and the newer records
//! that made its other records dead, must be durable before the only other copy goes. The next
//! roll syncs the whole log anyway, so retired segments are removed right after it (see
//! `FileStore::roll`) at no extra cost to the writer. A step removes them itself, with a sync,
//! only when that sync is free or the writer is idle: when everything written is already synced
//! (a durable store whose commit ran), or when nothing was written since the previous step.
//! A removal is made durable (directory sync) before tombstones that only hid records in the
//! removed segments are dropped, else a crash could bring those records back without them.

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
#[derive(Debug)]
pub enum CompactProgress {
    /// No sealed segment is over the dead-bytes threshold and none waits for removal.
    Idle,
    /// Part of `segment` was processed; call again to go on.
    InProgress { segment: u32, scanned: u64, copied: u64 },
    /// Everything still needed in `segment` is copied; it is removed after the next roll or by
    /// a later step.
    Retired { segment: u32 },
    /// Retired segments wait for the next roll (the writer is busy and unsynced).
    Waiting { retired: usize },
    /// This many retired segments were removed, freeing `freed_bytes` of disk (a removed file
    /// may be kept as the spare for the next segment, see `spare`).
    Reclaimed { segments: usize, freed_bytes: u64 },
    /// The step failed (the store is unchanged and readable); a later call retries.
    Failed(StoreError),
}

impl FileStore {
    /// Does at most about `max_bytes` of compaction work (see module doc).
    pub fn compact_step(&mut self, max_bytes: usize) -> CompactProgress {
        let written = self.sync.written();
        let writer_idle = written == mem::replace(&mut self.written_at_last_step, written);
        if !self.retired.is_empty() && (writer_idle || self.sync.is_synced()) {
            return match self.sync.sync() {
                Ok(()) => match self.remove_retired() {
                    Ok((segments, freed_bytes)) => CompactProgress::Reclaimed { segments, freed_bytes },
                    Err(err) => CompactProgress::Failed(err),
                },
                Err(err) => CompactProgress::Failed(self.io_error(err)),
            };
        }
        let Some(mut cursor) = self
            .compaction
            .take()
            .or_else(|| self.pick_victim().map(|seg| Cursor { seg, offset: 0 }))
        else {
            return match self.retired.len() {
                0 => CompactProgress::Idle,
                retired => CompactProgress::Waiting { retired },
            };
        };
        let mut scanned = 0;
        let mut copied = 0;
        let result = self.copy_live(&mut cursor, max_bytes as u64, &mut scanned, &mut copied);
        self.written_at_last_step = self.sync.written();
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
        self.retired.push(cursor.seg);
        CompactProgress::Retired { segment: cursor.seg }
    }

    /// The sealed segment with the most dead bytes among those over the threshold.
    fn pick_victim(&self) -> Option<u32> {
        let threshold = self.options.compaction_threshold;
        let newest_sealed = self.segments.range(..self.active).next_back().map_or(0, |(&id, _)| id);
        self.segments
            .values()
            // The newest sealed segment waits for the next roll: it holds the most recent
            // records, the ones most likely to be overwritten soon, which would otherwise be
            // copied only to die right after.
            .filter(|seg| seg.id < newest_sealed && !self.retired.contains(&seg.id))
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
            let Decoded::Record(rec) = record::decode_verified(&seg.bytes()[cursor.offset as usize..]) else {
                return Err(StoreError::Corrupt {
                    file: seg.path.clone(),
                    offset: cursor.offset,
                });
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
                let Decoded::Record(rec) = record::decode_verified(&self.scratch) else {
                    unreachable!("copied an intact record")
                };
                let old = match rec.kind {
                    Kind::Set => self
                        .index
                        .get_mut(rec.stream, rec.group, rec.item)
                        .map(|entry| mem::replace(&mut entry.loc, new)),
                    Kind::Delete => self
                        .index
                        .tomb_mut(rec.stream, rec.group, rec.item)
                        .map(|tomb| mem::replace(&mut tomb.loc, new)),
                };
                match old {
                    Some(old) => {
                        self.kill(old);
                        self.add_live(new);
                    }
                    // A tombstone that the roll making room for its copy found unneeded (it
                    // removed the last segment the tombstone hid records in).
                    None => self.add_dead(new),
                }
                *copied += len as u64;
            }
            cursor.offset += len as u64;
            *scanned += len as u64;
        }
        Ok(())
    }

    /// Removes the retired segments; the caller made every record written so far durable.
    /// Returns how many went and the disk bytes freed. If only the directory sync fails, the
    /// segments are gone but their tombstones are kept until a later removal.
    pub(super) fn remove_retired(&mut self) -> Result<(usize, u64), StoreError> {
        let mut removed = (0, 0);
        while let Some(&id) = self.retired.last() {
            let capacity = self.segments[&id].capacity;
            self.retire_file(id).map_err(|err| self.io_error(err))?;
            self.retired.pop();
            removed.0 += 1;
            removed.1 += capacity;
        }
        segment::sync_dir(&self.dir).map_err(|err| self.io_error(err))?;
        self.prune_tombs();
        Ok(removed)
    }
}
