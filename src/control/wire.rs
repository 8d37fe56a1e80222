//! Worker protocol messages (spec/worker-protocol.md §3): serde types for both directions and
//! the frame decoder. Each outbound frame is serialised exactly once.
//!
//! Payloads the control core only forwards (the `data` and `metadata` of an `invokefunction`,
//! the `result` and `error` of an `invocationresult`) are kept as the JSON text they arrived as
//! ([`Payload::Raw`]): they are checked to be well-formed JSON and nothing more, so numbers of any
//! size, any nesting depth and any valid string escape (lone surrogates included) reach the other
//! worker byte for byte. Only functions that read their input (`stream::*`, `engine::*`) decode
//! it ([`Payload::decode`]), and a payload they cannot decode becomes an error result.
//!
//! Depth: skipping a raw payload is iterative (serde_json's `ignore_value`), so a forwarded
//! payload of any depth costs no stack and is bounded by the frame size (`max_message_bytes`).
//! What the engine parses into a tree is bounded twice: by `max_json_depth` (checked by a linear
//! scan first, for a clear error) and by serde_json's fixed recursion limit of 128 levels.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;

/// `ErrorBody` (§2.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stacktrace: Option<String>,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ErrorBody { code: code.to_string(), message: message.into(), stacktrace: None }
    }
}

/// `TriggerAction` (§2.2).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Action {
    Void,
    Enqueue { queue: String },
}

/// Every message a worker may send. Unknown types decode to `Unknown` and are ignored.
/// Decoded by [`decode`] (by the `type` key, case-sensitive).
#[derive(Debug)]
pub enum Inbound {
    Reattach(Reattach),
    RegisterFunction(RegisterFunction),
    UnregisterFunction(UnregisterFunction),
    InvokeFunction(InvokeFunction),
    InvocationResult(InvocationResult),
    RegisterTriggerType(RegisterTriggerType),
    UnregisterTriggerType(UnregisterTriggerType),
    RegisterTrigger(RegisterTrigger),
    UnregisterTrigger(UnregisterTrigger),
    TriggerRegistrationResult(TriggerRegistrationResult),
    RegisterService(RegisterService),
    Ping,
    Pong,
    Unknown,
}

#[derive(Debug, Deserialize)]
pub struct Reattach {
    pub previous_worker_id: String,
    #[serde(default)]
    pub reattach_token: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RegisterFunction {
    pub id: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub request_format: Option<Value>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub metadata: Option<Value>,
    /// HTTP-invoked functions (§8): run by the engine (`control/http_functions.rs`).
    #[serde(default)]
    pub invocation: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct UnregisterFunction {
    pub id: String,
}

#[derive(Debug, Deserialize)]
pub struct InvokeFunction {
    #[serde(default)]
    pub invocation_id: Option<String>,
    pub function_id: String,
    /// Missing `data` is treated as null (the reference drops such frames; SDKs send them).
    /// Kept as the text it arrived as: forwarded verbatim, decoded only by builtins.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    #[serde(default)]
    pub traceparent: Option<String>,
    #[serde(default)]
    pub baggage: Option<String>,
    #[serde(default)]
    pub action: Option<Action>,
    /// Forwarded verbatim to the owner.
    #[serde(default)]
    pub metadata: Option<Box<RawValue>>,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct InvocationResult {
    pub invocation_id: String,
    #[serde(default)]
    pub function_id: Option<String>,
    /// Forwarded verbatim to a waiting worker; decoded only for engine-internal callers.
    #[serde(default)]
    pub result: Option<Box<RawValue>>,
    /// Likewise: an `ErrorBody` as the worker wrote it.
    #[serde(default)]
    pub error: Option<Box<RawValue>>,
    #[serde(default)]
    pub traceparent: Option<String>,
    #[serde(default)]
    pub baggage: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RegisterTriggerType {
    pub id: String,
    pub description: String,
    #[serde(default)]
    pub trigger_request_format: Option<Value>,
    #[serde(default)]
    pub call_request_format: Option<Value>,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct UnregisterTriggerType {
    pub id: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RegisterTrigger {
    pub id: String,
    pub trigger_type: String,
    pub function_id: String,
    #[serde(default)]
    pub config: Value,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub trigger_namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct UnregisterTrigger {
    pub id: String,
    #[serde(default)]
    pub trigger_type: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct TriggerRegistrationResult {
    pub id: String,
    pub trigger_type: String,
    pub function_id: String,
    #[serde(default)]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Deserialize)]
pub struct RegisterService {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parent_service_id: Option<String>,
}

/// A JSON value on its way through the engine: the text a worker sent (forwarded as it is), or
/// a value the engine built itself.
#[derive(Debug, Clone)]
pub enum Payload {
    Raw(Box<RawValue>),
    Value(Value),
}

impl Default for Payload {
    fn default() -> Self {
        Payload::Value(Value::Null)
    }
}

impl From<Value> for Payload {
    fn from(value: Value) -> Self {
        Payload::Value(value)
    }
}

impl From<Box<RawValue>> for Payload {
    fn from(raw: Box<RawValue>) -> Self {
        Payload::Raw(raw)
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Payload::Raw(raw) => raw.serialize(serializer),
            Payload::Value(value) => value.serialize(serializer),
        }
    }
}

/// Why a payload could not be decoded for a function that reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum PayloadError {
    /// Nesting deeper than the limit the engine parses.
    TooDeep(usize),
    /// An integer outside the 64-bit range: decoding would round it to a float.
    BigInteger(String),
    /// Not decodable (number out of range, lone surrogate in a string, …).
    Invalid(String),
}

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PayloadError::TooDeep(limit) => write!(f, "JSON nested deeper than {limit} levels"),
            PayloadError::BigInteger(n) => {
                write!(f, "the integer {n} does not fit in 64 bits (ringcast would have to round it)")
            }
            PayloadError::Invalid(e) => write!(f, "{e}"),
        }
    }
}

impl Payload {
    /// Decodes the payload for a function that reads it. Refuses, rather than alters, what a
    /// `Value` cannot hold exactly: integers beyond 64 bits, numbers out of the f64 range,
    /// lone surrogates; and nesting deeper than `max_depth`.
    pub fn decode(self, max_depth: usize) -> Result<Value, PayloadError> {
        match self {
            Payload::Value(value) => Ok(value),
            Payload::Raw(raw) => decode_value(raw.get(), max_depth),
        }
    }

    /// Whether the payload is a JSON object.
    pub fn is_object(&self) -> bool {
        match self {
            Payload::Value(value) => value.is_object(),
            Payload::Raw(raw) => raw.get().trim_start().starts_with('{'),
        }
    }

    /// Sets `key` to the string `value` if the payload is an object (spec §4.1 step 6.1). Raw
    /// text is edited as text: the member is added last, so parsers that keep the last of a
    /// duplicated key (JavaScript, Python, serde_json's `Value`) see the engine's value.
    pub fn insert_str(self, key: &str, value: &str) -> Payload {
        match self {
            Payload::Value(Value::Object(mut map)) => {
                map.insert(key.to_string(), Value::String(value.to_string()));
                Payload::Value(Value::Object(map))
            }
            Payload::Raw(raw) => {
                let text = raw.get().trim();
                let Some(body) = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')) else {
                    return Payload::Raw(raw);
                };
                let mut out = String::with_capacity(text.len() + key.len() + value.len() + 8);
                out.push('{');
                if !body.trim().is_empty() {
                    out.push_str(body);
                    out.push(',');
                }
                push_json_str(&mut out, key);
                out.push(':');
                push_json_str(&mut out, value);
                out.push('}');
                // Valid by construction (an object with one more member); keep the original if not.
                match RawValue::from_string(out) {
                    Ok(edited) => Payload::Raw(edited),
                    Err(_) => Payload::Raw(raw),
                }
            }
            other => other,
        }
    }
}

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        // Serialising a &str cannot fail; write an empty string rather than panic.
        Err(_) => out.push_str("\"\""),
    }
}

/// Decodes JSON text into a `Value` under the rules of [`Payload::decode`].
pub fn decode_value(text: &str, max_depth: usize) -> Result<Value, PayloadError> {
    check_parseable(text.as_bytes(), max_depth)?;
    serde_json::from_str(text).map_err(|e| PayloadError::Invalid(e.to_string()))
}

/// One linear pass before a tree is built: nesting within `max_depth` and every integer within
/// 64 bits. Strings are skipped (brackets and digits in them do not count). Malformed text is
/// left for the parser to report.
pub fn check_parseable(buf: &[u8], max_depth: usize) -> Result<(), PayloadError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut number: Option<usize> = None;
    for (at, &b) in buf.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        if let Some(start) = number {
            if matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                continue;
            }
            number = None;
            check_integer(buf.get(start..at).unwrap_or_default())?;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(PayloadError::TooDeep(max_depth));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => number = Some(at),
            _ => {}
        }
    }
    match number {
        Some(start) => check_integer(buf.get(start..).unwrap_or_default()),
        None => Ok(()),
    }
}

/// An integer token (no fraction, no exponent) must fit i64 or u64, or decoding would round it.
fn check_integer(token: &[u8]) -> Result<(), PayloadError> {
    if token.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        return Ok(());
    }
    let text = std::str::from_utf8(token).unwrap_or_default();
    if text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok() {
        return Ok(());
    }
    // Not a number at all (e.g. a lone `-`): the parser reports it.
    if text.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit()) && text.len() > 1 {
        return Err(PayloadError::BigInteger(text.to_string()));
    }
    Ok(())
}

/// Every message the engine sends. Serialised once per frame.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Outbound<'a> {
    WorkerRegistered {
        worker_id: &'a str,
        reattach_token: &'a str,
    },
    RegistrationRejected {
        code: &'a str,
        namespace: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        worker_name: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        function_id: Option<&'a str>,
        owner_worker_id: &'a str,
    },
    InvokeFunction {
        invocation_id: &'a str,
        function_id: &'a str,
        data: &'a Payload,
        #[serde(skip_serializing_if = "Option::is_none")]
        traceparent: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        baggage: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        metadata: Option<&'a Payload>,
    },
    InvocationResult {
        invocation_id: &'a str,
        function_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<&'a Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a ErrorBody>,
        #[serde(skip_serializing_if = "Option::is_none")]
        traceparent: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        baggage: Option<&'a str>,
    },
    /// A worker's `invocationresult` relayed to the worker that called: `result`/`error` are
    /// the owner's text, verbatim.
    #[serde(rename = "invocationresult")]
    RelayedResult {
        invocation_id: &'a str,
        function_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        traceparent: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        baggage: Option<&'a str>,
    },
    RegisterTrigger {
        id: &'a str,
        trigger_type: &'a str,
        function_id: &'a str,
        config: &'a Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        metadata: Option<&'a Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        namespace: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        trigger_namespace: Option<&'a str>,
    },
    UnregisterTrigger {
        id: &'a str,
        trigger_type: &'a str,
    },
    TriggerRegistrationResult {
        id: &'a str,
        trigger_type: &'a str,
        function_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a ErrorBody>,
    },
    Pong,
}

impl Outbound<'_> {
    /// The frame text. Serialising these types cannot fail (string keys, JSON values, raw text
    /// already validated); should it ever, the frame is logged and replaced by an empty object,
    /// which workers ignore as an unknown message.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            tracing::error!("an outbound message did not serialise: {e}");
            "{}".to_string()
        })
    }
}

/// Why a frame was not decoded into a message.
#[derive(Debug)]
pub enum DecodeError {
    /// Nesting deeper than the configured limit.
    TooDeep(usize),
    /// Not JSON, or not a known message shape.
    Invalid(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::TooDeep(limit) => write!(f, "JSON nested deeper than {limit} levels"),
            DecodeError::Invalid(e) => write!(f, "{e}"),
        }
    }
}

/// The `type` of a frame, read without building anything else.
#[derive(Deserialize)]
struct Tag<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

/// The `type` when the frame starts with it as a plain string (what every SDK writes), without
/// scanning the rest; `None` sends the caller to the full scan.
fn leading_type(buf: &[u8]) -> Option<&str> {
    let start = buf.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = buf.get(start..)?.strip_prefix(b"{")?;
    let rest = rest.get(rest.iter().position(|b| !b.is_ascii_whitespace())?..)?;
    let rest = rest.strip_prefix(b"\"type\"")?;
    let rest = rest.get(rest.iter().position(|b| !b.is_ascii_whitespace())?..)?.strip_prefix(b":")?;
    let rest = rest.get(rest.iter().position(|b| !b.is_ascii_whitespace())?..)?.strip_prefix(b"\"")?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    if rest.get(end) != Some(&b'"') {
        return None;
    }
    std::str::from_utf8(rest.get(..end)?).ok()
}

fn parse<'a, T: Deserialize<'a>>(buf: &'a [u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(buf).map_err(|e| DecodeError::Invalid(e.to_string()))
}

/// Decodes one inbound worker frame (the whole WebSocket message).
///
/// `invokefunction` and `invocationresult` carry their payloads as raw text: their depth is not
/// limited here (the engine does not parse them; the frame size bounds them). Every other
/// message is parsed into values and must nest at most `max_depth` levels.
pub fn decode(buf: &[u8], max_depth: usize) -> Result<Inbound, DecodeError> {
    let kind = match leading_type(buf) {
        Some(kind) => Cow::Borrowed(kind),
        None => parse::<Tag>(buf)?.kind,
    };
    let relays_payload = matches!(kind.as_ref(), "invokefunction" | "invocationresult");
    if !relays_payload && json_depth_exceeds(buf, max_depth) {
        return Err(DecodeError::TooDeep(max_depth));
    }
    Ok(match kind.as_ref() {
        "invokefunction" => Inbound::InvokeFunction(parse(buf)?),
        "invocationresult" => Inbound::InvocationResult(parse(buf)?),
        "reattach" => Inbound::Reattach(parse(buf)?),
        "registerfunction" => Inbound::RegisterFunction(parse(buf)?),
        "unregisterfunction" => Inbound::UnregisterFunction(parse(buf)?),
        "registertriggertype" => Inbound::RegisterTriggerType(parse(buf)?),
        "unregistertriggertype" => Inbound::UnregisterTriggerType(parse(buf)?),
        "registertrigger" => Inbound::RegisterTrigger(parse(buf)?),
        "unregistertrigger" => Inbound::UnregisterTrigger(parse(buf)?),
        "triggerregistrationresult" => Inbound::TriggerRegistrationResult(parse(buf)?),
        "registerservice" => Inbound::RegisterService(parse(buf)?),
        // Unit messages: still the whole frame must be JSON.
        "ping" => parse::<serde::de::IgnoredAny>(buf).map(|_| Inbound::Ping)?,
        "pong" => parse::<serde::de::IgnoredAny>(buf).map(|_| Inbound::Pong)?,
        _ => parse::<Tag>(buf).map(|_| Inbound::Unknown)?,
    })
}

/// Whether `buf` nests arrays/objects deeper than `limit`. A linear scan that skips strings;
/// it runs before any recursive decoding so that deep input cannot exhaust the stack.
pub fn json_depth_exceeds(buf: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in buf {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Facts salvaged from a frame that did not decode, so a waiting caller can be answered.
pub struct Salvaged {
    pub invocation_id: String,
    pub function_id: String,
}

/// The fields of an `invokefunction` needed to answer its caller; the rest is skipped without
/// being parsed (so neither its depth nor its numbers matter).
#[derive(Deserialize)]
struct InvokeIds {
    #[serde(rename = "type")]
    kind: String,
    invocation_id: Option<String>,
    #[serde(default)]
    function_id: Option<Box<RawValue>>,
}

/// For an `invokefunction` frame that failed to decode, returns its `invocation_id` and
/// `function_id` (empty when absent or not a string) when the id is a string: the caller is
/// waiting for an answer. Depth is no concern: skipped values are walked iteratively.
pub fn salvage_invocation(original: &[u8], _max_depth: usize) -> Option<Salvaged> {
    let ids: InvokeIds = serde_json::from_slice(original).ok()?;
    if ids.kind != "invokefunction" {
        return None;
    }
    Some(Salvaged {
        invocation_id: ids.invocation_id?,
        function_id: ids.function_id.and_then(|raw| serde_json::from_str(raw.get()).ok()).unwrap_or_default(),
    })
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn dec(text: &str) -> Result<Inbound, DecodeError> {
        decode(text.as_bytes(), 128)
    }

    #[test]
    fn invoke_without_data_decodes_as_null() {
        match dec(r#"{"type":"invokefunction","function_id":"a::b"}"#).unwrap() {
            Inbound::InvokeFunction(call) => {
                assert!(call.data.is_none());
                assert!(call.invocation_id.is_none());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_type_and_unknown_fields_are_tolerated() {
        assert!(matches!(dec(r#"{"type":"observe","x":1}"#).unwrap(), Inbound::Unknown));
        assert!(matches!(
            dec(r#"{"type":"registertrigger","id":"t","trigger_type":"x","function_id":"f","config":{},"message_type":"registertrigger"}"#).unwrap(),
            Inbound::RegisterTrigger(_)
        ));
    }

    #[test]
    fn type_is_case_sensitive() {
        assert!(matches!(
            dec(r#"{"type":"InvokeFunction","function_id":"a"}"#).unwrap(),
            Inbound::Unknown
        ));
    }

    #[test]
    fn wrong_field_type_is_an_error() {
        assert!(dec(r#"{"type":"invokefunction","function_id":5,"data":1}"#).is_err());
        assert!(dec("not json").is_err());
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(dec(&deep).is_err());
        // Brackets inside strings do not count.
        let text = format!(r#"{{"type":"ping","s":"{}"}}"#, "[".repeat(500));
        assert!(matches!(dec(&text).unwrap(), Inbound::Ping));
    }

    #[test]
    fn salvage_finds_the_waiting_caller() {
        let frame = br#"{"type":"invokefunction","invocation_id":"not-a-uuid","function_id":"a::b","data":1}"#;
        let s = salvage_invocation(frame, 128).unwrap();
        assert_eq!((s.invocation_id.as_str(), s.function_id.as_str()), ("not-a-uuid", "a::b"));
        assert!(salvage_invocation(br#"{"type":"ping"}"#, 128).is_none());
    }

    /// Payloads a worker may send that a `Value` cannot hold as they are.
    fn awkward_payloads() -> Vec<String> {
        vec![
            "1000000000000000000000000000000".to_string(),
            "1e999".to_string(),
            "-0".to_string(),
            "1.0000000000000000001".to_string(),
            format!("{}{}", "[".repeat(1000), "]".repeat(1000)),
            r#""\ud800""#.to_string(),
            r#"{ "a" : [1e999, -0, 100000000000000000000000000000], "s":"\ud800\u0000" }"#.to_string(),
        ]
    }

    #[test]
    fn invoke_data_and_metadata_are_kept_as_sent() {
        for data in awkward_payloads() {
            let frame = format!(
                r#"{{"type":"invokefunction","invocation_id":"0f8a3c62-3a3e-4a57-b2b6-8d1a2a0b1f77","function_id":"a::b","data":{data},"metadata":{data}}}"#
            );
            let Inbound::InvokeFunction(call) = dec(&frame).unwrap() else { panic!("not an invoke: {frame}") };
            assert_eq!(call.data.as_deref().unwrap().get(), data);
            assert_eq!(call.metadata.as_deref().unwrap().get(), data);
            let payload = Payload::Raw(call.data.unwrap());
            let out = Outbound::InvokeFunction {
                invocation_id: "i",
                function_id: "a::b",
                data: &payload,
                traceparent: None,
                baggage: None,
                metadata: None,
            }
            .to_text();
            assert_eq!(out, format!(r#"{{"type":"invokefunction","invocation_id":"i","function_id":"a::b","data":{data}}}"#));
        }
    }

    #[test]
    fn invocation_result_and_error_are_kept_as_sent() {
        for result in awkward_payloads() {
            let frame = format!(r#"{{"type":"invocationresult","invocation_id":"x","result":{result},"error":{result}}}"#);
            let Inbound::InvocationResult(r) = dec(&frame).unwrap() else { panic!("not a result: {frame}") };
            assert_eq!(r.result.as_deref().unwrap().get(), result);
            assert_eq!(r.error.as_deref().unwrap().get(), result);
        }
    }

    #[test]
    fn type_need_not_come_first() {
        let frame = r#"{"invocation_id":"x","result":1e999,"type":"invocationresult"}"#;
        assert!(matches!(dec(frame).unwrap(), Inbound::InvocationResult(_)));
        assert!(matches!(dec(r#" { "type" : "ping" } "#).unwrap(), Inbound::Ping));
        assert!(matches!(dec(r#"{"type":"p\u0069ng"}"#).unwrap(), Inbound::Ping));
        assert!(dec(r#"{"type":"ping""#).is_err(), "truncated frame");
        assert!(dec(r#"{"type":"observe","x":}"#).is_err(), "malformed unknown message");
        assert!(dec(r#"{"x":1}"#).is_err(), "no type");
    }

    #[test]
    fn depth_limits_only_what_the_engine_parses() {
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let invoke = format!(r#"{{"type":"invokefunction","function_id":"a","data":{deep}}}"#);
        assert!(matches!(dec(&invoke).unwrap(), Inbound::InvokeFunction(_)));
        let register = format!(r#"{{"type":"registerfunction","id":"a","metadata":{deep}}}"#);
        assert!(matches!(dec(&register), Err(DecodeError::TooDeep(128))));
    }

    #[test]
    fn decoding_for_the_engine_refuses_what_it_would_change() {
        let raw = |t: &str| Payload::Raw(RawValue::from_string(t.to_string()).unwrap());
        assert!(matches!(raw("[1, 100000000000000000000000000000]").decode(128), Err(PayloadError::BigInteger(n)) if n == "100000000000000000000000000000"));
        assert!(matches!(raw("-100000000000000000000").decode(128), Err(PayloadError::BigInteger(_))));
        assert!(raw("1e999").decode(128).unwrap_err().to_string().contains("out of range"));
        assert!(raw(r#""\ud800""#).decode(128).unwrap_err().to_string().contains("hex escape"));
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(raw(&deep).decode(128).unwrap_err(), PayloadError::TooDeep(128));
        // Past serde_json's own limit the parser's error still comes back, never a crash.
        assert!(matches!(raw(&deep).decode(1000), Err(PayloadError::Invalid(e)) if e.contains("recursion limit")));
        // Within range: decoded; strings holding digits or brackets do not count.
        let ok = r#"{"a":[18446744073709551615,-9223372036854775808,1.5e300,"123456789012345678901234567890[[["]}"#;
        assert_eq!(raw(ok).decode(2).unwrap()["a"][0], serde_json::json!(u64::MAX));
    }

    #[test]
    fn caller_worker_id_is_added_to_objects_only() {
        let raw = |t: &str| Payload::Raw(RawValue::from_string(t.to_string()).unwrap());
        let text = |p: Payload| serde_json::to_string(&p).unwrap();
        assert_eq!(text(raw(" { } ").insert_str("k", "w")), r#"{"k":"w"}"#);
        assert_eq!(text(raw(r#"{"a":1e999}"#).insert_str("k", "w\"")), r#"{"a":1e999,"k":"w\""}"#);
        assert_eq!(text(raw("[1]").insert_str("k", "w")), "[1]");
        assert_eq!(text(raw("null").insert_str("k", "w")), "null");
        assert_eq!(text(Payload::Value(serde_json::json!({"a":1})).insert_str("k", "w")), r#"{"a":1,"k":"w"}"#);
        // A client-sent key of the same name loses to the engine's (last one wins).
        let v: Value = serde_json::from_str(&text(raw(r#"{"k":"spoof"}"#).insert_str("k", "w"))).unwrap();
        assert_eq!(v["k"], "w");
    }

    #[test]
    fn salvage_reads_ids_past_unparseable_values() {
        let frame = br#"{"type":"invokefunction","invocation_id":"id-1","function_id":"a::b","namespace":7,"x":[1e999,100000000000000000000000]}"#;
        assert!(dec(std::str::from_utf8(frame).unwrap()).is_err());
        let s = salvage_invocation(frame, 128).unwrap();
        assert_eq!((s.invocation_id.as_str(), s.function_id.as_str()), ("id-1", "a::b"));
        let frame = br#"{"type":"invokefunction","invocation_id":"id-2","function_id":{"deep":[[[[1e999]]]]}}"#;
        let s = salvage_invocation(frame, 128).unwrap();
        assert_eq!((s.invocation_id.as_str(), s.function_id.as_str()), ("id-2", ""));
    }

    #[test]
    fn outbound_result_has_function_id_and_no_nulls() {
        let text = Outbound::InvocationResult {
            invocation_id: "i",
            function_id: "f",
            result: None,
            error: None,
            traceparent: None,
            baggage: None,
        }
        .to_text();
        assert_eq!(text, r#"{"type":"invocationresult","invocation_id":"i","function_id":"f"}"#);
    }
}
