//! What each group operation (`set`, `get`, `delete`, `list`, `update`, `send`, emitted events)
//! does to a group's store, as a pure function: the result for the caller, the event text for
//! subscribers, and whether it wrote. Making it durable and publishing it is the caller's job
//! (`commit`, `owner`).

use crate::event_json;
use crate::messages::{EventKind, GroupKey, GroupOp};
use crate::update;
use ringcast_storage::{Json, KvStore};
use serde_json::{json, Value};

/// The result of an operation as the function's caller gets it: a value (`None` = no result)
/// or an error `(code, message)`.
pub type OpResult = Result<Option<Value>, (String, String)>;

/// The outcome of a group operation, before it is made durable and published.
#[derive(Debug)]
pub struct Applied {
    pub result: OpResult,
    /// `(item, event JSON text)` of the event it produced.
    pub event: Option<(Option<String>, String)>,
    /// Whether it wrote to the store (and so needs a commit).
    pub wrote: bool,
    /// Bytes of stored values it added and removed (for the `store_bytes` counter).
    pub stored_bytes: (usize, usize),
}

fn storage_error(code: &str, message: impl Into<String>) -> OpResult {
    Err((code.to_string(), message.into()))
}

/// Reads a stored value. Never turns into `null`: text that does not parse (a value written
/// deeper than the reader accepts, by a version without the write-time check) is an error that
/// names the problem; the text itself stays stored and is still what subscribers' frames carry.
pub(crate) fn parse_stored(json: &Json) -> Result<Value, String> {
    serde_json::from_str(json).map_err(|e| format!("the stored value cannot be read back: {e}"))
}

/// `(code, message)` for a stored value `parse_stored` could not read.
pub(crate) fn unreadable(code: &str, item: &str, why: String) -> (String, String) {
    (code.to_string(), format!("item {item:?}: {why}"))
}

/// Checks a document about to be stored against the limits that let it read back as itself:
/// `max_value` bytes of text and `MAX_DOCUMENT_DEPTH` levels of nesting.
pub(crate) fn check_storable(value: &Value, text: &str, max_value: usize, what: &str) -> Result<(), String> {
    let depth = update::depth(value);
    if depth > update::MAX_DOCUMENT_DEPTH {
        return Err(format!(
            "{what} is nested {depth} levels deep, over the limit of {} levels a stored value may have",
            update::MAX_DOCUMENT_DEPTH
        ));
    }
    if text.len() > max_value {
        return Err(format!("{what} is {} bytes, over the limit of {max_value} bytes (max_value_bytes)", text.len()));
    }
    Ok(())
}

/// The JSON text of a value. Serialising a `Value` cannot fail (its keys are strings); the
/// error path keeps that an error rather than a panic.
pub(crate) fn value_text(value: &Value) -> Result<Json, String> {
    serde_json::to_string(value).map(Json::from).map_err(|e| format!("the value cannot be encoded: {e}"))
}

/// `{"old_value": …}` plus `extra`; an unreadable old value is reported in `old_value_error`
/// instead of being shown as `null` (the write it belongs to has happened).
pub(crate) fn with_old_value(old: Option<&Json>, extra: Option<(&str, Value)>) -> Value {
    let mut result = serde_json::Map::new();
    match old.map(parse_stored).transpose() {
        Ok(old) => {
            result.insert("old_value".to_string(), old.unwrap_or(Value::Null));
        }
        Err(why) => {
            result.insert("old_value_error".to_string(), Value::String(why));
        }
    }
    if let Some((key, value)) = extra {
        result.insert(key.to_string(), value);
    }
    Value::Object(result)
}

/// Runs `op` on group `key` of `store`. `max_value` is the largest value text a write may store.
pub fn apply(store: &mut dyn KvStore, key: &GroupKey, op: GroupOp, max_value: usize) -> Applied {
    let (stream, group) = (key.0.as_str(), key.1.as_str());
    let mut event: Option<(Option<String>, String)> = None;
    let mut stored_bytes = (0, 0);
    let ephemeral = matches!(op, GroupOp::CustomEvent { .. } | GroupOp::Emit { .. });
    let result = match op {
        GroupOp::Set { item, data } => {
            let checked = value_text(&data).and_then(|text| check_storable(&data, &text, max_value, "the value").map(|()| text));
            match checked {
                Err(why) => storage_error("STREAM_SET_ERROR", format!("Failed to set value: {why}")),
                Ok(text) => match store.set(stream, group, &item, text.clone()) {
                    Ok(old) => {
                        stored_bytes = (text.len(), old.as_ref().map_or(0, |o| o.len()));
                        let kind = if old.is_some() { EventKind::Update } else { EventKind::Create };
                        event = Some((Some(item.clone()), event_json::data_event(stream, group, Some(&item), kind.as_str(), &text)));
                        Ok(Some(with_old_value(old.as_ref(), Some(("new_value", data)))))
                    }
                    Err(e) => storage_error("STREAM_SET_ERROR", format!("Failed to set value: {e}")),
                },
            }
        }
        GroupOp::Get { item } => match store.health() {
            Err(e) => storage_error("STREAM_STORE_ERROR", e.to_string()),
            Ok(()) => match store.get(stream, group, &item).as_ref().map(parse_stored).transpose() {
                Ok(value) => Ok(value),
                Err(why) => Err(unreadable("STREAM_GET_ERROR", &item, why)),
            },
        },
        GroupOp::Delete { item } => match store.delete(stream, group, &item) {
            Ok(old) => {
                if let Some(old) = &old {
                    stored_bytes = (0, old.len());
                    event = Some((Some(item.clone()), event_json::data_event(stream, group, Some(&item), "delete", old)));
                }
                Ok(Some(with_old_value(old.as_ref(), None)))
            }
            Err(e) => storage_error("STREAM_DELETE_ERROR", format!("Failed to delete value: {e}")),
        },
        GroupOp::List => match store.health() {
            Err(e) => storage_error("STREAM_STORE_ERROR", e.to_string()),
            Ok(()) => {
                let values: Result<Vec<Value>, String> = store.list(stream, group).iter().map(parse_stored).collect();
                match values {
                    Ok(values) => Ok(Some(Value::Array(values))),
                    Err(why) => storage_error("STREAM_GET_GROUP_ERROR", format!("a value of group {group:?}: {why}")),
                }
            }
        },
        GroupOp::Update { item, ops } => {
            let old = store.get(stream, group, &item);
            // The ops apply to the stored document: one that cannot be read is left as it is
            // (applying to `null` would erase it).
            let applied = old.as_ref().map(parse_stored).transpose().and_then(|old_value| {
                let (new_value, errors) = update::apply(old_value.as_ref(), &ops);
                let text = value_text(&new_value)?;
                check_storable(&new_value, &text, max_value, "the result")?;
                Ok((old_value, new_value, errors, text))
            });
            match applied {
                Err(why) => storage_error("STREAM_UPDATE_ERROR", format!("Failed to update value: item {item:?}: {why}")),
                Ok((old_value, new_value, errors, text)) => match store.set(stream, group, &item, text.clone()) {
                    Ok(_) => {
                        stored_bytes = (text.len(), old.as_ref().map_or(0, |o| o.len()));
                        let kind = if old.is_some() { EventKind::Update } else { EventKind::Create };
                        event = Some((Some(item.clone()), event_json::data_event(stream, group, Some(&item), kind.as_str(), &text)));
                        let mut result = json!({ "old_value": old_value, "new_value": new_value });
                        if !errors.is_empty() {
                            result["errors"] = serde_json::to_value(&errors).unwrap_or(Value::Null);
                        }
                        Ok(Some(result))
                    }
                    Err(e) => storage_error("STREAM_UPDATE_ERROR", format!("Failed to update value: {e}")),
                },
            }
        }
        GroupOp::CustomEvent { item, event_type, data } => match value_text(&data) {
            Ok(data) => {
                event = Some((item.clone(), event_json::custom_event(stream, group, item.as_deref(), &event_type, &data)));
                Ok(Some(Value::Null))
            }
            Err(why) => storage_error("STREAM_SEND_ERROR", why),
        },
        GroupOp::Emit { item, kind, data } => match value_text(&data) {
            Ok(data) => {
                event = Some((item.clone(), event_json::data_event(stream, group, item.as_deref(), kind.as_str(), &data)));
                Ok(None)
            }
            Err(why) => storage_error("STREAM_EMIT_ERROR", why),
        },
    };
    let wrote = result.is_ok() && event.is_some() && !ephemeral;
    Applied { result, event, wrote, stored_bytes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringcast_storage::memory::MemoryStore;

    fn key() -> GroupKey {
        ("chat".into(), "room".into())
    }

    fn event_of(applied: &Applied) -> Value {
        let (_, text) = applied.event.as_ref().expect("an event");
        serde_json::from_str::<Value>(text).unwrap()["event"].clone()
    }

    #[test]
    fn set_creates_then_updates_and_reports_the_old_value() {
        let mut store = MemoryStore::new();
        let first = apply(&mut store, &key(), GroupOp::Set { item: "a".into(), data: json!({"n": 1}) }, 1 << 20);
        assert!(first.wrote);
        assert_eq!(first.result, Ok(Some(json!({"old_value": null, "new_value": {"n": 1}}))));
        assert_eq!(event_of(&first), json!({"type": "create", "data": {"n": 1}}));
        assert_eq!(first.stored_bytes, (7, 0));
        let second = apply(&mut store, &key(), GroupOp::Set { item: "a".into(), data: json!(2) }, 1 << 20);
        assert_eq!(event_of(&second), json!({"type": "update", "data": 2}));
        assert_eq!(second.result, Ok(Some(json!({"old_value": {"n": 1}, "new_value": 2}))));
        assert_eq!(second.stored_bytes, (1, 7));
    }

    #[test]
    fn reads_write_nothing_and_publish_nothing() {
        let mut store = MemoryStore::new();
        apply(&mut store, &key(), GroupOp::Set { item: "a".into(), data: json!(1) }, 1 << 20);
        let get = apply(&mut store, &key(), GroupOp::Get { item: "a".into() }, 1 << 20);
        assert_eq!((get.result, get.event.is_none(), get.wrote), (Ok(Some(json!(1))), true, false));
        let list = apply(&mut store, &key(), GroupOp::List, 1 << 20);
        assert_eq!((list.result, list.wrote), (Ok(Some(json!([1]))), false));
    }

    #[test]
    fn delete_of_a_missing_item_has_no_event() {
        let mut store = MemoryStore::new();
        let missing = apply(&mut store, &key(), GroupOp::Delete { item: "x".into() }, 1 << 20);
        assert_eq!((missing.result, missing.event.is_none(), missing.wrote), (Ok(Some(json!({"old_value": null}))), true, false));
        apply(&mut store, &key(), GroupOp::Set { item: "x".into(), data: json!("v") }, 1 << 20);
        let deleted = apply(&mut store, &key(), GroupOp::Delete { item: "x".into() }, 1 << 20);
        assert!(deleted.wrote);
        assert_eq!(event_of(&deleted), json!({"type": "delete", "data": "v"}));
    }

    #[test]
    fn events_without_storage_are_not_writes() {
        let mut store = MemoryStore::new();
        let sent = apply(&mut store, &key(), GroupOp::CustomEvent { item: None, event_type: "typing".into(), data: json!({}) }, 1 << 20);
        assert_eq!(event_of(&sent), json!({"type": "event", "event": {"type": "typing", "data": {}}}));
        assert_eq!((sent.result, sent.wrote), (Ok(Some(Value::Null)), false));
        let emitted = apply(&mut store, &key(), GroupOp::Emit { item: Some("i".into()), kind: EventKind::Delete, data: json!(1) }, 1 << 20);
        assert_eq!((emitted.result, emitted.wrote), (Ok(None), false));
        assert!(store.list("chat", "room").is_empty());
    }

    #[test]
    fn values_over_the_limit_are_refused_and_not_stored() {
        let mut store = MemoryStore::new();
        let refused = apply(&mut store, &key(), GroupOp::Set { item: "a".into(), data: json!("0123456789") }, 8);
        let (code, message) = refused.result.unwrap_err();
        assert_eq!(code, "STREAM_SET_ERROR");
        assert!(message.contains("max_value_bytes"), "{message}");
        assert!(!refused.wrote && refused.event.is_none());
        assert!(store.get("chat", "room", "a").is_none());
    }

    #[test]
    fn update_applies_ops_to_the_stored_document() {
        let mut store = MemoryStore::new();
        apply(&mut store, &key(), GroupOp::Set { item: "a".into(), data: json!({"n": 1}) }, 1 << 20);
        let ops = update::parse_ops(&json!([{"type": "increment", "path": "n", "by": 2}])).unwrap();
        let updated = apply(&mut store, &key(), GroupOp::Update { item: "a".into(), ops }, 1 << 20);
        assert_eq!(updated.result, Ok(Some(json!({"old_value": {"n": 1}, "new_value": {"n": 3}}))));
        assert_eq!(event_of(&updated), json!({"type": "update", "data": {"n": 3}}));
    }
}
