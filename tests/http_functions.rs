//! HTTP-invoked functions (spec/worker-protocol.md §8) against the built binary: a worker
//! registers a function with an `invocation`, another calls it, and the engine sends the
//! request to a small HTTP server this test runs on loopback.

mod common;

use base64::Engine as _;
use common::{free_port, http_get, uuid, wait_until, Engine, Worker};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A request the test server received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// A keep-alive HTTP/1.1 server on loopback that answers by path:
/// `/echo` 200 `{"ok":true}`; `/auth` 200 with `Authorization: Bearer right`, else 401 with an
/// error body; `/status/<n>` status n (502: a JSON error body; others: plain text);
/// `/notjson` 200 text; `/empty` 200 no body; `/redirect` 302 to `/echo`; `/slow/<ms>` waits
/// then 200; `/big/<n>` a JSON string of n bytes; `/bigclose/<n>` the same without a length,
/// ended by closing.
struct TestServer {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
}

impl TestServer {
    fn start(ip: &str) -> TestServer {
        let listener = TcpListener::bind((ip, 0)).expect("bind the test server");
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (seen2, connections2) = (seen.clone(), connections.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                connections2.fetch_add(1, Ordering::SeqCst);
                let seen = seen2.clone();
                std::thread::spawn(move || serve(stream, &seen));
            }
        });
        TestServer { addr, seen, connections }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(stream: TcpStream, seen: &Mutex<Vec<Seen>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        seen.lock().unwrap().push(Seen { method, path: path.clone(), headers: headers.clone(), body });
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (status, extra, body, close): (u16, &str, Vec<u8>, bool) = match segments.as_slice() {
            ["echo"] => (200, "", br#"{"ok":true}"#.to_vec(), false),
            ["auth"] if headers.get("authorization").map(String::as_str) == Some("Bearer right") => (200, "", br#"{"authorized":true}"#.to_vec(), false),
            ["auth"] => (401, "", br#"{"error":{"code":"unauthorized","message":"wrong token"}}"#.to_vec(), false),
            ["status", "502"] => (502, "", br#"{"error":{"code":"upstream_down","message":"the upstream is down"}}"#.to_vec(), false),
            ["status", n] => (n.parse().unwrap_or(500), "", b"plain text".to_vec(), false),
            ["notjson"] => (200, "", b"hello".to_vec(), false),
            ["empty"] => (200, "", Vec::new(), false),
            ["redirect"] => (302, "Location: /echo\r\n", br#"{"moved":true}"#.to_vec(), false),
            ["slow", ms] => {
                std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
                (200, "", br#"{"slow":true}"#.to_vec(), false)
            }
            ["big", n] => (200, "", serde_json::to_vec(&"x".repeat(n.parse::<usize>().unwrap_or(0).saturating_sub(2))).unwrap(), false),
            ["bigclose", n] => (200, "", serde_json::to_vec(&"x".repeat(n.parse::<usize>().unwrap_or(0).saturating_sub(2))).unwrap(), true),
            _ => (404, "", b"no such path".to_vec(), false),
        };
        let head = if close {
            format!("HTTP/1.1 {status} X\r\n{extra}Connection: close\r\n\r\n")
        } else {
            format!("HTTP/1.1 {status} X\r\n{extra}Content-Length: {}\r\n\r\n", body.len())
        };
        if stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&body)).is_err() || close {
            return;
        }
    }
}

/// An engine with `iii-http-functions` configured by `settings` (YAML lines at 6 spaces) and
/// its metrics on a free port (returned).
fn engine_with(settings: &str) -> (Engine, u16) {
    let metrics_port = free_port();
    let block = format!("  - name: iii-http-functions\n    config:\n{settings}");
    let engine = Engine::start_full(&format!("metrics: 127.0.0.1:{metrics_port}\n"), "", &block, &[]);
    (engine, metrics_port)
}

fn register_http(worker: &mut Worker, id: &str, invocation: Value) {
    worker.send(json!({ "type": "registerfunction", "id": id, "invocation": invocation }));
    let frames = worker.sync();
    assert!(frames.is_empty(), "a registration is not answered: {frames:?}");
}

/// The secrets the registrations name, in this process's environment (inherited by the
/// engine). Same values in every test, so setting them again is harmless.
fn set_secrets() {
    std::env::set_var("RINGCAST_TEST_HMAC_SECRET", "hmac-s3cret");
    std::env::set_var("RINGCAST_TEST_BEARER", "right");
    std::env::set_var("RINGCAST_TEST_WRONG_BEARER", "wrong");
    std::env::set_var("RINGCAST_TEST_API_KEY", "key-123");
}

fn hmac_hex(secret: &str, message: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::sign(&key, message.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn metric(port: u16, name: &str) -> u64 {
    let text = http_get(port, "/metrics", Duration::from_secs(2)).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
}

fn error_code(result: &Value) -> &str {
    result["error"]["code"].as_str().unwrap_or_else(|| panic!("expected an error: {result}"))
}

#[test]
fn each_auth_mode_sends_the_headers_and_signature_of_the_reference() {
    set_secrets();
    let server = TestServer::start("127.0.0.1");
    let (engine, _) = engine_with("      threads: 4\n");
    let mut owner = Worker::connect(&engine);
    register_http(&mut owner, "ext::hmac", json!({ "url": server.url("/echo"), "headers": { "x-custom": "1" }, "auth": { "type": "hmac", "secret_key": "RINGCAST_TEST_HMAC_SECRET" } }));
    register_http(&mut owner, "ext::bearer", json!({ "url": server.url("/auth"), "method": "PUT", "auth": { "type": "bearer", "token_key": "RINGCAST_TEST_BEARER" } }));
    register_http(&mut owner, "ext::key", json!({ "url": server.url("/echo"), "method": "PATCH", "auth": { "type": "api_key", "header": "x-api-key", "value_key": "RINGCAST_TEST_API_KEY" } }));
    let mut caller = Worker::connect(&engine);

    let result = caller.call("ext::hmac", json!({ "n": 1 }));
    assert_eq!(result["result"], json!({ "ok": true }), "{result}");
    let result = caller.call("ext::bearer", json!({ "n": 2 }));
    assert_eq!(result["result"], json!({ "authorized": true }), "{result}");
    let result = caller.call("ext::key", json!([1, 2]));
    assert_eq!(result["result"], json!({ "ok": true }), "{result}");
    assert!(owner.sync().is_empty(), "the registering worker never receives the calls");

    let seen = server.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let hmac = &seen[0];
    assert_eq!((hmac.method.as_str(), hmac.path.as_str()), ("POST", "/echo"));
    let body: Value = serde_json::from_slice(&hmac.body).unwrap();
    assert_eq!(body, json!({ "n": 1, "_caller_worker_id": caller.worker_id }), "the body is the call's data");
    let h = &hmac.headers;
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["x-iii-function-path"], "ext::hmac");
    assert!(uuid::Uuid::parse_str(&h["x-iii-invocation-id"]).is_ok(), "{h:?}");
    assert_eq!(h["x-custom"], "1");
    let timestamp: u64 = h["x-iii-timestamp"].parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(now.abs_diff(timestamp) < 60, "timestamp in unix seconds: {timestamp}");
    // The signature covers exactly the bytes sent: "<timestamp>:<base64(body)>".
    let signed = format!("{timestamp}:{}", base64::engine::general_purpose::STANDARD.encode(&hmac.body));
    assert_eq!(h["x-iii-signature"], format!("sha256={}", hmac_hex("hmac-s3cret", &signed)));
    assert!(!h.contains_key("authorization"));

    assert_eq!(seen[1].method, "PUT");
    assert_eq!(seen[1].headers["authorization"], "Bearer right");
    assert!(!seen[1].headers.contains_key("x-iii-signature"));
    assert_eq!(seen[2].method, "PATCH");
    assert_eq!(seen[2].headers["x-api-key"], "key-123");
    assert_eq!(serde_json::from_slice::<Value>(&seen[2].body).unwrap(), json!([1, 2]), "non-object data is sent unchanged");
}

#[test]
fn a_missing_secret_refuses_the_registration_and_a_wrong_one_gets_the_servers_error() {
    set_secrets();
    let server = TestServer::start("127.0.0.1");
    let (engine, metrics) = engine_with("      threads: 2\n");
    let mut owner = Worker::connect(&engine);
    register_http(&mut owner, "ext::nosecret", json!({ "url": server.url("/echo"), "auth": { "type": "hmac", "secret_key": "RINGCAST_TEST_UNSET_SECRET" } }));
    register_http(&mut owner, "ext::notoken", json!({ "url": server.url("/echo"), "auth": { "type": "bearer", "token_key": "RINGCAST_TEST_UNSET_TOKEN" } }));
    register_http(&mut owner, "ext::nokey", json!({ "url": server.url("/echo"), "auth": { "type": "api_key", "header": "x-k", "value_key": "RINGCAST_TEST_UNSET_KEY" } }));
    register_http(&mut owner, "ext::wrong", json!({ "url": server.url("/auth"), "auth": { "type": "bearer", "token_key": "RINGCAST_TEST_WRONG_BEARER" } }));
    let mut caller = Worker::connect(&engine);

    for (id, code, variable) in [
        ("ext::nosecret", "secret_not_found", "RINGCAST_TEST_UNSET_SECRET"),
        ("ext::notoken", "token_not_found", "RINGCAST_TEST_UNSET_TOKEN"),
        ("ext::nokey", "api_key_not_found", "RINGCAST_TEST_UNSET_KEY"),
    ] {
        let result = caller.call(id, json!({}));
        assert_eq!(error_code(&result), code, "{result}");
        assert!(result["error"]["message"].as_str().unwrap().contains(variable), "the error names the variable: {result}");
    }
    assert!(server.seen().is_empty(), "a refused registration sends nothing");

    let result = caller.call("ext::wrong", json!({}));
    assert_eq!(result["error"], json!({ "code": "unauthorized", "message": "wrong token" }), "the server's error body: {result}");
    assert_eq!(server.seen()[0].headers["authorization"], "Bearer wrong");
    assert_eq!(metric(metrics, "ringcast_http_function_errors_total"), 4);
    assert_eq!(metric(metrics, "ringcast_http_function_calls_total"), 1, "only the wrong secret got as far as a request");
}

#[test]
fn answers_map_to_results_and_errors_and_redirects_are_not_followed() {
    let server = TestServer::start("127.0.0.1");
    let (engine, _) = engine_with("      threads: 2\n");
    let mut owner = Worker::connect(&engine);
    for (id, path) in [("s::502", "/status/502"), ("s::404", "/status/404"), ("s::notjson", "/notjson"), ("s::empty", "/empty"), ("s::redirect", "/redirect"), ("s::get", "/echo")] {
        let method = if id == "s::get" { "GET" } else { "POST" };
        register_http(&mut owner, id, json!({ "url": server.url(path), "method": method }));
    }
    let mut caller = Worker::connect(&engine);

    let result = caller.call("s::502", json!({}));
    assert_eq!(result["error"], json!({ "code": "upstream_down", "message": "the upstream is down" }), "{result}");
    let result = caller.call("s::404", json!({}));
    assert_eq!(result["error"], json!({ "code": "http_error", "message": "HTTP 404" }), "{result}");
    let result = caller.call("s::notjson", json!({}));
    assert_eq!(error_code(&result), "invalid_response", "{result}");
    let result = caller.call("s::empty", json!({}));
    assert!(result.get("error").is_none() && result["result"].is_null(), "2xx without a body: no result: {result}");
    let result = caller.call("s::redirect", json!({}));
    assert_eq!(result["result"], json!({ "moved": true }), "a 3xx is an answer, its body the result: {result}");
    let result = caller.call("s::get", json!({ "q": 1 }));
    assert_eq!(result["result"], json!({ "ok": true }), "{result}");

    let paths: Vec<String> = server.seen().iter().map(|s| format!("{} {}", s.method, s.path)).collect();
    assert_eq!(paths, ["POST /status/502", "POST /status/404", "POST /notjson", "POST /empty", "POST /redirect", "GET /echo"], "the redirect was not followed");
    // Six requests, one keep-alive connection.
    assert_eq!(server.connections.load(Ordering::SeqCst), 1, "connections are reused");
}

#[test]
fn a_request_past_its_timeout_fails_and_is_counted() {
    let server = TestServer::start("127.0.0.1");
    let (engine, metrics) = engine_with("      threads: 2\n      default_timeout_ms: 400\n");
    let mut owner = Worker::connect(&engine);
    register_http(&mut owner, "t::own", json!({ "url": server.url("/slow/5000"), "timeout_ms": 300 }));
    register_http(&mut owner, "t::default", json!({ "url": server.url("/slow/5000") }));
    let mut caller = Worker::connect(&engine);
    for (id, limit) in [("t::own", 300), ("t::default", 400)] {
        assert_times_out(&mut caller, id, limit, 1500);
    }
    assert_eq!(metric(metrics, "ringcast_http_function_timeouts_total"), 2);
    wait_until(Duration::from_secs(2), "no request in flight", || metric(metrics, "ringcast_http_function_in_flight") == 0);
}

/// Calls `function_id` and asserts that it fails with "no answer within `limit_ms` ms", answered
/// no sooner than that and less than `slack_ms` later.
fn assert_times_out(caller: &mut Worker, function_id: &str, limit_ms: u64, slack_ms: u64) {
    let started = Instant::now();
    let result = caller.call(function_id, json!({}));
    let took = started.elapsed();
    assert_eq!(error_code(&result), "http_request_failed", "{result}");
    assert!(result["error"]["message"].as_str().unwrap().contains(&format!("{limit_ms} ms")), "{result}");
    assert!(
        took >= Duration::from_millis(limit_ms) && took < Duration::from_millis(limit_ms + slack_ms),
        "{function_id} answered after {took:?}"
    );
}

/// Sends a call without waiting for its answer; returns its invocation id.
fn send_call(worker: &mut Worker, function_id: &str) -> String {
    let id = uuid();
    worker.send(json!({ "type": "invokefunction", "invocation_id": id, "function_id": function_id, "data": {} }));
    id
}

#[test]
fn a_slow_endpoint_delays_no_other_call_and_its_queue_is_bounded() {
    let server = TestServer::start("127.0.0.1");
    let (engine, metrics) = engine_with("      threads: 4\n      max_concurrency_per_function: 2\n      max_queue_per_function: 1\n");
    let mut owner = Worker::connect(&engine);
    register_http(&mut owner, "slow::fn", json!({ "url": server.url("/slow/1500") }));
    register_http(&mut owner, "fast::fn", json!({ "url": server.url("/echo") }));
    let mut slow_caller = Worker::connect(&engine);
    let slow_ids: Vec<String> = (0..3).map(|_| send_call(&mut slow_caller, "slow::fn")).collect();
    wait_until(Duration::from_secs(2), "two slow requests running", || server.seen().len() == 2);
    assert_eq!(metric(metrics, "ringcast_http_function_queued"), 1);
    assert_eq!(metric(metrics, "ringcast_http_function_in_flight"), 2);

    // Two running and one waiting: the next call is refused at once.
    let started = Instant::now();
    let refused = slow_caller.call("slow::fn", json!({}));
    assert_eq!(error_code(&refused), "http_queue_full", "{refused}");
    assert!(started.elapsed() < Duration::from_millis(500));

    // Another function answers at once meanwhile, and so do the engine's own functions.
    let mut caller = Worker::connect(&engine);
    let started = Instant::now();
    let fast = caller.call("fast::fn", json!({}));
    assert_eq!(fast["result"], json!({ "ok": true }), "{fast}");
    let listed = caller.call("engine::functions::list", json!({}));
    assert!(listed["result"]["functions"].is_array());
    assert!(started.elapsed() < Duration::from_millis(500), "took {:?} beside the slow endpoint", started.elapsed());

    // The queued call runs once a slot frees: all three slow calls succeed.
    let mut answered = BTreeMap::new();
    while answered.len() < 3 {
        let frame = slow_caller.recv_type("invocationresult");
        answered.insert(frame["invocation_id"].as_str().unwrap().to_string(), frame);
    }
    for id in &slow_ids {
        assert_eq!(answered[id]["result"], json!({ "slow": true }), "{:?}", answered[id]);
    }
    assert_eq!(metric(metrics, "ringcast_http_function_rejected_total"), 1);
    assert_eq!(metric(metrics, "ringcast_http_function_queued"), 0);
    wait_until(Duration::from_secs(2), "no request in flight", || metric(metrics, "ringcast_http_function_in_flight") == 0);
}

#[test]
fn the_allowlist_is_checked_on_resolved_addresses() {
    // Only 127.0.0.2 may be reached: 127.0.0.1 is refused, and so is `localhost`, a name
    // that resolves to it.
    let server = TestServer::start("127.0.0.2");
    let port = server.addr.port();
    let (engine, _) = engine_with("      threads: 2\n      allowed_networks: [\"127.0.0.2/32\"]\n");
    let mut owner = Worker::connect(&engine);
    register_http(&mut owner, "a::allowed", json!({ "url": format!("http://127.0.0.2:{port}/echo") }));
    register_http(&mut owner, "a::literal", json!({ "url": format!("http://127.0.0.1:{port}/echo") }));
    register_http(&mut owner, "a::name", json!({ "url": format!("http://localhost:{port}/echo") }));
    register_http(&mut owner, "a::mapped", json!({ "url": format!("http://[::ffff:127.0.0.1]:{port}/echo") }));
    register_http(&mut owner, "a::scheme", json!({ "url": format!("file:///etc/passwd") }));
    let mut caller = Worker::connect(&engine);

    assert_eq!(caller.call("a::allowed", json!({}))["result"], json!({ "ok": true }));
    for id in ["a::literal", "a::name", "a::mapped", "a::scheme"] {
        let result = caller.call(id, json!({}));
        assert_eq!(error_code(&result), "url_validation_failed", "{id}: {result}");
    }
    let message = caller.call("a::name", json!({}))["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("localhost") && message.contains("127.0.0.2/32"), "names the host and the list: {message}");
    assert_eq!(server.seen().len(), 1, "only the allowed call reached the server");
}

#[test]
fn a_response_over_max_response_bytes_fails_the_call() {
    let server = TestServer::start("127.0.0.1");
    let (engine, _) = engine_with("      threads: 2\n      max_response_bytes: 1000\n");
    let mut owner = Worker::connect(&engine);
    register_http(&mut owner, "b::fits", json!({ "url": server.url("/big/1000") }));
    register_http(&mut owner, "b::length", json!({ "url": server.url("/big/1001") }));
    register_http(&mut owner, "b::close", json!({ "url": server.url("/bigclose/50000") }));
    let mut caller = Worker::connect(&engine);
    let fits = caller.call("b::fits", json!({}));
    assert_eq!(fits["result"].as_str().map(str::len), Some(998), "{fits}");
    for id in ["b::length", "b::close"] {
        let result = caller.call(id, json!({}));
        assert_eq!(error_code(&result), "http_response_failed", "{id}: {result}");
        assert!(result["error"]["message"].as_str().unwrap().contains("1000 bytes"), "{result}");
    }
}

#[test]
fn an_http_function_leaves_with_its_worker_and_is_unregistered_by_it_only() {
    let server = TestServer::start("127.0.0.1");
    let (engine, _) = engine_with("      threads: 2\n");
    let mut owner = Worker::connect(&engine);
    register_http(&mut owner, "l::one", json!({ "url": server.url("/echo") }));
    register_http(&mut owner, "l::two", json!({ "url": server.url("/echo") }));
    let mut other = Worker::connect(&engine);
    other.send(json!({ "type": "unregisterfunction", "id": "l::one" }));
    other.sync();
    assert_eq!(other.call("l::one", json!({}))["result"], json!({ "ok": true }), "only its owner removes it");
    owner.send(json!({ "type": "unregisterfunction", "id": "l::one" }));
    owner.sync();
    assert_eq!(error_code(&other.call("l::one", json!({}))), "function_not_found");
    drop(owner);
    wait_until(Duration::from_secs(5), "the function to leave with its worker", || {
        other.call("l::two", json!({}))["error"]["code"] == "function_not_found"
    });
}

#[test]
fn sigterm_answers_running_and_waiting_http_calls_with_engine_shutdown() {
    let server = TestServer::start("127.0.0.1");
    let (mut engine, _) = engine_with("      threads: 2\n      max_concurrency_per_function: 1\n");
    let mut owner = Worker::connect(&engine);
    register_http(&mut owner, "slow::fn", json!({ "url": server.url("/slow/5000") }));
    let mut caller = Worker::connect(&engine);
    let ids = [send_call(&mut caller, "slow::fn"), send_call(&mut caller, "slow::fn")];
    wait_until(Duration::from_secs(2), "the first request to run", || server.seen().len() == 1);
    let started = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(engine.child.id() as i32, common::SIGTERM) };
    let mut answered = Vec::new();
    for _ in &ids {
        let result = caller.recv_type("invocationresult");
        assert_eq!(error_code(&result), "engine_shutdown", "{result}");
        answered.push(result["invocation_id"].as_str().unwrap().to_string());
    }
    answered.sort();
    let mut expected = ids.to_vec();
    expected.sort();
    assert_eq!(answered, expected, "the running call and the waiting one");
    assert_eq!(caller.recv_close(), Some(1001));
    let status = common::wait_exit(&mut engine.child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(4), "a request in flight does not hold the exit");
    assert_eq!(server.seen().len(), 1, "the waiting call never started");
}

#[test]
fn requests_waiting_for_a_thread_are_bounded_too() {
    let server = TestServer::start("127.0.0.1");
    let (engine, metrics) = engine_with("      threads: 1\n      max_pending_requests: 1\n");
    let mut owner = Worker::connect(&engine);
    for id in ["p::a", "p::b", "p::c"] {
        register_http(&mut owner, id, json!({ "url": server.url("/slow/800") }));
    }
    let mut caller = Worker::connect(&engine);
    // The one thread runs a's request; b's waits in the thread queue, which is then full.
    let running = send_call(&mut caller, "p::a");
    wait_until(Duration::from_secs(2), "a's request to run", || server.seen().len() == 1);
    let queued = send_call(&mut caller, "p::b");
    let refused = caller.call("p::c", json!({}));
    assert_eq!(error_code(&refused), "http_queue_full", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("max_pending_requests"), "{refused}");
    for id in [running, queued] {
        let result = caller.recv_type("invocationresult");
        assert_eq!((result["invocation_id"].as_str(), &result["result"]), (Some(id.as_str()), &json!({ "slow": true })), "{result}");
    }
    assert_eq!(metric(metrics, "ringcast_http_function_rejected_total"), 1);
}

#[test]
fn a_call_waiting_for_a_busy_thread_is_answered_at_its_deadline_and_never_sent() {
    let server = TestServer::start("127.0.0.1");
    let (engine, metrics) = engine_with("      threads: 1\n");
    let mut owner = Worker::connect(&engine);
    register_http(&mut owner, "d::long", json!({ "url": server.url("/slow/3500"), "timeout_ms": 5000 }));
    register_http(&mut owner, "d::short", json!({ "url": server.url("/echo"), "timeout_ms": 200 }));
    let mut caller = Worker::connect(&engine);
    let long = send_call(&mut caller, "d::long");
    wait_until(Duration::from_secs(2), "the long request to hold the one thread", || server.seen().len() == 1);
    // The short call's request waits for the thread: its caller is answered 200 ms + the
    // 1 s grace after the call, not after the long request.
    assert_times_out(&mut caller, "d::short", 1200, 1300);
    let result = caller.recv_type("invocationresult");
    assert_eq!((result["invocation_id"].as_str(), &result["result"]), (Some(long.as_str()), &json!({ "slow": true })), "{result}");
    // The thread skipped the request whose caller had its answer: the server saw only one.
    let again = caller.call("d::long", json!({}));
    assert!(again["result"].is_object(), "{again}");
    let paths: Vec<String> = server.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/slow/3500", "/slow/3500"], "the given-up request was never sent");
    assert_eq!(metric(metrics, "ringcast_http_function_timeouts_total"), 1);
}

#[test]
fn request_bytes_held_by_unanswered_calls_are_bounded() {
    let server = TestServer::start("127.0.0.1");
    let (engine, metrics) = engine_with("      threads: 2\n      max_buffered_bytes: 1000\n");
    let mut owner = Worker::connect(&engine);
    register_http(&mut owner, "m::slow", json!({ "url": server.url("/slow/600") }));
    let mut caller = Worker::connect(&engine);
    let big = json!({ "pad": "x".repeat(600) });
    let id = uuid();
    caller.send(json!({ "type": "invokefunction", "invocation_id": id, "function_id": "m::slow", "data": big }));
    wait_until(Duration::from_secs(2), "the first request to run", || server.seen().len() == 1);
    assert!(metric(metrics, "ringcast_http_function_buffered_bytes") > 600);
    let refused = caller.call("m::slow", big.clone());
    assert_eq!(error_code(&refused), "http_queue_full", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("max_buffered_bytes"), "{refused}");
    let first = caller.recv_type("invocationresult");
    assert_eq!((first["invocation_id"].as_str(), &first["result"]), (Some(id.as_str()), &json!({ "slow": true })));
    assert_eq!(metric(metrics, "ringcast_http_function_buffered_bytes"), 0, "answered calls give their bytes back");
    // A call larger than the bound alone still runs when nothing else is held.
    let alone = caller.call("m::slow", json!({ "pad": "x".repeat(2000) }));
    assert_eq!(alone["result"], json!({ "slow": true }), "{alone}");
}
