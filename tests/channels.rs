//! Channels (`engine::channels::create`, `/ws/channels/{id}`) with raw WebSocket clients over
//! real sockets: refusals, frames in order, close propagation both ways, the connect timeout,
//! backpressure from a stalled reader, vanished peers, and the metrics.

mod common;

use common::{free_port, http_get, wait_until, Engine, Worker};
use serde_json::{json, Value};
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

/// An engine with metrics on a free port; `worker_extra` as for `Engine::start_with`.
fn engine_with_metrics(worker_extra: &str) -> (Engine, u16) {
    let port = free_port();
    let engine = Engine::start_full(&format!("metrics: 127.0.0.1:{port}\n"), worker_extra, "", &[]);
    (engine, port)
}

fn metric(port: u16, name: &str) -> u64 {
    let text = http_get(port, "/metrics", Duration::from_secs(2)).expect("metrics answer");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

/// `engine::channels::create` through a worker; returns the result (`writer`, `reader`).
fn create(worker: &mut Worker, data: Value) -> Value {
    let answer = worker.call("engine::channels::create", data);
    assert!(answer["error"].is_null(), "create failed: {answer}");
    answer["result"].clone()
}

fn url(engine: &Engine, r: &Value, dir: &str) -> String {
    format!("ws://127.0.0.1:{}/ws/channels/{}?key={}&dir={dir}", engine.worker_port, r["channel_id"].as_str().unwrap(), r["access_key"].as_str().unwrap())
}

fn open(url: &str) -> Socket {
    let (ws, _) = tungstenite::connect(url).unwrap_or_else(|e| panic!("connect {url}: {e}"));
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    ws
}

/// The HTTP status an upgrade to `url` is refused with.
fn refused_status(url: &str) -> u16 {
    match tungstenite::connect(url) {
        Ok(_) => panic!("upgrade to {url} accepted"),
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade to {url} failed without an HTTP answer: {e}"),
    }
}

/// Reads until the close frame; returns the data frames before it and the close.
fn read_to_close(ws: &mut Socket) -> (Vec<Message>, Option<(u16, String)>) {
    let mut frames = Vec::new();
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => {
                return (frames, frame.map(|f| (u16::from(f.code), f.reason.to_string())));
            }
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => frames.push(m),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e} (after {} frames)", frames.len()),
        }
    }
}

fn close_with(ws: &mut Socket, code: u16, reason: &str) {
    ws.close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() })).unwrap();
    let _ = ws.flush();
}

#[test]
fn create_returns_refs_and_bad_requests_are_refused_with_clear_statuses() {
    let (engine, port) = engine_with_metrics("");
    let mut worker = Worker::connect(&engine);
    let refs = create(&mut worker, json!({}));
    let (w, r) = (&refs["writer"], &refs["reader"]);
    assert_eq!(w["direction"], "write");
    assert_eq!(r["direction"], "read");
    assert_eq!(w["channel_id"], r["channel_id"]);
    assert_eq!(w["access_key"], r["access_key"]);
    for field in ["channel_id", "access_key"] {
        let text = w[field].as_str().unwrap();
        assert!(uuid::Uuid::parse_str(text).is_ok(), "{field} is a UUID: {text}");
    }
    assert_ne!(w["channel_id"], w["access_key"]);
    assert_eq!(metric(port, "ringcast_channels_open"), 1);

    let id = w["channel_id"].as_str().unwrap();
    let base = format!("ws://127.0.0.1:{}/ws/channels", engine.worker_port);
    let wrong_key = uuid::Uuid::new_v4().to_string();
    // Wrong key and unknown channel get the same answer, so a refusal tells nothing.
    assert_eq!(refused_status(&format!("{base}/{id}?key={wrong_key}&dir=write")), 404);
    assert_eq!(refused_status(&format!("{base}/{wrong_key}?key={wrong_key}&dir=read")), 404);
    assert_eq!(metric(port, "ringcast_channel_refused_total"), 2);
    assert_eq!(refused_status(&format!("{base}/{id}?dir=read")), 400);
    assert_eq!(refused_status(&format!("{base}/{id}?key=x&dir=sideways")), 400);
    assert_eq!(refused_status(&format!("{base}/{id}/extra?key=x&dir=read")), 404);

    // One socket per end: the second writer is refused while the first holds the end.
    let _writer = open(&url(&engine, w, "write"));
    assert_eq!(refused_status(&url(&engine, w, "write")), 409);
    // A wrong key did not take or spoil the reader end.
    let _reader = open(&url(&engine, r, "read"));
    wait_until(Duration::from_secs(5), "two channel sockets", || metric(port, "ringcast_channel_sockets") == 2);

    // buffer_size of the wrong type is a clear error; other functions keep answering.
    let bad = worker.call("engine::channels::create", json!({"buffer_size": "big"}));
    assert_eq!(bad["error"]["code"], "deserialization_error", "{bad}");
    worker.assert_quiet();
}

#[test]
fn text_and_binary_frames_pass_in_order_unmodified_and_the_writers_close_follows() {
    let (engine, port) = engine_with_metrics("");
    let mut worker = Worker::connect(&engine);
    let refs = create(&mut worker, json!({"buffer_size": 4}));
    let mut writer = open(&url(&engine, &refs["writer"], "write"));
    let mut sent = Vec::new();
    for i in 0..200u32 {
        let frame = if i % 3 == 0 {
            Message::text(format!("{{\"type\":\"progress\",\"n\":{i},\"note\":\"é ✓\"}}"))
        } else {
            // Sizes from 0 bytes to ~300 KiB, contents that depend on the index.
            let len = (i as usize * 1543) % (300 << 10);
            Message::binary((0..len).map(|b| (b as u32 ^ i) as u8).collect::<Vec<u8>>())
        };
        sent.push(frame);
    }
    // The writer writes everything and closes before the reader exists: what fits the buffer
    // waits there, the rest in the sockets (the writer is not read meanwhile).
    let sender = std::thread::spawn(move || {
        for frame in sent.clone() {
            writer.send(frame).unwrap();
        }
        close_with(&mut writer, 1000, "stream_complete");
        let (after, close) = read_to_close(&mut writer);
        (sent, after.len(), close)
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut reader = open(&url(&engine, &refs["reader"], "read"));
    let (got, close) = read_to_close(&mut reader);
    let (sent, extra, writer_close) = sender.join().unwrap();
    assert_eq!(extra, 0);
    assert_eq!(writer_close.map(|c| c.0), Some(1000), "the writer's close is answered");
    assert_eq!(got.len(), sent.len());
    for (i, (a, b)) in got.iter().zip(&sent).enumerate() {
        assert!(a == b, "frame {i} differs (text stays text, binary stays binary)");
    }
    assert_eq!(close, Some((1000, "stream_complete".to_string())), "the writer's close reaches the reader");
    let bytes: usize = sent.iter().map(|m| m.len()).sum();
    wait_until(Duration::from_secs(5), "channel reclaimed", || metric(port, "ringcast_channels_open") == 0);
    assert_eq!(metric(port, "ringcast_channel_bytes_relayed_total"), bytes as u64);
    assert_eq!(metric(port, "ringcast_channel_frames_relayed_total"), 200);
    assert_eq!(metric(port, "ringcast_channel_sockets"), 0);
    assert_eq!(metric(port, "ringcast_channel_buffered_bytes"), 0);
    // A used end cannot be taken again, and a reclaimed channel is gone.
    assert_eq!(refused_status(&url(&engine, &refs["reader"], "read")), 404);
}

#[test]
fn the_readers_close_reaches_the_writer() {
    let (engine, port) = engine_with_metrics("");
    let mut worker = Worker::connect(&engine);
    let refs = create(&mut worker, json!({}));
    let mut writer = open(&url(&engine, &refs["writer"], "write"));
    let mut reader = open(&url(&engine, &refs["reader"], "read"));
    writer.send(Message::text("first")).unwrap();
    assert_eq!(reader.read().unwrap(), Message::text("first"));
    close_with(&mut reader, 4100, "enough");
    let (_, close) = read_to_close(&mut writer);
    assert_eq!(close, Some((4100, "enough".to_string())));
    let (_, reader_close) = read_to_close(&mut reader);
    assert_eq!(reader_close.map(|c| c.0), Some(4100), "the reader's close is answered");
    wait_until(Duration::from_secs(5), "channel reclaimed", || metric(port, "ringcast_channels_open") == 0);
}

#[test]
fn a_peer_that_never_connects_times_out_with_4001_and_the_channel_is_reclaimed() {
    let (engine, port) = engine_with_metrics("      channel_connect_timeout_ms: 300\n");
    let mut worker = Worker::connect(&engine);
    let lonely = create(&mut worker, json!({}));
    let unused = create(&mut worker, json!({}));
    let mut writer = open(&url(&engine, &lonely["writer"], "write"));
    writer.send(Message::binary(vec![7u8; 1000])).unwrap();
    let started = Instant::now();
    let (_, close) = read_to_close(&mut writer);
    assert_eq!(close, Some((4001, "channel peer never connected".to_string())));
    assert!(started.elapsed() < Duration::from_secs(3), "closed after {:?}", started.elapsed());
    wait_until(Duration::from_secs(5), "both channels reclaimed", || metric(port, "ringcast_channels_open") == 0);
    assert_eq!(metric(port, "ringcast_channel_timeouts_total"), 2);
    assert_eq!(metric(port, "ringcast_channel_buffered_bytes"), 0);
    assert_eq!(refused_status(&url(&engine, &unused["reader"], "read")), 404);
}

#[test]
fn max_channels_refuses_create_with_a_clear_error() {
    let (engine, port) = engine_with_metrics("      max_channels: 2\n");
    let mut worker = Worker::connect(&engine);
    create(&mut worker, json!({}));
    create(&mut worker, json!({}));
    let third = worker.call("engine::channels::create", json!({}));
    assert_eq!(third["error"]["code"], "CHANNEL_LIMIT", "{third}");
    assert_eq!(metric(port, "ringcast_channel_limit_refusals_total"), 1);
    assert_eq!(metric(port, "ringcast_channels_open"), 2);
}

/// Bytes the engine may hold for a channel whose reader stalls: the configured buffer plus one
/// frame (the test's frames are 64 KiB, as the SDKs send them).
const BUFFER_BYTES: u64 = 1 << 20;
const FRAME: usize = 64 << 10;

#[test]
fn a_stalled_reader_slows_the_writer_and_memory_stays_bounded() {
    let (engine, port) = engine_with_metrics(&format!("      channel_max_buffer_bytes: {BUFFER_BYTES}\n"));
    let mut worker = Worker::connect(&engine);
    let refs = create(&mut worker, json!({"buffer_size": 1024}));
    let mut reader = open(&url(&engine, &refs["reader"], "read"));
    let mut writer = open(&url(&engine, &refs["writer"], "write"));
    let rss_before = engine.rss_kib();
    const TOTAL: usize = 160 << 20;
    let written = Arc::new(AtomicU64::new(0));
    let progress = written.clone();
    let sender = std::thread::spawn(move || {
        let mut sum = 0u64;
        for i in 0..TOTAL / FRAME {
            let frame: Vec<u8> = (0..FRAME).map(|b| (b as u8).wrapping_mul(31).wrapping_add(i as u8)).collect();
            sum = frame.iter().fold(sum, |s, &b| s.wrapping_mul(131).wrapping_add(u64::from(b)));
            writer.send(Message::binary(frame)).unwrap();
            progress.fetch_add(FRAME as u64, Ordering::Relaxed);
        }
        close_with(&mut writer, 1000, "stream_complete");
        let _ = read_to_close(&mut writer);
        sum
    });
    // The reader does not read: the writer must come to a stop well before the end.
    let mut last = (0, Instant::now());
    wait_until(Duration::from_secs(30), "the writer to stall", || {
        let now = written.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
        now > 0 && last.1.elapsed() > Duration::from_millis(500)
    });
    let stalled_at = written.load(Ordering::Relaxed);
    assert!(stalled_at < (TOTAL as u64) / 2, "writer not slowed: {stalled_at} bytes written");
    let buffered = metric(port, "ringcast_channel_buffered_bytes");
    assert!(buffered <= BUFFER_BYTES + FRAME as u64, "engine buffers {buffered} bytes");
    let grown_kib = engine.rss_kib().saturating_sub(rss_before);
    assert!(grown_kib < 32 << 10, "engine RSS grew by {grown_kib} KiB while the reader stalled");
    assert_eq!(written.load(Ordering::Relaxed), stalled_at, "the writer stays stopped");

    // The reader resumes: everything arrives, in order, nothing lost.
    let mut sum = 0u64;
    let mut received = 0usize;
    loop {
        match reader.read().unwrap() {
            Message::Binary(b) => {
                received += b.len();
                sum = b.iter().fold(sum, |s, &x| s.wrapping_mul(131).wrapping_add(u64::from(x)));
            }
            Message::Close(frame) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1000));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(received, TOTAL);
    assert_eq!(sum, sender.join().unwrap(), "checksum of what the writer sent");
}

#[test]
fn a_writer_that_vanishes_closes_the_reader_with_4002_and_frees_everything() {
    let (engine, port) = engine_with_metrics("");
    let mut worker = Worker::connect(&engine);
    let fds_before = engine.fd_count();
    let refs = create(&mut worker, json!({}));
    let mut writer = open(&url(&engine, &refs["writer"], "write"));
    let mut reader = open(&url(&engine, &refs["reader"], "read"));
    writer.send(Message::binary(vec![1u8; 5000])).unwrap();
    writer.send(Message::text("last words")).unwrap();
    writer.flush().unwrap();
    // Gone without a Close frame: the TCP connection is just dropped.
    drop(writer);
    let (frames, close) = read_to_close(&mut reader);
    assert_eq!(frames, vec![Message::binary(vec![1u8; 5000]), Message::text("last words")], "what was sent is delivered");
    assert_eq!(close, Some((4002, "channel writer went away".to_string())));
    drop(reader);
    wait_until(Duration::from_secs(5), "channel reclaimed", || metric(port, "ringcast_channels_open") == 0);
    wait_until(Duration::from_secs(5), "channel sockets freed", || metric(port, "ringcast_channel_sockets") == 0);
    wait_until(Duration::from_secs(5), "engine fds back to the baseline", || engine.fd_count() <= fds_before);
}

#[test]
fn a_reader_that_vanishes_stops_the_writer_with_4002() {
    let (engine, port) = engine_with_metrics("");
    let mut worker = Worker::connect(&engine);
    let fds_before = engine.fd_count();
    let refs = create(&mut worker, json!({}));
    let mut writer = open(&url(&engine, &refs["writer"], "write"));
    let reader = open(&url(&engine, &refs["reader"], "read"));
    wait_until(Duration::from_secs(5), "two channel sockets", || metric(port, "ringcast_channel_sockets") == 2);
    // Reset, not FIN: the reader's host is gone.
    if let MaybeTlsStream::Plain(s) = reader.get_ref() {
        socket2::SockRef::from(s).set_linger(Some(Duration::ZERO)).unwrap();
    }
    drop(reader);
    let (_, close) = read_to_close(&mut writer);
    assert_eq!(close, Some((4002, "channel reader went away".to_string())));
    drop(writer);
    wait_until(Duration::from_secs(5), "channel reclaimed", || metric(port, "ringcast_channels_open") == 0);
    wait_until(Duration::from_secs(5), "engine fds back to the baseline", || engine.fd_count() <= fds_before);
}

#[test]
fn a_channel_request_that_trickles_in_is_still_served_and_workers_are_unaffected() {
    let (engine, _port) = engine_with_metrics("");
    let mut worker = Worker::connect(&engine);
    let refs = create(&mut worker, json!({}));
    let w = &refs["writer"];
    let request = format!(
        "GET /ws/channels/{}?key={}&dir=write HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        w["channel_id"].as_str().unwrap(),
        w["access_key"].as_str().unwrap()
    );
    let mut raw = TcpStream::connect(("127.0.0.1", engine.worker_port)).unwrap();
    raw.set_nodelay(true).unwrap();
    for chunk in request.as_bytes().chunks(5) {
        raw.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = [0u8; 12];
    std::io::Read::read_exact(&mut raw, &mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 101");
    // A connection that sends nothing does not hold up the control core: workers still answer.
    let silent = TcpStream::connect(("127.0.0.1", engine.worker_port)).unwrap();
    worker.assert_quiet();
    drop(silent);
}

#[test]
fn sigterm_closes_channel_sockets_with_1001_and_exits_zero() {
    let (mut engine, _port) = engine_with_metrics("");
    let mut worker = Worker::connect(&engine);
    let refs = create(&mut worker, json!({}));
    let mut writer = open(&url(&engine, &refs["writer"], "write"));
    let mut reader = open(&url(&engine, &refs["reader"], "read"));
    writer.send(Message::text("before the stop")).unwrap();
    assert_eq!(reader.read().unwrap(), Message::text("before the stop"));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(engine.child.id() as i32, common::SIGTERM) };
    for ws in [&mut writer, &mut reader] {
        let (_, close) = read_to_close(ws);
        assert_eq!(close, Some((1001, "engine shutting down".to_string())));
    }
    let status = common::wait_exit(&mut engine.child, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_writer_that_sends_an_invalid_frame_is_closed_and_the_reader_told() {
    let (engine, port) = engine_with_metrics("");
    let mut worker = Worker::connect(&engine);
    let refs = create(&mut worker, json!({}));
    let mut writer = open(&url(&engine, &refs["writer"], "write"));
    let mut reader = open(&url(&engine, &refs["reader"], "read"));
    writer.send(Message::text("valid")).unwrap();
    // A masked text frame whose payload is not UTF-8.
    if let MaybeTlsStream::Plain(s) = writer.get_mut() {
        s.write_all(&[0x81, 0x82, 0, 0, 0, 0, 0xff, 0xfe]).unwrap();
    }
    let (_, close) = read_to_close(&mut writer);
    assert_eq!(close.map(|c| c.0), Some(1007));
    let (frames, close) = read_to_close(&mut reader);
    assert_eq!(frames, vec![Message::text("valid")]);
    assert_eq!(close, Some((4002, "channel writer failed: invalid frame".to_string())));
    drop(reader);
    wait_until(Duration::from_secs(5), "channel reclaimed", || metric(port, "ringcast_channels_open") == 0);
}

#[test]
fn buffer_size_bounds_the_frames_held_for_a_stalled_reader() {
    let (engine, port) = engine_with_metrics("");
    let mut worker = Worker::connect(&engine);
    let refs = create(&mut worker, json!({"buffer_size": 2}));
    let _reader = open(&url(&engine, &refs["reader"], "read"));
    let mut writer = open(&url(&engine, &refs["writer"], "write"));
    let written = Arc::new(AtomicU64::new(0));
    let progress = written.clone();
    // Runs until the engine closes it (the test's end kills the engine).
    std::thread::spawn(move || {
        while writer.send(Message::binary(vec![3u8; FRAME])).is_ok() {
            progress.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut last = (0, Instant::now());
    wait_until(Duration::from_secs(30), "the writer to stall", || {
        let now = written.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
        now > 0 && last.1.elapsed() > Duration::from_millis(500)
    });
    let buffered = metric(port, "ringcast_channel_buffered_bytes");
    assert!(buffered > 0, "the stalled reader's frames wait in the buffer");
    assert!(buffered <= 2 * FRAME as u64, "buffer_size 2 holds {buffered} bytes");
}
