//! The stored form of a queued or dead-lettered message: one JSON object per message, kept in
//! the queue store under `(queue, "pending" | "dead", id)`. The caller's payload is embedded as
//! the JSON text it sent, so it is never re-encoded.

use serde::Deserialize;
use std::fmt::Write as _;
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
    #[error("stored queue record cannot be read: {0}")]
    Decode(serde_json::Error),
}

impl Record {
    /// The record's JSON text. The payload is spliced in as it is: it is JSON already (the
    /// caller's frame was checked when it was decoded), so it is neither copied into a value
    /// nor parsed again.
    pub fn encode(&self) -> String {
        fn text(out: &mut String, s: &str) {
            // Writing a string into a String cannot fail.
            out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
        }
        let mut out = String::with_capacity(self.data.len() + 160 + self.function_id.len());
        out.push_str("{\"id\":");
        text(&mut out, &self.id);
        let _ = write!(out, ",\"seq\":{},\"ns\":", self.seq);
        text(&mut out, &self.namespace);
        out.push_str(",\"function_id\":");
        text(&mut out, &self.function_id);
        out.push_str(",\"data\":");
        out.push_str(&self.data);
        for (key, value) in [("traceparent", &self.traceparent), ("baggage", &self.baggage)] {
            if let Some(value) = value {
                let _ = write!(out, ",\"{key}\":");
                text(&mut out, value);
            }
        }
        let _ = write!(out, ",\"attempts\":{},\"enqueued_at_ms\":{}", self.attempts, self.enqueued_at_ms);
        if let Some((reason, at)) = &self.dead {
            out.push_str(",\"reason\":");
            text(&mut out, reason);
            let _ = write!(out, ",\"dead_at_ms\":{at}");
        }
        out.push('}');
        out
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
            baggage: Some("k=\"v\"\n".into()),
            attempts: 2,
            enqueued_at_ms: 12,
            dead: None,
        }
    }

    #[test]
    fn a_record_reads_back_with_its_payload_text_unchanged() {
        let r = record();
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        let dead = Record { dead: Some(("boom".into(), 99)), ..record() };
        assert_eq!(Record::decode(&dead.encode()).unwrap(), dead);
    }

    #[test]
    fn junk_is_an_error_not_a_panic() {
        for junk in ["", "{", "[]", r#"{"id":1}"#, "\u{0}"] {
            assert!(Record::decode(junk).is_err(), "{junk:?}");
        }
    }
}
