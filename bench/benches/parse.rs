//! Decoding worker frames: simd-json (what the control core uses) against serde_json, on real
//! message samples.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringcast::control::wire::{self, Inbound};

const SAMPLES: &[(&str, &str)] = &[
    ("invoke_set_128B", r#"{"type":"invokefunction","invocation_id":"0f8a3c62-3a3e-4a57-b2b6-8d1a2a0b1f77","function_id":"stream::set","data":{"stream_name":"loadtest","group_id":"g0","item_id":"i1","data":{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","seq":1,"t":1}}}"#),
    ("invocation_result", r#"{"type":"invocationresult","invocation_id":"0f8a3c62-3a3e-4a57-b2b6-8d1a2a0b1f77","function_id":"math::add","result":{"sum":5,"items":[1,2,3]}}"#),
    ("register_function", r#"{"type":"registerfunction","id":"math::add","description":"Adds two numbers","request_format":{"type":"object","properties":{"a":{"type":"number"},"b":{"type":"number"}}},"metadata":{"public":true}}"#),
];

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for (name, sample) in SAMPLES {
        group.throughput(Throughput::Bytes(sample.len() as u64));
        group.bench_function(format!("simd_json/{name}"), |b| {
            b.iter(|| {
                let mut buf = sample.as_bytes().to_vec();
                wire::decode(&mut buf, 128).unwrap()
            })
        });
        group.bench_function(format!("serde_json/{name}"), |b| {
            b.iter(|| serde_json::from_slice::<Inbound>(sample.as_bytes()).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
