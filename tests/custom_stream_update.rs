//! `stream::update` on a custom stream (spec/stream.md §6.5): the stream's storage is a worker
//! that registered `stream::get(<name>)`, `stream::set(<name>)` and the rest, as the SDKs'
//! `createStream` does (no `stream::update(<name>)`). The engine applies the ops through that
//! get and set, one update of an item at a time, and its subscribers still get the events.

mod common;

use common::{uuid, Engine, Subscriber, Worker};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::Message;

const STREAM: &str = "counters";

/// What the custom storage worker holds and saw.
#[derive(Default)]
struct Store {
    items: HashMap<String, Value>,
    /// `"get <item>"` / `"set <item>"`, in the order the calls arrived.
    calls: Vec<String>,
    /// Whether the one unanswered get of `hang-once` happened.
    hung: bool,
}

/// A worker serving `STREAM`'s storage from a map, in its own thread. Items named
/// `fail-get` / `fail-set` answer errors from get / set; `no-result` answers set with null;
/// the first get of `hang-once` is never answered.
struct CustomStorage {
    store: Arc<Mutex<Store>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CustomStorage {
    fn start(engine: &Engine) -> CustomStorage {
        let mut worker = Worker::connect(engine);
        for op in ["get", "set", "delete", "list", "list_groups"] {
            worker.register_function(&format!("stream::{op}({STREAM})"));
        }
        if let MaybeTlsStream::Plain(s) = worker.ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let store = Arc::new(Mutex::new(Store::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (store2, stop2) = (store.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let text = match worker.ws.read() {
                    Ok(Message::Text(text)) => text,
                    Ok(_) => continue,
                    Err(tungstenite::Error::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                    Err(_) => return,
                };
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] != "invokefunction" {
                    continue;
                }
                let Some(answer) = serve(&store2, &frame) else { continue };
                let mut reply = json!({ "type": "invocationresult", "invocation_id": frame["invocation_id"], "function_id": frame["function_id"] });
                match answer {
                    Ok(result) => reply["result"] = result,
                    Err(error) => reply["error"] = error,
                }
                worker.send(reply);
            }
        });
        CustomStorage { store, stop, thread: Some(thread) }
    }

    fn calls(&self) -> Vec<String> {
        self.store.lock().unwrap().calls.clone()
    }

    fn item(&self, item: &str) -> Option<Value> {
        self.store.lock().unwrap().items.get(item).cloned()
    }
}

impl Drop for CustomStorage {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(store: &Mutex<Store>, frame: &Value) -> Option<Result<Value, Value>> {
    let mut store = store.lock().unwrap();
    let item = frame["data"]["item_id"].as_str().unwrap_or_default();
    if item == "hang-once" && !store.hung {
        store.hung = true;
        store.calls.push("get hang-once (unanswered)".to_string());
        return None;
    }
    Some(serve_now(&mut store, frame))
}

fn serve_now(store: &mut Store, frame: &Value) -> Result<Value, Value> {
    let function = frame["function_id"].as_str().unwrap_or_default();
    let data = &frame["data"];
    let item = data["item_id"].as_str().unwrap_or_default().to_string();
    if function.starts_with("stream::get(") {
        store.calls.push(format!("get {item}"));
        if item == "fail-get" {
            return Err(json!({ "code": "store_down", "message": "the store cannot read" }));
        }
        return Ok(store.items.get(&item).cloned().unwrap_or(Value::Null));
    }
    if function.starts_with("stream::set(") {
        store.calls.push(format!("set {item}"));
        match item.as_str() {
            "fail-set" => return Err(json!({ "code": "store_full", "message": "the store cannot write" })),
            "no-result" => return Ok(Value::Null),
            _ => {}
        }
        let old = store.items.insert(item, data["data"].clone());
        return Ok(json!({ "old_value": old, "new_value": data["data"] }));
    }
    Err(json!({ "code": "not_here", "message": format!("{function} is not served by this test") }))
}

fn update_frame(item: &str, ops: Value) -> (String, Value) {
    let id = uuid();
    let frame = json!({
        "type": "invokefunction", "invocation_id": id, "function_id": "stream::update",
        "data": { "stream_name": STREAM, "group_id": "g", "item_id": item, "ops": ops },
    });
    (id, frame)
}

#[test]
fn concurrent_updates_of_one_item_are_all_applied_through_get_and_set() {
    let engine = Engine::start();
    let storage = CustomStorage::start(&engine);
    let mut subscriber = Subscriber::connect(&engine);
    subscriber.join_sync("sub", STREAM, "g", None);
    let mut caller = Worker::connect(&engine);

    const UPDATES: usize = 20;
    let mut ids = Vec::new();
    for _ in 0..UPDATES {
        let (id, frame) = update_frame("c1", json!([{ "type": "increment", "path": "n", "by": 1 }]));
        caller.send(frame);
        ids.push(id);
    }
    let mut results = HashMap::new();
    while results.len() < UPDATES {
        let frame = caller.recv_type("invocationresult");
        results.insert(frame["invocation_id"].as_str().unwrap().to_string(), frame);
    }
    // Each update saw the one before it: the old values are 0..19 (missing first), in order.
    let olds: Vec<i64> = ids
        .iter()
        .map(|id| {
            let r = &results[id];
            assert!(r.get("error").is_none(), "{r}");
            r["result"]["old_value"]["n"].as_i64().unwrap_or(0)
        })
        .collect();
    assert_eq!(olds, (0..UPDATES as i64).collect::<Vec<_>>(), "updates applied in arrival order");
    assert_eq!(storage.item("c1"), Some(json!({ "n": UPDATES })), "no update was lost");

    // The custom storage saw each read followed by its write, never two updates interleaved.
    let expected: Vec<String> = (0..UPDATES).flat_map(|_| ["get c1".to_string(), "set c1".to_string()]).collect();
    assert_eq!(storage.calls(), expected);

    // Subscribers got one event per update, in order: a create, then updates.
    for n in 1..=UPDATES {
        let frame = subscriber.recv();
        assert_eq!(frame["id"], "c1", "{frame}");
        assert_eq!(frame["event"]["type"], if n == 1 { "create" } else { "update" }, "{frame}");
        assert_eq!(frame["event"]["data"], json!({ "n": n }), "{frame}");
    }
}

#[test]
fn get_and_set_errors_are_update_errors_and_change_nothing() {
    let engine = Engine::start();
    let storage = CustomStorage::start(&engine);
    let mut subscriber = Subscriber::connect(&engine);
    subscriber.join_sync("sub", STREAM, "g", None);
    let mut caller = Worker::connect(&engine);
    let ops = json!([{ "type": "set", "path": "x", "value": 1 }]);

    for (item, code) in [("fail-get", "store_down"), ("fail-set", "store_full")] {
        let result = caller.call("stream::update", json!({ "stream_name": STREAM, "group_id": "g", "item_id": item, "ops": ops }));
        assert_eq!(result["error"]["code"], "STREAM_UPDATE_ERROR", "{result}");
        let message = result["error"]["message"].as_str().unwrap();
        assert!(message.contains(code) && message.contains(&format!("({STREAM})")), "names the custom function and its error: {message}");
        assert_eq!(storage.item(item), None);
    }
    assert_eq!(storage.calls(), ["get fail-get", "get fail-set", "set fail-set"], "a failed get writes nothing");

    let result = caller.call("stream::update", json!({ "stream_name": STREAM, "group_id": "g", "item_id": "no-result", "ops": ops }));
    assert_eq!(result["error"]["code"], "STREAM_UPDATE_ERROR", "{result}");

    // Neither failure published an event: the next frame is the event of a good update.
    let ok = caller.call("stream::update", json!({ "stream_name": STREAM, "group_id": "g", "item_id": "fine", "ops": ops }));
    assert_eq!(ok["result"], json!({ "old_value": null, "new_value": { "x": 1 } }), "{ok}");
    let frame = subscriber.recv();
    assert_eq!((&frame["id"], &frame["event"]["type"]), (&json!("fine"), &json!("create")), "{frame}");

    // Failed updates left no item waiting: the failed items update normally once fixed.
    let result = caller.call("stream::update", json!({ "stream_name": STREAM, "group_id": "g", "item_id": "fail-get", "ops": [] }));
    assert_eq!(result["error"]["code"], "STREAM_UPDATE_ERROR");
}

#[test]
fn per_op_errors_are_reported_and_sets_of_the_item_wait_their_turn() {
    let engine = Engine::start();
    let storage = CustomStorage::start(&engine);
    let mut caller = Worker::connect(&engine);

    // An op that fails is reported and skipped; the others apply (as on the built-in store).
    caller.ok("stream::set", json!({ "stream_name": STREAM, "group_id": "g", "item_id": "doc", "data": { "list": 1 } }));
    let result = caller.ok(
        "stream::update",
        json!({ "stream_name": STREAM, "group_id": "g", "item_id": "doc", "ops": [
            { "type": "append", "path": "list", "value": 2 },
            { "type": "set", "path": "ok", "value": true },
        ] }),
    );
    assert_eq!(result["old_value"], json!({ "list": 1 }));
    assert_eq!(result["new_value"], json!({ "list": 1, "ok": true }));
    assert_eq!(result["errors"][0]["op_index"], 0, "{result}");

    // A stream::set sent between updates of the same item is applied between them.
    let (first, frame1) = update_frame("doc", json!([{ "type": "set", "path": "step", "value": 1 }]));
    caller.send(frame1);
    let set_id = uuid();
    caller.send(json!({
        "type": "invokefunction", "invocation_id": set_id, "function_id": "stream::set",
        "data": { "stream_name": STREAM, "group_id": "g", "item_id": "doc", "data": { "replaced": true } },
    }));
    let (second, frame2) = update_frame("doc", json!([{ "type": "set", "path": "step", "value": 2 }]));
    caller.send(frame2);
    let mut results = HashMap::new();
    while results.len() < 3 {
        let frame = caller.recv_type("invocationresult");
        results.insert(frame["invocation_id"].as_str().unwrap().to_string(), frame);
    }
    assert_eq!(results[&first]["result"]["new_value"]["step"], 1);
    assert_eq!(results[&second]["result"]["old_value"], json!({ "replaced": true }), "the set came between: {:?}", results[&second]);
    assert_eq!(storage.item("doc"), Some(json!({ "replaced": true, "step": 2 })));
}

#[test]
fn an_unanswered_custom_call_gives_the_item_back_after_the_invocation_timeout() {
    let engine = Engine::start_with("      invocation_timeout_ms: 300\n", "", &[]);
    let storage = CustomStorage::start(&engine);
    let mut caller = Worker::connect(&engine);
    let ops = json!([{ "type": "increment", "path": "n", "by": 1 }]);
    let (first, frame1) = update_frame("hang-once", ops.clone());
    caller.send(frame1);
    let (second, frame2) = update_frame("hang-once", ops);
    caller.send(frame2);
    let mut results = HashMap::new();
    while results.len() < 2 {
        let frame = caller.recv_type("invocationresult");
        results.insert(frame["invocation_id"].as_str().unwrap().to_string(), frame);
    }
    assert_eq!(results[&first]["error"]["code"], "STREAM_UPDATE_ERROR", "{:?}", results[&first]);
    assert!(results[&first]["error"]["message"].as_str().unwrap().contains("timeout"), "{:?}", results[&first]);
    assert_eq!(results[&second]["result"]["new_value"], json!({ "n": 1 }), "the next update of the item ran: {:?}", results[&second]);
    assert_eq!(storage.item("hang-once"), Some(json!({ "n": 1 })));
}
