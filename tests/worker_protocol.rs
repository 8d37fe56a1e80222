//! The worker protocol over real sockets against the built binary (spec/worker-protocol.md).

mod common;

use common::*;
use serde_json::json;
use tungstenite::Message;

#[test]
fn first_frame_is_workerregistered_with_uuids() {
    let engine = Engine::start();
    let worker = Worker::connect(&engine);
    assert!(uuid::Uuid::parse_str(&worker.worker_id).is_ok());
    assert!(uuid::Uuid::parse_str(&worker.reattach_token).is_ok());
    assert_ne!(worker.worker_id, worker.reattach_token);
}

#[test]
fn sync_call_reuses_the_caller_id_and_injects_caller_worker_id() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("math::add");
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    caller.send(json!({
        "type": "invokefunction", "invocation_id": id, "function_id": "math::add",
        "data": {"a": 2, "b": 3}, "metadata": {"tenant": "acme"},
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "baggage": "iii.function.id=caller::fn"
    }));
    let call = owner.recv_type("invokefunction");
    assert_eq!(call["invocation_id"], id);
    assert_eq!(call["function_id"], "math::add");
    assert_eq!(call["data"], json!({"a": 2, "b": 3, "_caller_worker_id": caller.worker_id}));
    assert_eq!(call["metadata"], json!({"tenant": "acme"}));
    assert_eq!(call["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    assert_eq!(call["baggage"], "iii.function.id=math::add");
    owner.answer(&call, json!(5));
    let result = caller.recv_type("invocationresult");
    assert_eq!(result, json!({"type": "invocationresult", "invocation_id": id, "function_id": "math::add", "result": 5}));
}

#[test]
fn uppercase_invocation_id_is_accepted_and_echoed_as_sent() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("f::g");
    let mut caller = Worker::connect(&engine);
    let id = uuid().to_uppercase();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "f::g", "data": 1}));
    let call = owner.recv_type("invokefunction");
    assert_eq!(call["invocation_id"], id.to_lowercase());
    owner.answer(&call, json!(2));
    assert_eq!(caller.recv_type("invocationresult")["invocation_id"], id);
}

#[test]
fn missing_data_is_forwarded_as_null_and_scalars_get_no_injection() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("f::none");
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "f::none"}));
    let call = owner.recv_type("invokefunction");
    assert!(call.get("data").is_some(), "data must always be present: {call}");
    assert!(call["data"].is_null());
    owner.send(json!({"type": "invocationresult", "invocation_id": id, "function_id": "f::none"}));
    let result = caller.recv_type("invocationresult");
    assert!(result.get("result").is_none() && result.get("error").is_none(), "{result}");
}

#[test]
fn void_call_runs_with_a_fresh_id_and_the_caller_gets_nothing() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("log::it");
    let mut caller = Worker::connect(&engine);
    caller.send(json!({"type": "invokefunction", "function_id": "log::it", "data": {"x": 1}, "action": {"type": "void"}}));
    let call = owner.recv_type("invokefunction");
    assert!(uuid::Uuid::parse_str(call["invocation_id"].as_str().unwrap()).is_ok());
    assert_eq!(call["data"]["_caller_worker_id"], caller.worker_id);
    owner.answer(&call, json!("ignored"));
    owner.sync(); // the engine has consumed the result
    caller.assert_quiet();
}

#[test]
fn unknown_function_is_function_not_found() {
    let engine = Engine::start();
    let mut caller = Worker::connect(&engine);
    let result = caller.call("nope::missing", json!({}));
    assert_eq!(result["function_id"], "nope::missing");
    assert_eq!(result["error"]["code"], "function_not_found");
    assert_eq!(result["error"]["message"], "Function nope::missing not found in namespace default.");
}

#[test]
fn handler_errors_pass_through_unchanged() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("f::boom");
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "f::boom", "data": {}}));
    let call = owner.recv_type("invokefunction");
    assert_eq!(call["invocation_id"], id);
    let error = json!({"code": "invocation_failed", "message": "boom", "stacktrace": "Error: boom\n    at x"});
    owner.send(json!({"type": "invocationresult", "invocation_id": id, "function_id": "f::boom", "error": error}));
    let result = caller.recv_type("invocationresult");
    assert_eq!(result["error"], error);
    assert!(result.get("result").is_none());
}

#[test]
fn owner_disconnect_stops_pending_invocations_at_once() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("slow::fn");
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "slow::fn", "data": {}}));
    owner.recv_type("invokefunction");
    drop(owner); // abrupt: no close frame
    let result = caller.recv_type("invocationresult");
    assert_eq!(result["invocation_id"], id);
    assert_eq!(result["error"], json!({"code": "invocation_stopped", "message": "Invocation stopped"}));
    // The function went with its owner.
    assert_eq!(caller.call("slow::fn", json!({}))["error"]["code"], "function_not_found");
}

#[test]
fn late_result_for_a_departed_caller_is_dropped_quietly() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("f::late");
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "f::late", "data": {}}));
    let call = owner.recv_type("invokefunction");
    caller.ws.close(None).unwrap();
    let _ = caller.recv_close();
    owner.answer(&call, json!(1));
    owner.assert_quiet();
    // The engine still serves.
    let mut other = Worker::connect(&engine);
    let id2 = uuid();
    other.send(json!({"type": "invokefunction", "invocation_id": id2, "function_id": "f::late", "data": {}}));
    let call = owner.recv_type("invokefunction");
    owner.answer(&call, json!(2));
    assert_eq!(other.recv_type("invocationresult")["result"], 2);
}

#[test]
fn non_uuid_invocation_id_gets_an_error_answer_and_the_socket_stays() {
    let engine = Engine::start();
    let mut caller = Worker::connect(&engine);
    caller.send(json!({"type": "invokefunction", "invocation_id": "abc", "function_id": "x::y", "data": {}}));
    let result = caller.recv_type("invocationresult");
    assert_eq!(result["invocation_id"], "abc");
    assert_eq!(result["function_id"], "x::y");
    assert_eq!(result["error"]["code"], "invalid_invocation_id");
    caller.assert_quiet();
}

#[test]
fn wrong_field_types_answer_a_waiting_caller() {
    let engine = Engine::start();
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": 42, "data": {}}));
    let result = caller.recv_type("invocationresult");
    assert_eq!(result["invocation_id"], id);
    assert_eq!(result["error"]["code"], "invalid_message");
    caller.assert_quiet();
}

#[test]
fn bad_frames_are_dropped_and_the_connection_stays_up() {
    let engine = Engine::start();
    let mut worker = Worker::connect(&engine);
    for frame in [
        "not json at all",
        "{\"type\":",
        "[1,2,3]",
        "{\"no_type\":1}",
        "{\"type\":\"InvokeFunction\",\"function_id\":\"a\",\"data\":1}",
        "{\"type\":\"observe\",\"anything\":true}",
        "{\"type\":\"registerfunction\"}",
        "{\"type\":\"registertriggertype\",\"id\":\"no-description\"}",
        "   ",
    ] {
        worker.send_raw(Message::text(frame));
    }
    let deep = format!("{{\"type\":\"ping\",\"x\":{}{}}}", "[".repeat(200_000), "]".repeat(200_000));
    worker.send_raw(Message::text(deep));
    worker.send_raw(Message::binary(b"\xff\xfe not utf8".to_vec()));
    worker.send_raw(Message::binary(b"OTLP\x00\x01telemetry".to_vec()));
    worker.assert_quiet();
    let listed = worker.call("engine::functions::list", json!({"prefix": "a"}));
    assert_eq!(listed["result"]["functions"], json!([]), "nothing was registered by the bad frames");
}

#[test]
fn binary_frames_carrying_json_are_protocol_messages() {
    let engine = Engine::start();
    let mut worker = Worker::connect(&engine);
    worker.send_raw(Message::binary(br#"{"type":"ping"}"#.to_vec()));
    assert_eq!(worker.recv()["type"], "pong");
}

#[test]
fn websocket_ping_is_answered_with_pong() {
    let engine = Engine::start();
    let mut worker = Worker::connect(&engine);
    worker.send_raw(Message::Ping(b"hb".to_vec().into()));
    match worker.ws.read().expect("pong") {
        Message::Pong(payload) => assert_eq!(&payload[..], b"hb"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn fragmented_messages_are_reassembled() {
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::Frame;
    let engine = Engine::start();
    let mut worker = Worker::connect(&engine);
    let text = br#"{"type":"ping"}"#;
    let (a, b) = text.split_at(6);
    let mut first = Frame::message(a.to_vec(), OpCode::Data(Data::Text), false);
    first.header_mut().is_final = false;
    worker.ws.write(Message::Frame(first)).unwrap();
    worker.ws.write(Message::Frame(Frame::message(b.to_vec(), OpCode::Data(Data::Continue), true))).unwrap();
    worker.ws.flush().unwrap();
    assert_eq!(worker.recv()["type"], "pong");
}

#[test]
fn oversized_message_closes_with_1009() {
    let engine = Engine::start_with("      max_message_bytes: 4096\n", "", &[]);
    let mut worker = Worker::connect(&engine);
    let big = json!({"type": "ping", "pad": "x".repeat(10_000)});
    worker.send(big);
    assert_eq!(worker.recv_close(), Some(1009));
    // Others are unaffected.
    let mut other = Worker::connect(&engine);
    other.assert_quiet();
}

#[test]
fn large_payloads_round_trip() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("echo::big");
    let mut caller = Worker::connect(&engine);
    let payload = "p".repeat(1 << 20);
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "echo::big", "data": {"s": payload}}));
    let call = owner.recv_type("invokefunction");
    assert_eq!(call["data"]["s"].as_str().unwrap().len(), 1 << 20);
    owner.answer(&call, call["data"]["s"].clone());
    assert_eq!(caller.recv_type("invocationresult")["result"].as_str().unwrap(), payload);
}

#[test]
fn first_registration_wins_and_the_newcomer_is_told() {
    let engine = Engine::start();
    let mut first = Worker::connect(&engine);
    first.register_function("dup::fn");
    let mut second = Worker::connect(&engine);
    second.send(json!({"type": "registerfunction", "id": "dup::fn"}));
    let rejected = second.recv_type("registrationrejected");
    assert_eq!(rejected["code"], "FUNCTION_NAMESPACE_CONFLICT");
    assert_eq!(rejected["function_id"], "dup::fn");
    assert_eq!(rejected["owner_worker_id"], first.worker_id);
    // The same worker re-registering is an idempotent replace.
    first.send(json!({"type": "registerfunction", "id": "dup::fn", "description": "v2"}));
    first.assert_quiet();
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "dup::fn", "data": 0}));
    let call = first.recv_type("invokefunction");
    first.answer(&call, json!("first"));
    assert_eq!(caller.recv_type("invocationresult")["result"], "first");
}

#[test]
fn unregisterfunction_only_by_the_owner() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("gone::soon");
    let mut other = Worker::connect(&engine);
    other.send(json!({"type": "unregisterfunction", "id": "gone::soon"}));
    other.sync();
    let listed = other.call("engine::functions::list", json!({"prefix": "gone::"}));
    assert_eq!(listed["result"]["functions"][0]["function_id"], "gone::soon");
    owner.send(json!({"type": "unregisterfunction", "id": "gone::soon"}));
    owner.sync();
    assert_eq!(other.call("gone::soon", json!({}))["error"]["code"], "function_not_found");
}

#[test]
fn worker_name_conflict_rejects_and_closes_the_newcomer() {
    let engine = Engine::start();
    let mut first = Worker::connect(&engine);
    first.register_worker("billing");
    first.sync();
    let mut second = Worker::connect(&engine);
    second.register_worker("billing");
    let rejected = second.recv_type("registrationrejected");
    assert_eq!(rejected["code"], "WORKER_NAMESPACE_CONFLICT");
    assert_eq!(rejected["worker_name"], "billing");
    assert_eq!(rejected["owner_worker_id"], first.worker_id);
    assert!(second.recv_close().is_some());
    first.assert_quiet();
}

#[test]
fn reattach_with_the_right_token_retires_the_old_connection() {
    let engine = Engine::start();
    let mut old = Worker::connect(&engine);
    old.register_worker("svc");
    old.register_function("svc::fn");
    let mut caller = Worker::connect(&engine);
    // A wrong token changes nothing.
    let mut intruder = Worker::connect(&engine);
    intruder.send(json!({"type": "reattach", "previous_worker_id": old.worker_id, "reattach_token": uuid()}));
    intruder.sync();
    old.assert_quiet();
    // The right token retires the old socket; its function goes until re-registered.
    let mut new = Worker::connect(&engine);
    new.send(json!({"type": "reattach", "previous_worker_id": old.worker_id, "reattach_token": old.reattach_token}));
    new.register_worker("svc"); // the name is free again
    new.sync();
    assert!(old.recv_close().is_some());
    assert_eq!(caller.call("svc::fn", json!({}))["error"]["code"], "function_not_found");
    new.register_function("svc::fn");
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "svc::fn", "data": {}}));
    let call = new.recv_type("invokefunction");
    new.answer(&call, json!("ok"));
    assert_eq!(caller.recv_type("invocationresult")["result"], "ok");
}

#[test]
fn triggers_park_until_a_provider_registers_and_replay_after_it_returns() {
    let engine = Engine::start();
    let mut app = Worker::connect(&engine);
    app.register_function("app::on_hook");
    let trigger = json!({"type": "registertrigger", "id": "t-1", "trigger_type": "webhook",
        "function_id": "app::on_hook", "config": {"path": "/x"}, "metadata": {"m": 1}});
    app.send(trigger.clone());
    app.assert_quiet(); // parked, nobody told

    let mut provider = Worker::connect(&engine);
    provider.send(json!({"type": "registertriggertype", "id": "webhook", "description": "Webhooks"}));
    let delivered = provider.recv_type("registertrigger");
    assert_eq!(
        delivered,
        json!({"type": "registertrigger", "id": "t-1", "trigger_type": "webhook",
               "function_id": "app::on_hook", "config": {"path": "/x"}, "metadata": {"m": 1}})
    );
    provider.send(json!({"type": "triggerregistrationresult", "id": "t-1", "trigger_type": "webhook", "function_id": "app::on_hook"}));
    app.assert_quiet(); // success is not acknowledged

    // The provider fires the target itself.
    provider.send(json!({"type": "invokefunction", "function_id": "app::on_hook", "data": {"hit": 1}, "action": {"type": "void"}}));
    assert_eq!(app.recv_type("invokefunction")["data"]["hit"], 1);

    // Provider leaves: the binding parks; a new provider gets it replayed.
    drop(provider);
    let mut provider2 = Worker::connect(&engine);
    provider2.send(json!({"type": "registertriggertype", "id": "webhook", "description": "Webhooks v2"}));
    assert_eq!(provider2.recv_type("registertrigger")["id"], "t-1");

    // Unregistering tells the provider, with trigger_type.
    app.send(json!({"type": "unregistertrigger", "id": "t-1"}));
    assert_eq!(provider2.recv_type("unregistertrigger"), json!({"type": "unregistertrigger", "id": "t-1", "trigger_type": "webhook"}));
}

#[test]
fn provider_rejection_is_forwarded_and_parks_the_binding() {
    let engine = Engine::start();
    let mut provider = Worker::connect(&engine);
    provider.send(json!({"type": "registertriggertype", "id": "cronish", "description": "c"}));
    provider.sync();
    let mut app = Worker::connect(&engine);
    app.send(json!({"type": "registertrigger", "id": "t-2", "trigger_type": "cronish", "function_id": "a::b", "config": {}}));
    provider.recv_type("registertrigger");
    let error = json!({"code": "trigger_registration_failed", "message": "bad expression"});
    provider.send(json!({"type": "triggerregistrationresult", "id": "t-2", "trigger_type": "cronish", "function_id": "a::b", "error": error}));
    let forwarded = app.recv_type("triggerregistrationresult");
    assert_eq!(forwarded, json!({"type": "triggerregistrationresult", "id": "t-2", "trigger_type": "cronish", "function_id": "a::b", "error": error}));
}

#[test]
fn binding_owner_disconnect_unregisters_at_the_provider() {
    let engine = Engine::start();
    let mut provider = Worker::connect(&engine);
    provider.send(json!({"type": "registertriggertype", "id": "tick", "description": "t"}));
    provider.sync();
    let mut app = Worker::connect(&engine);
    app.send(json!({"type": "registertrigger", "id": "t-3", "trigger_type": "tick", "function_id": "a::b", "config": null}));
    provider.recv_type("registertrigger");
    drop(app);
    assert_eq!(provider.recv_type("unregistertrigger")["id"], "t-3");
}

#[test]
fn unregistertriggertype_removes_the_type_and_parks_its_bindings() {
    let engine = Engine::start();
    let mut provider = Worker::connect(&engine);
    provider.send(json!({"type": "registertriggertype", "id": "evt", "description": "e"}));
    let mut app = Worker::connect(&engine);
    app.send(json!({"type": "registertrigger", "id": "t-4", "trigger_type": "evt", "function_id": "a::b", "config": {}}));
    provider.recv_type("registertrigger");
    provider.send(json!({"type": "unregistertriggertype", "id": "evt"}));
    provider.sync();
    let info = app.call("engine::triggers::info", json!({"id": "evt"}));
    assert_eq!(info["error"]["code"], "NOT_FOUND");
    let mut provider2 = Worker::connect(&engine);
    provider2.send(json!({"type": "registertriggertype", "id": "evt", "description": "e"}));
    assert_eq!(provider2.recv_type("registertrigger")["id"], "t-4");
}

#[test]
fn blank_namespace_is_refused_with_invalid_namespace() {
    let engine = Engine::start();
    let mut worker = Worker::connect(&engine);
    let id = uuid();
    worker.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "a::b", "data": {}, "namespace": " "}));
    assert_eq!(worker.recv_type("invocationresult")["error"]["code"], "INVALID_NAMESPACE");
    worker.send(json!({"type": "registertrigger", "id": "t", "trigger_type": "x", "function_id": "a::b", "config": {}, "namespace": ""}));
    assert_eq!(worker.recv_type("triggerregistrationresult")["error"]["code"], "INVALID_NAMESPACE");
}

#[test]
fn namespaced_workers_route_by_namespace() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.send(json!({"type": "registerfunction", "id": "orders::create"}));
    owner.send(json!({"type": "invokefunction", "function_id": "engine::workers::register", "action": {"type": "void"},
        "data": {"name": "orders", "namespace": "shop"}}));
    owner.sync();
    let mut caller = Worker::connect(&engine);
    let miss = caller.call("orders::create", json!({}));
    assert_eq!(miss["error"]["code"], "function_not_found");
    assert!(miss["error"]["message"].as_str().unwrap().contains("shop"), "{miss}");
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "orders::create", "data": {}, "namespace": "shop"}));
    let call = owner.recv_type("invokefunction");
    owner.answer(&call, json!("created"));
    assert_eq!(caller.recv_type("invocationresult")["result"], "created");
}

#[test]
fn enqueue_without_a_queue_provider_goes_to_the_built_in_queue() {
    // No worker provides engine::queue::enqueue: ringcast's own queue stores the message (see
    // tests/queue.rs for its delivery).
    let engine = Engine::start();
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "pay::charge",
        "data": {"amount": 1}, "action": {"type": "enqueue", "queue": "payments"}}));
    let result = caller.recv_type("invocationresult");
    assert_eq!(result["invocation_id"], id.as_str());
    assert!(uuid::Uuid::parse_str(result["result"]["messageReceiptId"].as_str().unwrap()).is_ok(), "{result}");
}

#[test]
fn enqueue_goes_through_the_queue_provider_and_returns_a_receipt() {
    let engine = Engine::start();
    let mut queue = Worker::connect(&engine);
    queue.register_function("engine::queue::enqueue");
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "pay::charge",
        "data": {"amount": 100}, "action": {"type": "enqueue", "queue": "payments"}}));
    let call = queue.recv_type("invokefunction");
    let data = &call["data"];
    assert_eq!(data["queue"], "payments");
    assert_eq!(data["function_id"], "pay::charge");
    assert_eq!(data["data"], json!({"amount": 100}), "no _caller_worker_id in queued data");
    let receipt = data["messageReceiptId"].as_str().unwrap().to_string();
    queue.answer(&call, json!({"ok": true}));
    let result = caller.recv_type("invocationresult");
    assert_eq!(result["result"], json!({"messageReceiptId": receipt}));
}

#[test]
fn engine_introspection_functions() {
    let engine = Engine::start();
    let mut worker = Worker::connect(&engine);
    worker.register_worker("inspector");
    worker.send(json!({"type": "registerfunction", "id": "shop::buy", "description": "Buys",
        "request_format": {"type": "object"}, "metadata": {"public": true}}));
    worker.send(json!({"type": "registertriggertype", "id": "shop::event", "description": "Shop events"}));
    worker.send(json!({"type": "registertrigger", "id": "tr-1", "trigger_type": "shop::event", "function_id": "shop::buy", "config": {"k": "v"}}));
    worker.recv_type("registertrigger");

    let list = worker.call("engine::functions::list", json!({"prefix": "shop::"}))["result"].clone();
    assert_eq!(list["functions"], json!([{"function_id": "shop::buy", "namespace": "default",
        "worker_name": "inspector", "description": "Buys", "metadata": {"public": true}}]));
    let all = worker.call("engine::functions::list", json!({"include_internal": true}))["result"].clone();
    assert!(all["functions"].as_array().unwrap().iter().any(|f| f["function_id"] == "engine::workers::register"));
    let searched = worker.call("engine::functions::list", json!({"search": "BUY"}))["result"].clone();
    assert_eq!(searched["functions"].as_array().unwrap().len(), 1);

    let info = worker.call("engine::functions::info", json!({"function_id": "shop::buy"}))["result"].clone();
    assert_eq!(info["request_schema"], json!({"type": "object"}));
    assert_eq!(info["registered_triggers"], json!([{"id": "tr-1", "trigger_type": "shop::event", "config": {"k": "v"}}]));
    let batch = worker.call("engine::functions::info", json!({"function_ids": ["shop::buy", "no::pe"]}))["result"].clone();
    assert_eq!(batch["functions"][1], json!({"function_id": "no::pe", "error": "not_found"}));
    assert_eq!(worker.call("engine::functions::info", json!({"function_id": "x"}))["error"]["code"], "NOT_FOUND");
    assert_eq!(worker.call("engine::functions::info", json!({}))["error"]["code"], "INVALID_ARGUMENTS");

    let workers = worker.call("engine::workers::list", json!({}))["result"]["workers"].clone();
    let me = workers.as_array().unwrap().iter().find(|w| w["id"] == worker.worker_id.as_str()).expect("listed");
    assert_eq!(me["name"], "inspector");
    assert_eq!(me["function_count"], 1);
    let winfo = worker.call("engine::workers::info", json!({"name": "inspector"}))["result"].clone();
    assert_eq!(winfo["worker"]["pid"], 4242);
    assert_eq!(winfo["functions"][0]["function_id"], "shop::buy");

    let types = worker.call("engine::triggers::list", json!({"prefix": "shop::"}))["result"]["triggers"].clone();
    assert_eq!(types, json!([{"id": "shop::event", "namespace": "default", "worker_name": "inspector", "description": "Shop events"}]));
    let tinfo = worker.call("engine::triggers::info", json!({"id": "shop::event"}))["result"].clone();
    assert_eq!(tinfo["instance_count"], 1);

    let bindings = worker.call("engine::registered-triggers::list", json!({}))["result"]["registered_triggers"].clone();
    assert_eq!(bindings[0]["id"], "tr-1");
    assert_eq!(bindings[0]["worker_name"], "inspector");
    let binfo = worker.call("engine::registered-triggers::info", json!({"id": "tr-1"}))["result"].clone();
    assert_eq!(binfo["function"]["function_id"], "shop::buy");
    assert_eq!(binfo["trigger"]["id"], "shop::event");

    let bad = worker.call("engine::workers::info", json!({"nom": 1}));
    assert_eq!(bad["error"]["code"], "deserialization_error");
}

#[test]
fn register_trigger_function_creates_an_unowned_binding() {
    let engine = Engine::start();
    let mut provider = Worker::connect(&engine);
    provider.send(json!({"type": "registertriggertype", "id": "ext", "description": "x"}));
    provider.sync();
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "engine::register_trigger",
        "data": {"trigger_type": "ext", "function_id": "a::b", "config": {"n": 1}}}));
    let delivered = provider.recv_type("registertrigger");
    provider.send(json!({"type": "triggerregistrationresult", "id": delivered["id"], "trigger_type": "ext", "function_id": "a::b"}));
    let created = caller.recv_type("invocationresult");
    assert_eq!(created["result"]["id"], delivered["id"]);
    // The binding survives its creator.
    drop(caller);
    let mut other = Worker::connect(&engine);
    let removed = other.call("engine::unregister_trigger", json!({"id": delivered["id"]}));
    assert_eq!(removed["result"], json!({"removed": true}));
    assert_eq!(provider.recv_type("unregistertrigger")["id"], delivered["id"]);
    assert_eq!(other.call("engine::unregister_trigger", json!({"id": "nope"}))["result"], json!({"removed": false}));

    // A provider's refusal fails the call.
    let id = uuid();
    other.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "engine::register_trigger",
        "data": {"trigger_type": "ext", "function_id": "a::b"}}));
    let delivered = provider.recv_type("registertrigger");
    provider.send(json!({"type": "triggerregistrationresult", "id": delivered["id"], "trigger_type": "ext", "function_id": "a::b",
        "error": {"code": "bad", "message": "no"}}));
    let failed = other.recv_type("invocationresult");
    assert_eq!(failed["error"], json!({"code": "trigger_registration_failed", "message": "bad: no"}));
}

#[test]
fn workers_available_fires_on_connect_and_disconnect() {
    let engine = Engine::start();
    let mut watcher = Worker::connect(&engine);
    watcher.register_function("watch::workers");
    watcher.send(json!({"type": "registertrigger", "id": "w", "trigger_type": "engine::workers-available", "function_id": "watch::workers", "config": {}}));
    watcher.sync();
    let other = Worker::connect(&engine);
    let fired = watcher.recv_type("invokefunction");
    assert_eq!(fired["function_id"], "watch::workers");
    assert_eq!(fired["data"], json!({"event": "worker_connected", "worker_id": other.worker_id}));
    let other_id = other.worker_id.clone();
    drop(other);
    let fired = watcher.recv_type("invokefunction");
    assert_eq!(fired["data"], json!({"event": "worker_disconnected", "worker_id": other_id}));
}

#[test]
fn functions_available_fires_when_functions_change() {
    let engine = Engine::start();
    let mut watcher = Worker::connect(&engine);
    watcher.register_function("watch::fns");
    watcher.send(json!({"type": "registertrigger", "id": "f", "trigger_type": "engine::functions-available", "function_id": "watch::fns", "config": {}}));
    watcher.sync();
    let mut other = Worker::connect(&engine);
    other.register_function("new::one");
    loop {
        let fired = watcher.recv_type("invokefunction");
        assert_eq!(fired["data"]["event"], "functions_changed");
        let ids: Vec<&str> = fired["data"]["functions"].as_array().unwrap().iter().map(|f| f["function_id"].as_str().unwrap()).collect();
        if ids.contains(&"new::one") {
            break;
        }
    }
}

#[test]
fn engine_side_invocation_timeout_when_configured() {
    let engine = Engine::start_with("      invocation_timeout_ms: 200\n", "", &[]);
    let mut owner = Worker::connect(&engine);
    owner.register_function("hang::forever");
    let mut caller = Worker::connect(&engine);
    let result = caller.call("hang::forever", json!({}));
    assert_eq!(result["error"]["code"], "invocation_timeout");
    // The owner's late answer is dropped quietly.
    let call = owner.recv_type("invokefunction");
    owner.answer(&call, json!(1));
    caller.assert_quiet();
}

#[test]
fn otel_is_accepted_and_channels_and_unknown_paths_are_refused() {
    let engine = Engine::start();
    let (mut otel, _) = tungstenite::connect(format!("ws://127.0.0.1:{}/otel", engine.worker_port)).expect("otel upgrade");
    otel.send(Message::binary(b"OTLP\x01\x02".to_vec())).unwrap();
    for path in ["/ws/channels/abc?key=k&dir=read", "/nope"] {
        match tungstenite::connect(format!("ws://127.0.0.1:{}{path}", engine.worker_port)) {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 404, "{path}"),
            other => panic!("{path}: expected 404, got {:?}", other.map(|_| ())),
        }
    }
    let mut worker = Worker::connect(&engine);
    worker.assert_quiet();
}

#[test]
fn sigterm_answers_waiting_callers_closes_sockets_and_exits_zero() {
    let mut engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("slow::op");
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "slow::op", "data": {}}));
    owner.recv_type("invokefunction");
    unsafe { libc::kill(engine.child.id() as i32, SIGTERM) };
    let result = caller.recv_type("invocationresult");
    assert_eq!(result["error"]["code"], "engine_shutdown");
    assert_eq!(caller.recv_close(), Some(1001));
    assert_eq!(owner.recv_close(), Some(1001));
    let status = wait_exit(&mut engine.child, std::time::Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn five_hundred_concurrent_calls_complete_with_their_own_results() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("sq::fn");
    let mut caller = Worker::connect(&engine);
    let mut ids = std::collections::HashMap::new();
    for n in 0..500 {
        let id = uuid();
        caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "sq::fn", "data": {"n": n}}));
        ids.insert(id, n);
    }
    for _ in 0..500 {
        let call = owner.recv_type("invokefunction");
        let n = call["data"]["n"].as_i64().unwrap();
        owner.answer(&call, json!(n * n));
    }
    for _ in 0..500 {
        let result = caller.recv_type("invocationresult");
        let n = ids.remove(result["invocation_id"].as_str().unwrap()).expect("known id, once");
        assert_eq!(result["result"], n * n);
    }
    assert!(ids.is_empty());
}
