//! Workers that misbehave or vanish, over real sockets: a worker that stops reading is closed
//! (4008) with bounded engine memory; FIN, RST, half-open and silent workers free their socket
//! and registrations; the engine's own functions and trigger types cannot be taken over; a slow
//! metrics client does not block `/healthz`.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};
use tungstenite::stream::MaybeTlsStream;

fn tcp(worker: &Worker) -> &TcpStream {
    match worker.ws.get_ref() {
        MaybeTlsStream::Plain(s) => s,
        _ => unreachable!("plain loopback socket"),
    }
}

/// How long a fault test waits for the engine to clean up (the condition is polled; where it
/// asks the observer worker, that also keeps it talking, so its ping timeout never hits it).
const CLEANUP_WAIT: Duration = Duration::from_secs(5);

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn function_ids(worker: &mut Worker) -> Vec<String> {
    let listed = worker.ok("engine::functions::list", json!({}));
    listed["functions"]
        .as_array()
        .unwrap_or_else(|| panic!("functions list: {listed}"))
        .iter()
        .filter_map(|f| f["function_id"].as_str().map(str::to_string))
        .collect()
}

/// A worker whose socket has a small, fixed receive buffer (no autotuning), so a peer that
/// stops reading backs up into the engine after a few hundred KiB rather than megabytes.
fn connect_small_rcvbuf(engine: &Engine) -> Worker {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(64 << 10).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", engine.worker_port).parse().unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(FRAME_WAIT)).unwrap();
    let (ws, _) = tungstenite::client(engine.url(), MaybeTlsStream::Plain(stream)).expect("upgrade");
    let mut worker = Worker { ws, worker_id: String::new(), reattach_token: String::new() };
    assert_eq!(worker.recv()["type"], "workerregistered");
    worker
}

fn invoke(worker: &mut Worker, function_id: &str, data: Value) -> String {
    let id = uuid();
    worker.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": function_id, "data": data}));
    id
}

#[test]
fn worker_that_stops_reading_is_closed_with_4008_and_memory_stays_bounded() {
    let port = free_port();
    let engine = Engine::start_full(
        &format!("metrics: 127.0.0.1:{port}\n"),
        "      max_outbox_bytes: 2097152\n      ping_interval_ms: 0\n",
        "      max_value_bytes: 4194304\n",
        &["--shards", "1"],
    );
    let mut caller = Worker::connect(&engine);
    caller.set("big", "g", "item", json!("x".repeat(1 << 20)));
    let mut stalled = connect_small_rcvbuf(&engine);
    stalled.register_function("stalled::work");
    let pending = invoke(&mut caller, "stalled::work", json!({}));
    assert_eq!(stalled.recv_type("invokefunction")["invocation_id"], pending.as_str());
    let baseline = engine.rss_kib();

    // 250 small requests for a 1 MiB item, none of whose answers is read.
    for _ in 0..250 {
        invoke(&mut stalled, "stream::get", json!({"stream_name": "big", "group_id": "g", "item_id": "item"}));
    }

    // Debug builds take a while to produce the megabytes that fill the outbox.
    tcp(&caller).set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let result = caller.recv_type("invocationresult");
    tcp(&caller).set_read_timeout(Some(FRAME_WAIT)).unwrap();
    assert_eq!(result["invocation_id"], pending.as_str());
    assert_eq!(result["error"]["code"], "invocation_stopped", "{result}");
    // What reached the socket before the end is followed by the documented close frame.
    if let MaybeTlsStream::Plain(s) = stalled.ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    assert_eq!(stalled.recv_close(), Some(4008));

    let (text, limit_kib) = (http_get(port, "/metrics", FRAME_WAIT).unwrap(), 32 * 1024);
    assert_eq!(metric(&text, "ringcast_worker_outbox_closes_total"), 1);
    assert_eq!(metric(&text, "ringcast_workers_connected"), 1);
    wait_until(CLEANUP_WAIT, "engine RSS back within 32 MiB of its baseline", || {
        engine.rss_kib() <= baseline + limit_kib
    });
    // The engine still serves the item to a worker that reads.
    let got = caller.ok("stream::get", json!({"stream_name": "big", "group_id": "g", "item_id": "item"}));
    assert_eq!(got.as_str().map(str::len), Some(1 << 20));
}

#[test]
fn vanished_workers_free_their_socket_and_registrations() {
    let engine = Engine::start_with(
        "      ping_interval_ms: 500\n      ping_timeout_ms: 500\n",
        "      max_value_bytes: 4194304\n",
        &["--shards", "1"],
    );
    let mut observer = Worker::connect(&engine);
    observer.set("big", "g", "item", json!("y".repeat(1 << 20)));
    // One clean connect/close cycle first, so lazily opened engine fds are in the baseline.
    let mut warmup = Worker::connect(&engine);
    warmup.register_function("warm::up");
    warmup.ws.close(None).unwrap();
    let _ = warmup.recv_close();
    drop(warmup);
    wait_until(CLEANUP_WAIT, "warm-up worker gone", || !function_ids(&mut observer).contains(&"warm::up".to_string()));
    let baseline = engine.fd_count();

    let mut keep_alive = Vec::new();
    for mode in ["fin", "rst", "half-open-with-queue", "silent"] {
        let mut worker = Worker::connect(&engine);
        let function = format!("gone::{mode}");
        worker.register_function(&function);
        match mode {
            // Process exit: FIN, and the socket is never read again.
            "fin" => tcp(&worker).shutdown(Shutdown::Write).unwrap(),
            // Killed process or NAT timeout: RST.
            "rst" => {
                socket2::SockRef::from(tcp(&worker)).set_linger(Some(Duration::ZERO)).unwrap();
                drop(worker);
                observer.sync();
                continue;
            }
            // Megabytes queued towards a peer that sent FIN and reads nothing more.
            "half-open-with-queue" => {
                for _ in 0..12 {
                    invoke(&mut worker, "stream::get", json!({"stream_name": "big", "group_id": "g", "item_id": "item"}));
                }
                worker.recv_type("invocationresult");
                tcp(&worker).shutdown(Shutdown::Write).unwrap();
            }
            // Connected, never answers a ping, never reads.
            _ => {}
        }
        keep_alive.push(worker);
        observer.sync(); // the observer stays well inside its own ping timeout
    }

    for mode in ["fin", "rst", "half-open-with-queue", "silent"] {
        let function = format!("gone::{mode}");
        wait_until(CLEANUP_WAIT, &format!("{function} unregistered"), || {
            let answer = observer.call(&function, json!({}));
            answer["error"]["code"] == "function_not_found" && !function_ids(&mut observer).contains(&function)
        });
    }
    wait_until(CLEANUP_WAIT, "engine fds back to baseline", || {
        observer.sync();
        engine.fd_count() <= baseline
    });
    let workers = observer.ok("engine::workers::list", json!({}));
    assert_eq!(workers["workers"].as_array().map(Vec::len), Some(1), "{workers}");
    drop(keep_alive);
}

#[test]
fn worker_killed_mid_call_answers_its_caller_invocation_stopped() {
    let engine = Engine::start();
    let mut caller = Worker::connect(&engine);
    let mut owner = Worker::connect(&engine);
    owner.register_function("dying::work");
    let id = invoke(&mut caller, "dying::work", json!({"n": 1}));
    owner.recv_type("invokefunction");
    socket2::SockRef::from(tcp(&owner)).set_linger(Some(Duration::ZERO)).unwrap();
    drop(owner);
    let result = caller.recv_type("invocationresult");
    assert_eq!(result["invocation_id"], id.as_str());
    assert_eq!(result["error"]["code"], "invocation_stopped", "{result}");
    assert_eq!(caller.call("dying::work", json!({}))["error"]["code"], "function_not_found");
}

#[test]
fn builtin_functions_and_trigger_types_cannot_be_taken_over() {
    let engine = Engine::start_with("", "", &["--shards", "1"]);
    let mut app = Worker::connect(&engine);
    let mut hostile = Worker::connect(&engine);
    for id in ["stream::set", "engine::functions::list", "engine::register_trigger"] {
        hostile.send(json!({"type": "registerfunction", "id": id}));
        let rejected = hostile.recv_type("registrationrejected");
        assert_eq!(
            rejected,
            json!({"type": "registrationrejected", "code": "FUNCTION_NAMESPACE_CONFLICT", "namespace": "default", "function_id": id, "owner_worker_id": ""})
        );
    }
    for id in ["stream:join", "stream", "engine::functions-available"] {
        hostile.send(json!({"type": "registertriggertype", "id": id, "description": "hijack"}));
        let rejected = hostile.recv_type("registrationrejected");
        assert_eq!((rejected["code"].as_str(), rejected["function_id"].as_str()), (Some("FUNCTION_NAMESPACE_CONFLICT"), Some(id)));
    }
    // A custom stream implementation is a worker's own id and stays allowed.
    hostile.send(json!({"type": "registerfunction", "id": "stream::get(custom)"}));
    hostile.assert_quiet();
    // Nothing a worker sends removes the builtins.
    hostile.send(json!({"type": "unregisterfunction", "id": "stream::set"}));
    hostile.send(json!({"type": "unregistertriggertype", "id": "stream:join"}));
    hostile.assert_quiet();

    app.set("s", "g", "i", json!(1));
    hostile.assert_quiet(); // the builtin answered, not the hostile worker
    let id = invoke(&mut app, "stream::get", json!({"stream_name": "custom", "group_id": "g", "item_id": "i"}));
    let call = hostile.recv_type("invokefunction");
    assert_eq!(call["function_id"], "stream::get(custom)");
    hostile.answer(&call, json!("from the custom stream"));
    let result = app.recv_type("invocationresult");
    assert_eq!((result["invocation_id"].as_str(), &result["result"]), (Some(id.as_str()), &json!("from the custom stream")));

    hostile.ws.close(None).unwrap();
    let _ = hostile.recv_close();
    drop(hostile);
    wait_until(CLEANUP_WAIT, "hostile worker gone", || {
        app.ok("engine::workers::list", json!({}))["workers"].as_array().map(Vec::len) == Some(1)
    });
    assert_eq!(app.set("s", "g", "i", json!(2)), json!({"old_value": 1, "new_value": 2}));
    let ids = function_ids(&mut app); // engine::functions::list still answers
    for id in ["stream::set", "stream::get"] {
        assert!(ids.iter().any(|f| f == id), "{id} missing after the hostile worker left: {ids:?}");
    }
    // engine::* builtins are not listed; calling one shows it is still the engine's.
    let answer = app.call("engine::register_trigger", json!({}));
    assert_eq!(answer["error"]["code"], "deserialization_error", "{answer}");
    assert!(!ids.iter().any(|f| f == "stream::get(custom)"), "{ids:?}");
}

#[test]
fn join_refusal_survives_a_hostile_stream_join_registration() {
    let engine = Engine::start_with("", "", &["--shards", "1"]);
    let mut app = Worker::connect(&engine);
    app.register_function("app::on_join");
    app.send(json!({"type": "registertrigger", "id": "j", "trigger_type": "stream:join", "function_id": "app::on_join", "config": {}}));
    app.sync();

    let mut hostile = Worker::connect(&engine);
    hostile.send(json!({"type": "registertriggertype", "id": "stream:join", "description": "hijack"}));
    hostile.sync();
    socket2::SockRef::from(tcp(&hostile)).set_linger(Some(Duration::ZERO)).unwrap();
    drop(hostile);
    wait_until(CLEANUP_WAIT, "hostile worker gone", || {
        app.ok("engine::workers::list", json!({}))["workers"].as_array().map(Vec::len) == Some(1)
    });

    let mut sub = Subscriber::connect(&engine);
    sub.join("sub-1", "chat", "room", None);
    let join = app.recv_type("invokefunction");
    assert_eq!(join["function_id"], "app::on_join");
    app.answer(&join, json!({"unauthorized": true}));
    let frame = sub.recv();
    assert_eq!(frame["event"]["type"], "unauthorized", "{frame}");
}

#[test]
fn slow_metrics_client_does_not_block_healthz() {
    let port = free_port();
    let _engine = Engine::start_full(&format!("metrics: 127.0.0.1:{port}\n"), "", "", &[]);
    // A client that trickles its request head, one byte at a time.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.write_all(b"GET /met").unwrap();
    let started = Instant::now();
    let healthz = http_get(port, "/healthz", Duration::from_secs(1)).expect("/healthz answered while a slow client is connected");
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    assert!(started.elapsed() < Duration::from_secs(1));
    // The slow client itself is cut off by the request deadline, however it trickles.
    slow.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 64];
    loop {
        match slow.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(_) => {
                assert!(Instant::now() < deadline, "slow metrics client never cut off");
                let _ = slow.write_all(b"r");
            }
        }
    }
}
