//! The file store under crashes and disk faults, through the engine: a torn record left at the
//! end of the log by a crash does not stop the restart, a failed fdatasync stops the store
//! (fail-stop) with one log line, and a read waits for the commit of the write before it.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The engine's test-only fdatasync fault hook (see `stream::store::FAIL_SYNC_AFTER_ENV`).
const FAIL_SYNC_AFTER: &str = "RINGCAST_TEST_FAIL_SYNC_AFTER";

fn file_store(dir: &Path, durability: &str, extra: &str) -> String {
    format!(
        "      adapter:\n        name: kv\n        config:\n          store_method: file_based\n          file_path: {}\n          durability: {durability}\n          segment_size: 32768\n{extra}",
        dir.display()
    )
}

/// Starts a one-shard engine with `env` set and its stderr in `engine.dir/stderr.log`; fails
/// at once (with that log) if the engine exits instead of listening.
fn start(stream_extra: &str, env: &[(&str, &str)]) -> Engine {
    let (worker_port, stream_port) = (free_port(), free_port());
    let dir = scratch_dir();
    let config = format!(
        "metrics: false\nworkers:\n  - name: iii-worker-manager\n    config:\n      host: 127.0.0.1\n      port: {worker_port}\n  - name: iii-stream\n    config:\n      host: 127.0.0.1\n      port: {stream_port}\n{stream_extra}"
    );
    std::fs::write(dir.join("config.yaml"), config).unwrap();
    let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
    let child = Command::new(binary())
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .args(["--shards", "1"])
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start ringcast");
    let mut engine = Engine { child, worker_port, stream_port, dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", worker_port)).is_err() {
        if let Some(status) = engine.child.try_wait().unwrap() {
            panic!("engine exited with {status} instead of starting:\n{}", stderr(&engine));
        }
        assert!(Instant::now() < deadline, "engine did not listen on {worker_port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    engine
}

fn stderr(engine: &Engine) -> String {
    std::fs::read_to_string(engine.dir.join("stderr.log")).unwrap_or_default()
}

fn get(w: &mut Worker, item: &str) -> Value {
    w.call("stream::get", json!({"stream_name": "s", "group_id": "g", "item_id": item}))
}

/// The last segment file of shard 0.
fn last_segment(store: &Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(store.join("shard-0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("seg-"))
        .collect();
    segments.sort();
    segments.pop().unwrap()
}

/// A `set` record (format version 2) as the writer leaves it when it dies before the checksum:
/// header and payload written, checksum still zero.
fn unfinished_record(item: &str, value: &str) -> Vec<u8> {
    let (stream, group) = ("s", "g");
    let mut rec = vec![0xA6, 1];
    for len in [stream.len(), group.len(), item.len()] {
        rec.extend((len as u16).to_le_bytes());
    }
    rec.extend((value.len() as u32).to_le_bytes());
    rec.extend(999u64.to_le_bytes());
    rec.extend([0; 4]);
    for part in [stream, group, item, value] {
        rec.extend(part.as_bytes());
    }
    rec
}

#[test]
fn a_record_left_unfinished_by_a_crash_does_not_stop_the_restart() {
    let store = scratch_dir().join("store");
    let config = file_store(&store, "batch", "");
    let mut engine = start(&config, &[]);
    let mut w = Worker::connect(&engine);
    for i in 0..40 {
        w.set("s", "g", &format!("i{i}"), json!({"n": i}));
    }
    engine.child.kill().unwrap(); // SIGKILL
    engine.child.wait().unwrap();

    // Append the unfinished record right after the last one (the rest of the file is zeros).
    let segment = last_segment(&store);
    let mut bytes = std::fs::read(&segment).unwrap();
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    let torn = unfinished_record("i0", "\"never acknowledged\"");
    bytes.splice(end..end + torn.len(), torn);
    std::fs::write(&segment, &bytes).unwrap();

    let restarted = start(&config, &[]);
    let mut w = Worker::connect(&restarted);
    for i in 0..40 {
        assert_eq!(get(&mut w, &format!("i{i}"))["result"], json!({"n": i}), "i{i} after the restart");
    }
    let log = stderr(&restarted);
    assert!(log.contains("cut off an unfinished write"), "the cut is logged: {log}");
}

#[test]
fn a_failed_fdatasync_fails_the_write_and_stops_the_store() {
    let store = scratch_dir().join("store");
    // The first commit's fdatasync succeeds, every later one fails with EIO.
    let engine = start(&file_store(&store, "batch", ""), &[(FAIL_SYNC_AFTER, "1")]);
    let mut w = Worker::connect(&engine);
    w.set("s", "g", "a", json!(1));

    let failed = w.call("stream::set", json!({"stream_name": "s", "group_id": "g", "item_id": "b", "data": 2}));
    assert_eq!(failed["error"]["code"], "STREAM_STORE_ERROR", "{failed}");
    // Fail-stop: nothing is served any more, not even what was durable.
    for item in ["a", "b"] {
        let read = get(&mut w, item);
        assert_eq!(read["error"]["code"], "STREAM_STORE_ERROR", "{read}");
        assert!(read["error"]["message"].as_str().unwrap().contains("restart"), "{read}");
    }
    let list = w.call("stream::list", json!({"stream_name": "s", "group_id": "g"}));
    assert_eq!(list["error"]["code"], "STREAM_STORE_ERROR", "{list}");
    let write = w.call("stream::set", json!({"stream_name": "s", "group_id": "g", "item_id": "c", "data": 3}));
    let message = write["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("failed") && message.contains("restart"), "{write}");
    // A join gets no snapshot from a failed store (it may hold the write that failed): the
    // subscriber is closed with 1011, naming the failure.
    let mut sub = Subscriber::connect(&engine);
    sub.join("s1", "s", "g", None);
    let close = loop {
        match sub.ws.read() {
            Ok(tungstenite::Message::Close(frame)) => break frame,
            Ok(tungstenite::Message::Text(text)) => panic!("a failed store served a frame: {text}"),
            Ok(_) => continue,
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1011);
    assert!(close.reason.contains("restart"), "{close:?}");
    let log = stderr(&engine);
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("refuses reads and writes")).collect();
    assert_eq!(lines.len(), 1, "one log line for the operator: {log}");
}

#[test]
fn a_get_right_after_a_set_waits_for_its_commit() {
    let store = scratch_dir().join("store");
    let engine = start(&file_store(&store, "batch", "          batch_max_delay_us: 200000\n"), &[]);
    let mut w = Worker::connect(&engine);
    w.set("s", "g", "x", json!("old"));
    // Both calls leave before either answer: the get reaches the shard while the set waits for
    // its commit.
    let (set_id, get_id) = (uuid(), uuid());
    w.send(json!({"type": "invokefunction", "invocation_id": set_id, "function_id": "stream::set",
        "data": {"stream_name": "s", "group_id": "g", "item_id": "x", "data": "new"}}));
    w.send(json!({"type": "invokefunction", "invocation_id": get_id, "function_id": "stream::get",
        "data": {"stream_name": "s", "group_id": "g", "item_id": "x"}}));
    let first = w.recv_type("invocationresult");
    assert_eq!(first["invocation_id"], set_id.as_str(), "the get was answered before the set it reads was committed: {first}");
    let second = w.recv_type("invocationresult");
    assert_eq!(second["invocation_id"], get_id.as_str());
    assert_eq!(second["result"], "new");
}
