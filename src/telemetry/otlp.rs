//! Decoding of the SDKs' telemetry frames: four ASCII prefix bytes (`OTLP` spans, `MTRC`
//! metrics, `LOGS` log records) and OTLP/JSON (the `Export*ServiceRequest` messages, lowerCamelCase
//! field names, hex trace and span ids). Only what the engine uses is read: the log records
//! (severity, body, attributes, trace id) with their resource's `service.name` and SDK language,
//! and the number of spans and metrics. Unknown fields are ignored, `null` counts as absent,
//! snake_case field names are accepted too (the OTLP/JSON spec asks receivers to).
//!
//! Everything here is pure and bounded: serde_json refuses nesting deeper than 128 levels, and
//! the rendered message and data of a log record are cut to the configured line length, with
//! control characters escaped so that a worker cannot forge engine log lines.

use serde::de::{DeserializeOwned, Deserializer};
use serde::Deserialize;
use serde_json::Value;
use std::fmt::Write as _;

/// The signal a frame carries, from its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `OTLP`: ExportTraceServiceRequest.
    Traces,
    /// `MTRC`: ExportMetricsServiceRequest.
    Metrics,
    /// `LOGS`: ExportLogsServiceRequest.
    Logs,
}

impl Kind {
    /// The frame prefix of each kind, as the SDKs send it.
    pub const PREFIXES: [(&'static [u8; 4], Kind); 3] =
        [(b"OTLP", Kind::Traces), (b"MTRC", Kind::Metrics), (b"LOGS", Kind::Logs)];

    /// Label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Traces => "traces",
            Kind::Metrics => "metrics",
            Kind::Logs => "logs",
        }
    }

    /// Path of the OTLP/HTTP endpoint for this signal.
    pub fn http_path(self) -> &'static str {
        match self {
            Kind::Traces => "/v1/traces",
            Kind::Metrics => "/v1/metrics",
            Kind::Logs => "/v1/logs",
        }
    }
}

/// The kind of a telemetry frame and its OTLP/JSON payload; `None` when the bytes do not start
/// with one of the three prefixes.
pub fn split_prefix(frame: &[u8]) -> Option<(Kind, &[u8])> {
    Kind::PREFIXES
        .iter()
        .find(|(prefix, _)| frame.starts_with(prefix.as_slice()))
        .map(|(prefix, kind)| (*kind, frame.get(prefix.len()..).unwrap_or_default()))
}

/// Why a frame's payload was not understood.
#[derive(Debug, thiserror::Error)]
pub enum MalformedFrame {
    #[error("not OTLP/JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// What one frame held.
#[derive(Debug)]
pub enum Decoded {
    Traces { spans: usize },
    Metrics { metrics: usize },
    Logs(Vec<LogLine>),
}

/// Severity of a log record, as the engine logs it (OTel severities folded into tracing's five
/// levels; FATAL is logged as ERROR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// One SDK log record, ready to be logged.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub severity: Severity,
    /// `service.name` of the record's resource (the SDK's OTel service name).
    pub resource_service: Option<String>,
    /// `telemetry.sdk.language` of the resource (`nodejs`, `python`).
    pub sdk_language: Option<String>,
    /// The record's own `service.name` attribute (set by the SDKs' `Logger(serviceName)`).
    pub record_service: Option<String>,
    /// The body, escaped and cut to the line limit.
    pub message: String,
    /// The record's other attributes as compact JSON, escaped and cut to what the line limit
    /// leaves; `None` when there are none.
    pub data: Option<String>,
    /// Lowercase hex trace id, when the record has a valid (non-zero) one.
    pub trace_id: Option<String>,
}

/// Decodes the payload (prefix removed) of a frame of `kind`; messages and data are cut to
/// `max_line_bytes` in total per record.
pub fn decode(kind: Kind, payload: &[u8], max_line_bytes: usize) -> Result<Decoded, MalformedFrame> {
    Ok(match kind {
        Kind::Traces => {
            let request: TracesRequest = serde_json::from_slice(payload)?;
            let spans = request.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
            Decoded::Traces { spans }
        }
        Kind::Metrics => {
            let request: MetricsRequest = serde_json::from_slice(payload)?;
            let metrics = request.resource_metrics.iter().flat_map(|r| &r.scope_metrics).map(|s| s.metrics.len()).sum();
            Decoded::Metrics { metrics }
        }
        Kind::Logs => {
            let request: LogsRequest = serde_json::from_slice(payload)?;
            let mut lines = Vec::new();
            for resource_logs in &request.resource_logs {
                let resource = &resource_logs.resource.attributes;
                let resource_service = string_attr(resource, "service.name");
                let sdk_language = string_attr(resource, "telemetry.sdk.language");
                for record in resource_logs.scope_logs.iter().flat_map(|s| &s.log_records) {
                    lines.push(log_line(record, &resource_service, &sdk_language, max_line_bytes));
                }
            }
            Decoded::Logs(lines)
        }
    })
}

/// Attributes the line shows in their own fields, left out of `data`.
const SHOWN_ATTRIBUTES: [&str; 3] = ["service.name", "trace_id", "span_id"];

fn log_line(
    record: &LogRecord,
    resource_service: &Option<String>,
    sdk_language: &Option<String>,
    max_line_bytes: usize,
) -> LogLine {
    let body = record.body.as_ref().map(plain).unwrap_or(Value::Null);
    let body = match body {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let message = clip(&body, max_line_bytes);
    let mut data = serde_json::Map::new();
    for kv in &record.attributes {
        if !SHOWN_ATTRIBUTES.contains(&kv.key.as_str()) {
            data.insert(kv.key.clone(), kv.value.as_ref().map(plain).unwrap_or(Value::Null));
        }
    }
    // The SDK Loggers put their structured argument in `log.data`: alone, it is the data.
    let data = match data.len() {
        0 => None,
        1 if data.contains_key("log.data") => data.remove("log.data"),
        _ => Some(Value::Object(data)),
    };
    let data = data.map(|d| clip(&d.to_string(), max_line_bytes.saturating_sub(message.len())));
    let trace_id = record
        .trace_id
        .as_deref()
        .filter(|id| is_trace_id(id))
        .map(str::to_ascii_lowercase)
        // The Node Logger also puts the active trace id in a `trace_id` attribute.
        .or_else(|| {
            string_attr(&record.attributes, "trace_id").filter(|id| is_trace_id(id)).map(|id| id.to_ascii_lowercase())
        });
    LogLine {
        severity: severity(record),
        resource_service: resource_service.clone(),
        sdk_language: sdk_language.clone(),
        record_service: string_attr(&record.attributes, "service.name").filter(|s| !s.is_empty()),
        message,
        data,
        trace_id,
    }
}

/// 32 hex digits, not all zero (the OTel "invalid" id).
fn is_trace_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id.bytes().any(|b| b != b'0')
}

/// OTel severity numbers: 1–4 TRACE, 5–8 DEBUG, 9–12 INFO, 13–16 WARN, 17–24 ERROR and FATAL.
/// Without a number (0, absent) the severity text decides; INFO when neither says.
fn severity(record: &LogRecord) -> Severity {
    let number = match &record.severity_number {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        // proto3 JSON may write an enum by name: SEVERITY_NUMBER_WARN2.
        Some(Value::String(name)) => return severity_text(name.trim_start_matches("SEVERITY_NUMBER_")),
        _ => 0,
    };
    match number {
        1..=4 => Severity::Trace,
        5..=8 => Severity::Debug,
        9..=12 => Severity::Info,
        13..=16 => Severity::Warn,
        17..=24 => Severity::Error,
        _ => severity_text(record.severity_text.as_deref().unwrap_or_default()),
    }
}

fn severity_text(text: &str) -> Severity {
    let upper = text.trim().to_ascii_uppercase();
    let word = upper.trim_end_matches(|c: char| c.is_ascii_digit());
    match word {
        "TRACE" => Severity::Trace,
        "DEBUG" => Severity::Debug,
        "WARN" | "WARNING" => Severity::Warn,
        "ERROR" | "FATAL" | "CRITICAL" => Severity::Error,
        _ => Severity::Info,
    }
}

/// The string value of attribute `key`, if it has one.
fn string_attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    let kv = attributes.iter().find(|kv| kv.key == key)?;
    match kv.value.as_ref().map(plain)? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// An OTLP `AnyValue` (`{"stringValue": …}`, `{"kvlistValue": {"values": […]}}`, …) as plain
/// JSON. Anything else is kept as it is. Recursion is bounded by serde_json's nesting limit.
fn plain(any: &Value) -> Value {
    let Value::Object(map) = any else { return any.clone() };
    if map.len() != 1 {
        return if map.is_empty() { Value::Null } else { any.clone() };
    }
    let Some((key, inner)) = map.iter().next() else { return Value::Null };
    match key.as_str() {
        "stringValue" | "string_value" | "boolValue" | "bool_value" | "doubleValue" | "double_value" | "bytesValue"
        | "bytes_value" => inner.clone(),
        // int64 is a JSON string in OTLP/JSON; shown as a number when it is one.
        "intValue" | "int_value" => match inner {
            Value::String(s) => s.parse::<i64>().map(Value::from).unwrap_or_else(|_| inner.clone()),
            _ => inner.clone(),
        },
        "arrayValue" | "array_value" => {
            let values = inner.get("values").and_then(Value::as_array);
            Value::Array(values.map(|v| v.iter().map(plain).collect()).unwrap_or_default())
        }
        "kvlistValue" | "kvlist_value" => {
            let mut out = serde_json::Map::new();
            for kv in inner.get("values").and_then(Value::as_array).into_iter().flatten() {
                if let Some(key) = kv.get("key").and_then(Value::as_str) {
                    out.insert(key.to_owned(), kv.get("value").map(plain).unwrap_or(Value::Null));
                }
            }
            Value::Object(out)
        }
        _ => any.clone(),
    }
}

/// `text` with control characters escaped (`\n`, `\u{1b}`), cut to at most `limit` bytes on a
/// character boundary; a cut line ends with `…[+N bytes]` (beyond the limit, so that what is
/// kept is exactly `limit` bytes of the escaped text).
pub fn clip(text: &str, limit: usize) -> String {
    let mut out = String::with_capacity(text.len().min(limit));
    let mut rest = 0usize;
    for (i, c) in text.char_indices() {
        let before = out.len();
        if c.is_control() {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > limit {
            out.truncate(before);
            rest = text.len() - i;
            break;
        }
    }
    if rest > 0 {
        let _ = write!(out, "…[+{rest} bytes]");
    }
    out
}

/// Deserializes `null` as the default value.
fn nullable<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct LogsRequest {
    #[serde(alias = "resource_logs", deserialize_with = "nullable")]
    resource_logs: Vec<ResourceLogs>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ResourceLogs {
    #[serde(deserialize_with = "nullable")]
    resource: Resource,
    #[serde(alias = "scope_logs", deserialize_with = "nullable")]
    scope_logs: Vec<ScopeLogs>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Resource {
    #[serde(deserialize_with = "nullable")]
    attributes: Vec<KeyValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct KeyValue {
    #[serde(deserialize_with = "nullable")]
    key: String,
    value: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ScopeLogs {
    #[serde(alias = "log_records", deserialize_with = "nullable")]
    log_records: Vec<LogRecord>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct LogRecord {
    #[serde(alias = "severity_number")]
    severity_number: Option<Value>,
    #[serde(alias = "severity_text")]
    severity_text: Option<String>,
    body: Option<Value>,
    #[serde(deserialize_with = "nullable")]
    attributes: Vec<KeyValue>,
    #[serde(alias = "trace_id")]
    trace_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct TracesRequest {
    #[serde(alias = "resource_spans", deserialize_with = "nullable")]
    resource_spans: Vec<ResourceSpans>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ResourceSpans {
    #[serde(alias = "scope_spans", deserialize_with = "nullable")]
    scope_spans: Vec<ScopeSpans>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ScopeSpans {
    #[serde(deserialize_with = "nullable")]
    spans: Vec<serde::de::IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct MetricsRequest {
    #[serde(alias = "resource_metrics", deserialize_with = "nullable")]
    resource_metrics: Vec<ResourceMetrics>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ResourceMetrics {
    #[serde(alias = "scope_metrics", deserialize_with = "nullable")]
    scope_metrics: Vec<ScopeMetrics>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ScopeMetrics {
    #[serde(deserialize_with = "nullable")]
    metrics: Vec<serde::de::IgnoredAny>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A logs frame as the Node SDK (otlp-transformer JsonLogsSerializer) writes it.
    const NODE_LOGS: &str = r#"{"resourceLogs":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"iii-node"}},{"key":"telemetry.sdk.language","value":{"stringValue":"nodejs"}}],"droppedAttributesCount":0},"scopeLogs":[{"scope":{"name":"iii-node"},"logRecords":[{"timeUnixNano":"1765000000000000000","observedTimeUnixNano":"1765000000000000000","severityNumber":13,"body":{"stringValue":"retry\nattempt"},"attributes":[{"key":"trace_id","value":{"stringValue":"0af7651916cd43dd8448eb211c80319c"}},{"key":"log.data","value":{"kvlistValue":{"values":[{"key":"attempt","value":{"intValue":3}}]}}}],"droppedAttributesCount":0}]}]}]}"#;

    fn logs(payload: &str, limit: usize) -> Vec<LogLine> {
        match decode(Kind::Logs, payload.as_bytes(), limit).expect("decodes") {
            Decoded::Logs(lines) => lines,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn prefixes_pick_the_kind() {
        assert_eq!(split_prefix(b"OTLP{}").map(|(k, p)| (k, p.len())), Some((Kind::Traces, 2)));
        assert_eq!(split_prefix(b"MTRC").map(|(k, p)| (k, p.len())), Some((Kind::Metrics, 0)));
        assert_eq!(split_prefix(b"LOGS{}").map(|(k, _)| k), Some(Kind::Logs));
        assert!(split_prefix(b"LOG").is_none());
        assert!(split_prefix(b"logs{}").is_none());
    }

    #[test]
    fn a_node_log_record_becomes_a_line() {
        let lines = logs(NODE_LOGS, 4096);
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line.severity, Severity::Warn);
        assert_eq!(line.resource_service.as_deref(), Some("iii-node"));
        assert_eq!(line.sdk_language.as_deref(), Some("nodejs"));
        assert_eq!(line.message, "retry\\nattempt", "control characters are escaped");
        assert_eq!(line.trace_id.as_deref(), Some("0af7651916cd43dd8448eb211c80319c"));
        assert_eq!(line.data.as_deref(), Some(r#"{"attempt":3}"#), "log.data alone is the data");
    }

    #[test]
    fn severity_numbers_and_texts_map_to_levels() {
        let record = |n: &str, t: &str| {
            format!(
                r#"{{"resourceLogs":[{{"scopeLogs":[{{"logRecords":[{{"severityNumber":{n},"severityText":"{t}"}}]}}]}}]}}"#
            )
        };
        for (n, t, want) in [
            ("1", "", Severity::Trace),
            ("5", "", Severity::Debug),
            ("9", "", Severity::Info),
            ("16", "", Severity::Warn),
            ("21", "", Severity::Error),
            ("0", "WARN", Severity::Warn),
            ("0", "error", Severity::Error),
            ("null", "", Severity::Info),
            ("\"SEVERITY_NUMBER_DEBUG2\"", "", Severity::Debug),
        ] {
            assert_eq!(logs(&record(n, t), 100)[0].severity, want, "{n} {t}");
        }
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let body = "é".repeat(100);
        let payload = format!(
            r#"{{"resourceLogs":[{{"scopeLogs":[{{"logRecords":[{{"body":{{"stringValue":"{body}"}},"attributes":[{{"key":"k","value":{{"stringValue":"v"}}}}]}}]}}]}}]}}"#
        );
        let line = &logs(&payload, 11)[0];
        assert_eq!(line.message, format!("{}…[+190 bytes]", "é".repeat(5)));
        assert_eq!(line.data.as_deref(), Some("…[+9 bytes]"), "no room left for data");
    }

    #[test]
    fn zero_trace_ids_and_nulls_are_absent() {
        let payload = r#"{"resourceLogs":[{"resource":null,"scopeLogs":[{"logRecords":[{"traceId":"00000000000000000000000000000000","body":null,"attributes":null}]}]}]}"#;
        let line = &logs(payload, 100)[0];
        assert_eq!(line.trace_id, None);
        assert_eq!(line.message, "");
        assert_eq!(line.data, None);
    }

    #[test]
    fn spans_and_metrics_are_counted() {
        let spans = r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{},{}]},{"spans":[{}]}]}]}"#;
        assert!(matches!(decode(Kind::Traces, spans.as_bytes(), 10), Ok(Decoded::Traces { spans: 3 })));
        let metrics = r#"{"resource_metrics":[{"scope_metrics":[{"metrics":[{"name":"x"}]}]}]}"#;
        assert!(matches!(decode(Kind::Metrics, metrics.as_bytes(), 10), Ok(Decoded::Metrics { metrics: 1 })));
    }

    #[test]
    fn malformed_payloads_are_errors() {
        for bad in [
            "",
            "{",
            "null",
            r#"{"resourceLogs":5}"#,
            r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"attributes":[{"key":1}]}]}]}]}"#,
        ] {
            assert!(decode(Kind::Logs, bad.as_bytes(), 10).is_err(), "{bad:?}");
        }
        let deep = "[".repeat(10_000);
        assert!(decode(Kind::Traces, deep.as_bytes(), 10).is_err());
    }
}
