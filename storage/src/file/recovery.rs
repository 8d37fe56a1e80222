//! Opening a directory: replay every segment in order into a fresh index, and decide what a bad
//! record means.
//!
//! What a crash can leave: only the last segment can hold unsynced records (a segment is synced
//! before its successor is created), and unsynced writes reach the disk, or not, a sector (512
//! bytes) at a time in any order, while space never written reads as zeros (segments are
//! preallocated, and a cut-off tail is zeroed at open). So in the last segment a bad record is a
//! torn write when a zeroed sector, or the end of the file, cuts into it and no intact record
//! follows before that cut: everything from it on was never synced (a sync is a barrier), and
//! is cut off. Anything else is damage: `open` fails with `OpenError::Corrupt` instead of
//! guessing, and `repair` salvages the rest. (JSON never contains a NUL byte, so a bit flip
//! cannot pass for a zeroed sector.)

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
        usage.live -= u64::from(loc.len);
        usage.dead += u64::from(loc.len);
    }

    /// Applies the record found at `offset` of segment `seg` (same rules as `FileStore`'s
    /// `set` and `delete`, with `oldest` exact: the first segment where the item was seen).
    pub fn apply(&mut self, seg: u32, offset: u64, rec: &RecordRef<'_>) {
        let loc = Loc {
            seg,
            offset,
            len: rec.len as u32,
            value_len: rec.value.len() as u32,
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

/// Whether the bad record at `bytes[at]` of the last segment is a torn write (see module doc).
fn is_torn(bytes: &[u8], at: usize) -> bool {
    let claimed_end = at.saturating_add(record::claimed_len(&bytes[at..]));
    let mut start = at;
    let cut = loop {
        if start >= claimed_end {
            return false;
        }
        if start >= bytes.len() {
            break bytes.len();
        }
        let end = ((start / SECTOR + 1) * SECTOR).min(bytes.len());
        if all_zero(&bytes[start..end]) {
            break start;
        }
        start = end;
    };
    !(at + 1..cut).any(|o| matches!(record::decode(&bytes[o..]), Decoded::Record(_)))
}

/// Replays the records of one segment; returns where they end, or the offset of a bad record
/// that a crash cannot explain.
fn scan(bytes: &[u8], is_last: bool, mut each: impl FnMut(u64, &RecordRef<'_>)) -> Result<usize, usize> {
    let mut offset = 0;
    while offset < bytes.len() {
        match record::decode(&bytes[offset..]) {
            Decoded::Record(rec) => {
                each(offset as u64, &rec);
                offset += rec.len;
            }
            Decoded::End | Decoded::Invalid => {
                let clean_end = if is_last {
                    is_torn(bytes, offset)
                } else {
                    all_zero(&bytes[offset..])
                };
                return if clean_end { Ok(offset) } else { Err(offset) };
            }
        }
    }
    Ok(offset)
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
    for (n, &id) in ids.iter().enumerate() {
        let is_last = n + 1 == ids.len();
        let mut seg =
            Segment::open_existing(dir, id).map_err(OpenError::io(&dir.join(segment::file_name(id))))?;
        let end =
            scan(seg.bytes(), is_last, |offset, rec| replay.apply(id, offset, rec)).map_err(|offset| {
                OpenError::Corrupt {
                    file: seg.path.clone(),
                    offset: offset as u64,
                }
            })?;
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
        let seg = segments.remove(id).expect("listed");
        fs::remove_file(&seg.path).map_err(OpenError::io(&seg.path))?;
    }
    if !empty.is_empty() {
        segment::sync_dir(dir).map_err(OpenError::io(dir))?;
    }

    let active = match active {
        Some(id) => {
            let seg = segments.get_mut(&id).expect("last segment");
            seg.activate(options.segment_size)
                .map_err(OpenError::io(&seg.path))?;
            id
        }
        None => {
            let seg = Segment::create(dir, 1, options.segment_size).map_err(OpenError::io(dir))?;
            segments.insert(1, seg);
            1
        }
    };

    replay.finish(&segments);
    for (id, usage) in &replay.usage {
        segments
            .get_mut(id)
            .expect("records come from known segments")
            .usage = *usage;
    }
    let sync = sync::Shared::new(segments[&active].file.clone());
    Ok(FileStore {
        dir: dir.to_owned(),
        options,
        segments,
        active,
        index: std::mem::take(&mut replay.index),
        next_seq: replay.max_seq + 1,
        sync,
        compaction: None,
        scratch: Vec::new(),
        prefaulter: super::prefault::Prefaulter::start(options.populate),
        spare: None,
        rolls: Default::default(),
        retired: Vec::new(),
        written_at_last_step: 0,
        _lock: lock,
    })
}

#[cfg(test)]
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
