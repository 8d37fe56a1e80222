//! Authentication and access control of a worker listener (`rbac:` of an `iii-worker-manager`
//! entry; spec `worker-protocol.md` §1.3), for browsers and other untrusted workers, usually on
//! an extra listener (port 49135).
//!
//! - **Auth**: right after the upgrade the engine calls `auth_function_id` (a function of a
//!   trusted worker) with `{headers, query_params, ip_address}`. Its answer (an [`AuthResult`])
//!   becomes the connection's [`Session`]; a failure, an answer that is not an object, or no
//!   answer within `auth_timeout_ms` refuses the worker: one `error` frame (`AUTH_ERROR`), then
//!   a Close 1008, and no `workerregistered`.
//! - **Calls**: a session calls a function only when it is allowed ([`Session::verdict`]:
//!   `forbidden_functions` → namespace grants → `allowed_functions` → the SDKs' infrastructure
//!   ids → `expose_functions`); otherwise it is answered `FORBIDDEN`. `engine::functions::list`
//!   and `engine::functions::info` show a session only what it may call.
//! - **Registrations**: `allow_function_registration`, `allow_trigger_type_registration`,
//!   `allowed_trigger_types`, the `function_registration_prefix` (ids registered as
//!   `prefix::id`, the prefix stripped again on the way to the worker), and the three hooks
//!   (`on_*_registration_function_id`) that may rewrite or deny each registration.
//!
//! A session's frames are applied in order: while a hook runs, the connection's socket is not
//! read (bounded by `hook_timeout_ms`).
//!
//! Function ids, headers and queries here come from untrusted clients: no indexing, slicing by
//! offset, unwrap or expect outside tests.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use super::engine::Engine;
use super::invocations::{Call, Outcome, Reply};
use super::ns_map::{is_blank, DEFAULT_NS};
use super::wire::{Action, ErrorBody, Inbound, InvokeFunction, Outbound, Payload, RegisterFunction, RegisterTrigger, RegisterTriggerType};
use super::workers::{WorkerConn, WorkerConnId};
use async_tungstenite::{WebSocketReceiver, WebSocketSender};
use futures_channel::oneshot;
use futures_util::StreamExt;
use glommio::net::TcpStream;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tungstenite::handshake::server::Request;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;
use uuid::Uuid;

/// Functions every session may call whatever `expose_functions` says: what the SDKs call on
/// their own (worker metadata, channels, logs, baggage). As the reference; `forbidden_functions`
/// still wins over them.
pub const INFRASTRUCTURE_FUNCTIONS: &[&str] = &[
    "engine::channels::create",
    "engine::workers::register",
    "engine::log::info",
    "engine::log::warn",
    "engine::log::error",
    "engine::log::debug",
    "engine::log::trace",
    "engine::baggage::get",
    "engine::baggage::set",
    "engine::baggage::get_all",
];

/// The error code of a refused call or trigger registration (spec §4.4).
pub const FORBIDDEN: &str = "FORBIDDEN";

// ------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------

/// `rbac:` of an `iii-worker-manager` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RbacConfig {
    /// Called once per connection with `{headers, query_params, ip_address}`; absent = every
    /// connection is accepted and `expose_functions` alone gates calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_function_id: Option<String>,
    /// A function is exposed when any rule matches it.
    #[serde(default)]
    pub expose_functions: Vec<ExposeRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_function_registration_function_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_trigger_registration_function_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_trigger_type_registration_function_id: Option<String>,
    /// ringcast: the prefix of sessions whose auth result names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_registration_prefix: Option<String>,
    /// ringcast: longest wait for the auth function; past it the worker is refused.
    #[serde(default = "default_call_timeout_ms")]
    pub auth_timeout_ms: u64,
    /// ringcast: longest wait for a registration hook; past it the registration is denied.
    #[serde(default = "default_call_timeout_ms")]
    pub hook_timeout_ms: u64,
    /// ringcast: connections of this listener whose auth call may be in flight at once; more
    /// are refused at once (`AUTH_ERROR`, "too many connections waiting for authentication").
    #[serde(default = "default_max_pending_auth")]
    pub max_pending_auth: usize,
}

fn default_call_timeout_ms() -> u64 {
    5_000
}
fn default_max_pending_auth() -> usize {
    1_024
}

/// A `*` glob anchored at both ends (`*` matches any run of characters, the empty one too).
#[derive(Debug, Clone, PartialEq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob(pattern.to_string())
    }

    pub fn matches(&self, value: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or_default();
        let Some(mut rest) = value.strip_prefix(first) else { return false };
        let middle: Vec<&str> = parts.collect();
        let Some((last, middle)) = middle.split_last() else {
            return rest.is_empty(); // no `*`: exact
        };
        for part in middle {
            match rest.find(part) {
                Some(at) => rest = rest.get(at + part.len()..).unwrap_or_default(),
                None => return false,
            }
        }
        rest.ends_with(last)
    }
}

/// A metadata condition: an exact JSON value, or `match("glob")` against a string value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataCondition {
    Exact(Value),
    Glob(Glob),
}

impl MetadataCondition {
    fn of(value: Value) -> MetadataCondition {
        match value.as_str().and_then(match_pattern) {
            Some(pattern) => MetadataCondition::Glob(Glob::new(pattern)),
            None => MetadataCondition::Exact(value),
        }
    }

    fn holds(&self, value: &Value) -> bool {
        match self {
            MetadataCondition::Exact(expected) => value == expected,
            MetadataCondition::Glob(glob) => value.as_str().is_some_and(|s| glob.matches(s)),
        }
    }
}

/// What an expose rule looks at.
#[derive(Debug, Clone, PartialEq)]
pub enum Matcher {
    /// `match("api::*")`: the function id.
    Id(Glob),
    /// `metadata: {public: true}`: every key of the function's metadata (all must hold).
    Metadata(Vec<(String, MetadataCondition)>),
}

/// One `expose_functions` rule; it applies in `namespace` (default: `default`) only.
#[derive(Debug, Clone, PartialEq)]
pub struct ExposeRule {
    pub matcher: Matcher,
    pub namespace: Option<String>,
}

/// The pattern inside `match("…")` or `match('…')`.
fn match_pattern(text: &str) -> Option<&str> {
    let text = text.trim();
    text.strip_prefix("match(\"")
        .and_then(|t| t.strip_suffix("\")"))
        .or_else(|| text.strip_prefix("match('").and_then(|t| t.strip_suffix("')")))
}

impl ExposeRule {
    /// Whether this rule exposes `function_id` reached in `namespace`.
    pub fn exposes(&self, function_id: &str, namespace: &str, metadata: Option<&Value>) -> bool {
        if self.namespace.as_deref().unwrap_or(DEFAULT_NS) != namespace {
            return false;
        }
        match &self.matcher {
            Matcher::Id(glob) => glob.matches(function_id),
            Matcher::Metadata(conditions) => {
                let Some(fields) = metadata.and_then(Value::as_object) else { return false };
                conditions.iter().all(|(key, condition)| fields.get(key).is_some_and(|v| condition.holds(v)))
            }
        }
    }

    fn from_value(value: Value) -> Result<ExposeRule, String> {
        const EXPECTED: &str = "expected match(\"pattern\") or a map with `match` or `metadata` (and optionally `namespace`)";
        match value {
            Value::String(text) => match match_pattern(&text) {
                Some(pattern) => Ok(ExposeRule { matcher: Matcher::Id(Glob::new(pattern)), namespace: None }),
                None => Err(format!("expose_functions: {EXPECTED}, got {text:?}")),
            },
            Value::Object(map) => {
                let (mut id, mut metadata, mut namespace) = (None, None, None);
                for (key, value) in map {
                    match (key.as_str(), value) {
                        // The map form takes the bare pattern; a wrapped one is unwrapped.
                        ("match", Value::String(p)) => id = Some(Glob::new(match_pattern(&p).unwrap_or(&p))),
                        ("metadata", Value::Object(m)) => {
                            metadata = Some(m.into_iter().map(|(k, v)| (k, MetadataCondition::of(v))).collect::<Vec<_>>())
                        }
                        ("namespace", Value::String(ns)) => namespace = Some(ns),
                        ("match" | "namespace", other) => return Err(format!("expose_functions: `{key}` must be a string, not {other}")),
                        ("metadata", other) => return Err(format!("expose_functions: `metadata` must be a map, not {other}")),
                        (other, _) => {
                            return Err(format!("expose_functions: unknown key `{other}` in a rule (keys: match, metadata, namespace)"))
                        }
                    }
                }
                let matcher = match (id, metadata) {
                    (Some(glob), None) => Matcher::Id(glob),
                    (None, Some(conditions)) if !conditions.is_empty() => Matcher::Metadata(conditions),
                    (Some(_), Some(_)) => return Err("expose_functions: a rule has `match` or `metadata`, not both".into()),
                    _ => return Err(format!("expose_functions: {EXPECTED}")),
                };
                Ok(ExposeRule { matcher, namespace })
            }
            other => Err(format!("expose_functions: {EXPECTED}, got {other}")),
        }
    }

    fn to_value(&self) -> Value {
        let glob_text = |g: &Glob| format!("match(\"{}\")", g.0);
        match (&self.matcher, &self.namespace) {
            (Matcher::Id(glob), None) => Value::String(glob_text(glob)),
            (matcher, namespace) => {
                let mut map = Map::new();
                match matcher {
                    // Wrapped, so that reading it back unwraps exactly once.
                    Matcher::Id(glob) => {
                        map.insert("match".into(), Value::String(glob_text(glob)));
                    }
                    Matcher::Metadata(conditions) => {
                        let fields = conditions.iter().map(|(k, c)| {
                            let v = match c {
                                MetadataCondition::Exact(v) => v.clone(),
                                MetadataCondition::Glob(g) => Value::String(glob_text(g)),
                            };
                            (k.clone(), v)
                        });
                        map.insert("metadata".into(), Value::Object(fields.collect()));
                    }
                }
                if let Some(ns) = namespace {
                    map.insert("namespace".into(), Value::String(ns.clone()));
                }
                Value::Object(map)
            }
        }
    }
}

impl<'de> Deserialize<'de> for ExposeRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ExposeRule::from_value(Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl Serialize for ExposeRule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

// ------------------------------------------------------------------------------------------
// Metrics
// ------------------------------------------------------------------------------------------

/// Counters of the RBAC listeners (`ringcast_rbac_*`).
#[derive(Default)]
pub struct RbacMetrics {
    pub auth_ok_total: AtomicU64,
    pub auth_denied_total: AtomicU64,
    pub forbidden_calls_total: AtomicU64,
    pub registrations_denied_total: AtomicU64,
    /// Auth calls in flight, all RBAC listeners together.
    pub auth_pending: AtomicU64,
}

impl RbacMetrics {
    /// Appends the Prometheus text of these counters.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        for (name, help, value) in [
            ("ringcast_rbac_auth_ok_total", "Workers admitted by an RBAC listener's auth function", &self.auth_ok_total),
            ("ringcast_rbac_auth_denied_total", "Workers refused by an RBAC listener (auth failed, denied or timed out)", &self.auth_denied_total),
            ("ringcast_rbac_forbidden_calls_total", "Calls from RBAC sessions answered FORBIDDEN", &self.forbidden_calls_total),
            ("ringcast_rbac_registrations_denied_total", "Registrations of RBAC sessions denied (session rights or a hook)", &self.registrations_denied_total),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Relaxed));
        }
        let name = "ringcast_rbac_auth_pending";
        let _ = writeln!(out, "# HELP {name} Auth calls of RBAC listeners in flight\n# TYPE {name} gauge\n{name} {}", self.auth_pending.load(Relaxed));
    }
}

// ------------------------------------------------------------------------------------------
// Sessions
// ------------------------------------------------------------------------------------------

/// What the auth function answers (every key optional).
#[derive(Debug, Deserialize)]
pub struct AuthResult {
    #[serde(default)]
    pub namespaces: HashMap<String, Vec<String>>,
    #[serde(default)]
    pub allowed_functions: Vec<String>,
    #[serde(default)]
    pub forbidden_functions: Vec<String>,
    #[serde(default)]
    pub allowed_trigger_types: Option<Vec<String>>,
    #[serde(default)]
    pub allow_trigger_type_registration: bool,
    #[serde(default = "yes")]
    pub allow_function_registration: bool,
    #[serde(default = "empty_object")]
    pub context: Value,
    #[serde(default)]
    pub function_registration_prefix: Option<String>,
}

fn yes() -> bool {
    true
}
fn empty_object() -> Value {
    json!({})
}

/// The rights of one connection on an RBAC listener.
#[derive(Debug)]
pub struct Session {
    pub rbac: Rc<RbacConfig>,
    /// Grants scoped to a namespace each; the keys are also the namespaces the session may
    /// declare. Empty: unscoped.
    pub namespaces: HashMap<String, Vec<String>>,
    /// Grants naming no namespace: they apply in `default`.
    pub allowed_functions: Vec<String>,
    /// Denials, in every namespace.
    pub forbidden_functions: Vec<String>,
    pub allowed_trigger_types: Option<Vec<String>>,
    pub allow_trigger_type_registration: bool,
    pub allow_function_registration: bool,
    /// The auth function's `context`, handed to the registration hooks.
    pub context: Value,
    pub function_registration_prefix: Option<String>,
}

/// Why a session may not call a function.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    /// Named in the auth result's `forbidden_functions`.
    Forbidden,
    /// Nothing grants or exposes it.
    NotExposed,
}

impl Session {
    /// The session of a listener without an auth function: every right, `expose_functions`
    /// alone gates calls.
    pub fn unauthenticated(rbac: Rc<RbacConfig>) -> Session {
        let prefix = rbac.function_registration_prefix.clone();
        Session {
            rbac,
            namespaces: HashMap::new(),
            allowed_functions: Vec::new(),
            forbidden_functions: Vec::new(),
            allowed_trigger_types: None,
            allow_trigger_type_registration: true,
            allow_function_registration: true,
            context: empty_object(),
            function_registration_prefix: prefix,
        }
    }

    pub fn from_auth(rbac: Rc<RbacConfig>, auth: AuthResult) -> Session {
        let prefix = auth.function_registration_prefix.filter(|p| !p.is_empty()).or_else(|| rbac.function_registration_prefix.clone());
        Session {
            rbac,
            namespaces: auth.namespaces,
            allowed_functions: auth.allowed_functions,
            forbidden_functions: auth.forbidden_functions,
            allowed_trigger_types: auth.allowed_trigger_types,
            allow_trigger_type_registration: auth.allow_trigger_type_registration,
            allow_function_registration: auth.allow_function_registration,
            context: auth.context,
            function_registration_prefix: prefix,
        }
    }

    /// Whether this session may call `function_id` in `namespace` (`metadata`: the function's,
    /// when it exists).
    pub fn verdict(&self, function_id: &str, namespace: &str, metadata: Option<&Value>) -> Result<(), Refusal> {
        if self.forbidden_functions.iter().any(|f| f == function_id) {
            return Err(Refusal::Forbidden);
        }
        let granted = |grant: &String| {
            let pattern = match_pattern(grant).unwrap_or(grant);
            pattern == function_id || (pattern.contains('*') && Glob::new(pattern).matches(function_id))
        };
        if self.namespaces.get(namespace).is_some_and(|grants| grants.iter().any(granted)) {
            return Ok(());
        }
        if namespace == DEFAULT_NS && self.allowed_functions.iter().any(|f| f == function_id) {
            return Ok(());
        }
        if INFRASTRUCTURE_FUNCTIONS.contains(&function_id) {
            return Ok(());
        }
        if self.rbac.expose_functions.iter().any(|rule| rule.exposes(function_id, namespace, metadata)) {
            return Ok(());
        }
        Err(Refusal::NotExposed)
    }

    /// The id a function registered (or referenced) by this session gets in the engine.
    pub fn engine_id(&self, id: &str) -> String {
        match &self.function_registration_prefix {
            Some(prefix) => format!("{prefix}::{id}"),
            None => id.to_string(),
        }
    }
}

/// The function id to send to `conn` for its function `id`: without its session's prefix.
pub fn local_function_id<'a>(conn: &WorkerConn, id: &'a str) -> &'a str {
    without_prefix(conn.session.as_ref().and_then(|s| s.function_registration_prefix.as_deref()), id)
}

/// `id` without `prefix::` when it starts with it.
fn without_prefix<'a>(prefix: Option<&str>, id: &'a str) -> &'a str {
    match prefix {
        Some(prefix) => id.strip_prefix(prefix).and_then(|rest| rest.strip_prefix("::")).unwrap_or(id),
        None => id,
    }
}

// ------------------------------------------------------------------------------------------
// Admission
// ------------------------------------------------------------------------------------------

/// What the auth function is told about an upgrade request: headers (lowercase names, the last
/// value wins, values that are not visible ASCII skipped) and the query (`name → [values]`,
/// not percent-decoded, as the reference).
pub struct UpgradeRequest {
    headers: Map<String, Value>,
    query: Map<String, Value>,
}

impl UpgradeRequest {
    pub fn of(request: &Request) -> UpgradeRequest {
        let mut headers = Map::new();
        for (name, value) in request.headers() {
            if let Ok(text) = value.to_str() {
                headers.insert(name.as_str().to_ascii_lowercase(), Value::String(text.to_string()));
            }
        }
        let query = ringcast_shards::subscriber::upgrade::query_params(request.uri().query().unwrap_or_default());
        UpgradeRequest { headers, query }
    }
}

/// Why a worker was refused; `message` goes to the worker in the `AUTH_ERROR` frame.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AuthDenied {
    pub message: String,
}

thread_local! {
    /// Auth calls in flight per listener port (the control core is one thread).
    static PENDING_AUTH: RefCell<HashMap<u16, usize>> = RefCell::new(HashMap::new());
}

/// One connection's place among its listener's pending authentications; given back when
/// dropped, however the authentication ends.
struct AuthSlot {
    port: u16,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl AuthSlot {
    fn take(port: u16, limit: usize, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Option<AuthSlot> {
        let taken = PENDING_AUTH.with(|pending| {
            let mut pending = pending.borrow_mut();
            let count = pending.entry(port).or_default();
            if *count >= limit {
                return false;
            }
            *count += 1;
            true
        });
        taken.then(|| {
            metrics.rbac.auth_pending.fetch_add(1, Relaxed);
            AuthSlot { port, metrics }
        })
    }
}

impl Drop for AuthSlot {
    fn drop(&mut self) {
        PENDING_AUTH.with(|pending| {
            if let Some(count) = pending.borrow_mut().get_mut(&self.port) {
                *count = count.saturating_sub(1);
            }
        });
        self.metrics.rbac.auth_pending.fetch_sub(1, Relaxed);
    }
}

/// Admits a connection to a listener (`port`): `Ok(None)` on a listener without `rbac`, the
/// session otherwise, or why it is refused. Counts and logs the outcome.
pub async fn admit(
    engine: &Rc<RefCell<Engine>>,
    port: u16,
    rbac: Option<&RbacConfig>,
    request: Option<UpgradeRequest>,
    peer: &str,
) -> Result<Option<Rc<Session>>, AuthDenied> {
    let Some(rbac) = rbac else { return Ok(None) };
    let rbac = Rc::new(rbac.clone());
    let Some(function_id) = rbac.auth_function_id.clone() else {
        return Ok(Some(Rc::new(Session::unauthenticated(rbac))));
    };
    let metrics = engine.borrow().metrics.clone();
    let Some(_slot) = AuthSlot::take(port, rbac.max_pending_auth, metrics) else {
        engine.borrow().metrics().rbac.auth_denied_total.fetch_add(1, Relaxed);
        let limit = rbac.max_pending_auth;
        if let Some(suppressed) = log_budget() {
            tracing::warn!(peer, port, limit, suppressed, "worker refused: too many connections waiting for authentication (max_pending_auth)");
        }
        return Err(AuthDenied { message: "too many connections waiting for authentication; retry later".into() });
    };
    let request = request.unwrap_or(UpgradeRequest { headers: Map::new(), query: Map::new() });
    let input = json!({ "headers": request.headers, "query_params": request.query, "ip_address": peer });
    let limit = Duration::from_millis(rbac.auth_timeout_ms);
    let outcome = call_within(engine, &function_id, input, limit).await;
    let decided = match outcome {
        Ok(Some(value @ Value::Object(_))) => serde_json::from_value::<AuthResult>(value)
            .map_err(|e| format!("the auth function's answer is not an auth result: {e}")),
        Ok(Some(other)) => Err(format!("the auth function's answer is not an object: {other}")),
        Ok(None) => Err("auth function returned no result".to_string()),
        Err(e) => Err(e.message),
    };
    match decided {
        Ok(auth) => {
            engine.borrow().metrics().rbac.auth_ok_total.fetch_add(1, Relaxed);
            let session = Session::from_auth(rbac, auth);
            tracing::debug!(peer, prefix = ?session.function_registration_prefix, "worker authenticated");
            Ok(Some(Rc::new(session)))
        }
        Err(message) => {
            engine.borrow().metrics().rbac.auth_denied_total.fetch_add(1, Relaxed);
            if let Some(suppressed) = log_budget() {
                tracing::warn!(peer, auth_function = %function_id, suppressed, "worker refused by the auth function: {message}");
            }
            Err(AuthDenied { message })
        }
    }
}

/// Longest the refusal frames are given to go out.
const REFUSAL_GRACE: Duration = Duration::from_secs(1);

/// Tells a refused worker why (`{"type":"error","error":{"code":"AUTH_ERROR",…}}`), closes with
/// 1008, and reads what the peer still sends until it closes (at most a second), so the close
/// frame is not lost to an RST.
pub async fn refuse(mut sink: WebSocketSender<TcpStream>, mut source: WebSocketReceiver<TcpStream>, denied: AuthDenied) {
    let frame = json!({ "type": "error", "error": { "code": "AUTH_ERROR", "message": denied.message } }).to_string();
    let _ = glommio::timer::timeout(REFUSAL_GRACE, async {
        let _ = sink.send(Message::text(frame)).await;
        let close = CloseFrame { code: CloseCode::Policy, reason: "authentication failed".into() };
        let _ = sink.send(Message::Close(Some(close))).await;
        Ok(())
    })
    .await;
    let _ = glommio::timer::timeout(REFUSAL_GRACE, async {
        while let Some(Ok(_)) = source.next().await {}
        Ok(())
    })
    .await;
}

/// Binds `session` to the connection the engine just registered (before any of its frames).
pub fn attach(engine: &Rc<RefCell<Engine>>, conn: WorkerConnId, session: Option<Rc<Session>>) {
    if let Some(c) = engine.borrow_mut().workers.get_mut(conn) {
        c.session = session;
    }
}

/// The session of `conn`, if it came in through an RBAC listener.
pub fn session_of(engine: &Rc<RefCell<Engine>>, conn: WorkerConnId) -> Option<Rc<Session>> {
    engine.borrow().workers.get(conn).and_then(|c| c.session.clone())
}

/// Calls a function of the default namespace from the engine and waits at most `limit`; a call
/// given up is dropped from the pending table, so a late answer is ignored.
async fn call_within(engine: &Rc<RefCell<Engine>>, function_id: &str, input: Value, limit: Duration) -> Outcome {
    let id = Uuid::new_v4();
    let mut call = Call::internal(DEFAULT_NS, function_id, input, None);
    call.forward_id = Some(id);
    let (tx, rx) = oneshot::channel();
    engine.borrow_mut().invoke(call, Reply::Internal(tx));
    match glommio::timer::timeout(limit, async { Ok(rx.await) }).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => Err(ErrorBody::new("invocation_error", format!("the call to {function_id} was dropped"))),
        Err(_) => {
            engine.borrow_mut().abandon_invocation(id);
            Err(ErrorBody::new("invocation_timeout", format!("{function_id} gave no answer within {} ms", limit.as_millis())))
        }
    }
}

// ------------------------------------------------------------------------------------------
// A session's frames
// ------------------------------------------------------------------------------------------

/// Applies one frame of a session's connection: calls are checked, registrations go through the
/// session's rights and hooks, the rest goes to the engine as it is.
pub async fn dispatch(engine: &Rc<RefCell<Engine>>, conn: WorkerConnId, session: &Rc<Session>, message: Inbound) {
    match message {
        Inbound::InvokeFunction(m) => invoke(engine, conn, session, m),
        Inbound::RegisterFunction(m) => register_function(engine, conn, session, m).await,
        Inbound::UnregisterFunction(mut m) => {
            m.id = session.engine_id(&m.id);
            engine.borrow_mut().handle(conn, Inbound::UnregisterFunction(m));
        }
        Inbound::RegisterTriggerType(m) => register_trigger_type(engine, conn, session, m).await,
        Inbound::RegisterTrigger(m) => register_trigger(engine, conn, session, m).await,
        // An untrusted worker answers only the calls it was sent, and removes only its own bindings.
        Inbound::InvocationResult(m) => {
            let owner = Uuid::parse_str(&m.invocation_id).ok().and_then(|id| engine.borrow_mut().invocations.get_mut(&id).map(|p| p.owner));
            match owner {
                Some(owner) if owner != conn => {
                    tracing::warn!(conn, invocation_id = %m.invocation_id, "dropped an invocationresult for a call this session was not sent");
                }
                _ => engine.borrow_mut().handle(conn, Inbound::InvocationResult(m)),
            }
        }
        Inbound::UnregisterTrigger(m) => {
            let owner = engine.borrow().triggers.binding(&m.id).map(|b| b.owner);
            match owner {
                Some(owner) if owner != Some(conn) => {
                    tracing::warn!(conn, trigger_id = %m.id, "ignored unregistertrigger of a binding this session does not own");
                }
                _ => engine.borrow_mut().handle(conn, Inbound::UnregisterTrigger(m)),
            }
        }
        other => engine.borrow_mut().handle(conn, other),
    }
}

/// The builtins whose answers are narrowed to what the session may see.
const FILTERED_BUILTINS: &[&str] = &["engine::functions::list", "engine::functions::info"];

fn invoke(engine: &Rc<RefCell<Engine>>, conn: WorkerConnId, session: &Rc<Session>, m: InvokeFunction) {
    if is_blank(&m.namespace) {
        // The engine answers INVALID_NAMESPACE.
        engine.borrow_mut().handle(conn, Inbound::InvokeFunction(m));
        return;
    }
    let namespace = m.namespace.clone().unwrap_or_else(|| DEFAULT_NS.to_string());
    let verdict = {
        let e = engine.borrow();
        let metadata = e.functions.get(&namespace, &m.function_id).and_then(|f| f.metadata.as_ref());
        session.verdict(&m.function_id, &namespace, metadata)
    };
    if let Err(refusal) = verdict {
        let remedy = match refusal {
            Refusal::Forbidden => "remove it from the auth result's forbidden_functions",
            Refusal::NotExposed => "add it to rbac.expose_functions or the auth result's allowed_functions",
        };
        let message = format!("function '{}' not allowed in namespace '{namespace}' ({remedy})", m.function_id);
        return forbid(engine, conn, &m, message);
    }
    if m.function_id == "engine::workers::register" && !session.namespaces.is_empty() {
        #[derive(Deserialize)]
        struct Declared {
            namespace: Option<String>,
        }
        let declared = m
            .data
            .as_ref()
            .and_then(|d| serde_json::from_str::<Declared>(d.get()).ok())
            .and_then(|d| d.namespace)
            .unwrap_or_else(|| DEFAULT_NS.to_string());
        if !session.namespaces.contains_key(&declared) {
            let mut permitted: Vec<&str> = session.namespaces.keys().map(String::as_str).collect();
            permitted.sort_unstable();
            let message = format!("namespace '{declared}' not allowed for this session (permitted: {})", permitted.join(", "));
            return forbid(engine, conn, &m, message);
        }
    }
    let answered_here = m.action.is_none()
        && namespace == DEFAULT_NS
        && FILTERED_BUILTINS.contains(&m.function_id.as_str())
        && m.invocation_id.as_deref().is_some_and(|id| Uuid::parse_str(id).is_ok());
    if answered_here {
        filtered_builtin(engine, conn, session, m);
    } else {
        engine.borrow_mut().handle(conn, Inbound::InvokeFunction(m));
    }
}

/// Answers a refused call `FORBIDDEN` (with the caller's id, or a fresh one for a call without,
/// as the reference), counts and logs it.
fn forbid(engine: &Rc<RefCell<Engine>>, conn: WorkerConnId, m: &InvokeFunction, message: String) {
    let e = engine.borrow();
    e.metrics().rbac.forbidden_calls_total.fetch_add(1, Relaxed);
    let worker_id = e.workers.get(conn).map(|c| c.worker_id.clone()).unwrap_or_default();
    if let Some(suppressed) = log_budget() {
        tracing::info!(worker_id = %worker_id, function_id = %m.function_id, suppressed, "call refused: {message}");
    }
    let id = match (&m.action, &m.invocation_id) {
        (Some(Action::Void), _) | (_, None) => Uuid::new_v4().to_string(),
        (_, Some(id)) => id.clone(),
    };
    let error = ErrorBody::new(FORBIDDEN, message);
    e.send_to(
        conn,
        &Outbound::InvocationResult {
            invocation_id: &id,
            function_id: &m.function_id,
            result: None,
            error: Some(&error),
            traceparent: m.traceparent.as_deref(),
            baggage: m.baggage.as_deref(),
        },
    );
}

/// Runs `engine::functions::list` / `info` for a session and answers with only the functions
/// it may call: other rows are left out of a list, or reported `forbidden`.
fn filtered_builtin(engine: &Rc<RefCell<Engine>>, conn: WorkerConnId, session: &Rc<Session>, m: InvokeFunction) {
    let (tx, rx) = oneshot::channel();
    let data = match m.data {
        Some(raw) => Payload::Raw(raw),
        None => Payload::Value(Value::Null),
    };
    let call = Call {
        namespace: DEFAULT_NS.to_string(),
        function_id: m.function_id.clone(),
        data,
        metadata: None,
        traceparent: m.traceparent.clone(),
        baggage: m.baggage.clone(),
        forward_id: None,
    };
    engine.borrow_mut().invoke(call, Reply::Internal(tx));
    let reply = Reply::Caller { conn, invocation_id: m.invocation_id.unwrap_or_default(), function_id: m.function_id };
    let visible = SessionView(session.clone());
    let weak = engine.borrow().weak_self();
    engine.borrow().spawn(async move {
        let outcome = match rx.await {
            Ok(outcome) => outcome.and_then(|result| visible.narrow(result)),
            Err(_) => Err(ErrorBody::new("invocation_error", "the call was dropped")),
        };
        if let Some(engine) = weak.upgrade() {
            engine.borrow_mut().complete(reply, outcome, None, None);
        }
    });
}

/// The session a filtering task narrows an answer for.
struct SessionView(Rc<Session>);

impl SessionView {
    fn sees(&self, row: &Value) -> bool {
        let id = row.get("function_id").and_then(Value::as_str).unwrap_or_default();
        let ns = row.get("namespace").and_then(Value::as_str).unwrap_or(DEFAULT_NS);
        self.0.verdict(id, ns, row.get("metadata")).is_ok()
    }

    /// A list loses the rows the session may not call; a single description it may not see
    /// becomes `FORBIDDEN`; in a batch such a row becomes `{function_id, error: "forbidden"}`.
    fn narrow(&self, result: Option<Value>) -> Outcome {
        let Some(mut result) = result else { return Ok(None) };
        if let Some(Value::Array(rows)) = result.get_mut("functions") {
            let mut kept = Vec::with_capacity(rows.len());
            for row in rows.drain(..) {
                if row.get("error").is_some() || self.sees(&row) {
                    kept.push(row);
                } else if row.get("request_schema").is_some() || row.get("registered_triggers").is_some() {
                    kept.push(json!({ "function_id": row.get("function_id"), "error": "forbidden" }));
                }
            }
            *rows = kept;
            return Ok(Some(result));
        }
        if result.get("function_id").is_some() && !self.sees(&result) {
            let id = result.get("function_id").and_then(Value::as_str).unwrap_or_default();
            return Err(ErrorBody::new(FORBIDDEN, format!("Function '{id}' is not visible to this session.")));
        }
        Ok(Some(result))
    }
}

/// Refusal log lines allowed per second; past it they are counted (the metrics count them all)
/// and the next line says how many were left out, so a client hammering refused calls cannot
/// flood the log.
const REFUSAL_LINES_PER_SECOND: u32 = 20;

thread_local! {
    /// (start of the current second, lines logged in it, lines suppressed since the last one).
    static LOG_BUDGET: std::cell::Cell<(Option<std::time::Instant>, u32, u64)> = const { std::cell::Cell::new((None, 0, 0)) };
}

/// Whether a refusal may be logged now: `Some(lines suppressed before it)`, or `None`.
fn log_budget() -> Option<u64> {
    LOG_BUDGET.with(|budget| {
        let (start, lines, suppressed) = budget.get();
        let now = std::time::Instant::now();
        let (start, lines) = match start {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => (start, lines),
            _ => (now, 0),
        };
        if lines >= REFUSAL_LINES_PER_SECOND {
            budget.set((Some(start), lines, suppressed + 1));
            None
        } else {
            budget.set((Some(start), lines + 1, 0));
            Some(suppressed)
        }
    })
}

/// Logs and counts a denied registration.
fn deny_registration(engine: &Rc<RefCell<Engine>>, conn: WorkerConnId, what: &str, id: &str, why: &str) {
    let e = engine.borrow();
    e.metrics().rbac.registrations_denied_total.fetch_add(1, Relaxed);
    let worker_id = e.workers.get(conn).map(|c| c.worker_id.clone()).unwrap_or_default();
    if let Some(suppressed) = log_budget() {
        tracing::warn!(worker_id = %worker_id, id, suppressed, "{what} registration denied: {why}");
    }
}

/// Calls a registration hook; its object answer, or why the registration is denied.
async fn run_hook(engine: &Rc<RefCell<Engine>>, session: &Session, hook: &str, input: Value) -> Result<Map<String, Value>, String> {
    let limit = Duration::from_millis(session.rbac.hook_timeout_ms);
    match call_within(engine, hook, input, limit).await {
        Ok(Some(Value::Object(answer))) => Ok(answer),
        Ok(Some(other)) => Err(format!("hook {hook} answered {other}, not an object")),
        Ok(None) => Err(format!("hook {hook} returned no result")),
        Err(e) => Err(format!("hook {hook} failed: {}: {}", e.code, e.message)),
    }
}

fn namespace_of(engine: &Rc<RefCell<Engine>>, conn: WorkerConnId) -> String {
    engine.borrow().workers.get(conn).map(|c| c.namespace.clone()).unwrap_or_else(|| DEFAULT_NS.to_string())
}

async fn register_function(engine: &Rc<RefCell<Engine>>, conn: WorkerConnId, session: &Session, mut m: RegisterFunction) {
    if !session.allow_function_registration {
        return deny_registration(engine, conn, "function", &m.id, "the session may not register functions (allow_function_registration)");
    }
    if let Some(hook) = &session.rbac.on_function_registration_function_id {
        let input = json!({
            "function_id": m.id,
            "description": m.description,
            "metadata": m.metadata,
            "namespace": namespace_of(engine, conn),
            "context": session.context,
        });
        match run_hook(engine, session, hook, input).await {
            Ok(answer) => {
                if let Some(Value::String(id)) = answer.get("function_id") {
                    m.id = id.clone();
                }
                if let Some(Value::String(description)) = answer.get("description") {
                    m.description = Some(description.clone());
                }
                if let Some(metadata) = answer.get("metadata") {
                    m.metadata = Some(metadata.clone());
                }
            }
            Err(why) => return deny_registration(engine, conn, "function", &m.id, &why),
        }
    }
    m.id = session.engine_id(&m.id);
    engine.borrow_mut().handle(conn, Inbound::RegisterFunction(m));
}

async fn register_trigger_type(engine: &Rc<RefCell<Engine>>, conn: WorkerConnId, session: &Session, mut m: RegisterTriggerType) {
    if !session.allow_trigger_type_registration {
        return deny_registration(engine, conn, "trigger type", &m.id, "the session may not register trigger types (allow_trigger_type_registration)");
    }
    if let Some(hook) = &session.rbac.on_trigger_type_registration_function_id {
        let input = json!({ "trigger_type_id": m.id, "description": m.description, "context": session.context });
        match run_hook(engine, session, hook, input).await {
            Ok(answer) => {
                if let Some(Value::String(id)) = answer.get("trigger_type_id") {
                    m.id = id.clone();
                }
                if let Some(Value::String(description)) = answer.get("description") {
                    m.description = description.clone();
                }
            }
            Err(why) => return deny_registration(engine, conn, "trigger type", &m.id, &why),
        }
    }
    engine.borrow_mut().handle(conn, Inbound::RegisterTriggerType(m));
}

async fn register_trigger(engine: &Rc<RefCell<Engine>>, conn: WorkerConnId, session: &Session, mut m: RegisterTrigger) {
    let refuse_binding = |m: &RegisterTrigger, message: String| {
        deny_registration(engine, conn, "trigger", &m.id, &message);
        let error = ErrorBody::new(FORBIDDEN, message);
        engine.borrow().send_to(
            conn,
            &Outbound::TriggerRegistrationResult { id: &m.id, trigger_type: &m.trigger_type, function_id: &m.function_id, error: Some(&error) },
        );
    };
    if is_blank(&m.namespace) || is_blank(&m.trigger_namespace) {
        // The engine answers INVALID_NAMESPACE.
        engine.borrow_mut().handle(conn, Inbound::RegisterTrigger(m));
        return;
    }
    if let Some(types) = &session.allowed_trigger_types {
        if !types.contains(&m.trigger_type) {
            let message = format!("trigger type '{}' not allowed for this session (allowed_trigger_types)", m.trigger_type);
            return refuse_binding(&m, message);
        }
    }
    if let Some(hook) = &session.rbac.on_trigger_registration_function_id {
        let input = json!({
            "trigger_id": m.id,
            "trigger_type": m.trigger_type,
            "function_id": m.function_id,
            "config": m.config,
            "metadata": m.metadata,
            "namespace": m.namespace.as_deref().unwrap_or(DEFAULT_NS),
            "context": session.context,
        });
        match run_hook(engine, session, hook, input).await {
            Ok(answer) => {
                if let Some(Value::String(id)) = answer.get("trigger_id") {
                    m.id = id.clone();
                }
                if let Some(Value::String(kind)) = answer.get("trigger_type") {
                    m.trigger_type = kind.clone();
                }
                if let Some(Value::String(function_id)) = answer.get("function_id") {
                    m.function_id = function_id.clone();
                }
                if let Some(config) = answer.get("config") {
                    m.config = config.clone();
                }
            }
            Err(why) => return refuse_binding(&m, why),
        }
    }
    m.function_id = session.engine_id(&m.function_id);
    // A binding calls its function on the session's behalf: the session must be allowed to.
    let namespace = m.namespace.clone().unwrap_or_else(|| DEFAULT_NS.to_string());
    let verdict = {
        let e = engine.borrow();
        let metadata = e.functions.get(&namespace, &m.function_id).and_then(|f| f.metadata.as_ref());
        session.verdict(&m.function_id, &namespace, metadata)
    };
    if verdict.is_err() {
        let message = format!("function '{}' not allowed in namespace '{namespace}'", m.function_id);
        return refuse_binding(&m, message);
    }
    engine.borrow_mut().handle(conn, Inbound::RegisterTrigger(m));
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> Vec<ExposeRule> {
        serde_yaml::from_str(yaml).expect("valid rules")
    }

    fn session(expose: &str, auth: Value) -> Session {
        let rbac = RbacConfig {
            auth_function_id: Some("auth".into()),
            expose_functions: rules(expose),
            on_function_registration_function_id: None,
            on_trigger_registration_function_id: None,
            on_trigger_type_registration_function_id: None,
            function_registration_prefix: None,
            auth_timeout_ms: 1,
            hook_timeout_ms: 1,
            max_pending_auth: 1,
        };
        Session::from_auth(Rc::new(rbac), serde_json::from_value(auth).expect("an auth result"))
    }

    #[test]
    fn refusal_logging_is_bounded_per_second_and_reports_what_it_left_out() {
        let allowed = (0..REFUSAL_LINES_PER_SECOND + 5).filter_map(|_| log_budget()).count();
        assert_eq!(allowed, REFUSAL_LINES_PER_SECOND as usize);
        // A second later the next line is logged and tells how many were left out.
        LOG_BUDGET.with(|b| {
            let (_, lines, suppressed) = b.get();
            b.set((std::time::Instant::now().checked_sub(Duration::from_secs(2)), lines, suppressed));
        });
        assert_eq!(log_budget(), Some(5));
        assert_eq!(log_budget(), Some(0));
    }

    #[test]
    fn globs_are_anchored_and_star_matches_any_run() {
        let cases = [
            ("api::*", "api::users::list", true),
            ("api::*", "xapi::users", false),
            ("*::public", "a::b::public", true),
            ("*::public", "a::public::x", false),
            ("api::*::read", "api::users::read", true),
            ("api::*::read", "api::users::write", false),
            ("*public*", "mypublicfn", true),
            ("*", "", true),
            ("a*a", "a", false),
            ("a*a", "aa", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("é*ü", "éxü", true),
        ];
        for (pattern, value, expected) in cases {
            assert_eq!(Glob::new(pattern).matches(value), expected, "{pattern} ~ {value}");
        }
    }

    #[test]
    fn expose_rules_parse_in_both_forms_and_round_trip() {
        let parsed = rules(
            "- match(\"api::*\")\n- match('*::public')\n- metadata: {public: true, tier: match(\"free*\")}\n- {match: \"svc::*\", namespace: orders}\n",
        );
        assert_eq!(parsed.len(), 4);
        assert!(parsed[0].exposes("api::x", "default", None));
        assert!(parsed[1].exposes("a::public", "default", None));
        assert!(parsed[2].exposes("f", "default", Some(&json!({"public": true, "tier": "free-1"}))));
        assert!(!parsed[2].exposes("f", "default", Some(&json!({"public": true, "tier": "paid"}))));
        assert!(!parsed[2].exposes("f", "default", Some(&json!({"public": "true", "tier": "free"}))));
        assert!(!parsed[2].exposes("f", "default", None));
        assert!(parsed[3].exposes("svc::get", "orders", None));
        assert!(!parsed[3].exposes("svc::get", "default", None), "a scoped rule does not answer elsewhere");
        assert!(!parsed[0].exposes("api::x", "orders", None), "a rule without namespace answers in default only");
        let again: Vec<ExposeRule> = serde_json::from_value(serde_json::to_value(&parsed).unwrap()).unwrap();
        assert_eq!(again, parsed);
        // A map-form pattern that itself looks wrapped keeps its exact text through a round trip.
        let odd: ExposeRule = serde_json::from_value(json!({"match": "match(\"match(\"q\")\")", "namespace": "n"})).unwrap();
        let again: ExposeRule = serde_json::from_value(serde_json::to_value(&odd).unwrap()).unwrap();
        assert_eq!(again, odd);
    }

    #[test]
    fn malformed_expose_rules_are_refused_with_the_reason() {
        for (yaml, needle) in [
            ("- api::*", "match(\"pattern\")"),
            ("- {match: a, metadata: {x: 1}}", "not both"),
            ("- {namesapce: x, match: a}", "unknown key `namesapce`"),
            ("- {metadata: {}}", "expected"),
            ("- 42", "expected"),
        ] {
            let err = serde_yaml::from_str::<Vec<ExposeRule>>(yaml).unwrap_err().to_string();
            assert!(err.contains(needle), "{yaml}: {err}");
        }
    }

    #[test]
    fn access_is_resolved_deny_first_then_grants_infrastructure_and_expose() {
        let s = session(
            "- match(\"api::*\")",
            json!({
                "forbidden_functions": ["api::delete", "engine::log::info"],
                "allowed_functions": ["internal::one"],
                "namespaces": { "orders": ["svc::*", "match(\"tool::get\")"] },
            }),
        );
        assert_eq!(s.verdict("api::delete", "default", None), Err(Refusal::Forbidden));
        assert_eq!(s.verdict("engine::log::info", "default", None), Err(Refusal::Forbidden), "a denial wins over the carve-out");
        assert_eq!(s.verdict("api::list", "default", None), Ok(()));
        assert_eq!(s.verdict("internal::one", "default", None), Ok(()));
        assert_eq!(s.verdict("internal::one", "orders", None), Err(Refusal::NotExposed), "unscoped grants answer in default only");
        assert_eq!(s.verdict("svc::x", "orders", None), Ok(()));
        assert_eq!(s.verdict("tool::get", "orders", None), Ok(()));
        assert_eq!(s.verdict("svc::x", "billing", None), Err(Refusal::NotExposed));
        assert_eq!(s.verdict("internal::two", "default", None), Err(Refusal::NotExposed));
        for id in INFRASTRUCTURE_FUNCTIONS.iter().filter(|id| **id != "engine::log::info") {
            assert_eq!(s.verdict(id, "default", None), Ok(()), "{id}");
        }
        assert_eq!(s.verdict("engine::functions::list", "default", None), Err(Refusal::NotExposed));
    }

    #[test]
    fn auth_result_defaults_follow_the_reference() {
        let s = session("[]", json!({}));
        assert!(s.allow_function_registration);
        assert!(!s.allow_trigger_type_registration);
        assert!(s.allowed_trigger_types.is_none());
        assert_eq!(s.context, json!({}));
        let open = Session::unauthenticated(s.rbac.clone());
        assert!(open.allow_trigger_type_registration);
    }

    #[test]
    fn the_prefix_is_added_for_the_engine_and_only_a_full_segment_is_stripped() {
        let s = session("[]", json!({ "function_registration_prefix": "tenant-1" }));
        assert_eq!(s.engine_id("echo"), "tenant-1::echo");
        let prefix = s.function_registration_prefix.as_deref();
        assert_eq!(without_prefix(prefix, "tenant-1::echo"), "echo");
        assert_eq!(without_prefix(prefix, "tenant-10::echo"), "tenant-10::echo");
        assert_eq!(without_prefix(prefix, "other::echo"), "other::echo");
        assert_eq!(without_prefix(None, "tenant-1::echo"), "tenant-1::echo");
    }
}
