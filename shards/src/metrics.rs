//! The counters one shard updates (relaxed atomics). The engine renders them on `/metrics`.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

/// Counters of one shard.
#[derive(Default)]
pub struct ShardMetrics {
    pub subscribers: AtomicU64,
    pub subscriptions: AtomicU64,
    /// Events published by groups this shard owns.
    pub events_total: AtomicU64,
    /// Frames queued to this shard's subscribers.
    pub deliveries_total: AtomicU64,
    pub slow_subscriber_closes_total: AtomicU64,
    /// Bytes of item values held by this shard's store.
    pub store_bytes: AtomicU64,
    /// Bytes queued for this shard's subscribers, frames on their way to it included. Shared by
    /// every outbound queue of the shard; nothing waits on it (each queue is bounded and a
    /// stalled subscriber is closed, so no write ever waits for a subscriber that may never read).
    pub queued_bytes: Arc<AtomicUsize>,
    /// `redis` adapter: commands that could not be sent or got no usable reply, snapshot reads
    /// included.
    pub redis_errors_total: AtomicU64,
    /// `redis` adapter: events received on group channels.
    pub redis_events_received_total: AtomicU64,
    /// `redis` adapter: fresh `sync` frames sent to a group's subscribers after a gap or a lost
    /// pub/sub connection (one per group and resync).
    pub redis_resyncs_total: AtomicU64,
    /// `redis` adapter: commands sent on the shard's connections.
    pub redis_commands_total: AtomicU64,
    /// `redis` adapter: socket writes that carried them (commands per write = pipelining).
    pub redis_writes_total: AtomicU64,
}

/// The counters of every shard, by index (a shard adds to a peer's `queued_bytes` when it sends
/// it a frame).
pub type AllShardMetrics = Arc<[ShardMetrics]>;

/// Zeroed counters for `shards` shards.
pub fn for_shards(shards: usize) -> AllShardMetrics {
    (0..shards).map(|_| ShardMetrics::default()).collect()
}
