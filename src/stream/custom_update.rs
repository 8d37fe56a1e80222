//! `stream::update` on a custom stream that has a `get` and a `set` but no `update` of its own
//! — what every SDK's `createStream` registers (spec/stream.md §6.5). The reference applies
//! such updates to its own store, a second copy the custom storage never sees; ringcast reads
//! the item with the custom `get`, applies the ops, and writes the result with the custom
//! `set`, holding the item's turn (see `item_locks.rs`) from the read to the event, so
//! concurrent updates of one item are all applied, each to the result of the one before.
//! Subscribers and `stream` triggers get the event as for any other write.

use super::functions::{call_within, finish, send_to_owner};
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
use std::time::Duration;

const CODE: &str = "STREAM_UPDATE_ERROR";

/// How long a custom function called while holding an item's turn may take when the engine has
/// no `invocation_timeout_ms`: the SDKs' own default call timeout. Past it the call is given
/// up, so one unanswered call cannot hold the item's later mutations for good.
const HELD_TURN_LIMIT: Duration = Duration::from_secs(30);

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
        let read = call_holding_turn(&weak, &custom.get, json!({ "stream_name": stream, "group_id": group, "item_id": item })).await;
        let old_value = read.map_err(|e| failed(&custom.get, &e))?.filter(|v| !v.is_null());
        let (new_value, errors) = ringcast_shards::update::apply(old_value.as_ref(), &ops);
        if ringcast_shards::update::depth(&new_value) > MAX_DEPTH {
            return Err(ErrorBody::new(
                CODE,
                format!("Failed to update value: item {item:?}: the result would be nested deeper than {MAX_DEPTH} levels; the item is left as it was"),
            ));
        }
        let write = json!({ "stream_name": stream, "group_id": group, "item_id": item, "data": new_value });
        let written = match call_holding_turn(&weak, &custom.set, write).await {
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

/// Calls a custom stream function while holding an item's turn, giving it up after
/// `invocation_timeout_ms` (or [`HELD_TURN_LIMIT`]).
pub(super) async fn call_holding_turn(weak: &Weak<RefCell<Engine>>, function_id: &str, data: Value) -> Outcome {
    let Some(engine) = weak.upgrade() else { return Err(ErrorBody::new(CODE, "the engine is shutting down")) };
    let limit = engine.borrow().config().invocation_timeout_ms.map_or(HELD_TURN_LIMIT, Duration::from_millis);
    call_within(&engine, DEFAULT_NS, function_id, data, None, limit, std::future::pending()).await
}

/// A custom function's error as the update's error, naming the function and its own code.
fn failed(function_id: &str, e: &ErrorBody) -> ErrorBody {
    ErrorBody::new(CODE, format!("Failed to update value: {function_id} failed: {}: {}", e.code, e.message))
}
