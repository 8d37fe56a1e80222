//! The built-in queue behind `TriggerAction.Enqueue`, over real sockets against the built
//! binary: per-queue order under concurrent producers, retries with backoff, dead letters after
//! the last attempt, redrive of any dead letter by id, owners that leave and come back, the
//! owner-wait age limit, metrics, and no acknowledged message lost to a SIGKILL.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

/// The `iii-queue` block (appended after the `iii-stream` block, the last one).
fn queue_block(queue_configs: &str) -> String {
    format!("  - name: iii-queue\n    config:\n      owner_probe_ms: 50\n      queue_configs:\n{queue_configs}")
}

fn start(queue_configs: &str) -> Engine {
    Engine::start_with("", &queue_block(queue_configs), &[])
}

/// Sends an enqueue of `data` for `function` to `queue`; returns its invocation id.
fn send_enqueue(w: &mut Worker, queue: &str, function: &str, data: Value) -> String {
    let id = uuid();
    w.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": function, "data": data,
        "action": {"type": "enqueue", "queue": queue}}));
    id
}

/// Enqueues and waits for the receipt; returns the message id.
fn enqueue(w: &mut Worker, queue: &str, function: &str, data: Value) -> String {
    let id = send_enqueue(w, queue, function, data);
    let result = w.recv_type("invocationresult");
    assert_eq!(result["invocation_id"], id.as_str());
    assert!(result.get("error").is_none(), "{result}");
    result["result"]["messageReceiptId"].as_str().expect("a receipt id").to_string()
}

fn fail(w: &mut Worker, call: &Value, message: &str) {
    w.send(json!({"type": "invocationresult", "invocation_id": call["invocation_id"], "function_id": call["function_id"],
        "error": {"code": "invocation_failed", "message": message}}));
}

fn dead_letters(w: &mut Worker, queue: &str) -> Vec<Value> {
    let r = w.call("engine::queue::dlq_messages", json!({"topic": queue}));
    r["result"].as_array().cloned().unwrap_or_else(|| panic!("{r}"))
}

fn topic(w: &mut Worker, queue: &str) -> Value {
    let r = w.call("engine::queue::list_topics", json!({}));
    r["result"].as_array().and_then(|t| t.iter().find(|t| t["name"] == queue).cloned()).unwrap_or(Value::Null)
}

#[test]
fn a_queue_with_concurrency_one_delivers_every_message_once_in_order_under_concurrent_producers() {
    let engine = start("        orders: {concurrency: 1}\n");
    let mut consumer = Worker::connect(&engine);
    consumer.register_function("orders::process");
    const PRODUCERS: usize = 4;
    const EACH: usize = 40;
    let url = engine.url();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut w = Worker::connect_url(&url);
                // All in flight at once: the order is the order the engine received them in.
                let ids: Vec<String> = (0..EACH).map(|i| send_enqueue(&mut w, "orders", "orders::process", json!({"p": p, "i": i}))).collect();
                for _ in &ids {
                    let r = w.recv_type("invocationresult");
                    assert!(r["result"]["messageReceiptId"].is_string(), "{r}");
                }
            })
        })
        .collect();
    let mut next = [0u64; PRODUCERS];
    for _ in 0..PRODUCERS * EACH {
        let call = consumer.recv_type("invokefunction");
        let (p, i) = (call["data"]["p"].as_u64().unwrap() as usize, call["data"]["i"].as_u64().unwrap());
        assert_eq!(i, next[p], "producer {p}'s messages out of order");
        next[p] += 1;
        assert!(call["data"].get("_caller_worker_id").is_none(), "queued payloads are the caller's data as sent");
        // Concurrency 1: nothing else is delivered before this one is answered.
        let early = consumer.sync();
        assert!(early.iter().all(|f| f["type"] != "invokefunction"), "second delivery in flight: {early:?}");
        consumer.answer(&call, json!({"ok": true}));
    }
    for p in producers {
        p.join().unwrap();
    }
    assert_eq!(next, [EACH as u64; PRODUCERS]);
    consumer.assert_quiet();
}

#[test]
fn a_failing_handler_is_retried_with_growing_backoff_until_it_succeeds() {
    let engine = start("        retry: {concurrency: 1, max_retries: 4, backoff_ms: 150}\n");
    let mut consumer = Worker::connect(&engine);
    consumer.register_function("jobs::flaky");
    let mut producer = Worker::connect(&engine);
    enqueue(&mut producer, "retry", "jobs::flaky", json!({"job": 1}));
    let mut times = Vec::new();
    for attempt in 0..3 {
        let call = consumer.recv_type("invokefunction");
        times.push(Instant::now());
        assert_eq!(call["data"], json!({"job": 1}));
        if attempt < 2 {
            fail(&mut consumer, &call, "not yet");
        } else {
            consumer.answer(&call, json!("done"));
        }
    }
    let first = times[1] - times[0];
    let second = times[2] - times[1];
    assert!(first >= Duration::from_millis(140), "first retry after {first:?}");
    assert!(second >= Duration::from_millis(290), "second retry after {second:?} (backoff doubles)");
    wait_until(Duration::from_secs(5), "the queue to empty", || topic(&mut producer, "retry")["depth"] == 0);
    assert!(dead_letters(&mut producer, "retry").is_empty());
    consumer.assert_quiet();
}

#[test]
fn after_the_last_attempt_a_message_is_dead_lettered_with_its_error() {
    let engine = start("        dlq: {max_retries: 2, backoff_ms: 20}\n");
    let mut consumer = Worker::connect(&engine);
    consumer.register_function("jobs::broken");
    let mut producer = Worker::connect(&engine);
    let id = enqueue(&mut producer, "dlq", "jobs::broken", json!({"x": 1}));
    for _ in 0..2 {
        let call = consumer.recv_type("invokefunction");
        fail(&mut consumer, &call, "kaput");
    }
    wait_until(Duration::from_secs(5), "the dead letter", || !dead_letters(&mut producer, "dlq").is_empty());
    let dead = dead_letters(&mut producer, "dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!((&dead[0]["id"], &dead[0]["data"], &dead[0]["attempts"]), (&json!(id), &json!({"x": 1}), &json!(2)));
    assert!(dead[0]["error"].as_str().unwrap().contains("kaput"), "{}", dead[0]);
    assert_eq!(topic(&mut producer, "dlq")["depth"], 0);
    consumer.assert_quiet();
}

#[test]
fn any_dead_letter_can_be_redriven_by_id_and_the_rest_stay() {
    let engine = start("        redrive: {max_retries: 1, concurrency: 1}\n");
    let mut consumer = Worker::connect(&engine);
    consumer.register_function("jobs::later");
    let mut producer = Worker::connect(&engine);
    let ids: Vec<String> = (0..3).map(|i| enqueue(&mut producer, "redrive", "jobs::later", json!({"i": i}))).collect();
    for _ in 0..3 {
        let call = consumer.recv_type("invokefunction");
        fail(&mut consumer, &call, "down");
    }
    wait_until(Duration::from_secs(5), "three dead letters", || dead_letters(&mut producer, "redrive").len() == 3);
    // Not the first one: the middle one.
    let r = producer.call("iii::queue::redrive_message", json!({"queue": "redrive", "message_id": ids[1]}));
    assert_eq!(r["result"], json!({"queue": "redrive", "message_id": ids[1], "redriven": 1}));
    let call = consumer.recv_type("invokefunction");
    assert_eq!(call["data"], json!({"i": 1}));
    consumer.answer(&call, json!(null));
    let left: Vec<Value> = dead_letters(&mut producer, "redrive").iter().map(|d| d["id"].clone()).collect();
    assert_eq!(left, [json!(ids[0]), json!(ids[2])]);
    // Unknown ids move nothing; a missing id is an error.
    let r = producer.call("iii::queue::redrive_message", json!({"queue": "redrive", "message_id": "nope"}));
    assert_eq!(r["result"]["redriven"], 0);
    let r = producer.call("iii::queue::redrive_message", json!({"queue": "redrive", "message_id": ""}));
    assert_eq!(r["error"]["code"], "message_id_not_set");
    // Discard one, redrive the rest.
    let r = producer.call("iii::queue::discard_message", json!({"queue": "redrive", "message_id": ids[0]}));
    assert_eq!(r["result"]["redriven"], 1);
    let r = producer.call("iii::queue::redrive", json!({"queue": "redrive"}));
    assert_eq!(r["result"], json!({"queue": "redrive", "redriven": 1}));
    let call = consumer.recv_type("invokefunction");
    assert_eq!(call["data"], json!({"i": 2}));
    consumer.answer(&call, json!(null));
    assert!(dead_letters(&mut producer, "redrive").is_empty());
}

#[test]
fn messages_wait_for_an_absent_owner_and_go_to_the_worker_that_comes_back() {
    let engine = start("        absent: {max_retries: 1, concurrency: 1}\n");
    let mut producer = Worker::connect(&engine);
    // The owner takes the first message and vanishes without answering.
    let mut first = Worker::connect(&engine);
    first.register_function("jobs::owned");
    enqueue(&mut producer, "absent", "jobs::owned", json!({"n": 0}));
    let call = first.recv_type("invokefunction");
    assert_eq!(call["data"], json!({"n": 0}));
    drop(first);
    for n in 1..3 {
        enqueue(&mut producer, "absent", "jobs::owned", json!({"n": n}));
    }
    // Kept, not failed: no attempt was used up, nothing is dead-lettered.
    wait_until(Duration::from_secs(5), "three waiting messages", || topic(&mut producer, "absent")["depth"] == 3);
    assert!(dead_letters(&mut producer, "absent").is_empty());
    let mut second = Worker::connect(&engine);
    second.register_function("jobs::owned");
    for n in 0..3 {
        let call = second.recv_type("invokefunction");
        assert_eq!(call["data"], json!({"n": n}), "delivered again, in order");
        second.answer(&call, json!(null));
    }
    wait_until(Duration::from_secs(5), "the queue to empty", || topic(&mut producer, "absent")["depth"] == 0);
    assert!(dead_letters(&mut producer, "absent").is_empty());
}

#[test]
fn a_message_whose_function_never_gets_a_worker_is_dead_lettered_after_the_age_limit() {
    let engine = start("        aging: {max_owner_wait_ms: 300}\n");
    let mut producer = Worker::connect(&engine);
    let started = Instant::now();
    let id = enqueue(&mut producer, "aging", "nobody::home", json!({"late": true}));
    wait_until(Duration::from_secs(5), "the dead letter", || !dead_letters(&mut producer, "aging").is_empty());
    assert!(started.elapsed() >= Duration::from_millis(300), "dead-lettered before the limit");
    let dead = dead_letters(&mut producer, "aging");
    assert_eq!(dead[0]["id"], id.as_str());
    assert_eq!(dead[0]["attempts"], 0, "waiting for a worker uses no attempt");
    assert!(dead[0]["error"].as_str().unwrap().contains("nobody::home"), "{}", dead[0]);
}

#[test]
fn a_provider_worker_of_engine_queue_enqueue_takes_precedence() {
    let engine = start("        q: {}\n");
    let mut provider = Worker::connect(&engine);
    provider.register_function("engine::queue::enqueue");
    let mut producer = Worker::connect(&engine);
    let id = send_enqueue(&mut producer, "q", "jobs::x", json!({"a": 1}));
    let call = provider.recv_type("invokefunction");
    assert_eq!((&call["data"]["queue"], &call["data"]["function_id"], &call["data"]["data"]), (&json!("q"), &json!("jobs::x"), &json!({"a": 1})));
    provider.answer(&call, json!(null));
    let r = producer.recv_type("invocationresult");
    assert_eq!(r["invocation_id"], id.as_str());
    assert_eq!(r["result"]["messageReceiptId"], call["data"]["messageReceiptId"]);
    assert!(topic(&mut producer, "q").is_null(), "the built-in queue was not used");
}

#[test]
fn queue_metrics_show_depth_in_flight_retries_and_dead_letters() {
    let port = free_port();
    let engine = Engine::start_full(&format!("metrics: 127.0.0.1:{port}\n"), "", &queue_block("        m: {max_retries: 2, backoff_ms: 10, concurrency: 1}\n"), &[]);
    let mut consumer = Worker::connect(&engine);
    consumer.register_function("jobs::m");
    let mut producer = Worker::connect(&engine);
    enqueue(&mut producer, "m", "jobs::m", json!(1));
    enqueue(&mut producer, "m", "jobs::m", json!(2));
    let metric = |name: &str| -> u64 {
        let text = http_get(port, "/metrics", Duration::from_secs(2)).unwrap_or_default();
        let prefix = format!("{name}{{queue=\"m\"}} ");
        text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
    };
    let call = consumer.recv_type("invokefunction");
    wait_until(Duration::from_secs(5), "depth 2, 1 in flight", || metric("ringcast_queue_depth") == 2 && metric("ringcast_queue_in_flight") == 1);
    fail(&mut consumer, &call, "x");
    let call = consumer.recv_type("invokefunction");
    fail(&mut consumer, &call, "x");
    let call = consumer.recv_type("invokefunction");
    assert_eq!(call["data"], 2);
    consumer.answer(&call, json!(null));
    wait_until(Duration::from_secs(5), "the counters", || {
        metric("ringcast_queue_depth") == 0
            && metric("ringcast_queue_retries_total") == 1
            && metric("ringcast_queue_dead_letters") == 1
            && metric("ringcast_queue_dead_lettered_total") == 1
            && metric("ringcast_queue_delivered_total") == 1
            && metric("ringcast_queue_enqueued_total") == 2
    });
}

#[test]
fn enqueue_to_an_empty_queue_name_is_an_enqueue_error() {
    let engine = start("        q: {}\n");
    let mut producer = Worker::connect(&engine);
    let id = send_enqueue(&mut producer, "", "jobs::x", json!(1));
    let r = producer.recv_type("invocationresult");
    assert_eq!(r["invocation_id"], id.as_str());
    assert_eq!(r["error"]["code"], "enqueue_error");
}

/// The `iii-stream` block's file store in `dir` (small segments, so the crash test also crosses
/// segment rolls and compaction of the queue store), then the queue block.
fn durable_config(dir: &Path, durability: &str) -> String {
    format!(
        "      adapter:\n        name: kv\n        config:\n          store_method: file_based\n          file_path: {}\n          durability: {durability}\n          segment_size: 65536\n{}",
        dir.display(),
        queue_block("        crash: {concurrency: 1}\n")
    )
}

#[test]
fn sigkill_mid_stream_loses_no_acknowledged_message_and_delivery_resumes_in_order() {
    let dir = scratch_dir();
    let mut engine = Engine::start_with("", &durable_config(&dir, "batch"), &[]);
    let mut consumer = Worker::connect(&engine);
    consumer.register_function("jobs::crash");
    let mut producer = Worker::connect(&engine);
    const TOTAL: u64 = 3000;
    const INFLIGHT: usize = 64;
    let mut sent: HashMap<String, u64> = HashMap::new();
    let mut acked = BTreeSet::new();
    let mut delivered = BTreeSet::new();
    let mut next = 0u64;
    // Produce with 64 in flight; consume some; kill the engine once 1000 are acknowledged.
    while acked.len() < 1000 {
        while sent.len() < INFLIGHT && next < TOTAL {
            sent.insert(send_enqueue(&mut producer, "crash", "jobs::crash", json!({"n": next})), next);
            next += 1;
        }
        let r = producer.recv_type("invocationresult");
        assert!(r.get("error").is_none(), "{r}");
        acked.insert(sent.remove(r["invocation_id"].as_str().unwrap()).unwrap());
        if acked.len() % 10 == 0 {
            let call = consumer.recv_type("invokefunction");
            delivered.insert(call["data"]["n"].as_u64().unwrap());
            consumer.answer(&call, json!(null));
        }
    }
    engine.child.kill().unwrap();
    engine.child.wait().unwrap();
    drop((producer, consumer));
    // Same directory: every acknowledged message not yet answered comes back, in order.
    let engine = Engine::start_with("", &durable_config(&dir, "batch"), &[]);
    let mut consumer = Worker::connect(&engine);
    consumer.register_function("jobs::crash");
    let missing = |delivered: &BTreeSet<u64>| acked.iter().filter(|n| !delivered.contains(n)).count();
    let mut last = None;
    while missing(&delivered) > 0 {
        let call = consumer.recv_type("invokefunction");
        let n = call["data"]["n"].as_u64().unwrap();
        if let Some(last) = last {
            assert!(n > last, "after the restart {n} came after {last}");
        }
        last = Some(n);
        delivered.insert(n);
        consumer.answer(&call, json!(null));
    }
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_fdatasync_answers_enqueue_error_and_nothing_is_delivered() {
    let dir = scratch_dir();
    // Every fdatasync fails with EIO (the test-only fault hook of the file stores).
    let engine = Engine::start_env("metrics: false\n", "", &durable_config(&dir, "always"), &[], &[("RINGCAST_TEST_FAIL_SYNC_AFTER", "0")]);
    let mut consumer = Worker::connect(&engine);
    consumer.register_function("jobs::crash");
    let mut producer = Worker::connect(&engine);
    for _ in 0..2 {
        let id = send_enqueue(&mut producer, "crash", "jobs::crash", json!({"n": 1}));
        let r = producer.recv_type("invocationresult");
        assert_eq!(r["invocation_id"], id.as_str());
        assert_eq!(r["error"]["code"], "enqueue_error", "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("restart the engine"), "{r}");
    }
    assert!(topic(&mut producer, "crash")["depth"] == 0);
    consumer.assert_quiet();
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn queued_and_dead_messages_follow_their_queues_to_new_shards_when_the_shard_count_changes() {
    let dir = scratch_dir();
    let config = |dir: &Path| {
        let queues = "  - name: iii-queue\n    config:\n      owner_probe_ms: 50\n      default_queue: {max_retries: 1}\n";
        format!(
            "      adapter:\n        name: kv\n        config:\n          store_method: file_based\n          file_path: {}\n          durability: batch\n          segment_size: 65536\n{queues}",
            dir.display()
        )
    };
    let queues: Vec<String> = (0..6).map(|i| format!("q{i}")).collect();
    let mut engine = Engine::start_with("", &config(&dir), &["--shards", "1"]);
    let mut consumer = Worker::connect(&engine);
    consumer.register_function("jobs::fails");
    let mut producer = Worker::connect(&engine);
    for (i, queue) in queues.iter().enumerate() {
        enqueue(&mut producer, queue, "jobs::fails", json!({"q": i, "dead": true}));
        enqueue(&mut producer, queue, "jobs::later", json!({"q": i, "dead": false}));
    }
    for _ in &queues {
        let call = consumer.recv_type("invokefunction");
        fail(&mut consumer, &call, "no");
    }
    for queue in &queues {
        wait_until(Duration::from_secs(5), "the dead letter", || dead_letters(&mut producer, queue).len() == 1);
    }
    engine.child.kill().unwrap();
    engine.child.wait().unwrap();
    // Three shards now: each queue's owner holds its waiting message and its dead letter.
    let engine = Engine::start_with("", &config(&dir), &["--shards", "3"]);
    let mut consumer = Worker::connect(&engine);
    for queue in &queues {
        assert_eq!(dead_letters(&mut consumer, queue).len(), 1, "{queue}'s dead letter at its new owner");
        assert_eq!(topic(&mut consumer, queue)["depth"], 1, "{queue}'s waiting message at its new owner");
    }
    consumer.register_function("jobs::fails");
    consumer.register_function("jobs::later");
    let mut admin = Worker::connect(&engine);
    for queue in &queues {
        let r = admin.call("iii::queue::redrive", json!({"queue": queue}));
        assert_eq!(r["result"]["redriven"], 1, "{r}");
    }
    let mut got = BTreeSet::new();
    while got.len() < 2 * queues.len() {
        let call = consumer.recv_type("invokefunction");
        assert!(got.insert((call["data"]["q"].as_u64().unwrap(), call["data"]["dead"].as_bool().unwrap())), "twice: {call}");
        consumer.answer(&call, json!(null));
    }
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}
