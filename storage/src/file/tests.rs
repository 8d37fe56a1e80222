//! Behaviour of the file store as a whole: semantics against `MemoryStore`, recovery, repair,
//! compaction, durability handle, errors.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::memory::MemoryStore;

/// A directory removed when dropped.
pub(super) struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ringcast-file-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(super) fn small(segment_size: u64) -> FileOptions {
    FileOptions {
        segment_size,
        ..FileOptions::default()
    }
}

pub(super) fn j(s: &str) -> Json {
    Json::from(s)
}

/// Everything a store shows: every stream, group and list, in order.
pub(super) fn snapshot(store: &impl KvStore) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for (stream, groups) in store.list_streams() {
        assert_eq!(store.list_groups(&stream), groups);
        for group in groups {
            let values: Vec<String> = store
                .list(&stream, &group)
                .iter()
                .map(|v| v.to_string())
                .collect();
            assert!(!values.is_empty(), "listed group {stream}/{group} is empty");
            out.push((stream.clone(), group, values));
        }
    }
    out
}

/// Every byte of every segment is either live or dead.
pub(super) fn check_accounting(store: &FileStore) {
    for seg in store.segments.values() {
        assert_eq!(seg.usage.live + seg.usage.dead, seg.len, "segment {}", seg.id);
    }
}

fn seg_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(segment::file_name(id))
}

/// Offsets (in the active segment) of the records written by `f`.
fn span_of(store: &mut FileStore, f: impl FnOnce(&mut FileStore)) -> (u32, u64, u64) {
    let before = store.segments[&store.active].len;
    f(store);
    (store.active, before, store.segments[&store.active].len)
}

#[test]
fn same_results_as_the_memory_store() {
    let dir = TempDir::new("semantics");
    let mut file = FileStore::open(&dir.0, small(512)).unwrap();
    let mut mem = MemoryStore::new();
    enum Op {
        Set(&'static str, &'static str, &'static str, &'static str),
        Del(&'static str, &'static str, &'static str),
    }
    use Op::*;
    let ops = [
        Set("s", "g", "c", "1"),
        Set("s", "g", "a", "2"),
        Set("s", "g", "b", "3"),
        Set("s", "g", "c", "9"),
        Del("s", "g", "a"),
        Set("s", "g", "a", "4"),
        Set("s", "g", "i", "null"),
        Set("s", "g", "i", "5"),
        Set("a:b", "c", "i", "6"),
        Set("a", "b:c", "i", "7"),
        Set("", "", "", "true"),
        Set("ünï", "cødé", "*", "[1]"),
        Del("s", "g", "missing"),
        Del("s", "missing", "i"),
        Del("missing", "g", "i"),
        Set("zeta", "b", "i", "8"),
        Set("zeta", "a", "i", "8"),
        Del("zeta", "b", "i"),
        Del("a:b", "c", "i"),
        Del("s", "g", "c"),
        Del("s", "g", "b"),
        Del("s", "g", "a"),
        Del("s", "g", "i"),
    ];
    for op in ops {
        match op {
            Set(s, g, i, v) => assert_eq!(file.set(s, g, i, j(v)).unwrap(), mem.set(s, g, i, j(v)).unwrap()),
            Del(s, g, i) => assert_eq!(file.delete(s, g, i).unwrap(), mem.delete(s, g, i).unwrap()),
        }
        assert_eq!(snapshot(&file), snapshot(&mem));
        for (s, g, i) in [("s", "g", "a"), ("s", "g", "i"), ("a", "b:c", "i"), ("", "", "")] {
            assert_eq!(file.get(s, g, i), mem.get(s, g, i));
        }
        check_accounting(&file);
    }
    assert_eq!(file.list_groups("s"), Vec::<String>::new());
    drop(file);
    let file = FileStore::open(&dir.0, small(512)).unwrap();
    assert_eq!(snapshot(&file), snapshot(&mem));
}

#[test]
fn reopen_recovers_items_and_their_order() {
    let dir = TempDir::new("reopen");
    let mut mem = MemoryStore::new();
    {
        let mut file = FileStore::open(&dir.0, small(300)).unwrap();
        for n in 0..200u32 {
            let (s, g, i) = (
                format!("s{}", n % 3),
                format!("g{}", n % 5),
                format!("i{}", n % 17),
            );
            let v = j(&format!("\"{i}-{n}\""));
            if n % 7 == 3 {
                file.delete(&s, &g, &i).unwrap();
                mem.delete(&s, &g, &i).unwrap();
            } else {
                file.set(&s, &g, &i, v.clone()).unwrap();
                mem.set(&s, &g, &i, v).unwrap();
            }
        }
        assert!(file.stats().segments > 5);
        assert_eq!(snapshot(&file), snapshot(&mem));
    }
    let mut file = FileStore::open(&dir.0, small(300)).unwrap();
    assert_eq!(snapshot(&file), snapshot(&mem));
    check_accounting(&file);
    // New items after a reopen still go to the end of their groups.
    file.set("s0", "g0", "new", j("\"new\"")).unwrap();
    mem.set("s0", "g0", "new", j("\"new\"")).unwrap();
    drop(file);
    let file = FileStore::open(&dir.0, FileOptions::default()).unwrap();
    assert_eq!(snapshot(&file), snapshot(&mem));
}

#[test]
fn a_torn_last_record_is_cut_off_at_every_byte() {
    let dir = TempDir::new("torn-src");
    let mut store = FileStore::open(&dir.0, small(4096)).unwrap();
    store.set("s", "g", "a", j("\"first\"")).unwrap();
    store.set("s", "g", "b", j("\"second\"")).unwrap();
    let (_, start, end) = span_of(&mut store, |s| {
        s.set("s", "g", "a", j("\"overwritten, then torn\"")).unwrap();
    });
    drop(store);
    let bytes = fs::read(seg_path(&dir.0, 1)).unwrap();
    for cut in start..end {
        let copy = TempDir::new("torn");
        fs::create_dir_all(&copy.0).unwrap();
        fs::write(seg_path(&copy.0, 1), &bytes[..cut as usize]).unwrap();
        let mut store = FileStore::open(&copy.0, small(4096)).unwrap();
        assert_eq!(
            store.list("s", "g"),
            [j("\"first\""), j("\"second\"")],
            "cut at {cut}"
        );
        assert_eq!(store.segments[&1].len, start);
        // What is written next survives the next start, and the torn bytes stay gone.
        store.set("s", "g", "c", j("1")).unwrap();
        drop(store);
        let store = FileStore::open(&copy.0, small(4096)).unwrap();
        assert_eq!(
            store.list("s", "g"),
            [j("\"first\""), j("\"second\""), j("1")],
            "cut at {cut}"
        );
    }
}

#[test]
fn a_lost_sector_in_the_last_record_is_a_torn_write() {
    let dir = TempDir::new("sector");
    let mut store = FileStore::open(&dir.0, small(8192)).unwrap();
    store.set("s", "g", "a", j("1")).unwrap();
    let big = format!("\"{}\"", "x".repeat(3000));
    let (_, start, _) = span_of(&mut store, |s| {
        s.set("s", "g", "b", j(&big)).unwrap();
    });
    drop(store);
    let path = seg_path(&dir.0, 1);
    let mut bytes = fs::read(&path).unwrap();
    bytes[2048..2560].fill(0);
    fs::write(&path, &bytes).unwrap();
    let store = FileStore::open(&dir.0, small(8192)).unwrap();
    assert_eq!(store.list("s", "g"), [j("1")]);
    assert_eq!(store.segments[&1].len, start);
}

/// Writes items a..f into a one-segment store; returns the offset and length of "c"'s record.
fn six_items(dir: &Path) -> (u64, u64) {
    let mut store = FileStore::open(dir, small(4096)).unwrap();
    let mut victim = (0, 0);
    for (n, item) in ["a", "b", "c", "d", "e", "f"].into_iter().enumerate() {
        let (_, start, end) = span_of(&mut store, |s| {
            s.set("s", "g", item, j(&n.to_string())).unwrap();
        });
        if item == "c" {
            victim = (start, end - start);
        }
    }
    victim
}

fn flip_bit(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x04;
    fs::write(path, bytes).unwrap();
}

#[test]
fn a_flipped_bit_in_a_middle_record_fails_open_with_a_repair_hint() {
    let dir = TempDir::new("flip");
    let (start, len) = six_items(&dir.0);
    let path = seg_path(&dir.0, 1);
    flip_bit(&path, start + len - 1);
    let err = FileStore::open(&dir.0, small(4096)).unwrap_err();
    let OpenError::Corrupt { file, offset } = &err else {
        panic!("{err}")
    };
    assert_eq!((file, *offset), (&path, start));
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains(&format!("offset {start}")), "{text}");
    assert!(
        text.contains(&format!("ringcast repair {}", dir.0.display())),
        "{text}"
    );
}

#[test]
fn a_flipped_bit_in_a_sealed_segment_fails_open() {
    let dir = TempDir::new("flip-sealed");
    {
        let mut store = FileStore::open(&dir.0, small(256)).unwrap();
        for n in 0..20 {
            store
                .set("s", "g", &format!("i{n}"), j(&format!("\"{n:020}\"")))
                .unwrap();
        }
        assert!(store.stats().segments > 2);
    }
    // The last record of the first segment: damage, not a torn write, since more segments follow.
    let path = seg_path(&dir.0, 1);
    let len = fs::metadata(&path).unwrap().len();
    flip_bit(&path, len - 2);
    let err = FileStore::open(&dir.0, small(256)).unwrap_err();
    assert!(
        matches!(&err, OpenError::Corrupt { file, .. } if *file == path),
        "{err}"
    );
}

#[test]
fn repair_salvages_every_intact_record() {
    let dir = TempDir::new("repair");
    let (start, len) = six_items(&dir.0);
    {
        // More segments, an overwrite and a delete after the damage.
        let mut store = FileStore::open(&dir.0, small(4096)).unwrap();
        store.set("s", "g", "b", j("\"b2\"")).unwrap();
        store.delete("s", "g", "e").unwrap();
        store
            .set("t", "g", "x", j(&format!("\"{}\"", "y".repeat(5000))))
            .unwrap();
    }
    flip_bit(&seg_path(&dir.0, 1), start + len / 2);
    assert!(matches!(
        FileStore::open(&dir.0, small(4096)),
        Err(OpenError::Corrupt { .. })
    ));
    let report = repair(&dir.0).unwrap();
    assert_eq!(report.corrupt_ranges, 1);
    assert!(
        report.corrupt_bytes > 0 && report.corrupt_bytes <= len,
        "{report:?}"
    );
    assert_eq!(report.records_salvaged, 8);
    assert_eq!(report.items_kept, 5);
    assert!(report.damaged_dir.join(segment::file_name(1)).exists());
    let store = FileStore::open(&dir.0, small(4096)).unwrap();
    assert_eq!(store.list("s", "g"), [j("0"), j("\"b2\""), j("3"), j("5")]);
    assert_eq!(store.get("s", "g", "c"), None);
    assert_eq!(store.list("t", "g").len(), 1);
    drop(store);
    // Repairing a healthy store changes nothing visible.
    let before = snapshot(&FileStore::open(&dir.0, small(4096)).unwrap());
    let report = repair(&dir.0).unwrap();
    assert_eq!(report.corrupt_ranges, 0);
    assert_eq!(snapshot(&FileStore::open(&dir.0, small(4096)).unwrap()), before);
}

fn compact_fully(store: &mut FileStore) -> usize {
    let mut reclaimed = 0;
    for _ in 0..100_000 {
        match store.compact_step(200) {
            CompactProgress::Idle => return reclaimed,
            CompactProgress::Reclaimed { segments, .. } => reclaimed += segments,
            CompactProgress::InProgress { scanned, .. } => assert!(scanned > 0),
            CompactProgress::Retired { .. } | CompactProgress::Waiting { .. } => {}
            CompactProgress::Failed(err) => panic!("{err}"),
        }
    }
    panic!("compaction never finished");
}

#[test]
fn compaction_reclaims_disk_and_keeps_every_live_item() {
    let dir = TempDir::new("compact");
    let mut mem = MemoryStore::new();
    let mut store = FileStore::open(
        &dir.0,
        FileOptions {
            segment_size: 1024,
            compaction_threshold: 0.5,
            ..FileOptions::default()
        },
    )
    .unwrap();
    // Long-lived items in the first segments, then heavy churn on a few keys.
    for n in 0..10 {
        let v = j(&format!("\"keep-{n}\""));
        store.set("s", "keep", &format!("k{n}"), v.clone()).unwrap();
        mem.set("s", "keep", &format!("k{n}"), v).unwrap();
    }
    for round in 0..300 {
        let item = format!("hot{}", round % 4);
        let v = j(&format!("\"{item}-{round:05}\""));
        store.set("s", "hot", &item, v.clone()).unwrap();
        mem.set("s", "hot", &item, v).unwrap();
        if round % 9 == 0 {
            store.delete("s", "hot", &item).unwrap();
            mem.delete("s", "hot", &item).unwrap();
        }
    }
    let before = store.stats();
    assert!(before.dead_bytes > before.live_bytes * 3, "{before:?}");
    let reclaimed = compact_fully(&mut store);
    let after = store.stats();
    assert!(reclaimed > 5, "{reclaimed} segments reclaimed");
    assert!(
        after.disk_bytes < before.disk_bytes / 2,
        "{before:?} -> {after:?}"
    );
    assert!(after.segments < before.segments);
    // The files really went.
    assert_eq!(segment::list(&dir.0).unwrap().len(), after.segments);
    assert_eq!(snapshot(&store), snapshot(&mem));
    check_accounting(&store);
    drop(store);
    let store = FileStore::open(
        &dir.0,
        FileOptions {
            segment_size: 1024,
            compaction_threshold: 0.5,
            ..FileOptions::default()
        },
    )
    .unwrap();
    assert_eq!(snapshot(&store), snapshot(&mem));
}

#[test]
fn deleted_items_stay_deleted_when_their_tombstone_is_compacted() {
    let dir = TempDir::new("tomb");
    let opts = FileOptions {
        segment_size: 512,
        compaction_threshold: 0.3,
        ..FileOptions::default()
    };
    let mut store = FileStore::open(&dir.0, opts).unwrap();
    // Segment 1: the item to delete beside items that stay live, so segment 1 is never compacted.
    store.set("s", "g", "gone", j("\"old\"")).unwrap();
    for n in 0..8 {
        store
            .set("s", "g", &format!("live{n}"), j(&format!("\"{n:030}\"")))
            .unwrap();
    }
    assert!(store.active > 1);
    // The delete lands beside garbage that makes its segment a compaction victim.
    store.delete("s", "g", "gone").unwrap();
    assert_eq!(store.index.tomb_count(), 1);
    for n in 0..40 {
        store.set("t", "g", "churn", j(&format!("\"{n:040}\""))).unwrap();
    }
    compact_fully(&mut store);
    assert_eq!(store.index.tomb_count(), 1, "segment 1 still holds the old set");
    assert!(store.segments.contains_key(&1));
    drop(store);
    let mut store = FileStore::open(&dir.0, opts).unwrap();
    assert_eq!(store.get("s", "g", "gone"), None);
    // Once segment 1 is compacted, the tombstone is no longer needed.
    for n in 0..8 {
        store.delete("s", "g", &format!("live{n}")).unwrap();
    }
    for n in 0..40 {
        store.set("t", "g", "churn", j(&format!("\"{n:040}\""))).unwrap();
    }
    compact_fully(&mut store);
    assert!(!store.segments.contains_key(&1));
    assert_eq!(store.index.tomb_count(), 0);
    drop(store);
    let store = FileStore::open(&dir.0, opts).unwrap();
    assert_eq!(store.get("s", "g", "gone"), None);
    assert!(store.list_groups("s").is_empty());
}

#[test]
fn compaction_interleaves_with_writes() {
    let dir = TempDir::new("interleave");
    let opts = FileOptions {
        segment_size: 512,
        compaction_threshold: 0.0,
        ..FileOptions::default()
    };
    let mut store = FileStore::open(&dir.0, opts).unwrap();
    let mut mem = MemoryStore::new();
    for n in 0..400u32 {
        let (g, i) = (format!("g{}", n % 3), format!("i{}", n % 11));
        let v = j(&format!("\"{i}:{n}\""));
        if n % 5 == 0 {
            assert_eq!(
                store.delete("s", &g, &i).unwrap(),
                mem.delete("s", &g, &i).unwrap()
            );
        } else {
            assert_eq!(
                store.set("s", &g, &i, v.clone()).unwrap(),
                mem.set("s", &g, &i, v).unwrap()
            );
        }
        assert!(!matches!(store.compact_step(64), CompactProgress::Failed(_)));
        check_accounting(&store);
    }
    assert_eq!(snapshot(&store), snapshot(&mem));
    drop(store);
    assert_eq!(snapshot(&FileStore::open(&dir.0, opts).unwrap()), snapshot(&mem));
}

#[test]
fn flush_handle_syncs_from_another_thread() {
    let dir = TempDir::new("flush");
    let mut store = FileStore::open(&dir.0, small(256)).unwrap();
    let handle = store.flush_handle();
    for n in 0..20 {
        store
            .set("s", "g", &format!("i{n}"), j("\"some value\""))
            .unwrap();
        let h = handle.clone();
        std::thread::spawn(move || h.sync()).join().unwrap().unwrap();
    }
    assert_eq!(store.sync.synced.load(Ordering::Relaxed), 20);
    // Nothing new: returns without syncing again.
    handle.sync().unwrap();
    store.sync().unwrap();
}

#[test]
fn names_too_long_for_the_format_are_refused() {
    let dir = TempDir::new("long");
    let mut store = FileStore::open(&dir.0, FileOptions::default()).unwrap();
    let long = "x".repeat(70_000);
    let err = store.set("s", "g", &long, j("1")).unwrap_err();
    assert!(matches!(&err, StoreError::TooLarge(_)) && err.to_string().contains("item id"), "{err}");
    assert!(store.set(&long, "g", "i", j("1")).is_err());
    assert_eq!(store.stats().live_bytes, 0);
    store.set("s", "g", "i", j("1")).unwrap();
    assert_eq!(store.get("s", "g", "i"), Some(j("1")));
}

#[test]
fn an_io_error_is_reported_and_the_store_stays_readable() {
    let dir = TempDir::new("ioerr");
    let mut store = FileStore::open(&dir.0, small(256)).unwrap();
    store.set("s", "g", "a", j("\"kept\"")).unwrap();
    // Something squats on the next segment's name, so the roll fails.
    fs::create_dir(seg_path(&dir.0, 2)).unwrap();
    let big = j(&format!("\"{}\"", "z".repeat(300)));
    let err = store.set("s", "g", "b", big.clone()).unwrap_err();
    assert!(
        matches!(&err, StoreError::Io { .. })
            && err.to_string().contains(&dir.0.display().to_string())
            && err.to_string().contains("exists"),
        "{err}"
    );
    assert_eq!(store.get("s", "g", "a"), Some(j("\"kept\"")));
    assert_eq!(store.list("s", "g"), [j("\"kept\"")]);
    assert_eq!(store.get("s", "g", "b"), None);
    check_accounting(&store);
    // Small writes still fit the current segment.
    store.set("s", "g", "c", j("1")).unwrap();
    fs::remove_dir(seg_path(&dir.0, 2)).unwrap();
    store.set("s", "g", "b", big.clone()).unwrap();
    drop(store);
    let store = FileStore::open(&dir.0, small(256)).unwrap();
    assert_eq!(store.list("s", "g"), [j("\"kept\""), j("1"), big]);
}

#[test]
fn an_allocation_failure_at_open_is_an_error() {
    let dir = TempDir::new("enospc");
    let err = FileStore::open(&dir.0, small(1 << 62)).unwrap_err();
    assert!(matches!(err, OpenError::Io { .. }), "{err}");
}

#[test]
fn a_value_larger_than_a_segment_gets_its_own() {
    let dir = TempDir::new("big");
    let mut store = FileStore::open(&dir.0, small(1024)).unwrap();
    store.set("s", "g", "small", j("1")).unwrap();
    let big = j(&format!("\"{}\"", "b".repeat(5000)));
    store.set("s", "g", "big", big.clone()).unwrap();
    store.set("s", "g", "after", j("2")).unwrap();
    assert_eq!(store.get("s", "g", "big"), Some(big.clone()));
    let sizes: Vec<u64> = store.segments.values().map(|s| s.capacity).collect();
    assert!(sizes.iter().any(|&c| c > 5000), "{sizes:?}");
    drop(store);
    let store = FileStore::open(&dir.0, small(1024)).unwrap();
    assert_eq!(store.list("s", "g"), [j("1"), big, j("2")]);
}

#[test]
fn an_empty_active_segment_is_replaced_not_kept() {
    let dir = TempDir::new("empty-active");
    let mut store = FileStore::open(&dir.0, small(64)).unwrap();
    store
        .set("s", "g", "big", j(&format!("\"{}\"", "b".repeat(100))))
        .unwrap();
    assert_eq!(segment::list(&dir.0).unwrap(), [2]);
    drop(store);
    assert_eq!(
        FileStore::open(&dir.0, small(64)).unwrap().list("s", "g").len(),
        1
    );
}

#[test]
fn foreign_items_lists_other_groups_in_list_order_and_changes_nothing() {
    let dir = TempDir::new("drain");
    let mut store = FileStore::open(&dir.0, small(512)).unwrap();
    for (s, g, i, v) in [
        ("a", "g", "1", "1"),
        ("b", "g", "2", "2"),
        ("b", "g", "1", "3"),
        ("b", "h", "x", "4"),
        ("a", "h", "y", "5"),
    ] {
        store.set(s, g, i, j(v)).unwrap();
    }
    let before = snapshot(&store);
    let moved = store.foreign_items(|stream, _| stream == "a");
    let moved: Vec<(&str, &str, &str, &str)> = moved
        .iter()
        .map(|(s, g, i, v)| (s.as_str(), g.as_str(), i.as_str(), &**v))
        .collect();
    assert_eq!(
        moved,
        [("b", "g", "2", "2"), ("b", "g", "1", "3"), ("b", "h", "x", "4")]
    );
    assert_eq!(snapshot(&store), before);
    assert!(store.foreign_items(|_, _| true).is_empty());
}

#[test]
fn any_options_open_an_existing_directory() {
    let dir = TempDir::new("options");
    let mut mem = MemoryStore::new();
    for (n, size) in [300u64, 64 << 20, 100, 4096].into_iter().enumerate() {
        let mut store = FileStore::open(&dir.0, small(size)).unwrap();
        assert_eq!(snapshot(&store), snapshot(&mem));
        for k in 0..30 {
            let v = j(&format!("\"{n}-{k}\""));
            store
                .set("s", &format!("g{}", k % 4), &format!("i{}", k % 7), v.clone())
                .unwrap();
            mem.set("s", &format!("g{}", k % 4), &format!("i{}", k % 7), v)
                .unwrap();
        }
    }
    assert_eq!(
        snapshot(&FileStore::open(&dir.0, FileOptions::default()).unwrap()),
        snapshot(&mem)
    );
}

#[test]
fn stats_count_segments_and_disk() {
    let dir = TempDir::new("stats");
    let mut store = FileStore::open(&dir.0, small(4096)).unwrap();
    assert_eq!(
        store.stats(),
        StoreStats {
            live_bytes: 0,
            dead_bytes: 0,
            segments: 1,
            disk_bytes: 4096,
            ..StoreStats::default()
        }
    );
    store.set("s", "g", "i", j("1")).unwrap();
    let one = store.stats().live_bytes;
    assert!(one > 0);
    store.set("s", "g", "i", j("2")).unwrap();
    assert_eq!(store.stats().live_bytes, one);
    assert_eq!(store.stats().dead_bytes, one);
    let on_disk = fs::metadata(seg_path(&dir.0, 1)).unwrap().len();
    assert_eq!(store.stats().disk_bytes, on_disk);
    // The whole segment is allocated up front, so writes through the map cannot hit ENOSPC.
    let file = OpenOptions::new().read(true).open(seg_path(&dir.0, 1)).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(file.metadata().unwrap().blocks() * 512 >= 4096);
}

#[test]
fn a_directory_is_opened_by_one_store_at_a_time() {
    let dir = TempDir::new("lock");
    let store = FileStore::open(&dir.0, FileOptions::default()).unwrap();
    let err = FileStore::open(&dir.0, FileOptions::default()).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    assert!(repair(&dir.0).is_err());
    drop(store);
    FileStore::open(&dir.0, FileOptions::default()).unwrap();
}

/// Overwrites one item until the store has rolled to segment `id`.
fn churn_until_active(store: &mut FileStore, id: u32) {
    let mut n = 0;
    while store.active < id {
        n += 1;
        store.set("s", "churn", "x", j(&format!("\"{n:060}\""))).unwrap();
    }
}

/// Runs compaction steps until one returns something other than `InProgress`.
fn compact_until_settled(store: &mut FileStore) -> CompactProgress {
    loop {
        match store.compact_step(1 << 20) {
            CompactProgress::InProgress { .. } => {}
            other => return other,
        }
    }
}

#[test]
fn a_retired_segment_waits_for_the_next_roll_while_writes_go_on() {
    let dir = TempDir::new("retired");
    let mut store = FileStore::open(&dir.0, small(1024)).unwrap();
    churn_until_active(&mut store, 4);
    // Segments 1 and 2 are dead; segment 3, the newest sealed one, waits for a roll. A write
    // before each step keeps the writer busy, and nothing is synced.
    let mut retired = Vec::new();
    for n in 0..2 {
        store.set("s", "other", "y", j(&n.to_string())).unwrap();
        match compact_until_settled(&mut store) {
            CompactProgress::Retired { segment } => retired.push(segment),
            other => panic!("{other:?}"),
        }
    }
    retired.sort_unstable();
    assert_eq!(retired, [1, 2]);
    store.set("s", "other", "y", j("2")).unwrap();
    let progress = store.compact_step(1 << 20);
    assert!(matches!(progress, CompactProgress::Waiting { retired: 2 }), "{progress:?}");
    for id in &retired {
        assert!(seg_path(&dir.0, *id).exists(), "segment {id} must stay until the log is synced");
    }
    // The roll syncs the log, and the retired segments go with it.
    churn_until_active(&mut store, 5);
    for id in &retired {
        assert!(!store.segments.contains_key(id));
        assert!(!seg_path(&dir.0, *id).exists(), "segment {id} is still there after the roll");
    }
    check_accounting(&store);
}

#[test]
fn an_idle_writer_lets_compaction_remove_a_retired_segment_at_once() {
    let dir = TempDir::new("retired-idle");
    let mut store = FileStore::open(&dir.0, small(1024)).unwrap();
    churn_until_active(&mut store, 4);
    assert!(matches!(compact_until_settled(&mut store), CompactProgress::Retired { segment: 1 }));
    // Nothing was written since the previous step: the step syncs and removes it itself.
    assert!(matches!(store.compact_step(1 << 20), CompactProgress::Reclaimed { segments: 1, .. }));
    assert!(!seg_path(&dir.0, 1).exists());
    check_accounting(&store);
}

#[test]
fn a_reclaimed_segment_file_is_reused_zeroed_for_a_later_segment() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("spare");
    let opts = small(4096);
    let mut store = FileStore::open(&dir.0, opts).unwrap();
    churn_until_active(&mut store, 3);
    assert!(matches!(compact_until_settled(&mut store), CompactProgress::Retired { segment: 1 }));
    assert!(matches!(store.compact_step(1 << 20), CompactProgress::Reclaimed { segments: 1, .. }));
    let spare_path = dir.0.join(spare::FILE_NAME);
    let inode = fs::metadata(&spare_path).expect("the reclaimed file is kept as the spare").ino();
    store.prefaulter.wait_for_jobs();
    assert!(store.spare.as_ref().is_some_and(|s| s.is_ready()));
    let mut mem = MemoryStore::new();
    for n in 0..10 {
        let v = j(&format!("\"{n}\""));
        store.set("s", "kept", &format!("k{n}"), v.clone()).unwrap();
        mem.set("s", "kept", &format!("k{n}"), v).unwrap();
    }
    churn_until_active(&mut store, 4);
    let reused = seg_path(&dir.0, 4);
    assert_eq!(fs::metadata(&reused).unwrap().ino(), inode, "segment 4 is the recycled file");
    let stats = store.stats();
    assert_eq!((stats.rolls.count, stats.rolls.on_spare), (3, 1));
    assert!(!spare_path.exists());
    // Only this segment's own records are in it: zeros after them.
    let seg = &store.segments[&4];
    assert_eq!(seg.capacity, 4096);
    assert!(recovery::all_zero(&seg.bytes()[seg.len as usize..]));
    mem.set("s", "churn", "x", store.get("s", "churn", "x").unwrap()).unwrap();
    assert_eq!(snapshot(&store), snapshot(&mem));
    drop(store);
    let store = FileStore::open(&dir.0, opts).unwrap();
    assert_eq!(snapshot(&store), snapshot(&mem));
    check_accounting(&store);
}

#[test]
fn a_spare_left_by_a_crash_is_removed_at_open() {
    let dir = TempDir::new("spare-leftover");
    drop(FileStore::open(&dir.0, small(4096)).unwrap());
    // As if a crash came while the helper was still zeroing old records.
    let leftover = record::encode(Kind::Set, 1, "s", "g", "i", "\"stale\"").unwrap();
    fs::write(dir.0.join(spare::FILE_NAME), leftover).unwrap();
    let store = FileStore::open(&dir.0, small(4096)).unwrap();
    assert!(!dir.0.join(spare::FILE_NAME).exists());
    assert_eq!(store.get("s", "g", "i"), None);
}

#[test]
fn records_far_behind_the_cursor_survive_writeback_and_reopen() {
    let dir = TempDir::new("write-behind");
    let opts = small(32 << 20);
    let mut store = FileStore::open(&dir.0, opts).unwrap();
    let value = |n: usize| j(&format!("\"{n:04096}\""));
    // About 24 MiB: the helper unmaps and writes back everything more than a few MiB behind the cursor.
    for n in 0..6000 {
        store.set("s", "g", &format!("i{n}"), value(n)).unwrap();
    }
    store.prefaulter.wait_for_jobs();
    for n in (0..6000).step_by(7) {
        assert_eq!(store.get("s", "g", &format!("i{n}")), Some(value(n)));
    }
    // Overwrites read previous values back from the written-back pages.
    assert_eq!(store.set("s", "g", "i3", j("3")).unwrap(), Some(value(3)));
    drop(store);
    let store = FileStore::open(&dir.0, opts).unwrap();
    assert_eq!(store.list("s", "g").len(), 6000);
    assert_eq!(store.get("s", "g", "i3"), Some(j("3")));
    assert_eq!(store.get("s", "g", "i5999"), Some(value(5999)));
}
