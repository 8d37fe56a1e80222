//! Test harness: starts the built `ringcast` binary on free loopback ports and speaks the
//! worker protocol to it with a plain WebSocket client.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// How long a test waits for an expected frame before failing.
pub const FRAME_WAIT: Duration = Duration::from_secs(5);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh scratch directory for one test.
pub fn scratch_dir() -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ringcast-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_ringcast")
}

/// A running engine; killed when dropped.
pub struct Engine {
    pub child: Child,
    pub worker_port: u16,
    pub stream_port: u16,
    pub dir: PathBuf,
}

impl Engine {
    /// Starts an engine with default settings.
    pub fn start() -> Engine {
        Engine::start_with("", "", &[])
    }

    /// Starts an engine; `worker_extra` and `stream_extra` are YAML lines added to the
    /// `iii-worker-manager` and `iii-stream` config blocks (indented by the caller with 6 spaces).
    pub fn start_with(worker_extra: &str, stream_extra: &str, args: &[&str]) -> Engine {
        Engine::start_full("metrics: false\n", worker_extra, stream_extra, args)
    }

    /// Like `start_with`, with `top_extra` YAML lines at the top level of the config.
    pub fn start_full(top_extra: &str, worker_extra: &str, stream_extra: &str, args: &[&str]) -> Engine {
        Engine::start_env(top_extra, worker_extra, stream_extra, args, &[])
    }

    /// Like `start_full`, with `env` set for the engine process (test-only fault hooks).
    pub fn start_env(top_extra: &str, worker_extra: &str, stream_extra: &str, args: &[&str], env: &[(&str, &str)]) -> Engine {
        let (worker_port, stream_port) = (free_port(), free_port());
        let dir = scratch_dir();
        let config = format!(
            "{top_extra}workers:\n  - name: iii-worker-manager\n    config:\n      host: 127.0.0.1\n      port: {worker_port}\n{worker_extra}  - name: iii-stream\n    config:\n      host: 127.0.0.1\n      port: {stream_port}\n{stream_extra}"
        );
        let path = dir.join("config.yaml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(binary())
            .arg("--config")
            .arg(&path)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", std::env::var("RINGCAST_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ringcast");
        let engine = Engine { child, worker_port, stream_port, dir };
        engine.wait_listening(worker_port);
        // The stream port is bound after the worker port (a file store is opened in between).
        engine.wait_listening(stream_port);
        engine
    }

    fn wait_listening(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "engine did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Open file descriptors of the engine process (`/proc/<pid>/fd`).
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map(|d| d.count()).unwrap_or(usize::MAX)
    }

    /// Resident memory of the engine process in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.worker_port)
    }

    /// Sends a signal and waits for the process to exit.
    pub fn signal_and_wait(&mut self, signal: i32) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        wait_exit(&mut self.child, Duration::from_secs(10))
    }
}

#[allow(unused_imports)]
pub use libc::{SIGINT, SIGTERM};

pub fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "process did not exit in {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One raw worker connection.
pub struct Worker {
    pub ws: WebSocket<MaybeTlsStream<TcpStream>>,
    pub worker_id: String,
    pub reattach_token: String,
}

impl Worker {
    /// Connects and reads the `workerregistered` frame.
    pub fn connect(engine: &Engine) -> Worker {
        Worker::connect_url(&engine.url())
    }

    pub fn connect_url(url: &str) -> Worker {
        let (ws, _) = tungstenite::connect(url).expect("connect to worker port");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(FRAME_WAIT)).unwrap();
            s.set_nodelay(true).unwrap();
        }
        let mut worker = Worker { ws, worker_id: String::new(), reattach_token: String::new() };
        let first = worker.recv();
        assert_eq!(first["type"], "workerregistered", "first frame: {first}");
        worker.worker_id = first["worker_id"].as_str().unwrap().to_string();
        worker.reattach_token = first["reattach_token"].as_str().unwrap().to_string();
        worker
    }

    pub fn send(&mut self, message: Value) {
        self.ws.send(Message::text(message.to_string())).unwrap();
    }

    pub fn send_raw(&mut self, message: Message) {
        self.ws.send(message).unwrap();
    }

    /// The next protocol frame (text JSON); fails after `FRAME_WAIT`.
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => return serde_json::from_str(&text).expect("engine sent JSON"),
                Ok(Message::Binary(_)) => panic!("engine sent a binary protocol frame"),
                Ok(Message::Close(frame)) => panic!("socket closed: {frame:?}"),
                Ok(_) => continue,
                Err(e) => panic!("no frame within {FRAME_WAIT:?}: {e}"),
            }
        }
    }

    /// Reads frames until one of type `kind` arrives (others are returned in order skipped).
    pub fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.recv();
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Waits for the close frame and returns its code.
    pub fn recv_close(&mut self) -> Option<u16> {
        read_close(&mut self.ws)
    }

    /// Round-trips a JSON ping: every frame the engine queued for this socket before it read
    /// the ping arrives first. Returns those frames.
    pub fn sync(&mut self) -> Vec<Value> {
        self.send(json!({"type": "ping"}));
        let mut before = Vec::new();
        loop {
            let frame = self.recv();
            if frame["type"] == "pong" {
                return before;
            }
            before.push(frame);
        }
    }

    /// Asserts the engine answered nothing but the pong of a sync.
    pub fn assert_quiet(&mut self) {
        let frames = self.sync();
        assert!(frames.is_empty(), "unexpected frames: {frames:?}");
    }

    /// `engine::workers::register`, as SDKs send it (void).
    pub fn register_worker(&mut self, name: &str) {
        self.send(json!({
            "type": "invokefunction", "function_id": "engine::workers::register",
            "action": {"type": "void"},
            "data": {"runtime": "node", "name": name, "pid": 4242, "version": "test"}
        }));
    }

    pub fn register_function(&mut self, id: &str) {
        self.send(json!({"type": "registerfunction", "id": id, "description": format!("{id} for tests")}));
        self.sync();
    }

    /// Sync call; returns the `invocationresult` frame.
    pub fn call(&mut self, function_id: &str, data: Value) -> Value {
        let id = uuid();
        self.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": function_id, "data": data}));
        let result = self.recv_type("invocationresult");
        assert_eq!(result["invocation_id"], id);
        result
    }

    /// Answers an `invokefunction` frame with `result`.
    pub fn answer(&mut self, call: &Value, result: Value) {
        self.send(json!({
            "type": "invocationresult", "invocation_id": call["invocation_id"],
            "function_id": call["function_id"], "result": result
        }));
    }
}

/// `GET path` on a loopback HTTP port (the metrics endpoint): the whole response.
pub fn http_get(port: u16, path: &str, timeout: Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// Polls `condition` every 20 ms until it holds or `limit` passes; returns whether it held.
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `condition` until it holds, failing the test after `limit`.
pub fn wait_until(limit: Duration, what: &str, condition: impl FnMut() -> bool) {
    assert!(eventually(limit, condition), "timed out after {limit:?} waiting for {what}");
}

pub fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Reads until the close frame (skipping other frames) and returns its code; `None` when the
/// connection ended without one.
fn read_close(ws: &mut WebSocket<MaybeTlsStream<TcpStream>>) -> Option<u16> {
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame.map(|f| f.code.into()),
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) | Err(tungstenite::Error::AlreadyClosed) => return None,
            Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                panic!("no close within {FRAME_WAIT:?}")
            }
            Err(_) => return None,
        }
    }
}

/// A raw subscriber on the stream port.
pub struct Subscriber {
    pub ws: WebSocket<MaybeTlsStream<TcpStream>>,
}

impl Subscriber {
    pub fn connect(engine: &Engine) -> Subscriber {
        Subscriber::connect_path(engine, "/")
    }

    pub fn connect_path(engine: &Engine, path: &str) -> Subscriber {
        let (ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{}{path}", engine.stream_port)).expect("connect to stream port");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(FRAME_WAIT)).unwrap();
        }
        Subscriber { ws }
    }

    pub fn send(&mut self, message: Value) {
        self.ws.send(Message::text(message.to_string())).unwrap();
    }

    pub fn join(&mut self, subscription: &str, stream: &str, group: &str, item: Option<&str>) {
        self.send(json!({"type": "join", "data": {"subscriptionId": subscription, "streamName": stream, "groupId": group, "id": item}}));
    }

    pub fn leave(&mut self, subscription: &str, stream: &str, group: &str) {
        self.send(json!({"type": "leave", "data": {"subscriptionId": subscription, "streamName": stream, "groupId": group}}));
    }

    /// The next data frame; fails after `FRAME_WAIT`.
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => return serde_json::from_str(&text).expect("JSON frame"),
                Ok(Message::Close(frame)) => panic!("subscriber closed: {frame:?}"),
                Ok(_) => continue,
                Err(e) => panic!("no frame within {FRAME_WAIT:?}: {e}"),
            }
        }
    }

    /// Waits for the close frame and returns its code.
    pub fn recv_close(&mut self) -> Option<u16> {
        read_close(&mut self.ws)
    }

    /// Joins and returns the sync frame.
    pub fn join_sync(&mut self, subscription: &str, stream: &str, group: &str, item: Option<&str>) -> Value {
        self.join(subscription, stream, group, item);
        let frame = self.recv();
        assert_eq!(frame["event"]["type"], "sync", "{frame}");
        frame
    }
}

impl Worker {
    /// Calls a function and returns its `result`, failing on an error.
    pub fn ok(&mut self, function_id: &str, data: Value) -> Value {
        let result = self.call(function_id, data);
        assert!(result.get("error").is_none(), "{function_id} failed: {result}");
        result.get("result").cloned().unwrap_or(Value::Null)
    }

    /// Sets an item on the `barrier` stream, which `subscriber` has joined (group `b`) on a
    /// one-shard engine: the barrier frame is the next frame it gets, so anything the engine
    /// would have sent it before has arrived by then — a way to assert absence without a sleep.
    pub fn barrier(&mut self, subscriber: &mut Subscriber) {
        let mark = uuid();
        self.set("barrier", "b", &mark, json!(mark));
        let frame = subscriber.recv();
        assert_eq!((frame["streamName"].as_str(), frame["id"].as_str()), (Some("barrier"), Some(mark.as_str())), "unexpected frame before the barrier: {frame}");
    }

    pub fn set(&mut self, stream: &str, group: &str, item: &str, data: Value) -> Value {
        self.ok("stream::set", json!({"stream_name": stream, "group_id": group, "item_id": item, "data": data}))
    }
}

/// The engine's log (its stderr), line by line, as a test reads it; every line is also copied to
/// the test's own stderr.
#[derive(Clone, Default)]
pub struct EngineLog {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl EngineLog {
    /// Starts reading `stderr` of a child on a thread until it closes.
    pub fn capture(stderr: std::process::ChildStderr) -> EngineLog {
        use std::io::BufRead;
        let log = EngineLog::default();
        let lines = log.lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[engine] {line}");
                lines.lock().unwrap().push(line);
            }
        });
        log
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a line that contains every one of `parts`; returns it.
    pub fn wait_for(&self, parts: &[&str], limit: Duration) -> String {
        let mut found = None;
        let held = eventually(limit, || {
            found = self.lines().into_iter().find(|l| parts.iter().all(|p| l.contains(p)));
            found.is_some()
        });
        assert!(held, "no engine log line with {parts:?} within {limit:?}; log:\n{}", self.lines().join("\n"));
        found.unwrap_or_default()
    }
}

impl Engine {
    /// Like `start_full`, with `RUST_LOG=rust_log` and the engine's stderr captured.
    pub fn start_logged(top_extra: &str, worker_extra: &str, rust_log: &str) -> (Engine, EngineLog) {
        let (worker_port, stream_port) = (free_port(), free_port());
        let dir = scratch_dir();
        let config = format!(
            "{top_extra}workers:\n  - name: iii-worker-manager\n    config:\n      host: 127.0.0.1\n      port: {worker_port}\n{worker_extra}  - name: iii-stream\n    config:\n      host: 127.0.0.1\n      port: {stream_port}\n"
        );
        let path = dir.join("config.yaml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(binary())
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ringcast");
        let log = EngineLog::capture(child.stderr.take().expect("piped stderr"));
        let engine = Engine { child, worker_port, stream_port, dir };
        engine.wait_listening(worker_port);
        (engine, log)
    }
}
