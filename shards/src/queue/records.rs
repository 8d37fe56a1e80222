//! The stored form of a queued or dead-lettered message: one JSON object per message, kept in
//! the queue store under `(queue, "pending" | "dead", id)`. The caller's payload is embedded as
//! the JSON text it sent, so it is never re-encoded.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::sync::Arc;

/// Group of a queue's waiting messages in the store.
pub const PENDING: &str = "pending";
/// Group of a queue's dead-lettered messages in the store.
pub const DEAD: &str = "dead";

/// A message as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub id: String,
    /// Position in its shard's enqueue order.
    pub seq: u64,
    pub namespace: String,
    pub function_id: String,
    pub data: Arc<str>,
    pub traceparent: Option<String>,
    pub baggage: Option<String>,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When it was enqueued (milliseconds since the Unix epoch).
    pub enqueued_at_ms: u64,
    /// Dead-lettered: why, and when.
    pub dead: Option<(String, u64)>,
}

#[derive(Serialize)]
struct Out<'a> {
    id: &'a str,
    seq: u64,
    ns: &'a str,
    function_id: &'a str,
    data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baggage: Option<&'a str>,
    attempts: u32,
    enqueued_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_at_ms: Option<u64>,
}

#[derive(Deserialize)]
struct In {
    id: String,
    seq: u64,
    ns: String,
    function_id: String,
    data: Box<RawValue>,
    traceparent: Option<String>,
    baggage: Option<String>,
    attempts: u32,
    enqueued_at_ms: u64,
    reason: Option<String>,
    dead_at_ms: Option<u64>,
}

/// Why a stored record could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("the message's payload is not JSON: {0}")]
    Payload(serde_json::Error),
    #[error("stored queue record cannot be read: {0}")]
    Decode(serde_json::Error),
}

impl Record {
    /// The record's JSON text.
    pub fn encode(&self) -> Result<String, RecordError> {
        let data = RawValue::from_string(self.data.to_string()).map_err(RecordError::Payload)?;
        let out = Out {
            id: &self.id,
            seq: self.seq,
            ns: &self.namespace,
            function_id: &self.function_id,
            data: &data,
            traceparent: self.traceparent.as_deref(),
            baggage: self.baggage.as_deref(),
            attempts: self.attempts,
            enqueued_at_ms: self.enqueued_at_ms,
            reason: self.dead.as_ref().map(|(r, _)| r.as_str()),
            dead_at_ms: self.dead.as_ref().map(|(_, at)| *at),
        };
        serde_json::to_string(&out).map_err(RecordError::Decode)
    }

    /// Reads a record written by [`Record::encode`].
    pub fn decode(text: &str) -> Result<Record, RecordError> {
        let r: In = serde_json::from_str(text).map_err(RecordError::Decode)?;
        let dead = match (r.reason, r.dead_at_ms) {
            (Some(reason), at) => Some((reason, at.unwrap_or(0))),
            (None, _) => None,
        };
        Ok(Record {
            id: r.id,
            seq: r.seq,
            namespace: r.ns,
            function_id: r.function_id,
            data: Arc::from(r.data.get()),
            traceparent: r.traceparent,
            baggage: r.baggage,
            attempts: r.attempts,
            enqueued_at_ms: r.enqueued_at_ms,
            dead,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            id: "a".into(),
            seq: 7,
            namespace: "default".into(),
            function_id: "orders::process".into(),
            data: Arc::from(r#"{"n":18446744073709551616,"x":1e999}"#),
            traceparent: None,
            baggage: Some("k=v".into()),
            attempts: 2,
            enqueued_at_ms: 12,
            dead: None,
        }
    }

    #[test]
    fn a_record_reads_back_with_its_payload_text_unchanged() {
        let r = record();
        assert_eq!(Record::decode(&r.encode().unwrap()).unwrap(), r);
        let dead = Record { dead: Some(("boom".into(), 99)), ..record() };
        assert_eq!(Record::decode(&dead.encode().unwrap()).unwrap(), dead);
    }

    #[test]
    fn junk_is_an_error_not_a_panic() {
        for junk in ["", "{", "[]", r#"{"id":1}"#, "\u{0}"] {
            assert!(Record::decode(junk).is_err(), "{junk:?}");
        }
    }
}
