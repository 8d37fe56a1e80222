//! Builds the shards' `ShardConfig` from the parsed `iii-stream` section, once at boot: the
//! shards get plain, validated values and never see the config file's format.

use crate::config::{Durability, StoreMethod, StreamConfig};
use ringcast_shards::config::{AuthSettings, CommitMode, ShardConfig, StoreLocation, StoreSettings, SubscriberLimits};
use std::path::PathBuf;
use std::time::Duration;

/// `Some(d)` for a positive number of milliseconds, `None` for 0 (the setting's "off").
fn millis_or_off(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// The shard configuration the `iii-stream` section describes (its `kv` adapter included).
pub fn shard_config(stream: &StreamConfig) -> ShardConfig {
    let kv = stream.kv();
    let redis = stream.redis().and_then(|r| Some((ringcast_shards::redis::RedisUrl::parse(&r.redis_url).ok()?, r.max_waiting_joins)));
    let location = match (&redis, kv.store_method) {
        // The URL was checked when the config was parsed.
        (Some((url, max_waiting_joins)), _) => StoreLocation::Redis { url: url.clone(), max_waiting_joins: *max_waiting_joins },
        (None, StoreMethod::InMemory) => StoreLocation::Memory,
        (None, StoreMethod::FileBased) => StoreLocation::File {
            root: PathBuf::from(&kv.file_path),
            segment_size: kv.segment_size,
            compaction_threshold: kv.compaction_threshold,
        },
    };
    // Only a file store waits for the disk; `durability` does nothing in memory.
    let commit = match (kv.store_method, kv.durability) {
        _ if redis.is_some() => CommitMode::Immediate,
        (StoreMethod::InMemory, _) | (_, Durability::None) => CommitMode::Immediate,
        (StoreMethod::FileBased, Durability::Always) => CommitMode::Group { gather: Duration::ZERO },
        (StoreMethod::FileBased, Durability::Batch) => CommitMode::Group { gather: Duration::from_micros(kv.batch_max_delay_us) },
    };
    ShardConfig {
        store: StoreSettings { location, commit },
        max_value_bytes: stream.max_value_bytes,
        max_connections: stream.max_connections_per_shard,
        max_queue_bytes: stream.max_queue_bytes,
        slow_subscriber_timeout: millis_or_off(stream.slow_subscriber_timeout_ms),
        subscriber: SubscriberLimits {
            max_frame_bytes: stream.max_frame_bytes,
            max_subscriptions: stream.max_subscriptions_per_connection,
            max_id_bytes: stream.max_id_bytes,
            ping_interval: millis_or_off(stream.ping_interval_ms),
            ping_timeout: Duration::from_millis(stream.ping_timeout_ms),
            max_pending_triggers: stream.max_pending_triggers_per_connection.max(1),
            trigger_timeout: Duration::from_millis(stream.trigger_timeout_ms),
        },
        auth: AuthSettings {
            function_id: stream.auth_function.clone(),
            required: stream.auth_required,
            timeout: Duration::from_millis(stream.auth_timeout_ms),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_section(yaml: &str) -> StreamConfig {
        let text = format!("workers:\n  - name: iii-stream\n    config:\n{yaml}");
        crate::config::parse(&text, "t").unwrap().stream.unwrap()
    }

    #[test]
    fn defaults_are_an_in_memory_store_acknowledged_at_once() {
        let config = shard_config(&StreamConfig::default());
        assert!(matches!(config.store.location, StoreLocation::Memory));
        assert_eq!(config.store.commit, CommitMode::Immediate);
        assert!(!config.store.needs_commit());
        assert_eq!(config.slow_subscriber_timeout, Some(Duration::from_secs(5)));
        assert_eq!(config.subscriber.ping_interval, Some(Duration::from_secs(20)));
    }

    #[test]
    fn durability_becomes_the_commit_mode_of_a_file_store() {
        let file = |durability: &str| {
            let section = stream_section(&format!(
                "      adapter:\n        name: kv\n        config: {{store_method: file_based, file_path: /tmp/x, durability: {durability}, batch_max_delay_us: 250}}\n"
            ));
            shard_config(&section).store
        };
        assert_eq!(file("batch").commit, CommitMode::Group { gather: Duration::from_micros(250) });
        assert_eq!(file("always").commit, CommitMode::Group { gather: Duration::ZERO });
        assert_eq!(file("none").commit, CommitMode::Immediate);
        assert!(file("batch").needs_commit() && !file("none").needs_commit());
    }

    #[test]
    fn zero_turns_timers_off_and_trigger_slots_stay_at_least_one() {
        let section = stream_section("      slow_subscriber_timeout_ms: 0\n      ping_interval_ms: 0\n      max_pending_triggers_per_connection: 0\n");
        let config = shard_config(&section);
        assert_eq!((config.slow_subscriber_timeout, config.subscriber.ping_interval), (None, None));
        assert_eq!(config.subscriber.max_pending_triggers, 1);
    }
}
