//! The iii engine config format (`workers:` list, `${VAR:default}` interpolation), read into
//! ringcast's typed configuration. Recognised workers are validated strictly; other iii workers
//! are reported as unsupported and start nothing.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

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

/// A configuration error, already phrased for the user.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Everything the engine needs from the config file.
#[derive(Debug, Clone, Serialize)]
pub struct EngineConfig {
    pub worker_manager: WorkerManagerConfig,
    pub stream: Option<StreamConfig>,
    /// iii workers listed in the file that ringcast does not implement.
    pub unsupported_workers: Vec<String>,
    /// Address of the `/metrics` and `/healthz` endpoint; `None` = off (`metrics: false`).
    pub metrics: Option<String>,
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
    #[serde(default)]
    pub adapter: Option<AdapterConfig>,
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
    /// What happens to a subscriber whose queue passes `max_queue_bytes`.
    #[serde(default)]
    pub slow_subscriber: SlowSubscriberPolicy,
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

/// Policy for a subscriber that cannot keep up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowSubscriberPolicy {
    /// Close it with code 4008 `slow subscriber` (counted in the log); others are unaffected.
    #[default]
    Close,
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

/// `adapter: {name: kv, config: …}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KvConfig {
    #[serde(default)]
    pub store_method: StoreMethod,
    /// Directory of the file store (one subdirectory per shard).
    #[serde(default = "default_file_path")]
    pub file_path: String,
    /// Reference settings of its periodic flush; ringcast writes through, so they do nothing.
    #[serde(default)]
    pub save_interval_ms: Option<u64>,
    #[serde(default)]
    pub channel_size: Option<u64>,
    #[serde(default)]
    pub durability: Durability,
    /// Longest a write waits for its group commit to start.
    #[serde(default = "default_batch_max_delay_us")]
    pub batch_max_delay_us: u64,
    #[serde(default = "default_segment_size")]
    pub segment_size: u64,
    /// Dead fraction of a sealed segment above which compaction rewrites it.
    #[serde(default = "default_compaction_threshold")]
    pub compaction_threshold: f64,
}

impl Default for KvConfig {
    fn default() -> Self {
        serde_yaml::from_str("{}").expect("all kv settings have defaults")
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
    /// The `kv` adapter settings (defaults when no adapter is configured).
    pub fn kv(&self) -> Result<KvConfig, ConfigError> {
        let Some(adapter) = &self.adapter else { return Ok(KvConfig::default()) };
        if adapter.name != "kv" {
            return Err(ConfigError(format!(
                "iii-stream: adapter {:?} is not available in this build of ringcast (available: kv)",
                adapter.name
            )));
        }
        match &adapter.config {
            None | Some(serde_yaml::Value::Null) => Ok(KvConfig::default()),
            Some(config) => serde_yaml::from_value(config.clone())
                .map_err(|e| ConfigError(format!("iii-stream: adapter kv: {e}"))),
        }
    }
}

/// `adapter: {name, config}` of the stream module.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    pub name: String,
    #[serde(default)]
    pub config: Option<serde_yaml::Value>,
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
const UNSUPPORTED_WORKER_MANAGER_KEYS: &[&str] = &["rbac", "middleware_function_id"];

/// Reads and parses a config file from disk.
pub fn load(path: &Path) -> Result<EngineConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(format!("cannot read config file {}: {e}", path.display()))
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses config text; `origin` names the file in error messages.
pub fn parse(text: &str, origin: &str) -> Result<EngineConfig, ConfigError> {
    let expanded = interpolate(text, |name| std::env::var(name).ok())
        .map_err(|e| ConfigError(format!("{origin}: {e}")))?;
    let raw: RawFile = serde_yaml::from_str(&expanded)
        .map_err(|e| ConfigError(format!("{origin}: invalid config: {e}")))?;

    let mut worker_manager: Option<WorkerManagerConfig> = None;
    let mut stream: Option<StreamConfig> = None;
    let mut unsupported_workers = Vec::new();
    for worker in raw.workers.into_iter().chain(raw.modules) {
        let config = worker.config.unwrap_or(serde_yaml::Value::Null);
        match worker.name.as_str() {
            "iii-worker-manager" => {
                if worker_manager.is_some() {
                    unsupported_workers.push(format!(
                        "{} (a second listener; ringcast serves one worker port)",
                        worker.name
                    ));
                    continue;
                }
                if let serde_yaml::Value::Mapping(map) = &config {
                    for key in UNSUPPORTED_WORKER_MANAGER_KEYS {
                        if map.contains_key(*key) {
                            return Err(ConfigError(format!(
                                "{origin}: iii-worker-manager.{key} is not supported by ringcast; remove it"
                            )));
                        }
                    }
                }
                worker_manager = Some(typed_section(config, &worker.name, origin)?);
            }
            "iii-stream" => {
                let parsed: StreamConfig = typed_section(config, &worker.name, origin)?;
                parsed.kv().map_err(|e| ConfigError(format!("{origin}: {e}")))?;
                stream = Some(parsed);
            }
            other => unsupported_workers.push(other.to_string()),
        }
    }
    let metrics = match raw.metrics {
        None | Some(serde_yaml::Value::Bool(true)) => Some(DEFAULT_METRICS_ADDR.to_string()),
        Some(serde_yaml::Value::Bool(false)) => None,
        Some(serde_yaml::Value::String(addr)) => Some(addr),
        Some(other) => {
            return Err(ConfigError(format!(
                "{origin}: metrics must be false or \"host:port\", not {other:?}"
            )))
        }
    };
    Ok(EngineConfig {
        worker_manager: worker_manager.unwrap_or_default(),
        stream,
        unsupported_workers,
        metrics,
    })
}

/// Decodes one worker's `config:` block; an absent block means all defaults.
fn typed_section<T: serde::de::DeserializeOwned>(
    config: serde_yaml::Value,
    worker: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    let config = match config {
        serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
        other => other,
    };
    serde_yaml::from_value(config)
        .map_err(|e| ConfigError(format!("{origin}: worker {worker}: {e}")))
}

/// Expands `${NAME}` and `${NAME:default}` textually, before YAML parsing, as the reference does
/// (name: any characters but `}` and `:`; default: any characters but `}`). Full-line comments
/// are left alone so a commented-out `${UNSET}` does not stop the engine.
pub fn interpolate(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
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
                (None, None) => {
                    return Err(format!(
                        "line {}: environment variable {name} is not set and ${{{name}}} has no default (write ${{{name}:default}})",
                        index + 1
                    ))
                }
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
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("MISSING"), "{err}");
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
        assert!(err.0.contains("prot"), "{err}");
        assert!(err.0.contains("iii-worker-manager"), "{err}");
    }

    #[test]
    fn rbac_is_refused_explicitly() {
        let err = parse(
            "workers:\n  - name: iii-worker-manager\n    config: {rbac: {}}\n",
            "t",
        )
        .unwrap_err();
        assert!(err.0.contains("not supported"), "{err}");
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
        assert!(parse("metrics: 5\n", "t").is_err());
    }

    #[test]
    fn kv_adapter_settings_are_checked_at_parse_time() {
        let text = "workers:\n  - name: iii-stream\n    config:\n      adapter:\n        name: kv\n        config: {store_method: file_based, file_path: /tmp/x, durability: always, save_interval_ms: 5000}\n";
        let kv = parse(text, "t").unwrap().stream.unwrap().kv().unwrap();
        assert_eq!((kv.store_method, kv.durability), (StoreMethod::FileBased, Durability::Always));
        assert!(parse(&text.replace("always", "sometimes"), "t").is_err());
        assert!(parse(&text.replace("name: kv", "name: redis"), "t").unwrap_err().0.contains("not available"));
        let defaults = StreamConfig::default().kv().unwrap();
        assert_eq!((defaults.store_method, defaults.durability, defaults.batch_max_delay_us), (StoreMethod::InMemory, Durability::Batch, 1000));
    }

    #[test]
    fn unknown_top_level_key_is_an_error() {
        assert!(parse("wrokers: []\n", "t").is_err());
    }
}
