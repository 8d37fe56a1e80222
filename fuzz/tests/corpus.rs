//! Replays every committed seed (`corpus/<target>/*`) through the target bodies, on any
//! toolchain: what `tests/fuzz.sh` runs where cargo-fuzz or nightly Rust cannot be had, and a
//! quick check that the seeds (fixed crash inputs among them) still pass.

use std::path::Path;

const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("worker_frame", ringcast_fuzz::worker_frame),
    ("subscriber_frame", ringcast_fuzz::subscriber_frame),
    ("upgrade_request", ringcast_fuzz::upgrade_request),
    ("update_ops", ringcast_fuzz::update_ops),
    ("config", ringcast_fuzz::config),
    ("store_recovery", ringcast_fuzz::store_recovery),
    ("telemetry_frame", ringcast_fuzz::telemetry_frame),
    ("http_function", ringcast_fuzz::http_function),
    ("rbac_rules", ringcast_fuzz::rbac_rules),
    ("channel_request", ringcast_fuzz::channel_request),
    ("redis_reply", ringcast_fuzz::redis_reply),
    ("redis_message", ringcast_fuzz::redis_message),
];

#[test]
fn every_corpus_seed_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, target) in TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("corpus entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no seeds for {name}");
        for file in &files {
            let data = std::fs::read(file).expect("seed readable");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: seed {} failed", file.display());
        }
        println!("{name}: {} seeds passed", files.len());
    }
}

/// Writes the `store_recovery` seeds from real stores (`cargo test --test corpus -- --ignored`):
/// the segment files of small stores, trailing zeros trimmed, several files joined by
/// `SEGMENT_SEPARATOR`.
#[test]
#[ignore = "regenerates committed seeds"]
fn make_store_recovery_seeds() {
    use ringcast_storage::file::{FileOptions, FileStore};
    use ringcast_storage::KvStore;

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/store_recovery");
    let seed = |name: &str, segment_size: u64, writes: &dyn Fn(&mut FileStore)| {
        let dir = std::env::temp_dir().join(format!("ringcast-fuzz-seed-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let mut store = FileStore::open(&dir, FileOptions { segment_size, ..FileOptions::default() }).unwrap();
            writes(&mut store);
            store.sync().unwrap();
        }
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("seg-"))
            .collect();
        names.sort();
        let mut joined = Vec::new();
        for (n, file) in names.iter().enumerate() {
            let mut bytes = std::fs::read(dir.join(file)).unwrap();
            while bytes.last() == Some(&0) {
                bytes.pop();
            }
            if n > 0 {
                joined.extend_from_slice(ringcast_fuzz::SEGMENT_SEPARATOR);
            }
            joined.extend_from_slice(&bytes);
        }
        std::fs::write(out.join(name), joined).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    };
    seed("empty", 4096, &|_| {});
    seed("one_set", 4096, &|s| {
        s.set("chat", "room-1", "m1", r#"{"text":"hi"}"#.into()).unwrap();
    });
    seed("set_overwrite_delete", 4096, &|s| {
        s.set("chat", "room-1", "m1", r#"{"n":1}"#.into()).unwrap();
        s.set("chat", "room-1", "m2", r#"{"n":2}"#.into()).unwrap();
        s.set("chat", "room-1", "m1", r#"{"n":3}"#.into()).unwrap();
        s.delete("chat", "room-1", "m2").unwrap();
        s.set("other", "g", "é", r#""ünïcode""#.into()).unwrap();
    });
    seed("rolled_segments", 256, &|s| {
        for i in 0..12 {
            let value = format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(40));
            s.set("s", &format!("g{}", i % 3), &format!("item{}", i % 5), value.into()).unwrap();
        }
        s.delete("s", "g0", "item0").unwrap();
    });
    seed("tombstone_after_roll", 200, &|s| {
        s.set("s", "g", "a", format!(r#""{}""#, "v".repeat(120)).into()).unwrap();
        s.set("s", "g", "b", r#"1"#.into()).unwrap();
        s.delete("s", "g", "a").unwrap();
    });
}
