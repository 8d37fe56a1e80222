//! Worker protocol messages (spec/worker-protocol.md §3): serde types for both directions and
//! the frame decoder. Inbound frames are parsed with simd-json; each outbound frame is
//! serialised exactly once.

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
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
    #[serde(other)]
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
    /// HTTP-invoked functions (§8) are not supported; the registration is refused with a log.
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
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub traceparent: Option<String>,
    #[serde(default)]
    pub baggage: Option<String>,
    #[serde(default)]
    pub action: Option<Action>,
    #[serde(default)]
    pub metadata: Option<Value>,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct InvocationResult {
    pub invocation_id: String,
    #[serde(default)]
    pub function_id: Option<String>,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<ErrorBody>,
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
        data: &'a Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        traceparent: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        baggage: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        metadata: Option<&'a Value>,
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
    /// The frame text; serialising these types cannot fail (string keys, JSON values).
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("outbound messages always serialise")
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

/// Decodes one frame. `buf` is scratch: simd-json parses in place.
pub fn decode(buf: &mut [u8], max_depth: usize) -> Result<Inbound, DecodeError> {
    if json_depth_exceeds(buf, max_depth) {
        return Err(DecodeError::TooDeep(max_depth));
    }
    simd_json::serde::from_slice::<Inbound>(buf).map_err(|e| DecodeError::Invalid(e.to_string()))
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

/// For an `invokefunction` frame that failed to decode, returns its `invocation_id` and
/// `function_id` when both are present as strings: the caller is waiting for an answer.
pub fn salvage_invocation(original: &[u8], max_depth: usize) -> Option<Salvaged> {
    if json_depth_exceeds(original, max_depth) {
        return None;
    }
    let value: Value = serde_json::from_slice(original).ok()?;
    let object = value.as_object()?;
    if object.get("type")?.as_str()? != "invokefunction" {
        return None;
    }
    Some(Salvaged {
        invocation_id: object.get("invocation_id")?.as_str()?.to_string(),
        function_id: object
            .get("function_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(text: &str) -> Result<Inbound, DecodeError> {
        let mut buf = text.as_bytes().to_vec();
        decode(&mut buf, 128)
    }

    #[test]
    fn invoke_without_data_decodes_as_null() {
        match dec(r#"{"type":"invokefunction","function_id":"a::b"}"#).unwrap() {
            Inbound::InvokeFunction(call) => {
                assert!(call.data.is_null());
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
        assert!(matches!(dec(&deep), Err(DecodeError::TooDeep(128))));
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
