//! Decoding worker frames, and the hop an `invokefunction` makes through the control core:
//! decode the caller's frame, write the frame for the owner.
//!
//! `relay/old/*` is how the control core did it before payloads were forwarded raw (simd-json
//! into a `Value` tree, then that tree serialised again); `relay/new/*` is `wire::decode` (the
//! payload kept as its text) and `Outbound::InvokeFunction` (the text copied out).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringcast::control::wire::{self, Inbound, Outbound, Payload};
use serde::{Deserialize, Serialize};
use serde_json::Value;

const SAMPLES: &[(&str, &str)] = &[
    ("invoke_set_128B", r#"{"type":"invokefunction","invocation_id":"0f8a3c62-3a3e-4a57-b2b6-8d1a2a0b1f77","function_id":"stream::set","data":{"stream_name":"loadtest","group_id":"g0","item_id":"i1","data":{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","seq":1,"t":1}}}"#),
    ("invocation_result", r#"{"type":"invocationresult","invocation_id":"0f8a3c62-3a3e-4a57-b2b6-8d1a2a0b1f77","function_id":"math::add","result":{"sum":5,"items":[1,2,3]}}"#),
    ("register_function", r#"{"type":"registerfunction","id":"math::add","description":"Adds two numbers","request_format":{"type":"object","properties":{"a":{"type":"number"},"b":{"type":"number"}}},"metadata":{"public":true}}"#),
];

/// The old inbound shape of an `invokefunction` (the payload as a tree).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum OldInbound {
    InvokeFunction(OldInvoke),
}

#[derive(Deserialize)]
struct OldInvoke {
    invocation_id: Option<String>,
    function_id: String,
    #[serde(default)]
    data: Value,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum OldOutbound<'a> {
    InvokeFunction { invocation_id: &'a str, function_id: &'a str, data: &'a Value },
}

/// An `invokefunction` whose `data` is an object of `size` bytes or a little more, shaped like
/// a real payload: records with strings and numbers.
fn invoke_frame(size: usize) -> String {
    let mut records = Vec::new();
    let mut len = 0;
    let mut i = 0u64;
    while len < size {
        let record = serde_json::json!({"id": i, "name": format!("user-{i}"), "score": i as f64 * 1.5, "tags": ["a", "b"], "active": i.is_multiple_of(2)});
        len += record.to_string().len() + 1;
        records.push(record);
        i += 1;
    }
    serde_json::json!({
        "type": "invokefunction", "invocation_id": "0f8a3c62-3a3e-4a57-b2b6-8d1a2a0b1f77",
        "function_id": "app::handle", "data": {"records": records}
    })
    .to_string()
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for (name, sample) in SAMPLES {
        group.throughput(Throughput::Bytes(sample.len() as u64));
        group.bench_function(format!("wire_decode/{name}"), |b| b.iter(|| wire::decode(sample.as_bytes(), 128).unwrap()));
        group.bench_function(format!("simd_json_value/{name}"), |b| {
            b.iter(|| {
                let mut buf = sample.as_bytes().to_vec();
                simd_json::serde::from_slice::<Value>(&mut buf).unwrap()
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("relay");
    for (name, size) in [("1KiB", 1024), ("64KiB", 64 * 1024)] {
        let frame = invoke_frame(size);
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(format!("old/{name}"), |b| {
            b.iter(|| {
                let mut buf = frame.as_bytes().to_vec();
                let OldInbound::InvokeFunction(m) = simd_json::serde::from_slice::<OldInbound>(&mut buf).unwrap();
                let id = m.invocation_id.unwrap_or_default();
                serde_json::to_string(&OldOutbound::InvokeFunction { invocation_id: &id, function_id: &m.function_id, data: &m.data }).unwrap()
            })
        });
        group.bench_function(format!("new/{name}"), |b| {
            b.iter(|| {
                let Inbound::InvokeFunction(m) = wire::decode(frame.as_bytes(), 128).unwrap() else { unreachable!() };
                let id = m.invocation_id.unwrap_or_default();
                let data = m.data.map(Payload::Raw).unwrap_or_default();
                Outbound::InvokeFunction {
                    invocation_id: &id,
                    function_id: &m.function_id,
                    data: &data,
                    traceparent: None,
                    baggage: None,
                    metadata: None,
                }
                .to_text()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
