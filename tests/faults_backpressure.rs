//! Faults of slow peers and dying cores: subscribers that stop reading never stall the engine
//! (they are closed with 4008 and counted), their bytes are all given back, and a shard that
//! dies takes the process down with a non-zero exit instead of leaving it half alive.

mod common;

use common::*;
use serde_json::{json, Value};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

/// The most an unrelated stream call may take while stalled readers exist.
const ANSWER_BOUND: Duration = Duration::from_millis(500);

/// A metric summed over its shards.
fn metric_sum(port: u16, name: &str) -> u64 {
    let prefix = format!("{name}{{");
    http_get(port, "/metrics", FRAME_WAIT)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// A subscriber on a raw TCP socket with a tiny receive buffer, so the engine's writes to it
/// stall as soon as it stops reading.
fn stalled_subscriber(engine: &Engine) -> WebSocket<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", engine.stream_port).parse().unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(FRAME_WAIT)).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://127.0.0.1:{}/", engine.stream_port), stream).expect("upgrade");
    ws
}

fn join(ws: &mut WebSocket<TcpStream>, subscription: &str, stream: &str, group: &str) {
    let frame = json!({"type": "join", "data": {"subscriptionId": subscription, "streamName": stream, "groupId": group}});
    ws.send(Message::text(frame.to_string())).unwrap();
}

/// Reads everything the engine still sends and returns the close code.
fn read_to_close(mut ws: WebSocket<TcpStream>) -> Option<u16> {
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame.map(|f| f.code.into()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// One `stream::set`, `get` and `list_groups` on a stream nobody is stalled on; each must answer
/// within `ANSWER_BOUND`.
fn probe(worker: &mut Worker, n: u64) {
    for (function, data) in [
        ("stream::set", json!({"stream_name": "calm", "group_id": "g", "item_id": "k", "data": n})),
        ("stream::get", json!({"stream_name": "calm", "group_id": "g", "item_id": "k"})),
        ("stream::list_groups", json!({"stream_name": "calm"})),
    ] {
        let started = Instant::now();
        worker.ok(function, data);
        let took = started.elapsed();
        assert!(took < ANSWER_BOUND, "{function} on an unrelated stream took {took:?} while readers were stalled");
    }
}

/// Reads each socket to its end on a thread of its own (in parallel: a closed subscriber has a
/// bounded time to take its close frame) and returns the close codes.
fn close_codes(sockets: Vec<WebSocket<TcpStream>>) -> Vec<Option<u16>> {
    let readers: Vec<_> = sockets.into_iter().map(|ws| std::thread::spawn(move || read_to_close(ws))).collect();
    readers.into_iter().map(|r| r.join().unwrap()).collect()
}

#[test]
fn stalled_readers_are_closed_and_unrelated_streams_keep_answering() {
    const STALLED: usize = 20;
    let port = free_port();
    // The default queue bound (4 MiB): 20 stalled readers hold far more than one shard's old
    // 32 MiB pause threshold.
    let engine = Engine::start_full(
        &format!("metrics: 127.0.0.1:{port}\n"),
        "",
        "      slow_subscriber_timeout_ms: 1000\n",
        &["--shards", "2"],
    );
    let mut stalled: Vec<_> = (0..STALLED)
        .map(|i| {
            let mut ws = stalled_subscriber(&engine);
            join(&mut ws, &format!("s{i}"), "busy", "g");
            match ws.read().unwrap() {
                Message::Text(t) => assert_eq!(serde_json::from_str::<Value>(&t).unwrap()["event"]["type"], "sync"),
                other => panic!("expected the sync frame, got {other:?}"),
            }
            ws // and never read again
        })
        .collect();

    // A publisher keeps the group busy with large values until the stalled readers are closed.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        let mut w = Worker::connect(&engine);
        std::thread::spawn(move || {
            let value = "v".repeat(256 << 10);
            for n in 0..400 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                w.set("busy", "g", &format!("i{}", n % 8), json!(value));
            }
        })
    };

    let mut probe_worker = Worker::connect(&engine);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while metric_sum(port, "ringcast_slow_subscriber_closes_total") < STALLED as u64 {
        assert!(Instant::now() < deadline, "stalled subscribers were not all closed");
        probe(&mut probe_worker, n);
        n += 1;
    }
    let codes = close_codes(std::mem::take(&mut stalled));
    assert!(codes.iter().all(|c| *c == Some(4008)), "every stalled subscriber gets 4008: {codes:?}");
    stop.store(true, Ordering::Relaxed);
    publisher.join().expect("the publisher's writes were all answered");
    probe(&mut probe_worker, n);
    assert_eq!(metric_sum(port, "ringcast_slow_subscriber_closes_total"), STALLED as u64);

    // Everything they held is given back.
    wait_until(Duration::from_secs(10), "subscribers gone and queues empty", || {
        metric_sum(port, "ringcast_subscribers") == 0 && metric_sum(port, "ringcast_outbound_queue_bytes") == 0
    });
}

#[test]
fn a_snapshot_over_the_bound_on_a_stalled_connection_stalls_nothing() {
    const STALLED: usize = 8;
    let port = free_port();
    let engine = Engine::start_full(
        &format!("metrics: 127.0.0.1:{port}\n"),
        "",
        "      max_queue_bytes: 1048576\n      slow_subscriber_timeout_ms: 1000\n",
        &["--shards", "1"],
    );
    let mut w = Worker::connect(&engine);
    // A group whose snapshot (6 MiB) is far over one connection's bound.
    let value = "s".repeat(1 << 20);
    for i in 0..6 {
        w.set("snap", "g", &format!("i{i}"), json!(value));
    }
    let sockets: Vec<_> = (0..STALLED)
        .map(|i| {
            let mut ws = stalled_subscriber(&engine);
            // The first snapshot is admitted on the empty queue and stalls the writer; the
            // second finds it still pending.
            join(&mut ws, &format!("a{i}"), "snap", "g");
            join(&mut ws, &format!("b{i}"), "snap", "g");
            ws
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while metric_sum(port, "ringcast_slow_subscriber_closes_total") < STALLED as u64 {
        assert!(Instant::now() < deadline, "stalled snapshot readers were not all closed");
        probe(&mut w, n);
        n += 1;
    }
    let codes = close_codes(sockets);
    assert!(codes.iter().all(|c| *c == Some(4008)), "every stalled reader gets 4008: {codes:?}");
    probe(&mut w, n);
    wait_until(Duration::from_secs(10), "subscribers gone and queues empty", || {
        metric_sum(port, "ringcast_subscribers") == 0 && metric_sum(port, "ringcast_outbound_queue_bytes") == 0
    });
}

#[test]
fn queued_bytes_return_to_zero_when_stalled_subscribers_vanish() {
    const STALLED: usize = 5;
    let port = free_port();
    // A large bound and no stall timer: the bytes stay queued until the peers go away.
    let engine = Engine::start_full(
        &format!("metrics: 127.0.0.1:{port}\n"),
        "",
        "      max_queue_bytes: 67108864\n      slow_subscriber_timeout_ms: 0\n",
        &["--shards", "2"],
    );
    let mut w = Worker::connect(&engine);
    let mut sockets: Vec<_> = (0..STALLED)
        .map(|i| {
            let mut ws = stalled_subscriber(&engine);
            join(&mut ws, &format!("s{i}"), "held", "g");
            assert!(matches!(ws.read().unwrap(), Message::Text(_)), "sync frame");
            ws
        })
        .collect();
    let value = "h".repeat(256 << 10);
    for n in 0..40 {
        w.set("held", "g", &format!("i{n}"), json!(value));
    }
    // Frames are stuck behind each writer's unfinished batch (10 MiB each, far more than the
    // kernel buffers take).
    wait_until(Duration::from_secs(10), "bytes queued for the stalled subscribers", || {
        metric_sum(port, "ringcast_outbound_queue_bytes") > (STALLED as u64) << 20
    });
    assert_eq!(metric_sum(port, "ringcast_slow_subscriber_closes_total"), 0);
    for ws in sockets.drain(..) {
        // Unread data in the receive buffer: the close resets the connection.
        drop(ws);
    }
    wait_until(Duration::from_secs(10), "subscribers gone and queues empty", || {
        metric_sum(port, "ringcast_subscribers") == 0 && metric_sum(port, "ringcast_outbound_queue_bytes") == 0
    });
    // And the engine still serves.
    probe(&mut w, 1);
}

#[test]
fn a_dying_shard_ends_the_process_with_exit_70() {
    let (worker_port, stream_port) = (free_port(), free_port());
    let dir = scratch_dir();
    let config = format!(
        "metrics: false\nworkers:\n  - name: iii-worker-manager\n    config:\n      host: 127.0.0.1\n      port: {worker_port}\n  - name: iii-stream\n    config:\n      host: 127.0.0.1\n      port: {stream_port}\n"
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(binary())
        .arg("--config")
        .arg(&path)
        .args(["--shards", "1"])
        // Test-only trigger: shard 0 panics on the first message of its inbox.
        .env("RINGCAST_TEST_PANIC_SHARD", "0")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ringcast");
    let mut engine = Engine { child, worker_port, stream_port, dir };
    wait_until(Duration::from_secs(10), "the worker port", || TcpStream::connect(("127.0.0.1", worker_port)).is_ok());
    let mut w = Worker::connect(&engine);
    w.send(json!({"type": "invokefunction", "invocation_id": uuid(), "function_id": "stream::get",
        "data": {"stream_name": "s", "group_id": "g", "item_id": "i"}}));
    let status = wait_exit(&mut engine.child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(70), "a dead shard ends the process with 70: {status:?}");
}

#[test]
fn a_reader_that_stops_is_closed_after_the_stall_timeout_without_new_events() {
    let port = free_port();
    // A bound no queue reaches: only the stall timer can close the reader.
    let engine = Engine::start_full(
        &format!("metrics: 127.0.0.1:{port}\n"),
        "",
        "      max_queue_bytes: 67108864\n      slow_subscriber_timeout_ms: 300\n",
        &["--shards", "1"],
    );
    let mut w = Worker::connect(&engine);
    let value = "q".repeat(1 << 20);
    for i in 0..4 {
        w.set("still", "g", &format!("i{i}"), json!(value));
    }
    // A reader that takes its whole 4 MiB snapshot is left alone; one that reads nothing holds
    // it and is closed, though no event follows.
    let mut healthy = Subscriber::connect(&engine);
    let snapshot = healthy.join_sync("h", "still", "g", None);
    assert_eq!(snapshot["event"]["data"].as_array().map(Vec::len), Some(4));
    let mut stalled = stalled_subscriber(&engine);
    join(&mut stalled, "s", "still", "g");
    wait_until(Duration::from_secs(5), "the stalled reader closed", || {
        metric_sum(port, "ringcast_slow_subscriber_closes_total") == 1
    });
    assert_eq!(close_codes(vec![stalled]), vec![Some(4008)]);
    w.set("still", "g", "after", json!(1));
    assert_eq!(healthy.recv()["id"], "after", "the reader that kept up still gets events");
    assert_eq!(metric_sum(port, "ringcast_slow_subscriber_closes_total"), 1);
    wait_until(Duration::from_secs(10), "the closed reader's bytes given back", || {
        metric_sum(port, "ringcast_subscribers") == 1 && metric_sum(port, "ringcast_outbound_queue_bytes") == 0
    });
}
