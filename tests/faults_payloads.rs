//! Payloads a `Value` cannot hold as they are (integers past 64 bits, `1e999`, `-0`, excess
//! precision, deep nesting, lone surrogates): forwarded byte for byte between workers, refused
//! with a reason by the functions that read them, and never stored in a form that reads back as
//! something else.

mod common;

use common::{uuid, Engine, Worker};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tungstenite::Message;

/// The frame text of the next frame of type `kind` (others are skipped).
fn recv_text(worker: &mut Worker, kind: &str) -> String {
    for _ in 0..100 {
        match worker.ws.read() {
            Ok(Message::Text(text)) => {
                let head: Head = serde_json::from_str(&text).expect("engine sent JSON");
                if head.kind == kind {
                    return text.to_string();
                }
            }
            Ok(Message::Close(frame)) => panic!("socket closed: {frame:?}"),
            Ok(_) => continue,
            Err(e) => panic!("no {kind} frame within {:?}: {e}", common::FRAME_WAIT),
        }
    }
    panic!("no {kind} frame among 100 frames");
}

/// Only the `type` of a frame; the rest is skipped unparsed (any depth, any number).
#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
}

/// The raw text of the fields a test compares.
#[derive(Deserialize)]
struct Frame {
    invocation_id: String,
    function_id: String,
    data: Option<Box<RawValue>>,
    result: Option<Box<RawValue>>,
}

fn frame(text: &str) -> Frame {
    serde_json::from_str(text).expect("frame fields")
}

fn send_text(worker: &mut Worker, text: String) {
    worker.send_raw(Message::text(text));
}

fn awkward_payloads() -> Vec<(&'static str, String)> {
    vec![
        ("10**30", "1000000000000000000000000000000".to_string()),
        ("1e999", "1e999".to_string()),
        ("-0", "-0".to_string()),
        ("1.0000000000000000001", "1.0000000000000000001".to_string()),
        ("1000 levels", format!("{}7{}", "[".repeat(1000), "]".repeat(1000))),
        ("lone surrogate", r#""\ud800""#.to_string()),
        ("mixed", r#"[ -0, 1E+999 ,{"n":-100000000000000000000000000000,"s":"\udfff\u0000"}]"#.to_string()),
    ]
}

#[test]
fn awkward_payloads_travel_byte_identical_between_workers() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("raw::echo");
    let mut caller = Worker::connect(&engine);
    for (name, payload) in awkward_payloads() {
        let id = uuid();
        send_text(
            &mut caller,
            format!(r#"{{"type":"invokefunction","invocation_id":"{id}","function_id":"raw::echo","data":{payload}}}"#),
        );
        let call_text = recv_text(&mut owner, "invokefunction");
        let call = frame(&call_text);
        assert_eq!(call.data.as_deref().map(RawValue::get), Some(payload.as_str()), "{name}: data at the owner");
        send_text(
            &mut owner,
            format!(
                r#"{{"type":"invocationresult","invocation_id":"{}","function_id":"raw::echo","result":{payload}}}"#,
                call.invocation_id
            ),
        );
        let result = frame(&recv_text(&mut caller, "invocationresult"));
        assert_eq!(result.invocation_id, id, "{name}");
        assert_eq!(result.function_id, "raw::echo", "{name}");
        assert_eq!(result.result.as_deref().map(RawValue::get), Some(payload.as_str()), "{name}: result at the caller");
    }
}

#[test]
fn object_payload_gets_the_caller_id_and_keeps_its_text() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("raw::obj");
    let mut caller = Worker::connect(&engine);
    let payload = r#"{"big":1000000000000000000000000000000,"inf":1e999,"s":"\ud800"}"#;
    send_text(&mut caller, format!(r#"{{"type":"invokefunction","invocation_id":"{}","function_id":"raw::obj","data":{payload}}}"#, uuid()));
    let call = frame(&recv_text(&mut owner, "invokefunction"));
    let expected = format!(r#"{{"big":1000000000000000000000000000000,"inf":1e999,"s":"\ud800","_caller_worker_id":"{}"}}"#, caller.worker_id);
    assert_eq!(call.data.as_deref().map(RawValue::get), Some(expected.as_str()));
}

#[test]
fn invocation_result_with_a_big_integer_reaches_the_caller() {
    let engine = Engine::start();
    let mut owner = Worker::connect(&engine);
    owner.register_function("py::big");
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    caller.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "py::big", "data": {}}));
    let call = owner.recv_type("invokefunction");
    // What a Python handler returning 10**30 sends.
    send_text(
        &mut owner,
        format!(r#"{{"type":"invocationresult","invocation_id":"{}","function_id":"py::big","result":{{"n":{}}}}}"#, call["invocation_id"].as_str().unwrap(), "1".to_string() + &"0".repeat(30)),
    );
    let result = frame(&recv_text(&mut caller, "invocationresult"));
    assert_eq!(result.invocation_id, id);
    assert_eq!(result.result.unwrap().get(), format!(r#"{{"n":1{}}}"#, "0".repeat(30)));
}

#[test]
fn invokefunction_with_1e999_in_a_field_the_engine_reads_is_answered() {
    let engine = Engine::start();
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    // `namespace` must be a string: the frame cannot be decoded, but its id can be read.
    send_text(&mut caller, format!(r#"{{"type":"invokefunction","invocation_id":"{id}","function_id":"a::b","namespace":1e999,"data":[1e999]}}"#));
    let answer = caller.recv_type("invocationresult");
    assert_eq!(answer["invocation_id"], id);
    assert_eq!(answer["error"]["code"], "invalid_message", "{answer}");
}

#[test]
fn stream_get_with_undecodable_input_gets_an_error_naming_the_problem() {
    let engine = Engine::start();
    let mut caller = Worker::connect(&engine);
    for (input, reason) in [
        (r#"{"stream_name":"s","group_id":"g","item_id":"i","x":1e999}"#, "out of range"),
        (r#"{"stream_name":"s","group_id":"g","item_id":"i","x":100000000000000000000000000000}"#, "does not fit in 64 bits"),
        (r#"{"stream_name":"s","group_id":"g","item_id":"\ud800"}"#, "escape"),
    ] {
        let id = uuid();
        send_text(&mut caller, format!(r#"{{"type":"invokefunction","invocation_id":"{id}","function_id":"stream::get","data":{input}}}"#));
        let answer = caller.recv_type("invocationresult");
        assert_eq!(answer["invocation_id"], id);
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("stream::get") && message.contains(reason), "{input}: {answer}");
    }
}

#[test]
fn stream_set_of_a_big_integer_is_refused_naming_it() {
    let engine = Engine::start();
    let mut caller = Worker::connect(&engine);
    let id = uuid();
    let big = format!("1{}", "0".repeat(30));
    send_text(
        &mut caller,
        format!(r#"{{"type":"invokefunction","invocation_id":"{id}","function_id":"stream::set","data":{{"stream_name":"s","group_id":"g","item_id":"i","data":{{"n":{big}}}}}}}"#),
    );
    let answer = caller.recv_type("invocationresult");
    assert_eq!(answer["invocation_id"], id);
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&big) && message.contains("64 bits"), "{answer}");
    // Nothing was stored in a rounded form.
    assert_eq!(caller.ok("stream::get", json!({"stream_name": "s", "group_id": "g", "item_id": "i"})), Value::Null);
}

/// `[[…[v]…]]`: `levels` arrays around `v`.
fn nested(levels: usize, v: Value) -> Value {
    (0..levels).fold(v, |inner, _| Value::Array(vec![inner]))
}

#[test]
fn stream_set_of_a_too_deep_value_is_refused() {
    let engine = Engine::start();
    let mut caller = Worker::connect(&engine);
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let id = uuid();
    send_text(
        &mut caller,
        format!(r#"{{"type":"invokefunction","invocation_id":"{id}","function_id":"stream::set","data":{{"stream_name":"s","group_id":"g","item_id":"i","data":{deep}}}}}"#),
    );
    let answer = caller.recv_type("invocationresult");
    assert_eq!(answer["invocation_id"], id);
    assert!(answer["error"]["message"].as_str().unwrap_or_default().contains("nested deeper"), "{answer}");
}

#[test]
fn stream_update_append_past_the_depth_limit_is_refused_and_the_value_kept() {
    let engine = Engine::start();
    let mut caller = Worker::connect(&engine);
    let key = json!({"stream_name": "s", "group_id": "g", "item_id": "i"});
    let stored = json!({"log": [nested(90, json!(1))]});
    caller.set("s", "g", "i", stored.clone());
    // 32 path segments around a 100-level value: the document would be far past the limit.
    let path: Vec<String> = (0..32).map(|i| format!("p{i}")).collect();
    let ops = json!([{"type": "append", "path": path, "value": nested(100, json!("x"))}]);
    let answer = caller.call("stream::update", json!({"stream_name": "s", "group_id": "g", "item_id": "i", "ops": ops}));
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("levels deep"), "{answer}");
    assert_eq!(caller.ok("stream::get", key.clone()), stored, "the stored value reads back as itself");
    assert_eq!(caller.ok("stream::list", json!({"stream_name": "s", "group_id": "g"})), json!([stored]));
}
