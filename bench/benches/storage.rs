//! Adapter throughput: set, get, list of a 1,000-item group and update, at 128 B and 4 KiB
//! values, for each store.

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use ringcast_storage::file::{FileOptions, FileStore, Populate};
use ringcast_storage::memory::MemoryStore;
use ringcast_shards::update::{apply, parse_ops};
use ringcast_storage::{Json, KvStore};
use std::path::PathBuf;
use std::sync::Arc;

fn value(size: usize) -> Json {
    Arc::from(format!("{{\"n\":1,\"pad\":\"{}\"}}", "x".repeat(size.saturating_sub(16))))
}

/// Sets between two calls of a store's background work (compaction for the file store), about
/// the 50 ms at which a shard runs it when sets take 0.2–0.8 µs.
const BACKGROUND_EVERY: u64 = 1 << 16;

/// What a store does besides serving calls: its background work, run every `BACKGROUND_EVERY`
/// sets, and a line about it printed after each set bench.
struct Background<S> {
    step: fn(&mut S),
    report: fn(&S) -> Option<String>,
}

/// Sets of one of 10,000 items in turn, with the store's background work between them.
fn bench_sets<S: KvStore>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    mut store: S,
    background: &Background<S>,
    mut value: impl FnMut() -> Json,
) {
    let mut n = 0u64;
    group.bench_function(name, |b| {
        b.iter(|| {
            n += 1;
            if n.is_multiple_of(BACKGROUND_EVERY) {
                (background.step)(&mut store);
            }
            store.set("bench", "g", &format!("i{}", n % 10_000), value()).unwrap()
        })
    });
    if let Some(line) = (background.report)(&store) {
        eprintln!("{name}: {line}");
    }
}

/// Runs the adapter benches against stores made by `make`.
fn adapter_benches<S: KvStore>(c: &mut Criterion, adapter: &str, mut make: impl FnMut() -> S, background: Background<S>) {
    for size in [128usize, 4096] {
        let mut group = c.benchmark_group(format!("storage/{adapter}/{size}B"));
        group.throughput(Throughput::Elements(1));
        let v = value(size);

        bench_sets(&mut group, "set", make(), &background, || v.clone());
        // As the engine calls it: each request brings its own freshly allocated value.
        let text = v.to_string();
        bench_sets(&mut group, "set_fresh_value", make(), &background, || Json::from(text.as_str()));

        let mut store = make();
        for i in 0..1000 {
            store.set("bench", "list", &format!("i{i}"), v.clone()).unwrap();
        }
        group.bench_function("get", |b| b.iter(|| store.get("bench", "list", "i500")));
        group.bench_with_input(BenchmarkId::new("list", 1000), &(), |b, _| b.iter(|| store.list("bench", "list")));

        let ops = parse_ops(&serde_json::json!([{"type": "increment", "path": "n", "by": 1}])).unwrap();
        group.bench_function("update", |b| {
            b.iter(|| {
                let current: serde_json::Value = serde_json::from_str(&store.get("bench", "list", "i1").unwrap()).unwrap();
                let (new, _) = apply(Some(&current), &ops);
                store.set("bench", "list", "i1", Arc::from(serde_json::to_string(&new).unwrap())).unwrap()
            })
        });
        group.finish();
    }
}

fn memory(c: &mut Criterion) {
    adapter_benches(c, "in_memory", MemoryStore::new, Background { step: |_| {}, report: |_| None });
}

/// Scratch directories of one bench function, removed when it ends (a `none` run writes
/// gigabytes).
#[derive(Default)]
struct Scratch(Vec<PathBuf>);

impl Scratch {
    /// A fresh file store in a new scratch directory, measured from a clean start: what earlier
    /// benches left dirty in the page cache is written out first, so their writeback does not
    /// compete with this one's.
    fn store(&mut self, tag: &str, populate: Populate) -> FileStore {
        let _ = std::process::Command::new("sync").status();
        let dir = std::env::temp_dir().join(format!("ringcast-bench-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        self.0.push(dir.clone());
        FileStore::open(&dir, FileOptions { populate, ..FileOptions::default() }).expect("open a scratch file store")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `file_based` with `durability: none`: the write path alone.
fn file_none(c: &mut Criterion) {
    let mut scratch = Scratch::default();
    let mut n = 0;
    let background = Background {
        step: |store: &mut FileStore| {
            store.compact_step(4 << 20);
        },
        report: |store: &FileStore| {
            let rolls = store.stats().rolls;
            (rolls.count > 0).then(|| format!(
                "{} segments sealed, {} of their successors on a reused file, rolls took {} µs on average, {} µs at most",
                rolls.count,
                rolls.on_spare,
                rolls.total_us / rolls.count,
                rolls.max_us
            ))
        },
    };
    adapter_benches(c, "file_based_none", || {
        n += 1;
        scratch.store(&format!("none-{n}"), Populate::Write)
    }, background);
}

/// `durability: always` (fdatasync per set) and `batch` (one fdatasync shared by 64 sets, as
/// group commit does for 64 concurrent writers).
fn file_durable(c: &mut Criterion) {
    let mut scratch = Scratch::default();
    for size in [128usize, 4096] {
        let v = value(size);
        let mut group = c.benchmark_group(format!("storage/file_based_durable/{size}B"));
        let mut store = scratch.store(&format!("always-{size}"), Populate::Read);
        let mut n = 0u64;
        group.throughput(Throughput::Elements(1));
        group.bench_function("set_always", |b| {
            b.iter(|| {
                n += 1;
                store.set("bench", "g", &format!("i{}", n % 10_000), v.clone()).unwrap();
                store.sync().unwrap();
            })
        });
        let mut store = scratch.store(&format!("batch-{size}"), Populate::Read);
        group.throughput(Throughput::Elements(64));
        group.bench_function("set_batch_64", |b| {
            b.iter(|| {
                for _ in 0..64 {
                    n += 1;
                    store.set("bench", "g", &format!("i{}", n % 10_000), v.clone()).unwrap();
                }
                store.sync().unwrap();
            })
        });
        group.finish();
    }
}

criterion_group!(benches, memory, file_none, file_durable);
criterion_main!(benches);
