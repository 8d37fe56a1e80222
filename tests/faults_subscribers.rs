//! Subscriber faults over real sockets: peers that vanish (FIN, RST), stop reading, or fall
//! silent; hostile upgrade URLs; over-long ids; a flood of leaves against a slow trigger; an
//! auth call nobody answers. Each test checks that the engine's own resources (open fds, RSS,
//! pending invocations, subscriber gauges) come back and that it keeps serving.

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::Message;

/// How long the engine may take to notice a fault and free what it held.
const RECOVERY: Duration = Duration::from_secs(6);

/// The engine's fd count at rest: after one subscriber came and left cleanly (so lazily opened
/// fds are already there) and once the count holds still for 300 ms.
fn baseline_fds(engine: &Engine) -> usize {
    let mut warm = Subscriber::connect(engine);
    warm.join_sync("warm-up", "warm", "g", None);
    warm.ws.close(None).unwrap();
    while warm.ws.read().is_ok() {}
    let mut last = engine.fd_count();
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && stable_since.elapsed() < Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(20));
        let now = engine.fd_count();
        if now != last {
            (last, stable_since) = (now, Instant::now());
        }
    }
    last
}

/// A gauge or counter of the metrics endpoint.
fn metric(port: u16, line_start: &str) -> u64 {
    let text = http_get(port, "/metrics", FRAME_WAIT).unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
}

/// A one-shard engine with metrics on `metrics_port`.
fn engine_with_metrics(metrics_port: u16, stream_extra: &str) -> Engine {
    Engine::start_full(&format!("metrics: 127.0.0.1:{metrics_port}\n"), "", stream_extra, &["--shards", "1"])
}

fn subscribers_and_subscriptions(metrics_port: u16) -> (u64, u64) {
    (metric(metrics_port, "ringcast_subscribers{shard=\"0\"}"), metric(metrics_port, "ringcast_subscriptions{shard=\"0\"}"))
}

/// Asserts the engine is back to `baseline` fds with no subscriber or subscription left.
fn assert_recovered(engine: &Engine, metrics_port: u16, baseline: usize, what: &str) {
    assert!(eventually(RECOVERY, || engine.fd_count() <= baseline), "{what}: engine fds {} did not return to {baseline}", engine.fd_count());
    assert!(eventually(RECOVERY, || subscribers_and_subscriptions(metrics_port) == (0, 0)), "{what}: gauges {:?}", subscribers_and_subscriptions(metrics_port));
}

/// Connects `n` subscribers that each hold one subscription.
fn joined_subscribers(engine: &Engine, n: usize) -> Vec<Subscriber> {
    (0..n)
        .map(|i| {
            let mut sub = Subscriber::connect(engine);
            sub.join_sync(&format!("s{i}"), "faults", "g", None);
            sub
        })
        .collect()
}

fn tcp_of(sub: &Subscriber) -> &TcpStream {
    match sub.ws.get_ref() {
        MaybeTlsStream::Plain(s) => s,
        _ => unreachable!("tests use plain sockets"),
    }
}

#[test]
fn clients_that_vanish_with_fin_free_their_sockets() {
    let metrics_port = free_port();
    let engine = engine_with_metrics(metrics_port, "");
    let baseline = baseline_fds(&engine);
    let subs = joined_subscribers(&engine, 10);
    assert!(engine.fd_count() >= baseline + 10);
    drop(subs); // close(2) without a WebSocket close frame: a FIN
    assert_recovered(&engine, metrics_port, baseline, "FIN");
    Subscriber::connect(&engine).join_sync("after", "faults", "g", None);
}

#[test]
fn clients_that_reset_free_their_sockets() {
    let metrics_port = free_port();
    let engine = engine_with_metrics(metrics_port, "");
    let baseline = baseline_fds(&engine);
    let subs = joined_subscribers(&engine, 10);
    for sub in &subs {
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: setsockopt(2) on a live socket with a correctly sized option value.
        let rc = unsafe {
            libc::setsockopt(tcp_of(sub).as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, (&linger as *const libc::linger).cast(), std::mem::size_of::<libc::linger>() as libc::socklen_t)
        };
        assert_eq!(rc, 0);
    }
    drop(subs); // SO_LINGER 0: close(2) sends a RST
    assert_recovered(&engine, metrics_port, baseline, "RST");
    Subscriber::connect(&engine).join_sync("after", "faults", "g", None);
}

#[test]
fn half_closed_client_that_stopped_reading_is_freed_with_its_queue() {
    let metrics_port = free_port();
    let engine = engine_with_metrics(metrics_port, "      max_queue_bytes: 67108864\n");
    let mut w = Worker::connect(&engine);
    let baseline = baseline_fds(&engine);
    // A tiny receive window: the engine's writer soon blocks on this socket.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], engine.stream_port)).into()).unwrap();
    let tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(FRAME_WAIT)).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://127.0.0.1:{}/", engine.stream_port), MaybeTlsStream::Plain(tcp)).unwrap();
    let mut sub = Subscriber { ws };
    sub.join_sync("s", "faults", "g", None);
    let value = "x".repeat(512 << 10);
    for i in 0..16 {
        w.set("faults", "g", &format!("i{i}"), json!(value));
    }
    // Stops reading and half-closes: the engine reads EOF while its writer is stuck.
    tcp_of(&sub).shutdown(std::net::Shutdown::Write).unwrap();
    assert_recovered(&engine, metrics_port, baseline, "half-closed, not reading");
    drop(sub);
}

#[test]
fn silent_client_is_closed_after_the_ping_timeout_and_a_live_one_stays() {
    let metrics_port = free_port();
    let engine = engine_with_metrics(metrics_port, "      ping_interval_ms: 200\n      ping_timeout_ms: 300\n");
    let baseline = baseline_fds(&engine);
    // Never reads, so never answers a ping.
    let mut silent = Subscriber::connect(&engine);
    silent.join_sync("quiet", "faults", "g", None);
    // Reads (tungstenite answers each ping with a pong on the next read).
    let mut live = Subscriber::connect(&engine);
    live.join_sync("live", "faults", "g", None);
    if let MaybeTlsStream::Plain(s) = live.ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    }
    let mut pings = 0;
    let watch_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < watch_until {
        match live.ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(Message::Close(frame)) => panic!("live subscriber closed: {frame:?}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("live subscriber failed: {e}"),
        }
    }
    assert!(pings >= 3, "the engine pings every 200 ms ({pings} pings)");
    assert!(eventually(RECOVERY, || metric(metrics_port, "ringcast_subscribers{shard=\"0\"}") == 1), "the silent subscriber was not closed");
    if let MaybeTlsStream::Plain(s) = live.ws.get_ref() {
        s.set_read_timeout(Some(FRAME_WAIT)).unwrap();
    }
    live.join_sync("still-live", "faults", "g2", None);
    drop(live);
    assert_recovered(&engine, metrics_port, baseline, "silent");
    drop(silent);
}

/// Sends raw request bytes to the stream port; returns the status code answered.
fn raw_status(engine: &Engine, request: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", engine.stream_port)).unwrap();
    stream.set_read_timeout(Some(FRAME_WAIT)).unwrap();
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    let mut chunk = [0u8; 1024];
    while !response.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line in {text:?}"))
}

fn upgrade_request(path: &[u8], extra: &str) -> Vec<u8> {
    let mut request = b"GET ".to_vec();
    request.extend_from_slice(path);
    request.extend_from_slice(
        format!(" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").as_bytes(),
    );
    request
}

#[test]
fn odd_urls_get_4xx_and_the_engine_keeps_serving() {
    let engine = Engine::start_with("", "", &["--shards", "1"]);
    let mut w = Worker::connect(&engine);
    let paths: [&[u8]; 8] = [
        "/stream/%a€/g".as_bytes(),
        b"/stream/%/g",
        b"/stream/s/g%",
        b"/stream/s/g/%4",
        b"/stream/%zz/g",
        b"/stream/s/%C3%28",
        b"/stream/\xff\xfe/g",
        "/stream/€%€/g/%€".as_bytes(),
    ];
    for path in paths {
        let status = raw_status(&engine, &upgrade_request(path, ""));
        assert!((400..500).contains(&status), "{:?} answered {status}", String::from_utf8_lossy(path));
    }
    let huge = format!("X-Big: {}\r\n", "a".repeat(20 << 10));
    let status = raw_status(&engine, &upgrade_request(b"/", &huge));
    assert!((400..500).contains(&status), "huge headers answered {status}");

    let mut sub = Subscriber::connect_path(&engine, "/stream/caf%C3%A9/g/");
    assert_eq!(sub.recv()["event"]["type"], "sync");
    w.set("café", "g", "i", json!(1));
    assert_eq!(sub.recv()["id"], "i");
}

fn expect_close(sub: &mut Subscriber) -> (u16, String) {
    loop {
        match sub.ws.read() {
            Ok(Message::Close(Some(frame))) => return (frame.code.into(), frame.reason.to_string()),
            Ok(Message::Text(text)) => panic!("expected a close, got {text}"),
            Ok(_) => continue,
            Err(e) => panic!("expected a close frame, got {e}"),
        }
    }
}

#[test]
fn over_long_ids_are_refused_with_close_1008() {
    let engine = Engine::start_with("", "      max_id_bytes: 64\n", &["--shards", "1"]);
    let at_limit = "a".repeat(64);
    let over = "a".repeat(65);
    let mut ok = Subscriber::connect(&engine);
    ok.join_sync(&at_limit, &at_limit, &at_limit, Some(&at_limit));

    for (subscription, stream, group, item) in [
        (over.as_str(), "s", "g", None),
        ("s", over.as_str(), "g", None),
        ("s", "s", over.as_str(), None),
        ("s", "s", "g", Some(over.as_str())),
    ] {
        let mut sub = Subscriber::connect(&engine);
        sub.join(subscription, stream, group, item);
        let (code, reason) = expect_close(&mut sub);
        assert_eq!(code, 1008, "{reason}");
        assert!(reason.contains("max_id_bytes"), "{reason}");
    }
    let mut leave = Subscriber::connect(&engine);
    leave.leave(&over, "s", "g");
    assert_eq!(expect_close(&mut leave).0, 1008);

    let mut url = Subscriber::connect_path(&engine, &format!("/stream/{over}/g"));
    assert_eq!(expect_close(&mut url).0, 1008);
    Subscriber::connect(&engine).join_sync("after", "s", "g", None);
}

#[test]
fn leave_flood_against_a_slow_trigger_worker_stays_bounded() {
    let engine = Engine::start_with("", "", &["--shards", "1"]);
    let mut app = Worker::connect(&engine);
    app.register_function("app::on_leave");
    app.send(json!({"type": "registertrigger", "id": "l", "trigger_type": "stream:leave", "function_id": "app::on_leave", "config": {}}));
    app.sync();
    let rss_before = engine.rss_kib();

    let mut sub = Subscriber::connect(&engine);
    if let MaybeTlsStream::Plain(s) = sub.ws.get_ref() {
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    }
    // 20,000 leaves; once the engine stops reading, the sends may block: then stop.
    for i in 0..20_000 {
        let leave = json!({"type": "leave", "data": {"subscriptionId": format!("s{i}"), "streamName": "flood", "groupId": "g"}});
        if sub.ws.send(Message::text(leave.to_string())).is_err() {
            break;
        }
    }
    // The trigger worker answers nothing: only the per-connection window of calls reaches it.
    let mut calls = Vec::new();
    if let MaybeTlsStream::Plain(s) = app.ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    }
    let stop = Instant::now() + Duration::from_secs(3);
    while Instant::now() < stop {
        match app.ws.read() {
            Ok(Message::Text(text)) => {
                let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "invokefunction" {
                    calls.push(frame);
                }
            }
            Ok(_) => {}
            Err(_) => break, // quiet for 500 ms
        }
    }
    assert!(!calls.is_empty() && calls.len() <= 8, "{} leave calls in flight (at most 8 per connection)", calls.len());
    let grown = engine.rss_kib().saturating_sub(rss_before);
    assert!(grown < 24 << 10, "engine RSS grew by {grown} KiB");

    // Answering frees the window: more leaves come.
    if let MaybeTlsStream::Plain(s) = app.ws.get_ref() {
        s.set_read_timeout(Some(FRAME_WAIT)).unwrap();
    }
    for call in &calls {
        app.answer(call, json!(null));
    }
    let next = app.recv_type("invokefunction");
    assert_eq!(next["function_id"], "app::on_leave");
}

#[test]
fn auth_call_given_up_by_the_shard_frees_its_pending_invocation() {
    let metrics_port = free_port();
    let engine = Engine::start_full(
        &format!("metrics: 127.0.0.1:{metrics_port}\n"),
        "",
        "      auth_function: auth::slow\n      auth_timeout_ms: 300\n",
        &["--shards", "1"],
    );
    let mut app = Worker::connect(&engine);
    app.register_function("auth::slow");
    // Fail-open after 300 ms: the upgrade goes through without a context.
    let mut sub = Subscriber::connect(&engine);
    let auth = app.recv_type("invokefunction");
    assert_eq!(auth["function_id"], "auth::slow");
    sub.join_sync("s", "a", "g", None);
    assert!(
        eventually(RECOVERY, || metric(metrics_port, "ringcast_invocations_in_flight ") == 0),
        "the abandoned auth call is still pending"
    );
    // A late answer is dropped without harm.
    app.answer(&auth, json!({"context": {"late": true}}));
    app.assert_quiet();
}
