//! `iii-queue`: the reference's queue module config (`queue_configs` per queue, `adapter`),
//! read into checked settings for the shards. ringcast runs the queue itself; its extras are
//! optional and have defaults.

use crate::config::{Durability, StoreMethod, StreamConfig};
use ringcast_shards::queue::{QueueModuleSettings, QueueSettings, QueueStoreSettings};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// One queue's settings as the config writes them (the reference's `FunctionQueueConfig`
/// keys, then ringcast's).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueEntry {
    /// Attempts in all before a failing message is dead-lettered (the reference's name).
    pub max_retries: u32,
    /// Messages delivered at once; 1 delivers in enqueue order.
    pub concurrency: u32,
    /// `standard` or `fifo` (delivered one at a time, in order).
    #[serde(rename = "type")]
    pub kind: String,
    /// Required by the reference for `fifo`; ringcast orders the whole queue, so it is only checked.
    pub message_group_field: Option<String>,
    /// First retry delay; doubled for each further attempt up to `max_backoff_ms`.
    pub backoff_ms: u64,
    /// Accepted for compatibility; ringcast delivers on arrival and does not poll.
    pub poll_interval_ms: u64,
    /// ringcast: longest retry delay.
    pub max_backoff_ms: u64,
    /// ringcast: how long a message may wait for its function to have a worker before it is
    /// dead-lettered.
    pub max_owner_wait_ms: u64,
}

impl Default for QueueEntry {
    fn default() -> Self {
        QueueEntry {
            max_retries: 3,
            concurrency: 10,
            kind: "standard".to_string(),
            message_group_field: None,
            backoff_ms: 1000,
            poll_interval_ms: 100,
            max_backoff_ms: 60_000,
            max_owner_wait_ms: 86_400_000,
        }
    }
}

/// The `adapter:` of `iii-queue`: only the built-in queue exists in ringcast.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueAdapter {
    pub name: String,
    #[serde(default, skip_serializing)]
    pub config: Option<serde_yaml::Value>,
}

/// `iii-queue`'s `config:` block.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueModuleConfig {
    pub adapter: Option<QueueAdapter>,
    pub queue_configs: BTreeMap<String, QueueEntry>,
    /// ringcast: settings of queues not listed in `queue_configs`.
    pub default_queue: QueueEntry,
    /// ringcast: payload bytes one shard keeps in its queues (waiting and dead-lettered);
    /// an enqueue past it gets `enqueue_error`.
    pub max_queued_bytes_per_shard: usize,
    /// ringcast: how often a message whose function has no worker is tried again.
    pub owner_probe_ms: u64,
}

impl Default for QueueModuleConfig {
    fn default() -> Self {
        QueueModuleConfig {
            adapter: None,
            queue_configs: BTreeMap::new(),
            default_queue: QueueEntry::default(),
            max_queued_bytes_per_shard: 256 << 20,
            owner_probe_ms: 200,
        }
    }
}

/// Adapter names that mean the built-in queue.
const BUILTIN_ADAPTERS: &[&str] = &["builtin", "modules::queue::BuiltinQueueAdapter"];

impl QueueModuleConfig {
    /// Checks what serde cannot: the adapter, each queue's type, numbers that must be positive.
    /// The error names the queue and key.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(adapter) = &self.adapter {
            if !BUILTIN_ADAPTERS.contains(&adapter.name.as_str()) {
                return Err(format!(
                    "adapter {:?} is not available in ringcast (it runs the built-in queue: name it `builtin` or leave `adapter` out)",
                    adapter.name
                ));
            }
        }
        let entries = self.queue_configs.iter().map(|(n, e)| (n.as_str(), e)).chain([("default_queue", &self.default_queue)]);
        for (name, entry) in entries {
            match entry.kind.as_str() {
                "standard" => {}
                "fifo" if entry.message_group_field.is_none() => {
                    return Err(format!("queue {name:?} is of type 'fifo' but 'message_group_field' is not set"))
                }
                "fifo" => {}
                other => return Err(format!("queue {name:?} has type {other:?}; it must be 'standard' or 'fifo'")),
            }
            if entry.concurrency == 0 {
                return Err(format!("queue {name:?}: concurrency must be at least 1"));
            }
            if entry.max_retries == 0 {
                return Err(format!("queue {name:?}: max_retries must be at least 1 (it counts every attempt)"));
            }
        }
        Ok(())
    }
}

fn settings_of(entry: &QueueEntry) -> QueueSettings {
    QueueSettings {
        max_attempts: entry.max_retries.max(1),
        // fifo: one at a time, as the reference consumes fifo queues.
        concurrency: if entry.kind == "fifo" { 1 } else { entry.concurrency.max(1) },
        backoff: Duration::from_millis(entry.backoff_ms),
        max_backoff: Duration::from_millis(entry.max_backoff_ms.max(entry.backoff_ms)),
        max_owner_wait: Duration::from_millis(entry.max_owner_wait_ms),
    }
}

/// The shards' queue settings: the queue config, and where messages are kept — next to the
/// stream store when it is `file_based` (its `queues/` subdirectory, same durability), else in
/// memory.
pub fn module_settings(queue: &QueueModuleConfig, stream: Option<&StreamConfig>) -> QueueModuleSettings {
    let store = stream.map(StreamConfig::kv).filter(|kv| kv.store_method == StoreMethod::FileBased).map(|kv| QueueStoreSettings {
        root: PathBuf::from(&kv.file_path).join("queues"),
        segment_size: kv.segment_size.min(8 << 20),
        compaction_threshold: kv.compaction_threshold,
        commit: match kv.durability {
            Durability::None => None,
            Durability::Always => Some(Duration::ZERO),
            Durability::Batch => Some(Duration::from_micros(kv.batch_max_delay_us)),
        },
    });
    QueueModuleSettings {
        queues: queue.queue_configs.iter().map(|(name, entry)| (name.clone(), settings_of(entry))).collect(),
        default: settings_of(&queue.default_queue),
        store,
        max_bytes_per_shard: queue.max_queued_bytes_per_shard,
        max_name_bytes: 256,
        owner_probe: Duration::from_millis(queue.owner_probe_ms.max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<crate::config::EngineConfig, crate::config::ConfigError> {
        crate::config::parse(&format!("workers:\n  - name: iii-queue\n    config:\n{yaml}"), "t")
    }

    #[test]
    fn the_reference_keys_are_accepted_with_its_defaults() {
        let config = parse(
            "      adapter: {name: builtin}\n      queue_configs:\n        orders: {max_retries: 5, concurrency: 1, type: standard, backoff_ms: 50, poll_interval_ms: 100}\n        pay: {type: fifo, message_group_field: tx}\n",
        )
        .unwrap();
        assert!(!config.unsupported_workers.iter().any(|w| w == "iii-queue"));
        let settings = module_settings(&config.queue, None);
        let orders = settings.for_queue("orders");
        assert_eq!((orders.max_attempts, orders.concurrency, orders.backoff), (5, 1, Duration::from_millis(50)));
        assert_eq!(settings.for_queue("pay").concurrency, 1, "fifo delivers one at a time");
        let other = settings.for_queue("anything");
        assert_eq!((other.max_attempts, other.concurrency, other.backoff), (3, 10, Duration::from_millis(1000)));
        assert!(settings.store.is_none(), "no file store: queues live in memory");
    }

    #[test]
    fn bad_queue_settings_are_errors_naming_the_queue() {
        for (yaml, needle) in [
            ("      queue_configs:\n        q: {type: lifo}\n", "lifo"),
            ("      queue_configs:\n        q: {type: fifo}\n", "message_group_field"),
            ("      queue_configs:\n        q: {concurrency: 0}\n", "concurrency"),
            ("      queue_configs:\n        q: {bogus: 1}\n", "bogus"),
            ("      adapter: {name: redis}\n", "redis"),
        ] {
            let err = parse(yaml).unwrap_err().to_string();
            assert!(err.contains(needle), "{yaml}: {err}");
        }
    }

    #[test]
    fn a_file_based_stream_store_makes_queues_durable_beside_it() {
        let text = "workers:\n  - name: iii-stream\n    config:\n      adapter:\n        name: kv\n        config: {store_method: file_based, file_path: ./d, durability: always}\n";
        let config = crate::config::parse(text, "t").unwrap();
        let store = module_settings(&config.queue, config.stream.as_ref()).store.unwrap();
        assert_eq!((store.root, store.commit), (PathBuf::from("./d/queues"), Some(Duration::ZERO)));
    }
}
