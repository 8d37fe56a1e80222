//! Building a subscriber frame once (JSON + WebSocket header) and handing it to 1, 100 and
//! 10,000 outbound queues — the per-event work of an owner shard.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringcast_shards::event_json as frames;
use ringcast_shards::outbound::{Batch, OutQueue};
use ringcast_shards::wsframe::text_frame;
use std::sync::Arc;

const VALUE_128: &str = r#"{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","seq":1,"t":123456789}"#;

fn build_frame(c: &mut Criterion) {
    c.bench_function("frame/build_128B_event", |b| {
        b.iter(|| {
            let text = frames::data_event("loadtest", "g0", Some("item-1"), "update", VALUE_128);
            text_frame(text.as_bytes())
        })
    });
}

fn fanout(c: &mut Criterion) {
    let executor = glommio::LocalExecutorBuilder::default().make().unwrap();
    executor.run(async {
        let mut group = c.benchmark_group("fanout");
        for subscribers in [1usize, 100, 10_000] {
            let total = Arc::default();
            let queues: Vec<OutQueue> = (0..subscribers).map(|_| OutQueue::new(usize::MAX, Arc::clone(&total))).collect();
            let text = frames::data_event("loadtest", "g0", Some("item-1"), "update", VALUE_128);
            group.throughput(Throughput::Elements(subscribers as u64));
            group.bench_with_input(BenchmarkId::from_parameter(subscribers), &subscribers, |b, _| {
                b.iter(|| {
                    let frame: Bytes = text_frame(text.as_bytes());
                    for queue in &queues {
                        queue.push(frame.clone());
                    }
                    // Drain so queues do not grow across iterations (what each writer does).
                    for queue in &queues {
                        if let Batch::Frames(frames) = futures_lite_block(queue) {
                            criterion::black_box(frames);
                        }
                    }
                })
            });
        }
        group.finish();
    });
}

/// Takes a queue's batch without an async context: the queue is never empty here.
fn futures_lite_block(queue: &OutQueue) -> Batch {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut fut = std::pin::pin!(queue.next_batch());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(batch) => batch,
        std::task::Poll::Pending => unreachable!("a frame was just queued"),
    }
}

use std::future::Future;

criterion_group!(benches, build_frame, fanout);
criterion_main!(benches);
