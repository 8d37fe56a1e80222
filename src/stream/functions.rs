//! The `stream::*` functions on the control core (spec/stream.md §2): decode the input, honour
//! a custom `stream::<op>(<name>)` function, route the operation to the group's owner shard, and
//! fire `stream` triggers with the event it produced. Also serves the shards' requests: the auth
//! function and the `stream:join`/`stream:leave` triggers.
//!
//! The control core does not know this module: the boot code installs these functions
//! ([`install`]) and starts [`serve_shard_requests`]; each function holds the shards' inboxes.

use ringcast_shards::messages::{ControlRequest, EventKind, GroupKey, GroupOp, GroupOpReply, ShardMsg};
use super::StreamService;
use crate::control::engine::Engine;
use crate::control::functions::{decode_input, reply_now, BuiltinReply};
use crate::control::invocations::{Call, Outcome, Reply};
use crate::control::ns_map::DEFAULT_NS;
use crate::control::wire::ErrorBody;
use bytes::Bytes;
use futures_channel::oneshot;
use ringcast_shards::wsframe::payload_of;
use serde::Deserialize;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::{Rc, Weak};

/// Requests from the shards to the control core (auth, join/leave triggers).
pub type ShardRequests = futures_channel::mpsc::UnboundedReceiver<ControlRequest>;

/// A stream function: the shards' inboxes, the engine, the call's input.
type StreamFn = fn(&Rc<StreamService>, &mut Engine, Value) -> BuiltinReply;

const FUNCTIONS: &[(&str, &str, StreamFn)] = &[
    ("stream::set", "Stores an item and notifies the group's subscribers", stream_set),
    ("stream::get", "Reads an item", stream_get),
    ("stream::delete", "Removes an item and notifies the group's subscribers", stream_delete),
    ("stream::list", "Lists the item values of a group", stream_list),
    ("stream::list_groups", "Lists the groups of a stream", stream_list_groups),
    ("stream::list_all", "Lists every stream and its groups", stream_list_all),
    ("stream::send", "Sends an ephemeral event to a group's subscribers", stream_send),
    ("stream::update", "Applies update operations to an item atomically", stream_update),
];

const TRIGGER_TYPES: &[(&str, &str)] = &[
    ("stream", "Fires on every change of a stream's items and on stream::send"),
    ("stream:join", "Fires when a subscriber joins a group; may refuse it"),
    ("stream:leave", "Fires when a subscription ends"),
];

/// Registers the stream functions, each holding `service`, and the stream trigger types.
pub fn install(engine: &mut Engine, service: StreamService) {
    let service = Rc::new(service);
    for (id, description, run) in FUNCTIONS {
        let (service, run) = (service.clone(), *run);
        engine.register_builtin(id, description, Rc::new(move |engine: &mut Engine, data: Value| run(&service, engine, data)));
    }
    for (id, description) in TRIGGER_TYPES {
        engine.register_engine_trigger_type(id, description);
    }
}

#[derive(Deserialize)]
struct ItemInput {
    stream_name: String,
    group_id: String,
    item_id: String,
}

#[derive(Deserialize)]
struct SetInput {
    stream_name: String,
    group_id: String,
    item_id: String,
    data: Value,
}

#[derive(Deserialize)]
struct GroupInput {
    stream_name: String,
    group_id: String,
}

#[derive(Deserialize)]
struct StreamInput {
    stream_name: String,
}

#[derive(Deserialize)]
struct SendInput {
    stream_name: String,
    group_id: String,
    #[serde(rename = "type")]
    event_type: String,
    data: Value,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize)]
struct UpdateInput {
    stream_name: String,
    group_id: String,
    item_id: String,
    ops: Value,
}

macro_rules! decode {
    ($id:expr, $data:expr) => {
        match decode_input($id, $data) {
            Ok(v) => v,
            Err(e) => return BuiltinReply::Now(Err(e)),
        }
    };
}

/// The custom function that replaces the built-in storage of `op` for the stream named in
/// `data`, if registered. Looked up before decoding, so that without one the input is decoded
/// by move, not copied.
fn override_for(engine: &Engine, op: &str, data: &Value) -> Option<String> {
    let stream = data.get("stream_name")?.as_str()?;
    let id = format!("stream::{op}({stream})");
    engine.has_function(DEFAULT_NS, &id).then_some(id)
}

/// Calls a worker function from a builtin; the outcome arrives on the receiver.
pub(super) fn call_function(engine: &mut Engine, function_id: &str, data: Value) -> oneshot::Receiver<Outcome> {
    let (tx, rx) = oneshot::channel();
    engine.invoke(Call::internal(DEFAULT_NS, function_id, data, None), Reply::Internal(tx));
    rx
}

/// Sends `op` to the owner of `key` and answers with its result, firing `stream` triggers for
/// the event it produced.
fn route(service: &StreamService, engine: &Engine, key: GroupKey, op: GroupOp, error_code: &'static str) -> BuiltinReply {
    let rx = send_to_owner(service, key.clone(), op);
    let weak = engine.weak_self();
    BuiltinReply::Later(Box::pin(async move {
        let reply = rx.await.map_err(|_| ErrorBody::new(error_code, "the shard owning this group is not running"))?;
        finish(&weak, key, reply)
    }))
}

pub(super) fn send_to_owner(service: &StreamService, key: GroupKey, op: GroupOp) -> oneshot::Receiver<GroupOpReply> {
    let (tx, rx) = oneshot::channel();
    let owner = ringcast_shards::routing::owner_shard(&key.0, &key.1, service.shards.len());
    let _ = service.shards[owner].unbounded_send(ShardMsg::GroupOp { key, op, reply: tx });
    rx
}

/// Fires triggers for the reply's event and turns the reply into the function's outcome.
pub(super) fn finish(weak: &Weak<RefCell<Engine>>, key: GroupKey, reply: GroupOpReply) -> Outcome {
    if let (Some(frame), Some(engine)) = (reply.event, weak.upgrade()) {
        fire_stream_triggers(&engine, &key, frame);
    }
    reply.result.map_err(|(code, message)| ErrorBody::new(&code, message))
}

fn stream_set(service: &Rc<StreamService>, engine: &mut Engine, data: Value) -> BuiltinReply {
    if let Some(custom) = override_for(engine, "set", &data) {
        let i: SetInput = decode!("stream::set", data.clone());
        return custom_mutation(service, engine, &custom, data, (i.stream_name, i.group_id), i.item_id, Mutation::Write("STREAM_SET_ERROR"));
    }
    let i: SetInput = decode!("stream::set", data);
    route(service, engine, (i.stream_name, i.group_id), GroupOp::Set { item: i.item_id, data: i.data }, "STREAM_SET_ERROR")
}

fn stream_get(service: &Rc<StreamService>, engine: &mut Engine, data: Value) -> BuiltinReply {
    if let Some(custom) = override_for(engine, "get", &data) {
        let _: ItemInput = decode!("stream::get", data.clone());
        return passthrough(engine, &custom, data);
    }
    let i: ItemInput = decode!("stream::get", data);
    route(service, engine, (i.stream_name, i.group_id), GroupOp::Get { item: i.item_id }, "STREAM_GET_ERROR")
}

fn stream_delete(service: &Rc<StreamService>, engine: &mut Engine, data: Value) -> BuiltinReply {
    if let Some(custom) = override_for(engine, "delete", &data) {
        let i: ItemInput = decode!("stream::delete", data.clone());
        return custom_mutation(service, engine, &custom, data, (i.stream_name, i.group_id), i.item_id, Mutation::Delete);
    }
    let i: ItemInput = decode!("stream::delete", data);
    route(service, engine, (i.stream_name, i.group_id), GroupOp::Delete { item: i.item_id }, "STREAM_DELETE_ERROR")
}

fn stream_list(service: &Rc<StreamService>, engine: &mut Engine, data: Value) -> BuiltinReply {
    if let Some(custom) = override_for(engine, "list", &data) {
        let _: GroupInput = decode!("stream::list", data.clone());
        return passthrough(engine, &custom, data);
    }
    let i: GroupInput = decode!("stream::list", data);
    route(service, engine, (i.stream_name, i.group_id), GroupOp::List, "STREAM_GET_GROUP_ERROR")
}

fn stream_update(service: &Rc<StreamService>, engine: &mut Engine, data: Value) -> BuiltinReply {
    // The input is copied only when a custom function needs it whole.
    let custom = override_for(engine, "update", &data).map(|id| (id, data.clone()));
    let i: UpdateInput = decode!("stream::update", data);
    let ops = match ringcast_shards::update::parse_ops(&i.ops) {
        Ok(ops) => ops,
        Err(e) => {
            return reply_now(Err(ErrorBody::new("deserialization_error", format!("Failed to deserialize input for stream::update: {e}"))))
        }
    };
    if let Some((custom, data)) = custom {
        return custom_mutation(service, engine, &custom, data, (i.stream_name, i.group_id), i.item_id, Mutation::Write("STREAM_UPDATE_ERROR"));
    }
    // A custom stream without its own update (what every SDK's createStream registers): the
    // ops apply through its get and set, one update of an item at a time.
    if let Some(custom) = super::custom_update::get_and_set(engine, &i.stream_name) {
        return super::custom_update::update(service, engine, custom, (i.stream_name, i.group_id), i.item_id, ops);
    }
    route(service, engine, (i.stream_name, i.group_id), GroupOp::Update { item: i.item_id, ops }, "STREAM_UPDATE_ERROR")
}

fn stream_send(service: &Rc<StreamService>, engine: &mut Engine, data: Value) -> BuiltinReply {
    let i: SendInput = decode!("stream::send", data);
    let op = GroupOp::CustomEvent { item: i.id, event_type: i.event_type, data: i.data };
    route(service, engine, (i.stream_name, i.group_id), op, "STREAM_SEND_ERROR")
}

fn stream_list_groups(service: &Rc<StreamService>, engine: &mut Engine, data: Value) -> BuiltinReply {
    if let Some(custom) = override_for(engine, "list_groups", &data) {
        let _: StreamInput = decode!("stream::list_groups", data.clone());
        return passthrough(engine, &custom, data);
    }
    let i: StreamInput = decode!("stream::list_groups", data);
    let receivers: Vec<_> = service
        .shards
        .iter()
        .map(|shard| {
            let (tx, rx) = oneshot::channel();
            let _ = shard.unbounded_send(ShardMsg::ListGroups { stream: i.stream_name.clone(), reply: tx });
            rx
        })
        .collect();
    BuiltinReply::Later(Box::pin(async move {
        let mut groups = BTreeSet::new();
        for rx in receivers {
            let held = rx.await.map_err(|_| ErrorBody::new("STREAM_LIST_GROUPS_ERROR", "a shard is not running"))?;
            groups.extend(held.map_err(|message| ErrorBody::new("STREAM_LIST_GROUPS_ERROR", message))?);
        }
        Ok(Some(json!(groups)))
    }))
}

fn stream_list_all(service: &Rc<StreamService>, _engine: &mut Engine, data: Value) -> BuiltinReply {
    if data.is_null() {
        return reply_now(Err(ErrorBody::new("deserialization_error", "Failed to deserialize input for stream::list_all: expected an object")));
    }
    let receivers: Vec<_> = service
        .shards
        .iter()
        .map(|shard| {
            let (tx, rx) = oneshot::channel();
            let _ = shard.unbounded_send(ShardMsg::ListStreams { reply: tx });
            rx
        })
        .collect();
    BuiltinReply::Later(Box::pin(async move {
        let mut streams: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for rx in receivers {
            let held = rx.await.map_err(|_| ErrorBody::new("STREAM_LIST_ALL_ERROR", "a shard is not running"))?;
            let held = held.map_err(|message| ErrorBody::new("STREAM_LIST_ALL_ERROR", message))?;
            for (stream, groups) in held {
                streams.entry(stream).or_default().extend(groups);
            }
        }
        let rows: Vec<Value> = streams.into_iter().map(|(id, groups)| json!({ "id": id, "groups": groups })).collect();
        let count = rows.len();
        Ok(Some(json!({ "stream": rows, "count": count })))
    }))
}

/// A read served by a custom function: its result is returned as it is.
fn passthrough(engine: &mut Engine, function_id: &str, data: Value) -> BuiltinReply {
    let rx = call_function(engine, function_id, data);
    BuiltinReply::Later(Box::pin(async move {
        rx.await.unwrap_or_else(|_| Err(ErrorBody::new("invocation_error", "the custom stream function went away")))
    }))
}

/// What a custom mutation function did: wrote a value (set/update, with the error code of the
/// built-in function it replaces) or deleted one.
enum Mutation {
    Write(&'static str),
    Delete,
}

/// A mutation served by a custom function: the engine still publishes the event and fires the
/// triggers, from the `{old_value, new_value}` the function returns.
fn custom_mutation(
    service: &Rc<StreamService>,
    engine: &mut Engine,
    function_id: &str,
    data: Value,
    key: GroupKey,
    item: String,
    mutation: Mutation,
) -> BuiltinReply {
    // The item's turn is taken now, in arrival order; the call goes out when it comes.
    let turn = super::item_locks::lock(service, (key.0.clone(), key.1.clone(), item.clone()));
    let function_id = function_id.to_string();
    let service = service.clone();
    let weak = engine.weak_self();
    let error_code = match mutation {
        Mutation::Write(code) => code,
        Mutation::Delete => "STREAM_DELETE_ERROR",
    };
    BuiltinReply::Later(Box::pin(async move {
        let held = turn.await;
        let result = match super::custom_update::call_holding_turn(&weak, &function_id, data).await {
            Ok(Some(result)) if result.is_object() => result,
            Err(e) => return Err(e),
            _ => return Err(ErrorBody::new(error_code, "the custom stream function returned no result")),
        };
        let old = result.get("old_value").filter(|v| !v.is_null()).cloned();
        let (kind, event_data) = if matches!(mutation, Mutation::Delete) {
            match old {
                Some(old) => (EventKind::Delete, old),
                None => return Ok(Some(result)),
            }
        } else {
            let Some(new) = result.get("new_value").cloned() else {
                return Err(ErrorBody::new("JSON_ERROR", "the custom stream function's result has no new_value"));
            };
            (if old.is_some() { EventKind::Update } else { EventKind::Create }, new)
        };
        let emitted = send_to_owner(&service, key.clone(), GroupOp::Emit { item: Some(item), kind, data: event_data });
        // The event is queued to the owner: the next mutation of the item may go (its event
        // queues after this one).
        drop(held);
        if let Ok(reply) = emitted.await {
            let _ = finish(&weak, key, reply);
        }
        Ok(Some(result))
    }))
}

/// Calls a function from a task and waits for its outcome.
async fn call_and_wait(engine: &Rc<RefCell<Engine>>, ns: &str, function_id: &str, data: Value, metadata: Option<Value>) -> Outcome {
    let (tx, rx) = oneshot::channel();
    engine.borrow_mut().invoke(Call::internal(ns, function_id, data, metadata), Reply::Internal(tx));
    rx.await.unwrap_or_else(|_| Err(ErrorBody::new("invocation_error", "the call was dropped")))
}

fn config_matches(config: &Value, field: &str, actual: &str) -> bool {
    match config.get(field).and_then(Value::as_str) {
        None | Some("") => true,
        Some(wanted) => wanted == actual,
    }
}

/// Fires the `stream` triggers matching an event: one task per event calls the handlers in
/// registration order, each after its condition function (skipped only on exactly `false`).
fn fire_stream_triggers(engine: &Rc<RefCell<Engine>>, key: &GroupKey, frame: Bytes) {
    let bindings = engine.borrow().live_bindings("stream");
    if bindings.is_empty() {
        return;
    }
    let payload_text = payload_of(&frame);
    let Ok(payload) = serde_json::from_slice::<Value>(&payload_text) else { return };
    let event_item = payload.get("id").and_then(Value::as_str).unwrap_or("").to_string();
    let matching: Vec<_> = bindings
        .into_iter()
        .filter(|b| {
            let config = &b.config;
            config.get("stream_name").and_then(Value::as_str) == Some(key.0.as_str())
                && config_matches(config, "group_id", &key.1)
                && config_matches(config, "item_id", &event_item)
        })
        .collect();
    if matching.is_empty() {
        return;
    }
    let engine = engine.clone();
    ringcast_shards::runtime::spawn_deferred(async move {
        for b in matching {
            if let Some(condition) = b.config.get("condition_function_id").and_then(Value::as_str) {
                match call_and_wait(&engine, &b.namespace, condition, payload.clone(), b.metadata.clone()).await {
                    Ok(Some(Value::Bool(false))) => continue,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(condition, code = %e.code, "stream trigger condition failed; handler skipped");
                        continue;
                    }
                }
            }
            if let Err(e) = call_and_wait(&engine, &b.namespace, &b.function_id, payload.clone(), b.metadata).await {
                tracing::warn!(function_id = %b.function_id, code = %e.code, message = %e.message, "stream trigger handler failed");
            }
        }
    });
}

/// Serves the shards' requests to the control core until the channel closes.
pub async fn serve_shard_requests(engine: Rc<RefCell<Engine>>, mut requests: ShardRequests) {
    use futures_util::StreamExt;
    while let Some(request) = requests.next().await {
        let engine = engine.clone();
        glommio::spawn_local(async move {
            match request {
                ControlRequest::Auth { function_id, input, limit, mut reply } => {
                    // The shard stops waiting after its `auth_timeout_ms`: give the call up then
                    // too, so an unanswered auth call does not stay pending for good.
                    let gone = reply.cancellation();
                    let outcome = call_within(&engine, DEFAULT_NS, &function_id, input, None, limit, gone).await;
                    let _ = reply.send(match outcome {
                        Ok(result) => Ok(result.unwrap_or(Value::Null)),
                        Err(e) => Err(format!("{}: {}", e.code, e.message)),
                    });
                }
                ControlRequest::Join { payload, limit, reply } => {
                    let mut authorized = true;
                    let bindings = engine.borrow().live_bindings("stream:join");
                    for b in bindings {
                        let outcome = call_within(&engine, &b.namespace, &b.function_id, payload.clone(), b.metadata, limit, std::future::pending()).await;
                        if let Ok(Some(result)) = outcome {
                            if result.get("unauthorized") == Some(&Value::Bool(true)) {
                                authorized = false;
                            }
                        }
                    }
                    let _ = reply.send(authorized);
                }
                ControlRequest::Leave { payload, limit, reply } => {
                    let bindings = engine.borrow().live_bindings("stream:leave");
                    for b in bindings {
                        let _ = call_within(&engine, &b.namespace, &b.function_id, payload.clone(), b.metadata, limit, std::future::pending()).await;
                    }
                    let _ = reply.send(());
                }
            }
        })
        .detach();
    }
}

/// Like `call_and_wait`, but gives the call up after `limit` or when `abandon` resolves: its
/// pending invocation is removed (a late result is then dropped as unknown).
pub(super) async fn call_within(
    engine: &Rc<RefCell<Engine>>,
    ns: &str,
    function_id: &str,
    data: Value,
    metadata: Option<Value>,
    limit: std::time::Duration,
    abandon: impl std::future::Future<Output = ()>,
) -> Outcome {
    let id = uuid::Uuid::new_v4();
    let mut call = Call::internal(ns, function_id, data, metadata);
    call.forward_id = Some(id);
    let (tx, rx) = oneshot::channel();
    engine.borrow_mut().invoke(call, Reply::Internal(tx));
    let answered = async { Some(rx.await) };
    let given_up = async {
        futures_lite::future::or(glommio::timer::sleep(limit), abandon).await;
        None
    };
    match futures_lite::future::or(answered, given_up).await {
        Some(outcome) => outcome.unwrap_or_else(|_| Err(ErrorBody::new("invocation_error", "the call was dropped"))),
        None => {
            engine.borrow_mut().abandon_invocation(id);
            Err(ErrorBody::new("invocation_timeout", format!("{function_id} gave no result within {} ms", limit.as_millis())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::test_support::{engine, on_executor, settle, FakeWorker};
    use futures_util::StreamExt;

    const CALL_ID: &str = "3c9e5a77-1d2b-4f8e-a6c4-5b0d9e2f7a18";

    /// An engine with the stream functions installed over one fake shard, whose inbox the test
    /// reads.
    fn stream_engine() -> (Rc<RefCell<Engine>>, futures_channel::mpsc::UnboundedReceiver<ShardMsg>) {
        let engine = engine();
        let (shard, inbox) = futures_channel::mpsc::unbounded();
        install(&mut engine.borrow_mut(), StreamService::new(vec![shard]));
        (engine, inbox)
    }

    /// Runs `stream::set` on `stream` from `caller`, and answers it from the fake shard with
    /// a `create` event.
    async fn set_item(engine: &Rc<RefCell<Engine>>, inbox: &mut futures_channel::mpsc::UnboundedReceiver<ShardMsg>, caller: &FakeWorker, stream: &str) {
        caller.send(engine, json!({
            "type": "invokefunction", "invocation_id": CALL_ID, "function_id": "stream::set",
            "data": { "stream_name": stream, "group_id": "g", "item_id": "i1", "data": { "n": 1 } },
        }));
        let Some(ShardMsg::GroupOp { key, reply, .. }) = inbox.next().await else { panic!("the set goes to the owner shard") };
        assert_eq!(key, (stream.to_string(), "g".to_string()));
        let event = format!(r#"{{"streamName":"{stream}","groupId":"g","id":"i1","event":{{"type":"create","data":{{"n":1}}}}}}"#);
        let _ = reply.send(GroupOpReply { result: Ok(Some(json!({ "n": 1 }))), event: Some(ringcast_shards::wsframe::text_frame(event.as_bytes())) });
        settle().await;
    }

    #[test]
    fn a_stream_trigger_fires_only_for_its_stream() {
        on_executor(|| async {
            let (engine, mut inbox) = stream_engine();
            let mut handler = FakeWorker::connect(&engine);
            handler.register_function(&engine, "on::orders");
            handler.send(&engine, json!({ "type": "registertrigger", "id": "t", "trigger_type": "stream", "function_id": "on::orders", "config": { "stream_name": "orders" } }));
            let mut caller = FakeWorker::connect(&engine);

            set_item(&engine, &mut inbox, &caller, "invoices").await;
            assert_eq!(caller.next("invocationresult")["result"], json!({ "n": 1 }));
            assert!(handler.drain().is_empty(), "another stream's event does not fire it");

            set_item(&engine, &mut inbox, &caller, "orders").await;
            assert_eq!(caller.next("invocationresult")["result"], json!({ "n": 1 }));
            let fired = handler.next("invokefunction");
            assert_eq!(fired["function_id"], "on::orders");
            assert_eq!(fired["data"]["streamName"], "orders");
            assert_eq!(fired["data"]["event"]["type"], "create");
            handler.answer(&engine, &fired, Value::Null);
            settle().await;
        });
    }

    #[test]
    fn a_stream_join_trigger_can_refuse_a_join() {
        on_executor(|| async {
            let (engine, _inbox) = stream_engine();
            let (requests_tx, requests) = futures_channel::mpsc::unbounded();
            glommio::spawn_local(serve_shard_requests(engine.clone(), requests)).detach();
            let mut gate = FakeWorker::connect(&engine);
            gate.register_function(&engine, "auth::join");
            gate.send(&engine, json!({ "type": "registertrigger", "id": "j", "trigger_type": "stream:join", "function_id": "auth::join" }));

            for (answer, authorized) in [(json!({ "unauthorized": true }), false), (json!({ "unauthorized": false }), true)] {
                let (reply, verdict) = oneshot::channel();
                let payload = json!({ "stream_name": "orders", "group_id": "g" });
                let _ = requests_tx.unbounded_send(ControlRequest::Join { payload: payload.clone(), limit: std::time::Duration::from_secs(5), reply });
                settle().await;
                let call = gate.next("invokefunction");
                assert_eq!((&call["function_id"], &call["data"]), (&json!("auth::join"), &payload));
                gate.answer(&engine, &call, answer);
                assert_eq!(verdict.await, Ok(authorized));
            }
        });
    }

    #[test]
    fn the_stream_ids_are_reserved_once_installed() {
        on_executor(|| async {
            let (engine, _inbox) = stream_engine();
            let mut worker = FakeWorker::connect(&engine);
            worker.register_function(&engine, "stream::set");
            assert_eq!(worker.next("registrationrejected")["function_id"], "stream::set");
            // A custom stream function is not a builtin id: it stays open to workers.
            worker.register_function(&engine, "stream::set(orders)");
            assert!(worker.drain().is_empty());
            settle().await;
        });
    }
}
