//! The built-in durable queue behind `TriggerAction.Enqueue` (spec §4.5), run by the shards.
//!
//! Each queue belongs to one shard (hashed by name as groups are, see [`queue_shard`]); that
//! shard keeps its messages, delivers them through the control core (which only forwards the
//! call to the function's worker and the outcome back), retries failures with exponential
//! backoff, and moves a message to the queue's dead-letter list after its last attempt or when
//! its function has had no worker for longer than the queue's owner-wait limit.
//!
//! `state` is the bookkeeping of one queue (pure, no I/O), `records` the stored form of a
//! message, `durable` the file store behind it, `service` the per-shard task that ties them
//! to the inbox, the timers and the control core, `metrics` the per-queue counters.

pub mod durable;
pub mod metrics;
pub mod records;
pub mod service;
pub mod state;

use futures_channel::{mpsc, oneshot};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use metrics::{QueueCounters, QueueMetrics};
pub use service::{prepare, start, QueueContext};

/// The shard that owns queue `name` (groups and queues hash alike; the fixed prefix keeps a
/// queue and a stream group of the same name apart).
pub fn queue_shard(name: &str, shards: usize) -> usize {
    crate::routing::owner_shard("\u{1}queue", name, shards)
}

/// How one queue delivers and retries.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    /// Attempts in all before a failing message is dead-lettered (the reference's `max_retries`).
    pub max_attempts: u32,
    /// Messages delivered at once; 1 delivers strictly in enqueue order.
    pub concurrency: u32,
    /// Wait before the first retry; doubled for each further one, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How long a message may wait for its function to have a worker before it is dead-lettered.
    pub max_owner_wait: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            max_attempts: 3,
            concurrency: 10,
            backoff: Duration::from_millis(1000),
            max_backoff: Duration::from_secs(60),
            max_owner_wait: Duration::from_secs(24 * 3600),
        }
    }
}

impl QueueSettings {
    /// Wait before the attempt that follows `failed` failed attempts (at least 1).
    pub fn backoff_after(&self, failed: u32) -> Duration {
        let doublings = failed.saturating_sub(1).min(32);
        self.backoff.saturating_mul(1u32 << doublings.min(31)).min(self.max_backoff.max(self.backoff))
    }
}

/// Where a file-backed queue store lives and when its writes count as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueStoreSettings {
    /// One `shard-<index>` directory per shard under this one.
    pub root: PathBuf,
    pub segment_size: u64,
    pub compaction_threshold: f64,
    /// `None`: acknowledged at once (`durability: none`); `Some(gather)`: after an fdatasync,
    /// gathering enqueues for at most `gather` (zero for `always`).
    pub commit: Option<Duration>,
}

/// The queue module's settings, as every shard sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueModuleSettings {
    /// Queues named in the config; others get `default`.
    pub queues: HashMap<String, QueueSettings>,
    pub default: QueueSettings,
    /// `None`: messages are kept in memory only (lost on restart).
    pub store: Option<QueueStoreSettings>,
    /// Bytes of message payloads one shard keeps (queued and dead-lettered); an enqueue past it
    /// is refused with `enqueue_error`.
    pub max_bytes_per_shard: usize,
    /// Longest queue name.
    pub max_name_bytes: usize,
    /// How often a message whose function has no worker is tried again.
    pub owner_probe: Duration,
}

impl Default for QueueModuleSettings {
    fn default() -> Self {
        QueueModuleSettings {
            queues: HashMap::new(),
            default: QueueSettings::default(),
            store: None,
            max_bytes_per_shard: 256 << 20,
            max_name_bytes: 256,
            owner_probe: Duration::from_millis(200),
        }
    }
}

impl QueueModuleSettings {
    pub fn for_queue(&self, name: &str) -> &QueueSettings {
        self.queues.get(name).unwrap_or(&self.default)
    }
}

/// A message to enqueue.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The receipt id given to the caller; the message's id from then on.
    pub id: String,
    pub queue: String,
    pub namespace: String,
    pub function_id: String,
    /// The caller's payload, as the JSON text it sent.
    pub data: Arc<str>,
    pub traceparent: Option<String>,
    pub baggage: Option<String>,
}

/// What the control core asks a queue's shard.
pub enum QueueMsg {
    /// Store a message; answered once it is stored (durable, for a file store that syncs).
    Enqueue { message: NewMessage, reply: oneshot::Sender<Result<(), String>> },
    /// Move dead-lettered messages back to the queue: one by id, or all (`None`). Answers how
    /// many moved.
    Redrive { queue: String, id: Option<String>, reply: oneshot::Sender<Result<u64, String>> },
    /// Delete a dead-lettered message. Answers how many were deleted (0 or 1).
    Discard { queue: String, id: String, reply: oneshot::Sender<Result<u64, String>> },
    /// Dead-lettered messages of a queue, oldest first.
    DeadLetters { queue: String, offset: usize, limit: usize, reply: oneshot::Sender<Vec<Value>> },
    /// Depth, in-flight and dead-letter counts of this shard's queues.
    Stats { reply: oneshot::Sender<Vec<Value>> },
}

/// How one delivery ended, as the control core saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum CallOutcome {
    Done,
    /// The function ran and failed: `(code, message)`. Counts as an attempt.
    Failed(String, String),
    /// No worker provides the function now (or its worker left during the call): the message
    /// waits for one, without using an attempt.
    NoOwner,
    /// The engine is stopping: the message stays queued.
    Shutdown,
}

/// A delivery the control core runs for a shard: call `function_id` with `data`.
pub struct QueueCall {
    pub queue: String,
    pub namespace: String,
    pub function_id: String,
    pub data: Arc<str>,
    pub traceparent: Option<String>,
    pub baggage: Option<String>,
    pub reply: oneshot::Sender<CallOutcome>,
}

pub type QueueSender = mpsc::UnboundedSender<QueueMsg>;
pub type QueueCallSender = mpsc::UnboundedSender<QueueCall>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = QueueSettings { backoff: Duration::from_millis(100), max_backoff: Duration::from_millis(350), ..Default::default() };
        assert_eq!(s.backoff_after(1), Duration::from_millis(100));
        assert_eq!(s.backoff_after(2), Duration::from_millis(200));
        assert_eq!(s.backoff_after(3), Duration::from_millis(350));
        assert_eq!(s.backoff_after(40), Duration::from_millis(350));
    }

    #[test]
    fn queues_spread_and_stay_put() {
        assert_eq!(queue_shard("orders", 4), queue_shard("orders", 4));
        assert!(queue_shard("orders", 3) < 3);
    }
}
