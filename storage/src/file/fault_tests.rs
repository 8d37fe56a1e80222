//! The file store under crashes and disk faults: torn tails cut at every byte, zero checksums,
//! a failed `fdatasync` (through the fault hook), re-homing order, and recovery on arbitrary
//! bytes.

use std::fs;
use std::path::{Path, PathBuf};

use super::tests::{j, small, snapshot, TempDir};
use super::*;
use crate::memory::MemoryStore;

fn seg_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(segment::file_name(id))
}

enum Op {
    Set(&'static str, &'static str),
    Delete(&'static str),
}

/// Writes `ops` into a fresh one-segment store; returns the segment's bytes (its records only)
/// and the end offset of each op's record.
fn write_ops(dir: &Path, ops: &[Op]) -> (Vec<u8>, Vec<u64>) {
    let mut store = FileStore::open(dir, small(4096)).unwrap();
    let mut ends = Vec::new();
    for op in ops {
        match op {
            Op::Set(item, value) => drop(store.set("s", "g", item, j(value)).unwrap()),
            Op::Delete(item) => drop(store.delete("s", "g", item).unwrap()),
        }
        ends.push(store.segments[&store.active].len);
    }
    let end = *ends.last().unwrap() as usize;
    drop(store);
    (fs::read(seg_path(dir, 1)).unwrap()[..end].to_vec(), ends)
}

/// What a store holds after the first `n` ops.
fn model(ops: &[Op], n: usize) -> Vec<(String, String, Vec<String>)> {
    let mut mem = MemoryStore::new();
    for op in &ops[..n] {
        match op {
            Op::Set(item, value) => drop(mem.set("s", "g", item, j(value)).unwrap()),
            Op::Delete(item) => drop(mem.delete("s", "g", item).unwrap()),
        }
    }
    snapshot(&mem)
}

#[test]
fn every_cut_of_a_segment_recovers_exactly_the_records_written_before_it() {
    let src = TempDir::new("cut-src");
    let ops = [
        Op::Set("a", "1"),
        Op::Set("b", "\"two\""),
        Op::Set("a", "{\"x\":[1,2]}"),
        Op::Delete("b"),
        Op::Set("c", "\"a longer value that spans a few more bytes\""),
    ];
    let (bytes, ends) = write_ops(&src.0, &ops);
    for cut in 0..=bytes.len() {
        let whole = ends.iter().filter(|&&end| end as usize <= cut).count();
        let expected = model(&ops, whole);
        let on_boundary = cut == 0 || ends.contains(&(cut as u64));
        // As a crash leaves it: the file ends at the cut, or the rest of it reads as zeros.
        for zero_tail in [false, true] {
            let copy = TempDir::new("cut");
            fs::create_dir_all(&copy.0).unwrap();
            let mut content = bytes[..cut].to_vec();
            if zero_tail {
                content.resize(4096, 0);
            }
            fs::write(seg_path(&copy.0, 1), &content).unwrap();
            let store = FileStore::open(&copy.0, small(4096))
                .unwrap_or_else(|e| panic!("cut at {cut} (zero tail: {zero_tail}): {e}"));
            assert_eq!(snapshot(&store), expected, "cut at {cut} (zero tail: {zero_tail})");
            assert_eq!(store.torn_tail().is_some(), !on_boundary, "cut at {cut} (zero tail: {zero_tail})");
            let direct = recover_segment_bytes(&content).unwrap();
            assert_eq!((direct.end, direct.records), (store.segments[&1].len as usize, whole));
        }
    }
}

/// Three records a, b, c; returns the directory's segment path and each record's offset.
fn three_records(dir: &Path) -> (PathBuf, Vec<u64>) {
    let mut store = FileStore::open(dir, small(4096)).unwrap();
    let mut starts = Vec::new();
    for (item, value) in [("a", "1"), ("b", "2"), ("c", "3")] {
        starts.push(store.segments[&store.active].len);
        store.set("s", "g", item, j(value)).unwrap();
    }
    (seg_path(dir, 1), starts)
}

fn zero_crc(path: &Path, record_start: u64) {
    let mut bytes = fs::read(path).unwrap();
    let at = record_start as usize;
    bytes[at + record::CRC_RANGE.start..at + record::CRC_RANGE.end].fill(0);
    fs::write(path, bytes).unwrap();
}

#[test]
fn a_zero_checksum_on_the_last_record_is_a_torn_write() {
    let dir = TempDir::new("zero-crc-tail");
    let (path, starts) = three_records(&dir.0);
    zero_crc(&path, starts[2]);
    let mut store = FileStore::open(&dir.0, small(4096)).unwrap();
    assert_eq!(store.list("s", "g"), [j("1"), j("2")]);
    let torn = store.torn_tail().cloned().unwrap();
    assert_eq!((torn.file, torn.offset), (path, starts[2]));
    // The cut-off bytes are gone for good: a new write takes their place and survives.
    store.set("s", "g", "d", j("4")).unwrap();
    drop(store);
    let store = FileStore::open(&dir.0, small(4096)).unwrap();
    assert_eq!(store.list("s", "g"), [j("1"), j("2"), j("4")]);
    assert_eq!(store.torn_tail(), None);
}

#[test]
fn a_zero_checksum_with_an_intact_record_after_it_is_corruption() {
    let dir = TempDir::new("zero-crc-mid");
    let (path, starts) = three_records(&dir.0);
    zero_crc(&path, starts[1]);
    let err = FileStore::open(&dir.0, small(4096)).unwrap_err();
    let OpenError::Corrupt { file, offset } = err else { panic!("{err}") };
    assert_eq!((file, offset), (path, starts[1]));
}

#[test]
fn a_failed_fdatasync_stops_the_store_for_good() {
    let dir = TempDir::new("sync-fail");
    let mut store = FileStore::open(&dir.0, small(4096)).unwrap();
    let handle = store.flush_handle();
    store.set("s", "g", "a", j("1")).unwrap();
    handle.sync().unwrap();
    store.inject_sync_failure_after(0);
    store.set("s", "g", "b", j("2")).unwrap();
    let err = handle.sync().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // The disk works again, but the pages it failed to write may be gone: a later sync must not
    // report them durable.
    store.inject_sync_failure_after(u64::MAX);
    assert!(handle.sync().is_err(), "a sync after a failed one succeeded");
    assert!(store.sync().is_err());
    assert!(!store.sync.is_synced(), "the durable mark moved past the failed write");
    // Fail-stop: no more writes or reads.
    let err = store.set("s", "g", "c", j("3")).unwrap_err();
    assert!(matches!(&err, StoreError::Failed { .. }) && err.to_string().contains("restart"), "{err}");
    assert!(store.delete("s", "g", "a").is_err());
    assert!(store.health().is_err());
    assert!(store.failure().unwrap().contains("fdatasync"));
    // One report for the operator's log, whoever asks first.
    assert!(handle.failure_to_report().is_some());
    assert_eq!(handle.failure_to_report(), None);
}

#[test]
fn a_failed_sync_at_a_segment_roll_stops_the_store() {
    let dir = TempDir::new("roll-fail");
    let mut store = FileStore::open(&dir.0, small(512)).unwrap();
    store.inject_sync_failure_after(0);
    let value = format!("\"{}\"", "x".repeat(100));
    let failed = (0..10).map(|n| store.set("s", "g", &n.to_string(), j(&value))).find_map(Result::err);
    assert!(failed.is_some(), "a roll happened and its sync failed");
    assert!(store.failure().is_some());
    store.inject_sync_failure_after(u64::MAX);
    assert!(store.set("s", "g", "later", j("1")).is_err());
    assert!(store.flush_handle().sync().is_err());
}

fn owner(_: &str, group: &str) -> usize {
    usize::from(group != "stays")
}

#[test]
fn rehoming_deletes_at_the_source_only_after_the_copies_are_durable() {
    let dirs = [TempDir::new("rehome-0"), TempDir::new("rehome-1")];
    let open = || -> Vec<FileStore> { dirs.iter().map(|d| FileStore::open(&d.0, small(4096)).unwrap()).collect() };
    let mut stores = open();
    for (group, item, value) in [("moves", "a", "1"), ("stays", "b", "2"), ("moves", "c", "3"), ("other", "d", "4")] {
        stores[0].set("s", group, item, j(value)).unwrap();
    }
    stores[0].sync().unwrap();
    let before = snapshot(&stores[0]);
    let written = stores[0].sync.written();

    // The copies' sync fails: nothing may be deleted at the source.
    stores[1].inject_sync_failure_after(0);
    assert!(rehome(&mut stores, owner).is_err());
    assert_eq!(stores[0].sync.written(), written, "the source wrote delete records before the copies were durable");
    drop(stores);
    let mut stores = open();
    assert_eq!(snapshot(&stores[0]), before, "items lost at the source");

    // Without a fault every item ends at its owner, in order, and stays there.
    assert_eq!(rehome(&mut stores, owner).unwrap(), 3);
    drop(stores);
    let stores = open();
    assert_eq!(stores[0].list_groups("s"), ["stays"]);
    assert_eq!(stores[1].list("s", "moves"), [j("1"), j("3")]);
    assert_eq!(stores[1].list("s", "other"), [j("4")]);
}

#[test]
fn recovery_of_damaged_bytes_never_panics() {
    let src = TempDir::new("fuzz-src");
    let (bytes, _) = write_ops(&src.0, &[Op::Set("a", "1"), Op::Set("b", "\"xy\""), Op::Delete("a"), Op::Set("c", "[]")]);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for at in 0..bytes.len() {
        for value in [0, 0xff, record::MAGIC, record::MAGIC_V1, 1, 2, next() as u8] {
            let mut damaged = bytes.clone();
            damaged[at] = value;
            let _ = recover_segment_bytes(&damaged);
            let _ = recover_segment_bytes(&damaged[..at]);
        }
    }
    for _ in 0..2000 {
        let len = (next() % 200) as usize;
        let mut random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if let Some(first) = random.first_mut() {
            *first = record::MAGIC;
        }
        let _ = recover_segment_bytes(&random);
    }
}
