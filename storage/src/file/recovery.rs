//! Opening a directory: replay every segment in order into a fresh index, and decide what a bad
//! record means.
//!
//! What a crash can leave: only the last segment can hold unsynced records (a segment is synced
//! before its successor is created). Two kinds of cut-short write are explained by a crash:
//!
//! - a process crash in the middle of `encode_into`: the record's bytes are written header
//!   first, then the payload, and the checksum last, so an unfinished record has a zero checksum
//!   or ends in zeros (`data_end` before its claimed end), with only zeros after it;
//! - a machine crash: unsynced writes reach the disk, or not, a sector (512 bytes) at a time in
//!   any order, while space never written reads as zeros (segments are preallocated, and a
//!   cut-off tail is zeroed at open); a zeroed sector or the end of the file cuts into the bad
//!   record.
//!
//! Either way no intact record may follow before the cut: everything from the bad record on was
//! never synced (a sync is a barrier), so never acknowledged, and is cut off (the store reports
//! it, see `FileStore::torn_tail`). Anything else, a bad record followed by an intact one or a
//! whole record with a wrong non-zero checksum, is damage: `open` fails with
//! `OpenError::Corrupt` instead of guessing, and `repair` salvages the rest. (JSON never
//! contains a NUL byte, so a bit flip cannot pass for a zeroed sector.)
//!
//! Nothing here may panic on any bytes a file holds: no indexing, no unwraps.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use super::index::{Entry, Index, Loc, Tomb};
use super::record::{self, Decoded, Kind, RecordRef};
use super::segment::{self, Segment, Usage};
use super::{sync, FileOptions, FileStore, OpenError};

const SECTOR: usize = 512;

/// The index and byte accounting rebuilt from records in log order.
#[derive(Default)]
pub(super) struct Replay {
    pub index: Index,
    pub usage: BTreeMap<u32, Usage>,
    pub max_seq: u64,
}

impl Replay {
    fn live(&mut self, loc: Loc) {
        self.usage.entry(loc.seg).or_default().live += u64::from(loc.len);
    }

    fn dead(&mut self, loc: Loc) {
        self.usage.entry(loc.seg).or_default().dead += u64::from(loc.len);
    }

    fn kill(&mut self, loc: Loc) {
        let usage = self.usage.entry(loc.seg).or_default();
        usage.live = usage.live.saturating_sub(u64::from(loc.len));
        usage.dead += u64::from(loc.len);
    }

    /// Applies the record found at `offset` of segment `seg` (same rules as `FileStore`'s
    /// `set` and `delete`, with `oldest` exact: the first segment where the item was seen).
    pub fn apply(&mut self, seg: u32, offset: u64, rec: &RecordRef<'_>) {
        let loc = Loc {
            seg,
            offset,
            // Both fit: `record::decode` refuses records longer than `MAX_RECORD_LEN`.
            len: u32::try_from(rec.len).unwrap_or(u32::MAX),
            value_len: u32::try_from(rec.value.len()).unwrap_or(u32::MAX),
        };
        let (s, g, i) = (rec.stream, rec.group, rec.item);
        match rec.kind {
            Kind::Set => {
                self.max_seq = self.max_seq.max(rec.seq);
                self.live(loc);
                if let Some(entry) = self.index.get_mut(s, g, i) {
                    let old = entry.loc;
                    entry.loc = loc;
                    entry.seq = rec.seq;
                    self.kill(old);
                } else {
                    let oldest = match self.index.take_tomb(s, g, i) {
                        Some(tomb) => {
                            self.kill(tomb.loc);
                            tomb.oldest
                        }
                        None => seg,
                    };
                    self.index.insert(
                        s,
                        g,
                        i,
                        Entry {
                            loc,
                            seq: rec.seq,
                            oldest,
                        },
                    );
                }
            }
            Kind::Delete => {
                let oldest = if let Some(entry) = self.index.remove(s, g, i) {
                    self.kill(entry.loc);
                    Some(entry.oldest)
                } else if let Some(tomb) = self.index.take_tomb(s, g, i) {
                    // A second copy of a tombstone (compaction stopped by a crash).
                    self.kill(tomb.loc);
                    Some(tomb.oldest)
                } else {
                    None
                };
                match oldest {
                    Some(oldest) => {
                        self.live(loc);
                        self.index.put_tomb(s, g, i, Tomb { loc, oldest });
                    }
                    // Nothing of the item is left before it.
                    None => self.dead(loc),
                }
            }
        }
    }

    /// Drops the tombstones with nothing left to hide and puts every group back in list order.
    pub fn finish(&mut self, segments: &BTreeMap<u32, Segment>) {
        let dropped = self
            .index
            .prune_tombs(|tomb| FileStore::tomb_needed(segments, tomb));
        for loc in dropped {
            self.kill(loc);
        }
        self.index.sort_by_seq();
    }
}

pub(super) fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Where a zeroed sector, or the end of the file, cuts into the claimed range `at..claimed_end`
/// of a bad record (a machine crash lost the rest of its writes).
fn lost_sector_cut(bytes: &[u8], at: usize, claimed_end: usize) -> Option<usize> {
    let mut start = at;
    loop {
        if start >= claimed_end {
            return None;
        }
        if start >= bytes.len() {
            return Some(bytes.len());
        }
        let end = (start / SECTOR)
            .saturating_add(1)
            .saturating_mul(SECTOR)
            .min(bytes.len());
        if bytes.get(start..end).is_some_and(all_zero) {
            return Some(start);
        }
        start = end;
    }
}

/// Where the zeros after the bad record at `at` begin, if the record is one that the writer did
/// not finish (the process died inside `encode_into`): nothing but zeros after its claimed end,
/// and either its checksum, written last, still zero or its own last bytes still zero.
fn unfinished_cut(bytes: &[u8], at: usize, claimed_end: usize) -> Option<usize> {
    let rest = bytes.get(at..)?;
    let data_end = at + rest.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    // A checksum field that the file ends inside was never written either.
    let crc_zero = rest.get(record::CRC_RANGE).is_none_or(all_zero);
    let ends_in_zeros = data_end < claimed_end;
    (data_end <= claimed_end && (ends_in_zeros || crc_zero)).then_some(data_end)
}

/// Whether the bad record at `bytes[at]` of the last segment is a torn write (see module doc).
fn is_torn(bytes: &[u8], at: usize) -> bool {
    let Some(rest) = bytes.get(at..) else {
        return false;
    };
    let claimed_end = at.saturating_add(record::claimed_len(rest));
    let Some(cut) = lost_sector_cut(bytes, at, claimed_end).or_else(|| unfinished_cut(bytes, at, claimed_end)) else {
        return false;
    };
    !(at + 1..cut).any(|o| matches!(bytes.get(o..).map(record::decode), Some(Decoded::Record(_))))
}

/// Replays the records of one segment; returns where they end, or the offset of a bad record
/// that a crash cannot explain.
fn scan(bytes: &[u8], is_last: bool, mut each: impl FnMut(u64, &RecordRef<'_>)) -> Result<usize, usize> {
    let mut offset = 0;
    while let Some(rest) = bytes.get(offset..).filter(|rest| !rest.is_empty()) {
        match record::decode(rest) {
            Decoded::Record(rec) => {
                each(offset as u64, &rec);
                offset += rec.len;
            }
            Decoded::End | Decoded::Invalid => {
                let clean_end = if is_last { is_torn(bytes, offset) } else { all_zero(rest) };
                return if clean_end { Ok(offset) } else { Err(offset) };
            }
        }
    }
    Ok(offset)
}

/// Non-zero bytes from `end` on: what a scan that stopped at `end` cut off.
fn dropped_bytes(bytes: &[u8], end: usize) -> u64 {
    bytes
        .get(end..)
        .and_then(|rest| rest.iter().rposition(|&b| b != 0))
        .map_or(0, |p| p as u64 + 1)
}

/// What [`recover_segment_bytes`] found.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveredBytes {
    /// Where the records end (the log's new end).
    pub end: usize,
    /// Intact records replayed.
    pub records: usize,
    /// Live items after the replay.
    pub items: usize,
    /// Bytes of a torn tail cut off after `end`.
    pub torn_bytes: u64,
}

/// Recovery of one segment held in memory, as `open` runs it on the last segment of a store:
/// scan, torn-tail decision and replay into an index. `Err` is the offset of a bad record that
/// `open` would refuse as corruption. For fuzzing: it must return, never panic, on any bytes.
#[doc(hidden)]
pub fn recover_segment_bytes(bytes: &[u8]) -> Result<RecoveredBytes, usize> {
    let mut replay = Replay::default();
    let mut records = 0;
    let end = scan(bytes, true, |offset, rec| {
        records += 1;
        replay.apply(1, offset, rec);
    })?;
    replay.finish(&BTreeMap::new());
    Ok(RecoveredBytes {
        end,
        records,
        items: replay.index.groups().map(|(_, _, items)| items.len()).sum(),
        torn_bytes: dropped_bytes(bytes, end),
    })
}

fn corrupt(seg: &Segment, offset: usize) -> OpenError {
    OpenError::Corrupt {
        file: seg.path.clone(),
        offset: offset as u64,
    }
}

pub(super) fn open(dir: &Path, options: FileOptions) -> Result<FileStore, OpenError> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(OpenError::io(dir))?;
        // The new directory's own entry must be durable too, or its segments vanish with it.
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        segment::sync_dir(parent).map_err(OpenError::io(parent))?;
    }
    let lock = segment::lock_dir(dir).map_err(OpenError::io(dir))?;
    super::spare::remove_leftover(dir).map_err(OpenError::io(dir))?;
    let ids = segment::list(dir).map_err(OpenError::io(dir))?;
    let mut segments = BTreeMap::new();
    let mut replay = Replay::default();
    let mut torn_tail = None;
    for (n, &id) in ids.iter().enumerate() {
        let is_last = n + 1 == ids.len();
        let mut seg =
            Segment::open_existing(dir, id).map_err(OpenError::io(&dir.join(segment::file_name(id))))?;
        let end = scan(seg.bytes(), is_last, |offset, rec| replay.apply(id, offset, rec))
            .map_err(|offset| corrupt(&seg, offset))?;
        let dropped = dropped_bytes(seg.bytes(), end);
        if dropped > 0 {
            // Only the last segment's scan stops before non-zero bytes without failing.
            torn_tail = Some(super::TornTail {
                file: seg.path.clone(),
                offset: end as u64,
                bytes: dropped,
            });
        }
        seg.len = end as u64;
        segments.insert(id, seg);
    }

    // Sealed segments without records (an emptied active segment whose removal a crash undid).
    let active = ids.last().copied();
    let empty: Vec<u32> = segments
        .values()
        .filter(|s| s.len == 0 && Some(s.id) != active)
        .map(|s| s.id)
        .collect();
    for id in &empty {
        if let Some(seg) = segments.remove(id) {
            fs::remove_file(&seg.path).map_err(OpenError::io(&seg.path))?;
        }
    }
    if !empty.is_empty() {
        segment::sync_dir(dir).map_err(OpenError::io(dir))?;
    }

    // The last segment becomes the active one; its torn tail (if any) is cut off here.
    let active = match active.and_then(|id| segments.get_mut(&id)) {
        Some(seg) => {
            seg.activate(options.segment_size)
                .map_err(OpenError::io(&seg.path))?;
            seg.id
        }
        None => {
            let seg = Segment::create(dir, 1, options.segment_size).map_err(OpenError::io(dir))?;
            segments.insert(1, seg);
            1
        }
    };

    replay.finish(&segments);
    for (id, usage) in &replay.usage {
        // Records come from the segments just scanned, all still here (emptied ones had none).
        if let Some(seg) = segments.get_mut(id) {
            seg.usage = *usage;
        }
    }
    let Some(active_file) = segments.get(&active).map(|seg| seg.file.clone()) else {
        return Err(OpenError::Io {
            path: dir.to_owned(),
            source: std::io::Error::other("the active segment went missing"),
        });
    };
    let sync = sync::Shared::new(active_file);
    Ok(FileStore {
        dir: dir.to_owned(),
        options,
        segments,
        active,
        index: std::mem::take(&mut replay.index),
        next_seq: replay.max_seq.saturating_add(1),
        sync,
        compaction: None,
        scratch: Vec::new(),
        prefaulter: super::prefault::Prefaulter::start(options.populate),
        spare: None,
        rolls: Default::default(),
        torn_tail,
        retired: Vec::new(),
        written_at_last_step: 0,
        _lock: lock,
    })
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn rec(seq: u64, value: &str) -> Vec<u8> {
        record::encode(Kind::Set, seq, "s", "g", "i", value).unwrap()
    }

    #[test]
    fn zero_tail_is_a_clean_end() {
        let mut bytes = rec(1, "1");
        let end = bytes.len();
        bytes.resize(4096, 0);
        assert_eq!(scan(&bytes, true, |_, _| {}), Ok(end));
        assert_eq!(scan(&bytes, false, |_, _| {}), Ok(end));
    }

    #[test]
    fn a_lost_sector_inside_the_last_record_is_a_torn_write() {
        let mut bytes = rec(1, "1");
        let start = bytes.len();
        bytes.extend(rec(2, &format!("\"{}\"", "x".repeat(2000))));
        bytes.resize(8192, 0);
        // The sector holding the middle of the second record never reached the disk.
        bytes[1024..1536].fill(0);
        assert_eq!(scan(&bytes, true, |_, _| {}), Ok(start));
        // In a sealed segment the same bytes are damage.
        assert_eq!(scan(&bytes, false, |_, _| {}), Err(start));
    }

    #[test]
    fn a_lost_sector_before_later_records_still_cuts_there() {
        let first = rec(1, &format!("\"{}\"", "a".repeat(600)));
        let mut bytes = first.clone();
        while bytes.len() < 3000 {
            bytes.extend(rec(2, "\"b\""));
        }
        bytes.resize(4096, 0);
        // Sector 1 lost; the records in sectors 2.. were written but never synced.
        bytes[512..1024].fill(0);
        assert_eq!(scan(&bytes, true, |_, _| {}), Ok(0));
    }

    #[test]
    fn a_flipped_bit_with_records_after_it_is_damage() {
        let mut bytes = rec(1, "1");
        let second = bytes.len();
        bytes.extend(rec(2, "2"));
        bytes.extend(rec(3, "3"));
        bytes.resize(4096, 0);
        bytes[second + 26] ^= 0x10;
        assert_eq!(scan(&bytes, true, |_, _| {}), Err(second));
    }

    #[test]
    fn a_flipped_bit_in_the_very_last_record_is_damage_too() {
        let mut bytes = rec(1, "1");
        let second = bytes.len();
        bytes.extend(rec(2, "\"two\""));
        bytes.resize(4096, 0);
        bytes[second + 26] ^= 0x01;
        assert_eq!(scan(&bytes, true, |_, _| {}), Err(second));
    }

    #[test]
    fn garbage_after_a_zero_header_in_a_sealed_segment_is_damage() {
        let mut bytes = rec(1, "1");
        let end = bytes.len();
        bytes.resize(4096, 0);
        bytes[3000] = 7;
        assert_eq!(scan(&bytes, false, |_, _| {}), Err(end));
    }
}
