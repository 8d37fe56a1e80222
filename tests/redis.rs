//! The `redis` adapter: several ringcast nodes behind one real `redis-server` (started by each
//! test on a free loopback port). Skipped, saying so, when `redis-server` is not installed
//! (`test.sh` installs it).

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` of its own; killed when dropped.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    binary: PathBuf,
}

fn redis_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")]).map(|d| d.join("redis-server")).find(|p| p.is_file())
}

/// Starts one, or says why the test is skipped.
fn redis() -> Option<Redis> {
    let Some(binary) = redis_binary() else {
        eprintln!("SKIPPED: redis-server not found (install it: apt-get install redis-server; test.sh does)");
        return None;
    };
    let mut redis = Redis { child: None, port: free_port(), dir: scratch_dir(), binary };
    redis.start();
    Some(redis)
}

impl Redis {
    /// Starts the server (again) on its port and directory; append-only file with fsync on
    /// every write, so a restart keeps everything it acknowledged.
    fn start(&mut self) {
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        wait_until(Duration::from_secs(10), "redis-server to answer PING", || ping(self.port));
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A ringcast node using this server.
    fn node(&self) -> Engine {
        Engine::start_with("", &adapter(&self.url()), &["--shards", "2"])
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn adapter(url: &str) -> String {
    format!("      adapter:\n        name: redis\n        config:\n          redis_url: {url}\n")
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

fn set_input(stream: &str, group: &str, item: &str, data: Value) -> Value {
    json!({"stream_name": stream, "group_id": group, "item_id": item, "data": data})
}

/// A subscriber's view of a group: the sync snapshot, then each event applied; fails on an
/// event the view contradicts (a create of a known item, an update or delete of an unknown one).
struct View {
    items: Vec<(String, Value)>,
}

impl View {
    fn from_sync(frame: &Value) -> View {
        assert_eq!(frame["event"]["type"], "sync", "{frame}");
        let items = frame["event"]["data"].as_array().expect("group sync").iter().map(|v| (v["id"].as_str().expect("items carry an id").to_string(), v.clone())).collect();
        View { items }
    }

    fn apply(&mut self, frame: &Value) {
        let id = frame["id"].as_str().unwrap_or_default().to_string();
        let data = frame["event"]["data"].clone();
        match frame["event"]["type"].as_str() {
            Some("create") => {
                assert!(!self.items.iter().any(|(i, _)| *i == id), "duplicate: a create of {id}, which the view already holds");
                self.items.push((id, data));
            }
            Some("update") => self.items.iter_mut().find(|(i, _)| *i == id).unwrap_or_else(|| panic!("an update of unknown item {id}")).1 = data,
            Some("delete") => {
                let before = self.items.len();
                self.items.retain(|(i, _)| *i != id);
                assert_eq!(before, self.items.len() + 1, "a delete of unknown item {id}");
            }
            Some("sync") => *self = View::from_sync(frame),
            other => panic!("unexpected event {other:?}: {frame}"),
        }
    }

    fn sorted(&self) -> Vec<Value> {
        let mut values: Vec<Value> = self.items.iter().map(|(_, v)| v.clone()).collect();
        values.sort_by_key(|v| v["id"].as_str().unwrap_or_default().to_string());
        values
    }
}

fn sorted(mut values: Vec<Value>) -> Vec<Value> {
    values.sort_by_key(|v| v["id"].as_str().unwrap_or_default().to_string());
    values
}

#[test]
fn unreachable_redis_at_start_is_one_error_line_and_exit_2() {
    let dir = scratch_dir();
    let closed = free_port();
    let path = dir.join("c.yaml");
    let config = format!(
        "metrics: false\nworkers:\n  - name: iii-stream\n    config:\n      port: {}\n      adapter:\n        name: redis\n        config:\n          redis_url: ${{RC_TEST_REDIS_URL:redis://127.0.0.1:{closed}}}\n",
        free_port()
    );
    std::fs::write(&path, config).unwrap();
    let out = Command::new(binary()).arg("--config").arg(&path).env("RUST_LOG", "info").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("cannot reach redis at 127.0.0.1:") && errors[0].contains("redis_url"), "{err}");
    // A URL that is not redis:// is a config error naming the key.
    std::fs::write(&path, "workers:\n  - name: iii-stream\n    config:\n      adapter:\n        name: redis\n        config: {redis_url: 'http://x'}\n").unwrap();
    let out = Command::new(binary()).args(["check-config", path.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("redis_url") && err.contains("not a redis:// URL"), "{err}");
}

#[test]
fn a_set_through_one_node_reaches_subscribers_of_the_other_in_order() {
    let Some(redis) = redis() else { return };
    let (a, b) = (redis.node(), redis.node());
    let mut writer = Worker::connect(&a);
    let mut reader = Worker::connect(&b);
    let mut sub = Subscriber::connect(&b);
    let sync = sub.join_sync("s1", "chat", "room", None);
    assert_eq!(sync["event"]["data"], json!([]));
    let mut item_sub = Subscriber::connect(&b);
    item_sub.join_sync("s2", "chat", "room", Some("m7"));

    for n in 0..40 {
        let result = writer.ok("stream::set", set_input("chat", "room", &format!("m{n}"), json!({"id": format!("m{n}"), "n": n})));
        assert_eq!(result, json!({"old_value": null, "new_value": {"id": format!("m{n}"), "n": n}}));
    }
    for n in 0..40 {
        let frame = sub.recv();
        assert_eq!((frame["event"]["type"].as_str(), frame["id"].as_str()), (Some("create"), Some(format!("m{n}").as_str())), "{frame}");
        assert_eq!(frame["event"]["data"]["n"], n);
    }
    let frame = item_sub.recv();
    assert_eq!((frame["id"].as_str(), frame["event"]["data"]["n"].as_i64()), (Some("m7"), Some(7)), "item subscribers get only their item: {frame}");

    // Update, delete and send from A; B's subscriber sees them in order, byte for byte.
    let updated = writer.ok("stream::update", json!({"stream_name": "chat", "group_id": "room", "item_id": "m1", "ops": [{"type": "increment", "path": "n", "by": 10}]}));
    assert_eq!(updated["new_value"], json!({"id": "m1", "n": 11}));
    writer.ok("stream::delete", json!({"stream_name": "chat", "group_id": "room", "item_id": "m2"}));
    writer.ok("stream::send", json!({"stream_name": "chat", "group_id": "room", "type": "typing", "data": {"who": "a"}}));
    let kinds: Vec<String> = (0..3).map(|_| sub.recv()["event"]["type"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, ["update", "delete", "event"]);

    // Reads agree on both nodes.
    for worker in [&mut writer, &mut reader] {
        let got = worker.ok("stream::get", json!({"stream_name": "chat", "group_id": "room", "item_id": "m1"}));
        assert_eq!(got, json!({"id": "m1", "n": 11}));
        let list = worker.ok("stream::list", json!({"stream_name": "chat", "group_id": "room"}));
        assert_eq!(list.as_array().unwrap().len(), 39);
        assert_eq!(worker.ok("stream::list_groups", json!({"stream_name": "chat"})), json!(["room"]));
        let all = worker.ok("stream::list_all", json!({}));
        assert_eq!(all, json!({"stream": [{"id": "chat", "groups": ["room"]}], "count": 1}));
    }
    // Names with `:` stay apart, and emptied groups disappear.
    writer.ok("stream::set", set_input("a:b", "c", "x", json!(1)));
    writer.ok("stream::set", set_input("a", "b:c", "x", json!(2)));
    assert_eq!(reader.ok("stream::list_groups", json!({"stream_name": "a"})), json!(["b:c"]));
    writer.ok("stream::delete", json!({"stream_name": "a", "group_id": "b:c", "item_id": "x"}));
    assert_eq!(reader.ok("stream::list_groups", json!({"stream_name": "a"})), json!([]));
    let all = reader.ok("stream::list_all", json!({}));
    assert_eq!(all["count"], 2, "{all}");
}

#[test]
fn concurrent_updates_from_two_nodes_lose_no_increment() {
    let Some(redis) = redis() else { return };
    let (a, b) = (redis.node(), redis.node());
    let per_node = 150;
    let handles: Vec<_> = [a.url(), b.url()]
        .into_iter()
        .map(|url| {
            std::thread::spawn(move || {
                let mut worker = Worker::connect_url(&url);
                // Pipelined: many calls in flight at once.
                let mut ids = Vec::new();
                for _ in 0..per_node {
                    let id = uuid();
                    worker.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "stream::update",
                        "data": {"stream_name": "c", "group_id": "g", "item_id": "hits", "ops": [{"type": "increment", "path": "n", "by": 1}]}}));
                    ids.push(id);
                }
                for _ in 0..per_node {
                    let result = worker.recv_type("invocationresult");
                    assert!(result.get("error").is_none(), "{result}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut worker = Worker::connect(&a);
    assert_eq!(worker.ok("stream::get", json!({"stream_name": "c", "group_id": "g", "item_id": "hits"})), json!({"n": 2 * per_node}));
}

#[test]
fn a_join_on_one_node_while_the_other_writes_misses_and_duplicates_nothing() {
    let Some(redis) = redis() else { return };
    let (a, b) = (redis.node(), redis.node());
    let url = a.url();
    let writes = 600;
    let writer = std::thread::spawn(move || {
        let mut worker = Worker::connect_url(&url);
        for n in 0..writes {
            let item = format!("i{}", n % 50);
            if n % 7 == 3 {
                worker.ok("stream::delete", json!({"stream_name": "live", "group_id": "g", "item_id": item}));
            } else {
                worker.ok("stream::set", set_input("live", "g", &item, json!({"id": item, "n": n})));
            }
        }
    });
    // Joins at different moments of the writes, each checked against the final state.
    let mut subs = Vec::new();
    for k in 0..4 {
        std::thread::sleep(Duration::from_millis(40 * k));
        let mut sub = Subscriber::connect(&b);
        let view = View::from_sync(&sub.join_sync("s", "live", "g", None));
        subs.push((sub, view));
    }
    writer.join().unwrap();
    let mut worker = Worker::connect(&a);
    worker.set("live", "g", "end", json!({"id": "end"}));
    let expected = sorted(worker.ok("stream::list", json!({"stream_name": "live", "group_id": "g"})).as_array().unwrap().clone());
    for (sub, view) in &mut subs {
        loop {
            let frame = sub.recv();
            view.apply(&frame);
            if frame["id"] == "end" {
                break;
            }
        }
        assert_eq!(view.sorted(), expected);
    }
}

#[test]
fn redis_restart_fails_writes_meanwhile_and_resyncs_subscribers_without_losing_acknowledged_writes() {
    let Some(mut redis) = redis() else { return };
    let (a, b) = (redis.node(), redis.node());
    let mut writer = Worker::connect(&a);
    let mut sub = Subscriber::connect(&b);
    sub.join_sync("s", "r", "g", None);
    let mut acknowledged: HashMap<String, Value> = HashMap::new();
    for n in 0..10 {
        let item = format!("k{n}");
        writer.set("r", "g", &item, json!({"id": item, "n": n}));
        acknowledged.insert(item, json!({"id": format!("k{n}"), "n": n}));
    }
    for _ in 0..10 {
        let frame = sub.recv();
        assert_eq!(frame["event"]["type"], "create");
    }

    redis.stop();
    // Writes fail while Redis is down (each answered at once, with an error).
    let mut failed = 0;
    wait_until(Duration::from_secs(5), "a write to fail", || {
        let started = Instant::now();
        let result = writer.call("stream::set", set_input("r", "g", "down", json!({"id": "down"})));
        assert!(started.elapsed() < Duration::from_secs(3), "a write during the outage took {:?}", started.elapsed());
        match result.get("error") {
            Some(e) => {
                assert_eq!(e["code"], "STREAM_SET_ERROR", "{result}");
                failed += 1;
                true
            }
            None => false,
        }
    });
    assert!(failed > 0);
    let result = writer.call("stream::get", json!({"stream_name": "r", "group_id": "g", "item_id": "k1"}));
    assert_eq!(result["error"]["code"], "STREAM_GET_ERROR", "{result}");
    let result = writer.call("stream::list_groups", json!({"stream_name": "r"}));
    assert_eq!(result["error"]["code"], "STREAM_LIST_GROUPS_ERROR", "{result}");

    // A join during the outage waits (no sync yet, the connection stays open)...
    let mut late = Subscriber::connect(&b);
    late.join("late", "r", "g2", None);
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = late.ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    }
    assert!(late.ws.read().is_err_and(|e| matches!(&e, tungstenite::Error::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))), "no frame while Redis is down");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = late.ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }

    redis.start();
    // ...and gets its sync once Redis is back.
    assert_eq!(late.recv()["event"]["type"], "sync");
    // Writes succeed again once the nodes have reconnected.
    wait_until(Duration::from_secs(10), "writes to succeed again", || {
        writer.call("stream::set", set_input("r", "g", "back", json!({"id": "back"}))).get("error").is_none()
    });
    acknowledged.insert("back".into(), json!({"id": "back"}));
    // The subscriber stayed connected and gets a fresh sync holding every acknowledged write.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sync = loop {
        assert!(Instant::now() < deadline, "no fresh sync after Redis came back");
        let frame = sub.recv();
        if frame["event"]["type"] == "sync" {
            break frame;
        }
    };
    let mut view = View::from_sync(&sync);
    // Events after the sync keep applying on top of it.
    writer.set("r", "g", "after", json!({"id": "after"}));
    acknowledged.insert("after".into(), json!({"id": "after"}));
    loop {
        let frame = sub.recv();
        view.apply(&frame);
        if frame["id"] == "after" {
            break;
        }
    }
    let mut expected: Vec<Value> = acknowledged.into_values().collect();
    expected = sorted(expected);
    let held: Vec<Value> = view.sorted().into_iter().filter(|v| v["id"] != "down").collect();
    assert_eq!(held, expected, "every acknowledged write is held after the restart");
}

#[test]
fn joins_waiting_for_redis_are_bounded_and_refused_with_1013_past_the_bound() {
    let Some(mut redis) = redis() else { return };
    let config = format!("{}          max_waiting_joins: 3\n", adapter(&redis.url()));
    let node = Engine::start_with("", &config, &["--shards", "1"]);
    redis.stop();
    // Three joins wait for their groups' snapshots; the fourth on the same connection (so
    // after them) finds the bound reached and the connection is closed with "try again later".
    let mut first = Subscriber::connect(&node);
    for g in ["g0", "g1", "g2", "g3"] {
        first.join(g, "w", g, None);
    }
    assert_eq!(first.recv_close(), Some(1013));
    // The three keep their places (the owner cannot tell a subscriber that left from a slow
    // one), so a join from anyone else is refused as well while Redis is down.
    let mut second = Subscriber::connect(&node);
    second.join("g4", "w", "g4", None);
    assert_eq!(second.recv_close(), Some(1013));

    // Once Redis is back the waiting joins are served (and given back), and joins work again.
    redis.start();
    wait_until(Duration::from_secs(10), "a join to be taken again", || {
        let mut later = Subscriber::connect(&node);
        later.join("g5", "w", "g5", None);
        match later.ws.read() {
            Ok(tungstenite::Message::Text(text)) => {
                assert!(text.contains(r#""type":"sync""#), "{text}");
                true
            }
            Ok(tungstenite::Message::Close(frame)) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1013));
                false
            }
            other => panic!("neither a sync nor a close: {other:?}"),
        }
    });
}

/// Sends one command to Redis on a connection of its own; returns the raw reply.
fn redis_command(port: u16, args: &[&str]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(out.as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn a_gap_or_junk_on_a_group_channel_sends_subscribers_a_fresh_sync() {
    let Some(redis) = redis() else { return };
    let (a, b) = (redis.node(), redis.node());
    let mut writer = Worker::connect(&a);
    writer.set("gap", "g", "x", json!({"id": "x"}));
    let mut sub = Subscriber::connect(&b);
    let view = View::from_sync(&sub.join_sync("s", "gap", "g", None));
    assert_eq!(view.sorted(), [json!({"id": "x"})]);
    // An event far ahead of the group's sequence (as if messages were lost): the node does not
    // apply it, reads the group again and sends a fresh sync of what Redis holds.
    let published = redis_command(redis.port, &["PUBLISH", "rc:ev:3:gap:g", "1000 1 c 5 ghost{\"id\":\"ghost\"}"]);
    assert_eq!(published.trim(), ":1", "one node subscribes the group's channel");
    let sync = sub.recv();
    assert_eq!(sync["event"]["type"], "sync", "{sync}");
    assert_eq!(sync["event"]["data"], json!([{"id": "x"}]));
    // Junk too; and a change made behind ringcast's back reaches group subscribers in the
    // fresh sync and the subscribers of that item in an item sync.
    let mut item_sub = Subscriber::connect(&b);
    assert_eq!(item_sub.join_sync("i", "gap", "g", Some("x"))["event"]["data"], json!({"id": "x"}));
    redis_command(redis.port, &["HSET", "rc:items:3:gap:g", "x", "{\"id\":\"x\",\"v\":2}"]);
    redis_command(redis.port, &["PUBLISH", "rc:ev:3:gap:g", "not an event"]);
    let sync = sub.recv();
    assert_eq!((sync["event"]["type"].as_str(), &sync["event"]["data"]), (Some("sync"), &json!([{"id": "x", "v": 2}])), "{sync}");
    let item_sync = item_sub.recv();
    assert_eq!((item_sync["id"].as_str(), item_sync["event"]["type"].as_str()), (Some("x"), Some("sync")), "{item_sync}");
    assert_eq!(item_sync["event"]["data"], json!({"id": "x", "v": 2}));
    // Events go on from the real sequence afterwards.
    writer.set("gap", "g", "y", json!({"id": "y"}));
    let frame = sub.recv();
    assert_eq!((frame["event"]["type"].as_str(), frame["id"].as_str()), (Some("create"), Some("y")), "{frame}");
    // The last subscriber leaving unsubscribes the channel.
    drop(sub);
    drop(item_sub);
    wait_until(Duration::from_secs(5), "the channel to lose its subscriber", || redis_command(redis.port, &["PUBLISH", "rc:ev:3:gap:g", "x"]).trim() == ":0");
}

#[test]
fn pipelined_calls_share_socket_writes_to_redis() {
    let Some(redis) = redis() else { return };
    let metrics_port = free_port();
    let node = Engine::start_full(&format!("metrics: 127.0.0.1:{metrics_port}\n"), "", &adapter(&redis.url()), &["--shards", "1"]);
    let mut worker = Worker::connect(&node);
    let calls = 400;
    for n in 0..calls {
        worker.send(json!({"type": "invokefunction", "invocation_id": uuid(), "function_id": "stream::set",
            "data": set_input("p", &format!("g{}", n % 16), &format!("i{n}"), json!(n))}));
    }
    for _ in 0..calls {
        let result = worker.recv_type("invocationresult");
        assert!(result.get("error").is_none(), "{result}");
    }
    let text = http_get(metrics_port, "/metrics", Duration::from_secs(2)).unwrap();
    let total = |name: &str| -> u64 {
        text.lines().filter(|l| l.starts_with(name) && !l.starts_with('#')).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
    };
    let (commands, writes) = (total("ringcast_redis_commands_total"), total("ringcast_redis_writes_total"));
    assert!(commands >= calls, "{text}");
    assert!(commands >= 2 * writes, "expected several commands per write under load: {commands} commands in {writes} writes");
}

/// A subscriber of a node known only by its stream address (`host:port`).
fn subscriber_at(addr: &str) -> Subscriber {
    let (ws, _) = tungstenite::connect(format!("ws://{addr}/")).expect("connect to stream port");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(FRAME_WAIT)).unwrap();
    }
    Subscriber { ws }
}

fn shell(command: &str) {
    let status = Command::new("sh").arg("-c").arg(command).status().expect("run sh");
    assert!(status.success(), "{command} failed");
}

/// Two nodes and Redis, each in a network namespace of its own, joined by veth pairs with
/// netem latency (set up by tests/multinode.sh, which passes the addresses and the commands
/// that cut and heal node A's link to Redis).
#[test]
#[ignore = "run by tests/multinode.sh (needs root for network namespaces)"]
fn multinode_across_network_namespaces() {
    let env = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by tests/multinode.sh"));
    let (a_worker, a_stream, b_worker, b_stream) = (env("RC_MN_A_WORKER"), env("RC_MN_A_STREAM"), env("RC_MN_B_WORKER"), env("RC_MN_B_STREAM"));
    let mut writer = Worker::connect_url(&a_worker);
    let mut b_writer = Worker::connect_url(&b_worker);

    // A set through A reaches B's subscribers in order.
    let mut sub_b = subscriber_at(&b_stream);
    sub_b.join_sync("s", "mn", "g", None);
    for n in 0..100 {
        writer.set("mn", "g", &format!("i{n}"), json!({"id": format!("i{n}"), "n": n}));
    }
    for n in 0..100 {
        let frame = sub_b.recv();
        assert_eq!(frame["id"], format!("i{n}"), "{frame}");
    }

    // Joins on B while A writes: nothing missed, nothing twice.
    let url = a_worker.clone();
    let load = std::thread::spawn(move || {
        let mut w = Worker::connect_url(&url);
        for n in 0..300 {
            let item = format!("j{}", n % 20);
            w.set("mn", "live", &item, json!({"id": item, "n": n}));
        }
    });
    let mut joined = Vec::new();
    for k in 0..3 {
        std::thread::sleep(Duration::from_millis(30 * k));
        let mut sub = subscriber_at(&b_stream);
        let view = View::from_sync(&sub.join_sync("s", "mn", "live", None));
        joined.push((sub, view));
    }
    load.join().unwrap();
    writer.set("mn", "live", "end", json!({"id": "end"}));
    let expected = sorted(writer.ok("stream::list", json!({"stream_name": "mn", "group_id": "live"})).as_array().unwrap().clone());
    for (sub, view) in &mut joined {
        loop {
            let frame = sub.recv();
            view.apply(&frame);
            if frame["id"] == "end" {
                break;
            }
        }
        assert_eq!(view.sorted(), expected);
    }

    // A loses its link to Redis: its writes fail, B keeps working, A's subscribers stay.
    let mut sub_a = subscriber_at(&a_stream);
    sub_a.join_sync("s", "mn", "cut", None);
    shell(&env("RC_MN_CUT_A"));
    let mut slow_writer = Worker::connect_url(&a_worker);
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = slow_writer.ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
    let result = slow_writer.call("stream::set", set_input("mn", "cut", "during", json!({"id": "during"})));
    assert_eq!(result["error"]["code"], "STREAM_SET_ERROR", "a write through the cut-off node fails: {result}");
    b_writer.set("mn", "cut", "from-b", json!({"id": "from-b"}));
    shell(&env("RC_MN_HEAL_A"));
    // Back: A's subscriber, still connected, gets B's write from the cut — as its event when
    // A's pub/sub connection survived the cut, or in a fresh sync when it had to reconnect.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "A's subscriber never got B's write after the link came back");
        match sub_a.ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let frame: Value = serde_json::from_str(&t).unwrap();
                let event = &frame["event"];
                let synced = event["type"] == "sync" && event["data"].as_array().is_some_and(|d| d.iter().any(|v| v["id"] == "from-b"));
                if synced || (event["type"] == "create" && frame["id"] == "from-b") {
                    break;
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("A's subscriber lost its connection: {e}"),
        }
    }
    wait_until(Duration::from_secs(20), "writes through A to succeed again", || {
        slow_writer.call("stream::set", set_input("mn", "cut", "after", json!({"id": "after"}))).get("error").is_none()
    });
}

#[test]
fn a_node_that_falls_behind_is_cut_off_by_redis_and_resyncs_its_subscribers() {
    let Some(redis) = redis() else { return };
    let (a, b) = (redis.node(), redis.node());
    // Redis' own bound on what waits for a pub/sub client: 64 KiB.
    let reply = redis_command(redis.port, &["CONFIG", "SET", "client-output-buffer-limit", "pubsub 65536 32768 1"]);
    assert!(reply.starts_with("+OK"), "{reply}");
    let mut writer = Worker::connect(&a);
    let mut sub = Subscriber::connect(&b);
    let mut view = View::from_sync(&sub.join_sync("s", "behind", "g", None));
    // Node B stops reading (its process is stopped) while A writes ~10 MiB of events (more than
    // the kernel's socket buffers hold).
    let pubsub_clients = || redis_command(redis.port, &["CLIENT", "LIST", "TYPE", "pubsub"]).lines().filter(|l| l.contains("id=")).count();
    let before = pubsub_clients();
    // SAFETY: kill(2) on a child process of this test.
    unsafe { libc::kill(b.child.id() as i32, libc::SIGSTOP) };
    let filler = "x".repeat(16 * 1024);
    for n in 0..600 {
        writer.set("behind", "g", &format!("i{}", n % 100), json!({"id": format!("i{}", n % 100), "n": n, "pad": filler}));
    }
    wait_until(Duration::from_secs(10), "Redis to cut off the stopped node's pub/sub connection", || pubsub_clients() < before);
    unsafe { libc::kill(b.child.id() as i32, libc::SIGCONT) };
    // B reconnects and sends its subscriber a fresh sync; its view then matches Redis.
    writer.set("behind", "g", "end", json!({"id": "end"}));
    let mut synced = false;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(Instant::now() < deadline, "the subscriber never caught up");
        let frame = sub.recv();
        synced |= frame["event"]["type"] == "sync";
        view.apply(&frame);
        if synced && view.items.iter().any(|(id, _)| id == "end") {
            break;
        }
    }
    let expected = sorted(writer.ok("stream::list", json!({"stream_name": "behind", "group_id": "g"})).as_array().unwrap().clone());
    assert_eq!(view.sorted(), expected);
}
