//! The iii engine config format (`workers:` list, `${VAR:default}` interpolation), read into
//! ringcast's typed configuration. Recognised workers are validated strictly; other iii workers
//! are reported as unsupported and start nothing.

use serde::de::{DeserializeOwned, Deserializer, IgnoredAny};
use serde::{Deserialize, Serialize, Serializer};
use std::path::{Path, PathBuf};

/// The config used when no `--config` is given and `./config.yaml` does not exist.
pub const EMBEDDED_DEFAULT: &str = "\
# ringcast embedded default: worker protocol and streams on loopback, in-memory store.
workers:
  - name: iii-worker-manager
    config:
      host: 127.0.0.1
      port: 49134
  - name: iii-stream
    config:
      host: 127.0.0.1
      port: 3112
      adapter:
        name: kv
        config:
          store_method: in_memory
";

/// Why a config cannot be used. Every variant is a start-up error; `Display` is the line the
/// user sees (`error: …` from `check-config`, the log line and exit code 2 at start-up).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: std::io::Error },
    /// `${NAME}` without a default, and `NAME` is not set.
    #[error("{origin}: {variable}")]
    UnsetVariable { origin: String, variable: UnsetVariable },
    /// Not YAML, or not the layout of a config file (an unknown top-level key, a worker without
    /// a name): the parser's message, which names the line when it knows it (`line`).
    #[error("{origin}: invalid config: {message}")]
    Syntax { origin: String, line: Option<usize>, message: String },
    /// A key that `section` (e.g. `worker iii-stream`) does not have; `message` lists the
    /// keys it has.
    #[error("{origin}: {section}: {message}")]
    UnknownKey { origin: String, section: String, key: String, message: String },
    /// A value of the wrong type or out of range; `key` names it when the block is a mapping.
    #[error("{origin}: {section}: {}{message}", key.as_deref().map(|k| format!("{k}: ")).unwrap_or_default())]
    InvalidValue { origin: String, section: String, key: Option<String>, message: String },
    /// A key of the reference's `iii-worker-manager` that ringcast deliberately lacks.
    #[error("{origin}: iii-worker-manager.{key} is not supported by ringcast; remove it")]
    UnsupportedKey { origin: String, key: &'static str },
    /// An `iii-stream` adapter other than `kv` and `redis`.
    #[error("{origin}: iii-stream: adapter {name:?} is not available in this build of ringcast (available: kv, redis)")]
    UnknownAdapter { origin: String, name: String },
    /// `metrics:` that is neither a boolean nor an address (`found`, as parsed).
    #[error("{origin}: metrics must be false or \"host:port\", not {found}")]
    InvalidMetrics { origin: String, found: String },
}

/// `${NAME}` without a default where `NAME` is not set (see [`interpolate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: environment variable {name} is not set and ${{{name}}} has no default (write ${{{name}:default}})")]
pub struct UnsetVariable {
    /// 1-based line of the file.
    pub line: usize,
    pub name: String,
}

/// Everything the engine needs from the config file.
#[derive(Debug, Clone, Serialize)]
pub struct EngineConfig {
    pub worker_manager: WorkerManagerConfig,
    pub stream: Option<StreamConfig>,
    /// iii workers listed in the file that ringcast does not implement.
    pub unsupported_workers: Vec<String>,
    /// Address of the `/metrics` and `/healthz` endpoint; `None` = off (`metrics: false`).
    pub metrics: Option<String>,
    /// `iii-http-functions`: HTTP-invoked functions (on by default, loopback destinations only).
    pub http_functions: crate::http_functions::HttpFunctionsConfig,
    /// Further `iii-worker-manager` entries: extra listeners of the same engine (typically
    /// port 49135 with an `rbac` block for browsers and other untrusted workers).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_worker_managers: Vec<WorkerManagerConfig>,
    /// `iii-queue`: the built-in queue behind `TriggerAction.Enqueue` (defaults when absent).
    pub queue: crate::queue::config::QueueModuleConfig,
}

/// Where `/metrics` is served unless the config says otherwise.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// `iii-worker-manager`: the worker protocol listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerManagerConfig {
    #[serde(default = "default_worker_host")]
    pub host: String,
    #[serde(default = "default_worker_port")]
    pub port: u16,
    /// Largest WebSocket message accepted from a worker.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// A connection that has not completed its upgrade in this time is closed.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Engine-side limit on a worker-dispatched invocation; absent = no limit (as the reference).
    #[serde(default)]
    pub invocation_timeout_ms: Option<u64>,
    /// Deepest JSON nesting accepted in a frame.
    #[serde(default = "default_max_json_depth")]
    pub max_json_depth: usize,
    /// Bytes that may wait in one worker's outbox; a worker whose backlog would pass this is
    /// closed (4008 `outbox full`). A frame queued to an empty outbox is always accepted.
    #[serde(default = "default_max_outbox_bytes")]
    pub max_outbox_bytes: usize,
    /// The engine pings each worker socket this often (0 turns pings off).
    #[serde(default = "default_worker_ping_interval_ms")]
    pub ping_interval_ms: u64,
    /// A worker that sends nothing (no pong, no frame) this long after a ping is closed
    /// (1001 `ping timeout`); 0 turns pings off.
    #[serde(default = "default_worker_ping_timeout_ms")]
    pub ping_timeout_ms: u64,
    /// Worker telemetry (`/otel`): queue, log line length, optional OTLP collector.
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// Authentication and access control for this listener (see `control::rbac`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbac: Option<crate::control::rbac::RbacConfig>,
    /// Both ends of a channel must connect within this time of its creation; a channel whose
    /// peer never came is reclaimed and the end that did connect is closed (4001).
    #[serde(default = "crate::channels::default_connect_timeout_ms")]
    pub channel_connect_timeout_ms: u64,
    /// Channels that may exist at once; `engine::channels::create` beyond it is refused.
    #[serde(default = "crate::channels::default_max_channels")]
    pub max_channels: usize,
    /// Frames a channel buffers when the create call names no `buffer_size`.
    #[serde(default = "crate::channels::default_buffer_size")]
    pub channel_default_buffer_size: usize,
    /// Largest `buffer_size` (frames) a create call gets; larger requests are capped.
    #[serde(default = "crate::channels::max_buffer_size")]
    pub channel_max_buffer_size: usize,
    /// Bytes one channel buffers between its writer and its reader, whatever its `buffer_size`
    /// (one frame of any size fits an empty buffer).
    #[serde(default = "crate::channels::default_max_buffer_bytes")]
    pub channel_max_buffer_bytes: usize,
}

impl Default for WorkerManagerConfig {
    fn default() -> Self {
        WorkerManagerConfig {
            host: default_worker_host(),
            port: default_worker_port(),
            max_message_bytes: default_max_message_bytes(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            invocation_timeout_ms: None,
            max_json_depth: default_max_json_depth(),
            max_outbox_bytes: default_max_outbox_bytes(),
            ping_interval_ms: default_worker_ping_interval_ms(),
            ping_timeout_ms: default_worker_ping_timeout_ms(),
            telemetry: Default::default(),
            rbac: None,
            channel_connect_timeout_ms: crate::channels::default_connect_timeout_ms(),
            max_channels: crate::channels::default_max_channels(),
            channel_default_buffer_size: crate::channels::default_buffer_size(),
            channel_max_buffer_size: crate::channels::max_buffer_size(),
            channel_max_buffer_bytes: crate::channels::default_max_buffer_bytes(),
        }
    }
}

/// `iii-stream`: the stream module and its subscriber WebSocket.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    #[serde(default = "default_stream_host")]
    pub host: String,
    #[serde(default = "default_stream_port")]
    pub port: u16,
    #[serde(default)]
    pub auth_function: Option<String>,
    /// The store behind the stream groups. Deserialising a `StreamConfig` alone only checks
    /// the block's shape and leaves the default here; [`parse`] reads and validates it.
    #[serde(default, deserialize_with = "adapter_shape")]
    pub adapter: Adapter,
    /// Reject the upgrade with 401 when the auth function fails or returns no context
    /// (default: fail-open, as the reference).
    #[serde(default)]
    pub auth_required: bool,
    /// Limit on one auth function call.
    #[serde(default = "default_auth_timeout_ms")]
    pub auth_timeout_ms: u64,
    /// Largest frame a subscriber may send.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions_per_connection: usize,
    #[serde(default = "default_max_connections")]
    pub max_connections_per_shard: usize,
    /// Bytes that may wait in one subscriber's outbound queue.
    #[serde(default = "default_max_queue_bytes")]
    pub max_queue_bytes: usize,
    /// `slow_subscriber:`, the reference's policy for a subscriber whose queue passes
    /// `max_queue_bytes`: ringcast has one, `close` (4008 `slow subscriber`), so the key is
    /// accepted with that value only and holds nothing (public so that other modules may
    /// still build a `StreamConfig { .., ..Default::default() }`).
    #[serde(default, deserialize_with = "close_only", serialize_with = "write_close")]
    pub slow_subscriber: (),
    /// Largest item value `stream::set`/`update` store.
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: usize,
    /// A subscriber that holds bytes to write and whose socket takes none of them for this long
    /// is closed like one past `max_queue_bytes` (4008); 0 turns the timer off (the byte bound
    /// still applies).
    #[serde(default = "default_slow_subscriber_timeout_ms")]
    pub slow_subscriber_timeout_ms: u64,
    /// How often the engine pings a subscriber it has heard nothing from (0 = never; TCP
    /// keepalive still finds dead peers, in minutes).
    #[serde(default = "default_ping_interval_ms")]
    pub ping_interval_ms: u64,
    /// A subscriber that sends nothing (no pong, no frame) this long after a ping is closed.
    #[serde(default = "default_ping_timeout_ms")]
    pub ping_timeout_ms: u64,
    /// Longest subscription id, stream name, group id or item id a join or leave may carry;
    /// longer ones close the connection with 1008.
    #[serde(default = "default_max_id_bytes")]
    pub max_id_bytes: usize,
    /// `stream:join`/`stream:leave` trigger runs one connection may have in flight; when full,
    /// the connection's further frames wait (its socket is not read).
    #[serde(default = "default_max_pending_triggers")]
    pub max_pending_triggers_per_connection: usize,
    /// Limit on one `stream:join`/`stream:leave` trigger call; past it the engine stops waiting
    /// (a join then counts as authorized, as when the trigger fails).
    #[serde(default = "default_trigger_timeout_ms")]
    pub trigger_timeout_ms: u64,
}

/// `slow_subscriber: close`, the one value accepted.
fn close_only<'de, D: Deserializer<'de>>(deserializer: D) -> Result<(), D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Policy {
        Close,
    }
    Policy::deserialize(deserializer).map(|Policy::Close| ())
}

fn write_close<S: Serializer>(_: &(), serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str("close")
}

impl Default for StreamConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all stream settings have defaults")
    }
}

/// How a `kv` store acknowledges writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// fsync before acknowledging each write.
    Always,
    /// Group commit: writes arriving together share one fdatasync; none is acknowledged (or
    /// published to subscribers) before it.
    #[default]
    Batch,
    /// Acknowledge at once; a crash can lose recent writes.
    None,
}

/// Where the `kv` adapter keeps items.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreMethod {
    #[default]
    InMemory,
    FileBased,
}

/// The `iii-stream` adapter: where stream items are kept. Printed by `check-config` as the file
/// writes it (`name: kv`, `config: {…}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "name", content = "config", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Adapter {
    /// `name: kv`: in memory or the file store.
    Kv(KvConfig),
    /// `name: redis`: items and cross-node events in Redis, for several nodes.
    Redis(RedisConfig),
}

/// Settings of the `redis` adapter (`adapter: {name: redis, config: {redis_url: …}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[[user]:password@]host[:port][/db]`; `check-config` prints it without the
    /// password.
    #[serde(default = "default_redis_url", serialize_with = "url_without_password")]
    pub redis_url: String,
    /// Joins one shard holds while their groups' snapshots cannot be read (Redis down); past
    /// this a join closes its connection with 1013 "try again later" (ringcast's own key).
    #[serde(default = "default_max_waiting_joins")]
    pub max_waiting_joins: usize,
}

fn default_max_waiting_joins() -> usize {
    65_536
}

/// A `redis://` URL as printed: a password between `:` and `@` becomes `***`.
fn url_without_password<S: Serializer>(url: &str, serializer: S) -> Result<S::Ok, S::Error> {
    let masked = match url.strip_prefix("redis://").and_then(|rest| rest.split_once('@')) {
        Some((credentials, host)) => {
            let user = credentials.split_once(':').map_or("", |(user, _)| user);
            format!("redis://{user}:***@{host}")
        }
        _ => url.to_owned(),
    };
    serializer.serialize_str(&masked)
}

fn default_redis_url() -> String {
    "redis://localhost:6379".into()
}

impl Default for Adapter {
    fn default() -> Self {
        Adapter::Kv(KvConfig::default())
    }
}

/// Settings of the `kv` adapter (`adapter: {name: kv, config: …}`), validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvConfig {
    pub store_method: StoreMethod,
    /// Directory of the file store (one subdirectory per shard).
    pub file_path: String,
    pub durability: Durability,
    /// Longest a write waits for its group commit to start.
    pub batch_max_delay_us: u64,
    /// Size of a new segment file (at least 1 byte; a larger record gets a segment of its own).
    pub segment_size: u64,
    /// Dead fraction (0 to 1) of a sealed segment above which compaction rewrites it.
    pub compaction_threshold: f64,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvSettings::default().validate().expect("the kv defaults are valid")
    }
}

/// The `kv` block as written: [`KvConfig`]'s keys plus those accepted and ignored.
#[derive(Deserialize)]
#[serde(rename = "KvConfig", deny_unknown_fields, default)]
struct KvSettings {
    store_method: StoreMethod,
    file_path: String,
    /// Reference settings of its periodic flush; ringcast writes through, so they do nothing.
    save_interval_ms: Option<u64>,
    channel_size: Option<u64>,
    durability: Durability,
    batch_max_delay_us: u64,
    segment_size: u64,
    compaction_threshold: f64,
}

impl Default for KvSettings {
    fn default() -> Self {
        KvSettings {
            store_method: StoreMethod::default(),
            file_path: default_file_path(),
            save_interval_ms: None,
            channel_size: None,
            durability: Durability::default(),
            batch_max_delay_us: default_batch_max_delay_us(),
            segment_size: default_segment_size(),
            compaction_threshold: default_compaction_threshold(),
        }
    }
}

impl KvSettings {
    /// The settings as [`KvConfig`], or the key whose value cannot be used and why.
    fn validate(self) -> Result<KvConfig, (&'static str, String)> {
        if self.segment_size == 0 {
            return Err(("segment_size", "must be at least 1 byte".into()));
        }
        if !(0.0..=1.0).contains(&self.compaction_threshold) {
            return Err((
                "compaction_threshold",
                format!("must be a fraction from 0 to 1, not {}", self.compaction_threshold),
            ));
        }
        Ok(KvConfig {
            store_method: self.store_method,
            file_path: self.file_path,
            durability: self.durability,
            batch_max_delay_us: self.batch_max_delay_us,
            segment_size: self.segment_size,
            compaction_threshold: self.compaction_threshold,
        })
    }
}

fn default_file_path() -> String {
    "kv_store_data.db".into()
}
fn default_batch_max_delay_us() -> u64 {
    1_000
}
fn default_segment_size() -> u64 {
    64 << 20
}
fn default_compaction_threshold() -> f64 {
    0.5
}

impl StreamConfig {
    /// The `kv` adapter settings (the defaults when the file configures no adapter).
    /// The `kv` adapter settings (the defaults when the file configures no adapter, or another
    /// adapter).
    pub fn kv(&self) -> &KvConfig {
        static DEFAULT_KV: std::sync::OnceLock<KvConfig> = std::sync::OnceLock::new();
        match &self.adapter {
            Adapter::Kv(kv) => kv,
            Adapter::Redis(_) => DEFAULT_KV.get_or_init(KvConfig::default),
        }
    }

    /// The `redis` adapter settings, when it is the one configured.
    pub fn redis(&self) -> Option<&RedisConfig> {
        match &self.adapter {
            Adapter::Redis(redis) => Some(redis),
            Adapter::Kv(_) => None,
        }
    }
}

/// `adapter: {name, config}` as the stream block must lay it out; its content is read by
/// [`parse_adapter`].
#[derive(Deserialize)]
#[serde(rename = "AdapterConfig", deny_unknown_fields)]
#[allow(dead_code)] // only checked, not kept
struct AdapterShape {
    name: String,
    #[serde(default)]
    config: Option<IgnoredAny>,
}

/// Checks the shape of `adapter:` while the stream block is decoded (so its errors read as
/// the block's); the default stands in until [`parse_adapter`] reads it.
fn adapter_shape<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Adapter, D::Error> {
    Option::<AdapterShape>::deserialize(deserializer).map(|_| Adapter::default())
}

/// Reads and validates `adapter:` of an `iii-stream` block whose shape is already checked.
fn parse_adapter(stream_block: &serde_yaml::Value, origin: &str) -> Result<Adapter, ConfigError> {
    let Some(adapter) = stream_block.get("adapter").filter(|a| !a.is_null()) else {
        return Ok(Adapter::default());
    };
    let name = adapter.get("name").and_then(serde_yaml::Value::as_str).unwrap_or_default();
    if name == "redis" {
        return parse_redis_adapter(adapter, origin);
    }
    if name != "kv" {
        return Err(ConfigError::UnknownAdapter { origin: origin.to_owned(), name: name.to_owned() });
    }
    let section = "iii-stream: adapter kv";
    let settings: KvSettings = match adapter.get("config") {
        None | Some(serde_yaml::Value::Null) => KvSettings::default(),
        Some(block) => decode_section(block, section, origin)?,
    };
    if settings.save_interval_ms.is_some() || settings.channel_size.is_some() {
        tracing::info!("iii-stream: save_interval_ms and channel_size are accepted and ignored (ringcast writes through; see `durability`)");
    }
    let kv = settings.validate().map_err(|(key, message)| ConfigError::InvalidValue {
        origin: origin.to_owned(),
        section: section.to_owned(),
        key: Some(key.to_owned()),
        message,
    })?;
    Ok(Adapter::Kv(kv))
}

/// Reads `adapter: {name: redis, config: {redis_url}}`; the URL is checked here, so a bad one
/// is a config error naming the key.
fn parse_redis_adapter(adapter: &serde_yaml::Value, origin: &str) -> Result<Adapter, ConfigError> {
    let section = "iii-stream: adapter redis";
    let redis: RedisConfig = match adapter.get("config") {
        None | Some(serde_yaml::Value::Null) => RedisConfig { redis_url: default_redis_url(), max_waiting_joins: default_max_waiting_joins() },
        Some(block) => decode_section(block, section, origin)?,
    };
    ringcast_shards::redis::RedisUrl::parse(&redis.redis_url).map_err(|e| ConfigError::InvalidValue {
        origin: origin.to_owned(),
        section: section.to_owned(),
        key: Some("redis_url".to_owned()),
        message: e.to_string(),
    })?;
    Ok(Adapter::Redis(redis))
}

fn default_worker_host() -> String {
    "0.0.0.0".into()
}
fn default_worker_port() -> u16 {
    49134
}
fn default_stream_host() -> String {
    "0.0.0.0".into()
}
fn default_stream_port() -> u16 {
    3112
}
fn default_auth_timeout_ms() -> u64 {
    5_000
}
fn default_max_frame_bytes() -> usize {
    1 << 20
}
fn default_max_subscriptions() -> usize {
    1_024
}
fn default_max_connections() -> usize {
    100_000
}
fn default_max_queue_bytes() -> usize {
    4 << 20
}
fn default_slow_subscriber_timeout_ms() -> u64 {
    5_000
}
fn default_max_value_bytes() -> usize {
    16 << 20
}
fn default_ping_interval_ms() -> u64 {
    20_000
}
fn default_ping_timeout_ms() -> u64 {
    20_000
}
fn default_max_id_bytes() -> usize {
    512
}
fn default_max_pending_triggers() -> usize {
    8
}
fn default_trigger_timeout_ms() -> u64 {
    30_000
}
fn default_max_message_bytes() -> usize {
    64 << 20
}
fn default_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_max_json_depth() -> usize {
    128
}
fn default_max_outbox_bytes() -> usize {
    32 << 20
}
fn default_worker_ping_interval_ms() -> u64 {
    20_000
}
fn default_worker_ping_timeout_ms() -> u64 {
    20_000
}

/// Top level of the file. Unknown keys are rejected, as in the reference.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    workers: Vec<RawWorker>,
    /// Legacy name of `workers`, merged after it.
    #[serde(default)]
    modules: Vec<RawWorker>,
    #[serde(default)]
    #[allow(dead_code)]
    registration_namespace_grace_ms: Option<u64>,
    /// ringcast's own: `false`, or the `host:port` of the metrics endpoint.
    #[serde(default)]
    metrics: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    image: Option<String>,
    #[serde(default)]
    config: Option<serde_yaml::Value>,
}

/// Keys of the reference's `iii-worker-manager` that ringcast deliberately does not implement;
/// named in the error so users know it is not a typo.
const UNSUPPORTED_WORKER_MANAGER_KEYS: &[&str] = &["middleware_function_id"];

/// ringcast settings of `iii-worker-manager` that apply to the whole engine: read from the first
/// entry, refused on the others (where they would do nothing).
const ENGINE_WIDE_WORKER_MANAGER_KEYS: &[&str] = &["invocation_timeout_ms", "max_json_depth"];

/// Reads and parses a config file from disk.
pub fn load(path: &Path) -> Result<EngineConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Unreadable { path: path.to_owned(), source })?;
    parse(&text, &path.display().to_string())
}

/// Parses config text; `origin` names the file in error messages.
pub fn parse(text: &str, origin: &str) -> Result<EngineConfig, ConfigError> {
    let expanded = interpolate(text, |name| std::env::var(name).ok())
        .map_err(|variable| ConfigError::UnsetVariable { origin: origin.to_owned(), variable })?;
    let raw: RawFile = serde_yaml::from_str(&expanded).map_err(|e| ConfigError::Syntax {
        origin: origin.to_owned(),
        line: e.location().map(|l| l.line()),
        message: e.to_string(),
    })?;

    let mut worker_manager: Option<WorkerManagerConfig> = None;
    let mut extra_worker_managers = Vec::new();
    let mut stream: Option<StreamConfig> = None;
    let mut unsupported_workers = Vec::new();
    let mut http_functions = crate::http_functions::HttpFunctionsConfig::default();
    let mut queue = crate::queue::config::QueueModuleConfig::default();
    for worker in raw.workers.into_iter().chain(raw.modules) {
        let config = worker.config.unwrap_or(serde_yaml::Value::Null);
        let section = format!("worker {}", worker.name);
        match worker.name.as_str() {
            "iii-worker-manager" => {
                if let serde_yaml::Value::Mapping(map) = &config {
                    if let Some(key) = UNSUPPORTED_WORKER_MANAGER_KEYS.iter().find(|key| map.contains_key(**key)) {
                        return Err(ConfigError::UnsupportedKey { origin: origin.to_owned(), key });
                    }
                }
                let parsed: WorkerManagerConfig = decode_section(&config, &section, origin)?;
                parsed.telemetry.validate().map_err(|(key, message)| ConfigError::InvalidValue {
                    origin: origin.to_owned(),
                    section: section.clone(),
                    key: Some(format!("telemetry.{key}")),
                    message,
                })?;
                if let (Some(_), serde_yaml::Value::Mapping(map)) = (&worker_manager, &config) {
                    if let Some(key) = ENGINE_WIDE_WORKER_MANAGER_KEYS.iter().find(|key| map.contains_key(**key)) {
                        return Err(ConfigError::InvalidValue {
                            origin: origin.to_owned(),
                            section,
                            key: Some((*key).to_owned()),
                            message: "applies to the whole engine: set it on the first iii-worker-manager entry".into(),
                        });
                    }
                }
                // The first entry is the engine's port; later ones are extra listeners.
                let taken = worker_manager.iter().chain(&extra_worker_managers).any(|w| w.port == parsed.port && parsed.port != 0);
                if taken {
                    return Err(ConfigError::InvalidValue {
                        origin: origin.to_owned(),
                        section,
                        key: Some("port".into()),
                        message: format!("port {} is already used by another iii-worker-manager entry; give each listener its own port", parsed.port),
                    });
                }
                match worker_manager {
                    None => worker_manager = Some(parsed),
                    Some(_) => extra_worker_managers.push(parsed),
                }
            }
            "iii-stream" => {
                let mut parsed: StreamConfig = decode_section(&config, &section, origin)?;
                parsed.adapter = parse_adapter(&config, origin)?;
                stream = Some(parsed);
            }
            "iii-http-functions" => {
                http_functions = decode_section(&config, &section, origin)?;
                http_functions.validate().map_err(|(key, message)| ConfigError::InvalidValue {
                    origin: origin.to_owned(),
                    section: section.clone(),
                    key: Some(key.to_owned()),
                    message,
                })?;
            }
            "iii-queue" => {
                queue = decode_section(&config, &section, origin)?;
                if queue.adapter.as_ref().is_some_and(|a| a.config.is_some()) {
                    tracing::info!(
                        "iii-queue: the adapter's config is accepted and ignored: ringcast keeps queued messages beside \
                         the iii-stream store (durable when it is file_based, else in memory)"
                    );
                }
                queue.validate().map_err(|message| ConfigError::InvalidValue {
                    origin: origin.to_owned(),
                    section: section.clone(),
                    key: None,
                    message,
                })?;
            }
            other => unsupported_workers.push(other.to_string()),
        }
    }
    let metrics = match raw.metrics {
        None | Some(serde_yaml::Value::Bool(true)) => Some(DEFAULT_METRICS_ADDR.to_string()),
        Some(serde_yaml::Value::Bool(false)) => None,
        Some(serde_yaml::Value::String(addr)) => Some(addr),
        Some(other) => {
            return Err(ConfigError::InvalidMetrics { origin: origin.to_owned(), found: format!("{other:?}") })
        }
    };
    Ok(EngineConfig {
        worker_manager: worker_manager.unwrap_or_default(),
        stream,
        unsupported_workers,
        metrics,
        http_functions,
        extra_worker_managers,
        queue,
    })
}

/// Decodes one block (a worker's `config:`, the kv adapter's `config:`) named `section` in
/// errors; an absent block means all defaults.
fn decode_section<T: DeserializeOwned>(
    block: &serde_yaml::Value,
    section: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    let block = match block {
        serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
        other => other.clone(),
    };
    serde_yaml::from_value(block.clone()).map_err(|e| {
        let message = e.to_string();
        let (origin, section) = (origin.to_owned(), section.to_owned());
        // serde's own wording for a key that a struct does not have (here or in a block inside).
        let unknown = message.strip_prefix("unknown field `").and_then(|rest| rest.split_once('`'));
        match unknown {
            Some((key, _)) => ConfigError::UnknownKey { origin, section, key: key.to_owned(), message },
            None => ConfigError::InvalidValue { origin, section, key: offending_key::<T>(&block), message },
        }
    })
}

/// The key of a mapping `block` that `T` rejects. Every setting has a default, so each entry
/// can be decoded alone: the first that fails alone is the one to name.
fn offending_key<T: DeserializeOwned>(block: &serde_yaml::Value) -> Option<String> {
    let serde_yaml::Value::Mapping(map) = block else { return None };
    map.iter()
        .find(|(key, value)| {
            let alone = serde_yaml::Mapping::from_iter([((*key).clone(), (*value).clone())]);
            serde_yaml::from_value::<T>(serde_yaml::Value::Mapping(alone)).is_err()
        })
        .map(|(key, _)| match key {
            serde_yaml::Value::String(name) => name.clone(),
            other => serde_yaml::to_string(other).unwrap_or_default().trim_end().to_owned(),
        })
}

/// Expands `${NAME}` and `${NAME:default}` textually, before YAML parsing, as the reference does
/// (name: any characters but `}` and `:`; default: any characters but `}`). Full-line comments
/// are left alone so a commented-out `${UNSET}` does not stop the engine.
pub fn interpolate(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, UnsetVariable> {
    let mut out = String::with_capacity(text.len());
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let inner = &after[..end];
            let (name, default) = match inner.split_once(':') {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            match (lookup(name), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => return Err(UnsetVariable { line: index + 1, name: name.to_owned() }),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("5000".into()),
            _ => None,
        }
    }

    #[test]
    fn interpolation_uses_value_then_default() {
        assert_eq!(interpolate("p: ${PORT}", env).unwrap(), "p: 5000");
        assert_eq!(interpolate("p: ${NOPE:7}", env).unwrap(), "p: 7");
        assert_eq!(interpolate("p: ${NOPE:}", env).unwrap(), "p: ");
        assert_eq!(interpolate("a ${PORT} b ${X:y}", env).unwrap(), "a 5000 b y");
    }

    #[test]
    fn unset_variable_without_default_names_variable_and_line() {
        let err = interpolate("workers:\n  port: ${MISSING}\n", env).unwrap_err();
        assert_eq!(err, UnsetVariable { line: 2, name: "MISSING".into() });
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(err.to_string().contains("MISSING"), "{err}");
    }

    #[test]
    fn comment_lines_are_not_interpolated() {
        assert_eq!(interpolate("  # ${MISSING}\n", env).unwrap(), "  # ${MISSING}\n");
    }

    #[test]
    fn embedded_default_parses_to_loopback() {
        let config = parse(EMBEDDED_DEFAULT, "embedded").unwrap();
        assert_eq!(config.worker_manager.host, "127.0.0.1");
        assert_eq!(config.worker_manager.port, 49134);
        let stream = config.stream.unwrap();
        assert_eq!((stream.host.as_str(), stream.port), ("127.0.0.1", 3112));
    }

    #[test]
    fn unknown_workers_are_reported_not_started() {
        let config = parse(
            "workers:\n  - name: iii-http\n    config: {port: 3111}\n  - name: iii-cron\n",
            "t",
        )
        .unwrap();
        assert_eq!(config.unsupported_workers, vec!["iii-http", "iii-cron"]);
        assert!(config.stream.is_none());
    }

    #[test]
    fn unknown_key_in_recognised_worker_is_an_error() {
        let err = parse(
            "workers:\n  - name: iii-worker-manager\n    config: {prot: 1}\n",
            "t",
        )
        .unwrap_err();
        assert!(matches!(&err, ConfigError::UnknownKey { key, .. } if key == "prot"), "{err:?}");
        assert!(err.to_string().contains("prot"), "{err}");
        assert!(err.to_string().contains("iii-worker-manager"), "{err}");
    }

    #[test]
    fn middleware_is_refused_explicitly() {
        let err = parse(
            "workers:\n  - name: iii-worker-manager\n    config: {middleware_function_id: m::w}\n",
            "t",
        )
        .unwrap_err();
        assert!(matches!(err, ConfigError::UnsupportedKey { key: "middleware_function_id", .. }), "{err:?}");
        assert!(err.to_string().contains("not supported"), "{err}");
    }

    #[test]
    fn a_second_worker_manager_is_an_extra_listener_with_its_rbac_block() {
        let config = parse(
            "workers:\n  - name: iii-worker-manager\n    config: {port: 49134}\n  - name: iii-worker-manager\n    config:\n      port: 49135\n      rbac:\n        auth_function_id: app::auth\n        expose_functions:\n          - match(\"api::*\")\n          - metadata: {public: true}\n",
            "t",
        )
        .unwrap();
        assert_eq!(config.worker_manager.port, 49134);
        assert!(config.worker_manager.rbac.is_none());
        assert!(config.unsupported_workers.is_empty());
        let [extra] = config.extra_worker_managers.as_slice() else { panic!("one extra listener") };
        assert_eq!(extra.port, 49135);
        let rbac = extra.rbac.as_ref().expect("the rbac block");
        assert_eq!(rbac.auth_function_id.as_deref(), Some("app::auth"));
        assert_eq!(rbac.expose_functions.len(), 2);
        // check-config prints it back in the form it was written.
        let printed = serde_yaml::to_string(&config).unwrap();
        assert!(printed.contains("match(\"api::*\")"), "{printed}");
    }

    #[test]
    fn two_worker_managers_on_one_port_and_bad_rbac_blocks_are_refused() {
        let err = parse(
            "workers:\n  - name: iii-worker-manager\n    config: {port: 5}\n  - name: iii-worker-manager\n    config: {port: 5}\n",
            "t",
        )
        .unwrap_err();
        assert!(matches!(&err, ConfigError::InvalidValue { key: Some(k), .. } if k == "port"), "{err:?}");
        let err = parse(
            "workers:\n  - name: iii-worker-manager\n  - name: iii-worker-manager\n    config: {port: 6, invocation_timeout_ms: 5}\n",
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("invocation_timeout_ms: applies to the whole engine"), "{err}");
        let err = parse("workers:\n  - name: iii-worker-manager\n    config: {rbac: {auth_fn: x}}\n", "t").unwrap_err();
        assert!(err.to_string().contains("auth_fn"), "{err}");
        let err = parse("workers:\n  - name: iii-worker-manager\n    config: {rbac: {expose_functions: [\"api::*\"]}}\n", "t").unwrap_err();
        assert!(err.to_string().contains("match(\"pattern\")"), "{err}");
    }

    #[test]
    fn legacy_modules_list_is_merged() {
        let config = parse(
            "modules:\n  - name: iii-worker-manager\n    config: {port: 1234}\n",
            "t",
        )
        .unwrap();
        assert_eq!(config.worker_manager.port, 1234);
    }

    #[test]
    fn metrics_default_on_and_can_be_turned_off_or_moved() {
        assert_eq!(parse("workers: []\n", "t").unwrap().metrics.as_deref(), Some(DEFAULT_METRICS_ADDR));
        assert_eq!(parse("metrics: false\n", "t").unwrap().metrics, None);
        assert_eq!(parse("metrics: 127.0.0.1:9999\n", "t").unwrap().metrics.as_deref(), Some("127.0.0.1:9999"));
        let err = parse("metrics: 5\n", "t").unwrap_err();
        assert!(matches!(err, ConfigError::InvalidMetrics { .. }), "{err:?}");
        assert_eq!(err.to_string(), "t: metrics must be false or \"host:port\", not Number(5)");
    }

    #[test]
    fn kv_adapter_settings_are_checked_at_parse_time() {
        let text = "workers:\n  - name: iii-stream\n    config:\n      adapter:\n        name: kv\n        config: {store_method: file_based, file_path: /tmp/x, durability: always, save_interval_ms: 5000}\n";
        let stream = parse(text, "t").unwrap().stream.unwrap();
        let kv = stream.kv();
        assert_eq!((kv.store_method, kv.durability), (StoreMethod::FileBased, Durability::Always));
        assert!(parse(&text.replace("always", "sometimes"), "t").is_err());
        assert!(parse(&text.replace("name: kv", "name: bridge"), "t").unwrap_err().to_string().contains("not available"));
        let defaults = StreamConfig::default();
        let defaults = defaults.kv();
        assert_eq!((defaults.store_method, defaults.durability, defaults.batch_max_delay_us), (StoreMethod::InMemory, Durability::Batch, 1000));
    }

    #[test]
    fn unknown_top_level_key_is_an_error() {
        assert!(parse("wrokers: []\n", "t").is_err());
    }

    /// A config with one `iii-stream` worker whose kv adapter block is `kv` (flow style).
    fn with_kv(kv: &str) -> String {
        format!("workers:\n  - name: iii-stream\n    config:\n      adapter:\n        name: kv\n        config: {kv}\n")
    }

    fn kv_of(text: &str) -> KvConfig {
        parse(text, "t").unwrap().stream.unwrap().kv().clone()
    }

    #[test]
    fn kv_defaults_apply_without_adapter_block_or_config() {
        let expected = KvConfig {
            store_method: StoreMethod::InMemory,
            file_path: "kv_store_data.db".into(),
            durability: Durability::Batch,
            batch_max_delay_us: 1_000,
            segment_size: 64 << 20,
            compaction_threshold: 0.5,
        };
        assert_eq!(KvConfig::default(), expected);
        assert_eq!(kv_of("workers:\n  - name: iii-stream\n"), expected);
        assert_eq!(kv_of("workers:\n  - name: iii-stream\n    config: {adapter: null}\n"), expected);
        assert_eq!(kv_of("workers:\n  - name: iii-stream\n    config:\n      adapter: {name: kv}\n"), expected);
        assert_eq!(kv_of(&with_kv("{}")), expected);
    }

    #[test]
    fn every_kv_key_is_read() {
        let kv = kv_of(&with_kv(
            "{store_method: file_based, file_path: data, durability: none, batch_max_delay_us: 7, segment_size: 4096, compaction_threshold: 0.25}",
        ));
        assert_eq!(
            kv,
            KvConfig {
                store_method: StoreMethod::FileBased,
                file_path: "data".into(),
                durability: Durability::None,
                batch_max_delay_us: 7,
                segment_size: 4096,
                compaction_threshold: 0.25,
            }
        );
        // Accepted and ignored (ringcast writes through).
        assert_eq!(kv_of(&with_kv("{save_interval_ms: 5000, channel_size: 64}")), KvConfig::default());
    }

    #[test]
    fn an_invalid_durability_names_the_key() {
        let err = parse(&with_kv("{durability: sometimes}"), "t").unwrap_err();
        assert!(
            matches!(&err, ConfigError::InvalidValue { key: Some(key), section, .. } if key == "durability" && section == "iii-stream: adapter kv"),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("t: iii-stream: adapter kv: durability: unknown variant `sometimes`"), "{err}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_key() {
        let err = parse(&with_kv("{store_method: file_based, segment_size: big}"), "t").unwrap_err();
        assert!(matches!(&err, ConfigError::InvalidValue { key: Some(key), .. } if key == "segment_size"), "{err:?}");
        assert!(err.to_string().contains("segment_size: invalid type"), "{err}");
        let err = parse("workers:\n  - name: iii-worker-manager\n    config: {host: h, port: abc}\n", "t").unwrap_err();
        assert_eq!(err.to_string(), "t: worker iii-worker-manager: port: invalid type: string \"abc\", expected u16");
        // A block that is not a mapping has no key to name.
        let err = parse(&with_kv("5"), "t").unwrap_err();
        assert!(matches!(&err, ConfigError::InvalidValue { key: None, .. }), "{err:?}");
    }

    #[test]
    fn out_of_range_kv_values_are_refused() {
        let err = parse(&with_kv("{compaction_threshold: 1.5}"), "t").unwrap_err();
        assert!(matches!(&err, ConfigError::InvalidValue { key: Some(key), .. } if key == "compaction_threshold"), "{err:?}");
        assert!(err.to_string().contains("compaction_threshold: must be a fraction"), "{err}");
        let err = parse(&with_kv("{segment_size: 0}"), "t").unwrap_err();
        assert!(matches!(&err, ConfigError::InvalidValue { key: Some(key), .. } if key == "segment_size"), "{err:?}");
    }

    #[test]
    fn redis_adapter_in_the_iii_form_with_env_defaults() {
        let text = "workers:\n  - name: iii-stream\n    config:\n      adapter:\n        name: redis\n        config:\n          redis_url: ${RC_TEST_UNSET_REDIS_URL:redis://localhost:6379}\n";
        let stream = parse(text, "t").unwrap().stream.unwrap();
        assert_eq!(stream.redis().map(|r| r.redis_url.as_str()), Some("redis://localhost:6379"));
        let bare = parse("workers:\n  - name: iii-stream\n    config:\n      adapter: {name: redis}\n", "t").unwrap().stream.unwrap();
        assert_eq!(bare.redis().map(|r| r.redis_url.as_str()), Some("redis://localhost:6379"));
        // The reference schema's stale key `url` is refused, as there.
        let err = parse(&text.replace("redis_url:", "url:"), "t").unwrap_err();
        assert!(matches!(&err, ConfigError::UnknownKey { key, .. } if key == "url"), "{err:?}");
        let secret = parse(&text.replace("redis://localhost:6379", "redis://app:s3cret@db:6380/2"), "t").unwrap();
        let printed = serde_yaml::to_string(&secret).unwrap();
        assert!(printed.contains("redis://app:***@db:6380/2") && !printed.contains("s3cret"), "{printed}");
        let err = parse(&text.replace("redis://localhost:6379", "localhost:6379"), "t").unwrap_err();
        assert!(matches!(&err, ConfigError::InvalidValue { key: Some(key), .. } if key == "redis_url"), "{err:?}");
    }

    #[test]
    fn unknown_kv_key_and_unknown_adapter_are_typed() {
        let err = parse(&with_kv("{segmnt_size: 1}"), "t").unwrap_err();
        assert!(matches!(&err, ConfigError::UnknownKey { key, .. } if key == "segmnt_size"), "{err:?}");
        assert!(err.to_string().starts_with("t: iii-stream: adapter kv: unknown field `segmnt_size`, expected one of"), "{err}");
        let err = parse(&with_kv("{}").replace("name: kv", "name: bridge"), "t").unwrap_err();
        assert!(matches!(&err, ConfigError::UnknownAdapter { name, .. } if name == "bridge"), "{err:?}");
        // The adapter block's own layout is checked with the stream block.
        let err = parse("workers:\n  - name: iii-stream\n    config:\n      adapter: {nme: kv}\n", "t").unwrap_err();
        assert!(matches!(&err, ConfigError::UnknownKey { key, .. } if key == "nme"), "{err:?}");
    }

    #[test]
    fn slow_subscriber_accepts_close_only() {
        let stream = |policy: &str| parse(&format!("workers:\n  - name: iii-stream\n    config: {{slow_subscriber: {policy}}}\n"), "t");
        assert!(stream("close").is_ok());
        let err = stream("drop").unwrap_err();
        assert!(matches!(&err, ConfigError::InvalidValue { key: Some(key), .. } if key == "slow_subscriber"), "{err:?}");
        assert!(err.to_string().contains("expected `close`"), "{err}");
    }

    #[test]
    fn syntax_unreadable_and_unset_variable_errors_are_typed() {
        let err = parse("workers: [\n", "t").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { line: Some(2), .. }), "{err:?}");
        assert!(err.to_string().starts_with("t: invalid config: "), "{err}");
        let err = parse("wrokers: []\n", "t").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }) && err.to_string().contains("wrokers"), "{err:?}");
        let err = load(Path::new("/nonexistent/ringcast.yaml")).unwrap_err();
        assert!(matches!(err, ConfigError::Unreadable { .. }), "{err:?}");
        assert!(err.to_string().starts_with("cannot read config file /nonexistent/ringcast.yaml: "), "{err}");
        let err = parse("a: ${RINGCAST_TEST_SURELY_UNSET}\n", "t").unwrap_err();
        assert!(matches!(&err, ConfigError::UnsetVariable { variable, .. } if variable.line == 1 && variable.name == "RINGCAST_TEST_SURELY_UNSET"), "{err:?}");
        assert!(err.to_string().starts_with("t: line 1: environment variable RINGCAST_TEST_SURELY_UNSET is not set"), "{err}");
    }

    #[test]
    fn effective_config_prints_the_adapter_as_written() {
        let text = serde_yaml::to_string(&parse(&with_kv("{store_method: file_based}"), "t").unwrap()).unwrap();
        assert!(text.contains("adapter:\n    name: kv\n    config:\n      store_method: file_based\n"), "{text}");
        assert!(text.contains("slow_subscriber: close\n"), "{text}");
    }
}
