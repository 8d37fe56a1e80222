//! What a shard is configured with: plain, validated values (limits, timeouts, the store and how
//! writes are committed). The engine builds one `ShardConfig` from its config file at boot; the
//! shard never sees the file's format.

use std::path::PathBuf;
use std::time::Duration;

/// Everything a shard core reads from the configuration.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub store: StoreSettings,
    /// Largest item value `stream::set`/`update` store (JSON text bytes).
    pub max_value_bytes: usize,
    /// Subscriber connections one shard serves; more are refused with 503.
    pub max_connections: usize,
    /// Bytes that may wait in one subscriber's outbound queue; past it the subscriber is closed
    /// (4008 `slow subscriber`).
    pub max_queue_bytes: usize,
    /// A subscriber holding bytes whose socket takes none of them this long is closed like one
    /// past `max_queue_bytes`; `None`: no timer (the byte bound still applies).
    pub slow_subscriber_timeout: Option<Duration>,
    pub subscriber: SubscriberLimits,
    pub auth: AuthSettings,
}

/// Limits of one subscriber connection.
#[derive(Debug, Clone)]
pub struct SubscriberLimits {
    /// Largest frame (reassembled message) a subscriber may send.
    pub max_frame_bytes: usize,
    pub max_subscriptions: usize,
    /// Longest subscription, stream, group or item id.
    pub max_id_bytes: usize,
    /// How often an idle subscriber is pinged; `None`: no pings.
    pub ping_interval: Option<Duration>,
    /// A pinged subscriber that sends nothing this long is closed.
    pub ping_timeout: Duration,
    /// `stream:join`/`stream:leave` trigger runs one connection may have in flight (at least 1).
    pub max_pending_triggers: usize,
    /// Limit on one `stream:join`/`stream:leave` trigger call.
    pub trigger_timeout: Duration,
}

/// The auth function called on every subscriber upgrade.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// `None`: no auth function; every upgrade is accepted with a `null` context.
    pub function_id: Option<String>,
    /// Refuse (401) an upgrade whose auth call fails or returns no context.
    pub required: bool,
    /// Limit on one auth call.
    pub timeout: Duration,
}

/// Where a shard keeps its groups and how writes become durable.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub location: StoreLocation,
    pub commit: CommitMode,
}

/// Where items are kept.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    Memory,
    /// The file store: one directory per shard (`shard-<index>`) under `root`.
    File { root: PathBuf, segment_size: u64, compaction_threshold: f64 },
    /// The `redis` adapter: items in Redis at `url`, shared with other nodes; the shard's memory
    /// store mirrors only the groups it has subscribers of.
    Redis { url: crate::redis::RedisUrl, max_waiting_joins: usize },
}

/// When a write is acknowledged (and its event published).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMode {
    /// At once (the memory store, or a file store with `durability: none`).
    Immediate,
    /// After an fdatasync shared by every write applied while it gathers (at most `gather`; zero
    /// for `durability: always`).
    Group { gather: Duration },
}

impl StoreSettings {
    /// An in-memory store (acknowledged at once).
    pub fn memory() -> Self {
        StoreSettings { location: StoreLocation::Memory, commit: CommitMode::Immediate }
    }

    /// Whether acknowledgements wait for the disk.
    pub fn needs_commit(&self) -> bool {
        matches!(self.location, StoreLocation::File { .. }) && self.commit != CommitMode::Immediate
    }
}

impl Default for SubscriberLimits {
    /// The engine's defaults (as the config file's).
    fn default() -> Self {
        SubscriberLimits {
            max_frame_bytes: 1 << 20,
            max_subscriptions: 1_024,
            max_id_bytes: 512,
            ping_interval: Some(Duration::from_secs(20)),
            ping_timeout: Duration::from_secs(20),
            max_pending_triggers: 8,
            trigger_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for ShardConfig {
    /// The engine's defaults with an in-memory store (for tests and benches).
    fn default() -> Self {
        ShardConfig {
            store: StoreSettings::memory(),
            max_value_bytes: 16 << 20,
            max_connections: 100_000,
            max_queue_bytes: 4 << 20,
            slow_subscriber_timeout: Some(Duration::from_secs(5)),
            subscriber: SubscriberLimits::default(),
            auth: AuthSettings { function_id: None, required: false, timeout: Duration::from_secs(5) },
        }
    }
}
