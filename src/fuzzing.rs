//! Entry points for the fuzz targets in `fuzz/` (not an API; hidden from the docs). Each one
//! runs a parser of network, disk or config input the way the engine calls it, so the targets
//! need no access to crate internals and a renamed parser only has to be followed here.

use ringcast_shards::subscriber::{message::ClientMessage, upgrade};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// Nesting limit the worker port decodes with by default (`max_json_depth`).
pub const WORKER_MAX_JSON_DEPTH: usize = 128;

/// How one worker frame ended: decoded, or refused (with the caller salvaged, if any).
#[derive(Debug)]
pub enum WorkerFrame {
    /// Blank frames are skipped before decoding.
    Blank,
    /// `relayed`: an `invokefunction`/`invocationresult`, whose payload is forwarded unparsed
    /// (so its depth is not limited).
    Decoded { relayed: bool },
    Refused { salvaged_invocation: Option<String> },
}

/// One inbound worker-protocol text/binary frame, as `control::connection` handles it: blank
/// frames skipped, `wire::decode`, `wire::salvage_invocation` when that fails.
pub fn worker_frame(payload: &[u8], max_depth: usize) -> WorkerFrame {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return WorkerFrame::Blank;
    }
    use crate::control::wire::Inbound;
    match crate::control::wire::decode(payload, max_depth) {
        Ok(inbound) => WorkerFrame::Decoded {
            relayed: matches!(inbound, Inbound::InvokeFunction(_) | Inbound::InvocationResult(_)),
        },
        Err(_) => WorkerFrame::Refused {
            salvaged_invocation: crate::control::wire::salvage_invocation(payload, max_depth)
                .map(|s| s.invocation_id),
        },
    }
}

/// Whether `payload` nests deeper than `limit` by the worker port's pre-decode scan.
pub fn worker_depth_exceeds(payload: &[u8], limit: usize) -> bool {
    crate::control::wire::json_depth_exceeds(payload, limit)
}

/// A subscriber's `join`/`leave` message (text or binary frame payload): `Some(is_join)` when it
/// decodes, `None` when the subscriber code would ignore it.
pub fn subscriber_message(payload: &[u8]) -> Option<bool> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    match serde_json::from_slice::<ClientMessage>(payload).ok()? {
        ClientMessage::Join { .. } => Some(true),
        ClientMessage::Leave { .. } => Some(false),
    }
}

/// What the subscriber port made of an upgrade request.
#[derive(Debug)]
pub enum UpgradeOutcome {
    /// More bytes needed.
    Partial,
    /// Answered with this HTTP status.
    Refused(&'static str),
    /// Accepted: the request path and, for `/stream/...` paths, the implicit join
    /// `(stream, group, item)`.
    Accepted { path: String, query_keys: usize, implicit_join: Option<(String, String, Option<String>)> },
}

/// The subscriber port's upgrade request handling (`subscriber::upgrade::read_upgrade` minus the socket):
/// httparse with 64 header slots, `upgrade_of`, then `implicit_join` of the path.
pub fn upgrade_request(bytes: &[u8]) -> UpgradeOutcome {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return UpgradeOutcome::Partial,
        Err(_) => return UpgradeOutcome::Refused("400 Bad Request"),
    }
    let upgrade = match upgrade::upgrade_of(&request) {
        Ok(upgrade) => upgrade,
        Err(status) => return UpgradeOutcome::Refused(status),
    };
    match stream_path(&upgrade.path) {
        Err(status) => UpgradeOutcome::Refused(status),
        Ok(implicit_join) => UpgradeOutcome::Accepted {
            query_keys: upgrade.query.len(),
            path: upgrade.path,
            implicit_join,
        },
    }
}

/// `subscriber::upgrade::implicit_join` of a request path, flattened: `Err` is the HTTP status.
#[allow(clippy::type_complexity)]
pub fn stream_path(path: &str) -> Result<Option<(String, String, Option<String>)>, &'static str> {
    Ok(upgrade::implicit_join(path)?.map(|((stream, group), item)| (stream, group, item)))
}

/// `subscriber::upgrade::percent_decode` of one path segment (`None`: a bad escape or not UTF-8).
pub fn percent_decode(segment: &str) -> Option<String> {
    upgrade::percent_decode(segment)
}

/// `subscriber::upgrade::query_params`, as the JSON object handed to the auth function.
pub fn query_params(query: &str) -> serde_json::Map<String, serde_json::Value> {
    upgrade::query_params(query)
}

/// The config file parser (`${VAR}` expansion from the process environment, YAML, validation).
pub fn config(text: &str) -> Result<crate::config::EngineConfig, String> {
    crate::config::parse(text, "fuzz.yaml").map_err(|e| e.to_string())
}

/// `${VAR}` expansion alone, with a fixed lookup (`SET` = `value`, everything else unset).
pub fn config_interpolate(text: &str) -> Result<String, String> {
    crate::config::interpolate(text, |name| (name == "SET").then(|| "value".to_owned())).map_err(|e| e.to_string())
}

/// A store directory removed when dropped (a recovery error included).
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every item of a store: `(stream, group, values in list order)`.
pub type Listing = Vec<(String, String, Vec<String>)>;

/// File-store recovery over segment files holding `segments` (ids 1, 2, …; the last one is the
/// active segment, where a torn tail is cut off). Opens the store, reads every item, closes it
/// and opens it again: `Ok` holds both listings (recovery should reach the same state twice).
/// `Err` is an `OpenError` (corruption that a crash cannot explain, or I/O), never a panic.
pub fn store_recovery(segments: &[&[u8]]) -> Result<(Listing, Listing), String> {
    use ringcast_storage::file::{FileOptions, FileStore};

    static NEXT: AtomicU64 = AtomicU64::new(0);
    // tmpfs where there is one: each run writes and syncs a few files.
    let base = ["/dev/shm", "/run/shm"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = ScratchDir(base.join(format!(
        "ringcast-fuzz-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )));
    std::fs::create_dir_all(&dir.0).map_err(|e| e.to_string())?;
    for (n, bytes) in segments.iter().enumerate() {
        let name = format!("seg-{:06}.log", n + 1);
        std::fs::write(dir.0.join(name), bytes).map_err(|e| e.to_string())?;
    }
    let options = FileOptions { segment_size: 4096, ..FileOptions::default() };
    let first = {
        let store = FileStore::open(&dir.0, options).map_err(|e| e.to_string())?;
        listing(&store)
    };
    let second = {
        let store = FileStore::open(&dir.0, options).map_err(|e| format!("second open: {e}"))?;
        listing(&store)
    };
    Ok((first, second))
}

/// Reads every value through the `KvStore` interface (which reads the mapped records).
fn listing(store: &ringcast_storage::file::FileStore) -> Listing {
    use ringcast_storage::KvStore;
    let mut out = Vec::new();
    for (stream, groups) in store.list_streams() {
        for group in groups {
            let values = store.list(&stream, &group).iter().map(|v| v.to_string()).collect();
            out.push((stream.clone(), group, values));
        }
    }
    out
}

/// One worker log line as the telemetry decoder renders it.
#[derive(Debug)]
pub struct TelemetryLine {
    pub message: String,
    pub data: Option<String>,
    pub trace_id: Option<String>,
}

/// What the telemetry thread made of one frame (prefix included).
#[derive(Debug)]
pub enum TelemetryFrame {
    /// No `OTLP`/`MTRC`/`LOGS` prefix.
    NotTelemetry,
    /// Counted as malformed and ignored.
    Malformed,
    /// Spans or metrics, counted.
    Counted(usize),
    Logs(Vec<TelemetryLine>),
}

/// A telemetry frame through `telemetry::otlp` (`split_prefix`, `decode`) with this line limit.
pub fn telemetry_frame(frame: &[u8], max_line_bytes: usize) -> TelemetryFrame {
    use crate::telemetry::otlp::{decode, split_prefix, Decoded};
    let Some((kind, payload)) = split_prefix(frame) else { return TelemetryFrame::NotTelemetry };
    match decode(kind, payload, max_line_bytes) {
        Err(_) => TelemetryFrame::Malformed,
        Ok(Decoded::Traces { spans }) => TelemetryFrame::Counted(spans),
        Ok(Decoded::Metrics { metrics }) => TelemetryFrame::Counted(metrics),
        Ok(Decoded::Logs(lines)) => TelemetryFrame::Logs(
            lines
                .into_iter()
                .map(|l| TelemetryLine { message: l.message, data: l.data, trace_id: l.trace_id })
                .collect(),
        ),
    }
}

/// An HTTP function's answer (status and complete body) as the call's outcome:
/// `Ok(result)` or `Err(code)`.
pub fn http_function_answer(status: u16, body: &[u8]) -> Result<Option<serde_json::Value>, String> {
    crate::http_functions::client::outcome_of(status, body).map_err(|e| e.code)
}

/// A worker's `invocation` object (`registerfunction`), checked as at registration against
/// `allowed_networks` = loopback, with `env` standing for the engine's environment: the scheme
/// of the URL it would call, or the error code its calls would answer.
pub fn http_function_registration(invocation: &[u8], env: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let value: serde_json::Value = serde_json::from_slice(invocation).map_err(|_| "not JSON".to_string())?;
    let config = crate::http_functions::HttpFunctionsConfig::default();
    crate::http_functions::client::Endpoint::from_registration(value, &config.networks(), &config, env)
        .map_err(|e| e.code)
        .and_then(|e| url::Url::parse(e.url()).map(|u| u.scheme().to_string()).map_err(|e| format!("accepted an unparsable URL: {e}")))
}

/// `*` glob matching of an RBAC listener (`match("…")` rules against function ids and
/// metadata values sent by untrusted workers).
pub fn rbac_glob(pattern: &str, value: &str) -> bool {
    crate::control::rbac::Glob::new(pattern).matches(value)
}

/// One `expose_functions` rule as the config reader takes it (here from JSON): `None` when it is
/// refused; otherwise whether it exposes `function_id` in `namespace` with `metadata`, and the
/// rule read back from its own serialisation (it must be the same rule).
pub fn rbac_rule(
    rule: &[u8],
    function_id: &str,
    namespace: &str,
    metadata: Option<&serde_json::Value>,
) -> Option<(bool, bool)> {
    use crate::control::rbac::ExposeRule;
    let parsed: ExposeRule = serde_json::from_slice(rule).ok()?;
    let exposed = parsed.exposes(function_id, namespace, metadata);
    let again = serde_json::to_vec(&parsed).ok().and_then(|text| serde_json::from_slice::<ExposeRule>(&text).ok());
    Some((exposed, again.as_ref() == Some(&parsed)))
}

/// The channel endpoint's request target (`/ws/channels/{id}?key=…&dir=…`), as the channels
/// executor parses it during the upgrade.
pub fn channel_request(target: &str) -> Result<crate::channels::request::ChannelRequest, crate::channels::request::RequestError> {
    crate::channels::request::parse(target)
}

/// The worker port's look at a connection's first bytes: a channel request or not, or undecided.
pub fn channel_request_line(first_bytes: &[u8]) -> crate::channels::request::Peeked {
    crate::channels::request::classify(first_bytes)
}
