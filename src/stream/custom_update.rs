//! `stream::update` on a custom stream that has a `get` and a `set` but no `update` of its own
//! — what every SDK's `createStream` registers (spec/stream.md §6.5). The reference applies
//! such updates to its own store, a second copy the custom storage never sees; ringcast reads
//! the item with the custom `get`, applies the ops, and writes the result with the custom
//! `set`, holding the item's turn (see `item_locks.rs`) from the read to the event, so
//! concurrent updates of one item are all applied, each to the result of the one before.
//! Subscribers and `stream` triggers get the event as for any other write.

use super::functions::{call_function, finish, send_to_owner};
use super::StreamService;
use crate::control::engine::Engine;
use crate::control::functions::BuiltinReply;
use crate::control::invocations::Outcome;
use crate::control::ns_map::DEFAULT_NS;
use crate::control::wire::ErrorBody;
use ringcast_shards::messages::{EventKind, GroupKey, GroupOp};
use ringcast_shards::update::UpdateOp;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::rc::{Rc, Weak};

const CODE: &str = "STREAM_UPDATE_ERROR";

/// Deepest document a write may leave (as the built-in store refuses deeper ones).
const MAX_DEPTH: usize = 127;

/// The custom `get` and `set` of a stream.
pub struct GetAndSet {
    get: String,
    set: String,
}

/// The stream's custom `get` and `set`, when it has both.
pub fn get_and_set(engine: &Engine, stream: &str) -> Option<GetAndSet> {
    let get = format!("stream::get({stream})");
    let set = format!("stream::set({stream})");
    (engine.has_function(DEFAULT_NS, &get) && engine.has_function(DEFAULT_NS, &set)).then_some(GetAndSet { get, set })
}

/// Applies `ops` to the item through the custom functions, then publishes the event.
pub fn update(service: &Rc<StreamService>, engine: &Engine, custom: GetAndSet, key: GroupKey, item: String, ops: Vec<UpdateOp>) -> BuiltinReply {
    let turn = super::item_locks::lock(service, (key.0.clone(), key.1.clone(), item.clone()));
    let service = service.clone();
    let weak = engine.weak_self();
    BuiltinReply::Later(Box::pin(async move {
        let held = turn.await;
        let (stream, group) = (&key.0, &key.1);
        let read = call(&weak, &custom.get, json!({ "stream_name": stream, "group_id": group, "item_id": item })).await;
        let old_value = read.map_err(|e| failed(&custom.get, &e))?.filter(|v| !v.is_null());
        let (new_value, errors) = ringcast_shards::update::apply(old_value.as_ref(), &ops);
        if ringcast_shards::update::depth(&new_value) > MAX_DEPTH {
            return Err(ErrorBody::new(
                CODE,
                format!("Failed to update value: item {item:?}: the result would be nested deeper than {MAX_DEPTH} levels; the item is left as it was"),
            ));
        }
        let write = json!({ "stream_name": stream, "group_id": group, "item_id": item, "data": new_value });
        let written = match call(&weak, &custom.set, write).await {
            Ok(Some(result)) if result.is_object() => result,
            Ok(_) => return Err(ErrorBody::new(CODE, format!("Failed to update value: {} returned no result", custom.set))),
            Err(e) => return Err(failed(&custom.set, &e)),
        };
        // What the set says it stored is what subscribers see (as for a custom `stream::set`).
        let stored = written.get("new_value").cloned().unwrap_or_else(|| new_value.clone());
        let kind = if old_value.is_some() { EventKind::Update } else { EventKind::Create };
        let emitted = send_to_owner(&service, key.clone(), GroupOp::Emit { item: Some(item), kind, data: stored.clone() });
        // The event is queued to the owner: the item's next mutation may start.
        drop(held);
        if let Ok(reply) = emitted.await {
            let _ = finish(&weak, key, reply);
        }
        let mut result = json!({ "old_value": old_value, "new_value": stored });
        if !errors.is_empty() {
            result["errors"] = serde_json::to_value(&errors).unwrap_or(Value::Null);
        }
        Ok(Some(result))
    }))
}

/// Calls a custom function from the update's task.
async fn call(weak: &Weak<RefCell<Engine>>, function_id: &str, data: Value) -> Outcome {
    let rx = {
        let Some(engine) = weak.upgrade() else { return Err(ErrorBody::new(CODE, "the engine is shutting down")) };
        let mut engine = engine.borrow_mut();
        call_function(&mut engine, function_id, data)
    };
    rx.await.unwrap_or_else(|_| Err(ErrorBody::new("invocation_error", format!("{function_id} went away"))))
}

/// A custom function's error as the update's error, naming the function and its own code.
fn failed(function_id: &str, e: &ErrorBody) -> ErrorBody {
    ErrorBody::new(CODE, format!("Failed to update value: {function_id} failed: {}: {}", e.code, e.message))
}
