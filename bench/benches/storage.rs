//! Adapter throughput: set, get, list of a 1,000-item group and update, at 128 B and 4 KiB
//! values, for each store.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringcast_storage::memory::MemoryStore;
use ringcast_storage::update_ops::{apply, parse_ops};
use ringcast_storage::{Json, KvStore};
use std::sync::Arc;

fn value(size: usize) -> Json {
    Arc::from(format!("{{\"n\":1,\"pad\":\"{}\"}}", "x".repeat(size.saturating_sub(16))))
}

/// Runs the adapter benches against stores made by `make`.
pub fn adapter_benches<S: KvStore>(c: &mut Criterion, adapter: &str, mut make: impl FnMut() -> S) {
    for size in [128usize, 4096] {
        let mut group = c.benchmark_group(format!("storage/{adapter}/{size}B"));
        group.throughput(Throughput::Elements(1));
        let v = value(size);

        let mut store = make();
        let mut n = 0u64;
        group.bench_function("set", |b| {
            b.iter(|| {
                n += 1;
                store.set("bench", "g", &format!("i{}", n % 10_000), v.clone()).unwrap()
            })
        });

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
    adapter_benches(c, "in_memory", MemoryStore::new);
}

criterion_group!(benches, memory);
criterion_main!(benches);
