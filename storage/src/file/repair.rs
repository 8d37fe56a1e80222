//! `ringcast repair DIR`: rebuild a store that `open` refuses, keeping every intact record.
//!
//! Every segment is scanned; at a bad record the scan skips ahead to the next offset where an
//! intact record starts (the magic byte, then a matching checksum). The intact records are
//! replayed in log order, and the resulting items (values and list order) are written to fresh
//! segments numbered after the old ones; then the old segments are moved into `damaged-NNNNNN/`
//! inside the directory, for inspection (delete it when satisfied). If repair is interrupted,
//! running it again gives the same result: the fresh segments replay after the old ones and
//! only restate what those already say.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::record::{self, Decoded, RecordRef};
use super::recovery::{all_zero, Replay};
use super::segment::{self, Segment};
use super::{FileOptions, FileStore};

/// What `repair` found and kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    pub segments_scanned: usize,
    /// Intact records found (live or superseded).
    pub records_salvaged: u64,
    /// Runs of damaged bytes skipped.
    pub corrupt_ranges: u64,
    pub corrupt_bytes: u64,
    /// Items in the repaired store.
    pub items_kept: u64,
    /// Where the old segment files went; empty when there were none.
    pub damaged_dir: PathBuf,
}

/// Intact records of one segment, skipping damaged ranges.
fn salvage(bytes: &[u8], report: &mut RepairReport, mut each: impl FnMut(u64, &RecordRef<'_>)) {
    let mut offset = 0;
    while offset < bytes.len() {
        if let Decoded::Record(rec) = record::decode(&bytes[offset..]) {
            each(offset as u64, &rec);
            report.records_salvaged += 1;
            offset += rec.len;
            continue;
        }
        let next = bytes[offset + 1..]
            .iter()
            .enumerate()
            .filter(|&(_, &b)| record::is_magic(b))
            .map(|(n, _)| offset + 1 + n)
            .find(|&o| matches!(record::decode(&bytes[o..]), Decoded::Record(_)))
            .unwrap_or(bytes.len());
        let skipped = &bytes[offset..next];
        if !all_zero(skipped) {
            let garbage = skipped.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
            report.corrupt_ranges += 1;
            report.corrupt_bytes += garbage as u64;
        }
        offset = next;
    }
}

fn other(err: impl std::fmt::Display) -> io::Error {
    io::Error::other(err.to_string())
}

/// Salvages every intact record of the store in `dir` into fresh segments (see module doc).
pub fn repair(dir: &Path) -> io::Result<RepairReport> {
    let _lock = segment::lock_dir(dir)?;
    let ids = segment::list(dir)?;
    let mut report = RepairReport::default();
    let Some(&last_old) = ids.last() else {
        return Ok(report);
    };
    let mut replay = Replay::default();
    let mut old = std::collections::BTreeMap::new();
    for &id in &ids {
        let seg = Segment::open_existing(dir, id)?;
        salvage(seg.bytes(), &mut report, |offset, rec| {
            replay.apply(id, offset, rec)
        });
        report.segments_scanned += 1;
        old.insert(id, seg);
    }
    replay.finish(&old);

    // Build the repaired store beside the old one, then swap the files.
    let staging = dir.join("repair.tmp");
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    let mut fresh = FileStore::open(&staging, FileOptions::default()).map_err(other)?;
    for (stream, group, items) in replay.index.groups() {
        for (item, entry) in items {
            let bytes = &old[&entry.loc.seg].bytes()[entry.loc.value_range()];
            let value = std::str::from_utf8(bytes).map_err(other)?;
            fresh
                .restore(stream, group, item, value, entry.seq)
                .map_err(other)?;
            report.items_kept += 1;
        }
    }
    fresh.sync()?;
    drop(fresh);
    drop(old);

    for id in segment::list(&staging)? {
        let to = segment::file_name(last_old + id);
        fs::rename(staging.join(segment::file_name(id)), dir.join(to))?;
    }
    segment::sync_dir(dir)?;
    let damaged = dir.join(format!("damaged-{last_old:06}"));
    fs::create_dir_all(&damaged)?;
    for &id in &ids {
        let name = segment::file_name(id);
        fs::rename(dir.join(&name), damaged.join(&name))?;
    }
    segment::sync_dir(&damaged)?;
    segment::sync_dir(dir)?;
    fs::remove_dir_all(&staging)?;
    report.damaged_dir = damaged;
    Ok(report)
}
