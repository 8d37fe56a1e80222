//! The file store over real processes: acknowledged writes survive SIGKILL, restarts with a
//! different shard count keep every item, and `ringcast repair` salvages a damaged directory.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// Small segments, so the crash tests also cross rolls, compaction and reused spare files.
fn file_store(dir: &Path, durability: &str) -> String {
    format!(
        "      adapter:\n        name: kv\n        config:\n          store_method: file_based\n          file_path: {}\n          durability: {durability}\n          segment_size: 32768\n",
        dir.display()
    )
}

/// Sets up to `total` items with `inflight` calls outstanding until the engine dies; returns the
/// last acknowledged value of each item.
fn write_until_killed(engine: &mut Engine, total: usize, kill_after: usize) -> HashMap<String, i64> {
    let mut w = Worker::connect(engine);
    let mut sent: HashMap<String, (String, i64)> = HashMap::new();
    let mut acked: HashMap<String, i64> = HashMap::new();
    const INFLIGHT: usize = 64;
    let mut next = 0usize;
    let mut outstanding = 0usize;
    let mut killed = false;
    loop {
        while !killed && outstanding < INFLIGHT && next < total {
            let id = uuid();
            let item = format!("i{}", next % 5000); // overwrites too, not only inserts
            w.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "stream::set",
                "data": {"stream_name": "crash", "group_id": format!("g{}", next % 7), "item_id": item, "data": next}}));
            sent.insert(id, (format!("g{}/{item}", next % 7), next as i64));
            next += 1;
            outstanding += 1;
        }
        if !killed && next >= kill_after {
            engine.child.kill().unwrap(); // SIGKILL with calls in flight
            engine.child.wait().unwrap();
            killed = true;
        }
        if outstanding == 0 {
            break;
        }
        let frame = match w.ws.read() {
            Ok(tungstenite::Message::Text(text)) => serde_json::from_str::<Value>(&text).unwrap(),
            Ok(_) => continue,
            Err(_) => break, // the engine is gone; unanswered calls were not acknowledged
        };
        if frame["type"] != "invocationresult" {
            continue;
        }
        outstanding -= 1;
        assert!(frame.get("error").is_none(), "{frame}");
        let (key, value) = sent.remove(frame["invocation_id"].as_str().unwrap()).unwrap();
        let last = acked.entry(key).or_insert(value);
        *last = (*last).max(value);
    }
    acked
}

fn assert_all_present(engine: &Engine, acked: &HashMap<String, i64>) {
    let mut w = Worker::connect(engine);
    for (key, value) in acked {
        let (group, item) = key.split_once('/').unwrap();
        let got = w.ok("stream::get", json!({"stream_name": "crash", "group_id": group, "item_id": item}));
        let got = got.as_i64().unwrap_or(-1);
        assert!(got >= *value, "{key}: acknowledged {value}, found {got} after the crash");
    }
}

fn crash_test(durability: &str) {
    let dir = scratch_dir().join("store");
    let stream = file_store(&dir, durability);
    let mut engine = Engine::start_with("", &stream, &["--shards", "2"]);
    let kill_after = 5_000 + (std::process::id() as usize * 7919) % 12_000; // a different moment each run
    let acked = write_until_killed(&mut engine, 20_000, kill_after);
    assert!(acked.len() > 100, "the engine acknowledged writes before it was killed");
    let restarted = Engine::start_with("", &stream, &["--shards", "2"]);
    assert_all_present(&restarted, &acked);
}

#[test]
fn acknowledged_writes_survive_sigkill_with_batch_durability() {
    crash_test("batch");
}

#[test]
fn acknowledged_writes_survive_sigkill_with_always_durability() {
    crash_test("always");
}

/// `none` promises nothing against a machine crash, but a process crash loses nothing: the
/// records are in the page cache as soon as they are in the map.
#[test]
fn acknowledged_writes_survive_sigkill_with_none_durability() {
    crash_test("none");
}

#[test]
fn changing_the_shard_count_keeps_every_item() {
    let dir = scratch_dir().join("store");
    let stream = file_store(&dir, "batch");
    let mut expected = Vec::new();
    {
        let engine = Engine::start_with("", &stream, &["--shards", "1"]);
        let mut w = Worker::connect(&engine);
        for g in 0..20 {
            for i in 0..10 {
                w.set("rehome", &format!("g{g}"), &format!("i{i}"), json!(g * 100 + i));
                expected.push((format!("g{g}"), format!("i{i}"), g * 100 + i));
            }
        }
    }
    for shards in ["3", "1", "2"] {
        let engine = Engine::start_with("", &stream, &["--shards", shards]);
        let mut w = Worker::connect(&engine);
        for (group, item, value) in &expected {
            let got = w.ok("stream::get", json!({"stream_name": "rehome", "group_id": group, "item_id": item}));
            assert_eq!(got, json!(value), "{group}/{item} with {shards} shards");
        }
        let groups = w.ok("stream::list_groups", json!({"stream_name": "rehome"}));
        assert_eq!(groups.as_array().unwrap().len(), 20, "with {shards} shards");
        let list = w.ok("stream::list", json!({"stream_name": "rehome", "group_id": "g3"}));
        assert_eq!(list, json!((0..10).map(|i| 300 + i).collect::<Vec<_>>()), "order survives re-homing");
    }
}

#[test]
fn corrupt_store_stops_the_start_and_repair_salvages_it() {
    let dir = scratch_dir().join("store");
    let stream = file_store(&dir, "always");
    {
        let engine = Engine::start_with("", &stream, &["--shards", "1"]);
        let mut w = Worker::connect(&engine);
        for i in 0..50 {
            w.set("r", "g", &format!("i{i}"), json!({"n": i, "pad": "p".repeat(100)}));
        }
    }
    // Flip a byte in the middle of the first segment.
    let segment = dir.join("shard-0").join("seg-000001.log");
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[3000] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();

    let config = dir.parent().unwrap().join("repair.yaml");
    let port = free_port();
    std::fs::write(&config, format!("metrics: false\nworkers:\n  - name: iii-worker-manager\n    config: {{host: 127.0.0.1, port: {port}}}\n  - name: iii-stream\n    config:\n      host: 127.0.0.1\n      port: {}\n{stream}", free_port())).unwrap();
    let out = std::process::Command::new(binary()).args(["--config", config.to_str().unwrap(), "--shards", "1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("seg-000001.log") && err.contains("repair"), "{err}");

    let out = std::process::Command::new(binary()).args(["repair", dir.join("shard-0").to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let engine = Engine::start_with("", &stream, &["--shards", "1"]);
    let mut w = Worker::connect(&engine);
    let list = w.ok("stream::list", json!({"stream_name": "r", "group_id": "g"}));
    let kept = list.as_array().unwrap().len();
    assert!((40..50).contains(&kept), "repair keeps the intact records ({kept} of 50)");
}
