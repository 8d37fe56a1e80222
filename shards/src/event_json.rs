//! The JSON text of subscriber events (spec/stream.md §1.5), written once per event with stored
//! values spliced in verbatim; `wsframe` wraps it in a WebSocket frame. The same text is the
//! `stream` trigger payload.

use crate::runtime::unix_time_ms;
use std::fmt::Write;

fn push_json_str(out: &mut String, s: &str) {
    // Serialising a &str cannot fail; an empty string stands in rather than a panic.
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        Err(_) => out.push_str("\"\""),
    }
}

/// `{"type":"stream","timestamp":…,"streamName":…,"groupId":…,"id":…,"event":` … `}` around
/// `event_body`, which must be the JSON object of the event.
fn envelope(stream: &str, group: &str, item: Option<&str>, event_body: &str) -> String {
    envelope_at(unix_time_ms(), stream, group, item, event_body)
}

/// `envelope` with a given timestamp (events that another node, through Redis, stamped).
fn envelope_at(timestamp: u64, stream: &str, group: &str, item: Option<&str>, event_body: &str) -> String {
    let mut out = String::with_capacity(96 + stream.len() + group.len() + event_body.len());
    let _ = write!(out, "{{\"type\":\"stream\",\"timestamp\":{timestamp},\"streamName\":");
    push_json_str(&mut out, stream);
    out.push_str(",\"groupId\":");
    push_json_str(&mut out, group);
    out.push_str(",\"id\":");
    match item {
        Some(id) => push_json_str(&mut out, id),
        None => out.push_str("null"),
    }
    out.push_str(",\"event\":");
    out.push_str(event_body);
    out.push('}');
    out
}

/// `create` / `update` / `delete` / `sync` events carrying `data` (JSON text).
pub fn data_event(stream: &str, group: &str, item: Option<&str>, kind: &str, data: &str) -> String {
    envelope(stream, group, item, &format!("{{\"type\":\"{kind}\",\"data\":{data}}}"))
}

/// `data_event` stamped `timestamp` (ms since the epoch).
pub fn data_event_at(timestamp: u64, stream: &str, group: &str, item: Option<&str>, kind: &str, data: &str) -> String {
    envelope_at(timestamp, stream, group, item, &format!("{{\"type\":\"{kind}\",\"data\":{data}}}"))
}

/// The `sync` snapshot of a group: an array of the item values in order.
pub fn group_sync(stream: &str, group: &str, values: &[impl AsRef<str>]) -> String {
    let mut data = String::with_capacity(2 + values.iter().map(|v| v.as_ref().len() + 1).sum::<usize>());
    data.push('[');
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            data.push(',');
        }
        data.push_str(v.as_ref());
    }
    data.push(']');
    data_event(stream, group, None, "sync", &data)
}

/// A custom `stream::send` event: `{"type":"event","event":{"type":…,"data":…}}`.
pub fn custom_event(stream: &str, group: &str, item: Option<&str>, event_type: &str, data: &str) -> String {
    custom_event_at(unix_time_ms(), stream, group, item, event_type, data)
}

/// `custom_event` stamped `timestamp` (ms since the epoch).
pub fn custom_event_at(timestamp: u64, stream: &str, group: &str, item: Option<&str>, event_type: &str, data: &str) -> String {
    let mut body = String::from("{\"type\":\"event\",\"event\":{\"type\":");
    push_json_str(&mut body, event_type);
    body.push_str(",\"data\":");
    body.push_str(data);
    body.push_str("}}");
    envelope_at(timestamp, stream, group, item, &body)
}

/// A join refused by a `stream:join` trigger.
pub fn unauthorized(stream: &str, group: &str, item: Option<&str>) -> String {
    envelope(stream, group, item, "{\"type\":\"unauthorized\"}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse(text: &str) -> Value {
        let mut v: Value = serde_json::from_str(text).unwrap();
        assert!(v["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
        v["timestamp"] = json!(0);
        v
    }

    #[test]
    fn create_event_envelope_in_key_order() {
        let text = data_event("chat", "room-1", Some("m1"), "create", r#"{"id":"m1"}"#);
        assert!(text.starts_with("{\"type\":\"stream\",\"timestamp\":"));
        assert_eq!(parse(&text), json!({"type":"stream","timestamp":0,"streamName":"chat","groupId":"room-1","id":"m1","event":{"type":"create","data":{"id":"m1"}}}));
    }

    #[test]
    fn group_sync_lists_values_and_null_id() {
        let text = group_sync("s", "g", &["1", "{\"a\":2}"]);
        assert_eq!(parse(&text)["event"], json!({"type":"sync","data":[1,{"a":2}]}));
        assert_eq!(parse(&text)["id"], Value::Null);
        assert_eq!(parse(&group_sync("s", "g", &Vec::<&str>::new()))["event"]["data"], json!([]));
    }

    #[test]
    fn custom_and_unauthorized_events() {
        let text = custom_event("chat", "r", None, "typing", r#"{"user":"alice"}"#);
        assert_eq!(parse(&text)["event"], json!({"type":"event","event":{"type":"typing","data":{"user":"alice"}}}));
        assert_eq!(parse(&unauthorized("s", "g", Some("i")))["event"], json!({"type":"unauthorized"}));
    }

    #[test]
    fn names_are_escaped() {
        let text = data_event("a\"b", "c\\d", None, "delete", "null");
        assert_eq!(parse(&text)["streamName"], "a\"b");
        assert_eq!(parse(&text)["groupId"], "c\\d");
    }
}
