//! The HTTP side of HTTP-invoked functions: the endpoint a registration describes (checked and
//! with its secrets read once, at registration), a bounded pool of threads that run the
//! blocking requests off the control core, and the mapping of each answer to a call outcome
//! (spec/worker-protocol.md §8).

use super::config::{HttpFunctionsConfig, Network};
use super::HttpFunctionMetrics;
use crate::control::invocations::Outcome;
use crate::control::wire::ErrorBody;
use base64::Engine as _;
use futures_channel::oneshot;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The `invocation` of a `registerfunction` as the SDKs send it (§2.4).
#[derive(Deserialize)]
struct InvocationRef {
    url: String,
    #[serde(default)]
    method: Method,
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// `null` is taken as "none" (the reference refuses it; SDKs do not send it).
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    auth: Option<AuthRef>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AuthRef {
    Hmac { secret_key: String },
    Bearer { token_key: String },
    ApiKey { header: String, value_key: String },
}

/// The request methods a registration may name (uppercase only, as the reference).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    Get,
    #[default]
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

/// How a request proves itself, with the secret read from the engine's environment.
enum Auth {
    Hmac { secret: String },
    Bearer { token: String },
    ApiKey { header: String, value: String },
}

/// A checked registration: where and how to send each call of one function.
pub struct Endpoint {
    url: String,
    method: Method,
    /// Limit of one request, connection and answer included.
    pub timeout: Duration,
    headers: Vec<(String, String)>,
    auth: Option<Auth>,
    /// `host:port` when the URL's host is a name: resolved and checked at each connection
    /// (and once at registration, for the log).
    pub host_name: Option<String>,
}

impl Endpoint {
    /// Checks a registration's `invocation` and reads its secret with `env`. The error is what
    /// every call of the function answers (and what the log line says).
    pub fn from_registration(
        invocation: Value,
        networks: &[Network],
        config: &HttpFunctionsConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Endpoint, ErrorBody> {
        let bad = |why: String| ErrorBody::new("invalid_http_invocation", why);
        let spec: InvocationRef =
            serde_json::from_value(invocation).map_err(|e| bad(format!("the registration's invocation cannot be read: {e}")))?;
        let timeout_ms = spec.timeout_ms.unwrap_or(config.default_timeout_ms).max(1);
        if timeout_ms > config.max_timeout_ms {
            return Err(bad(format!(
                "timeout_ms {timeout_ms} is over max_timeout_ms ({}) of iii-http-functions",
                config.max_timeout_ms
            )));
        }
        let headers: Vec<(String, String)> = spec.headers.unwrap_or_default().into_iter().collect();
        for (name, value) in &headers {
            check_header(name, value).map_err(bad)?;
        }
        if let Some(AuthRef::ApiKey { header, .. }) = &spec.auth {
            check_header(header, "").map_err(bad)?;
        }
        let invalid = |why: String| ErrorBody::new("url_validation_failed", format!("Invalid URL {:?}: {why}", spec.url));
        let url = url::Url::parse(&spec.url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("only http and https are supported".into()));
        }
        let host_name = match url.host() {
            None => return Err(invalid("no host".into())),
            Some(url::Host::Ipv4(ip)) => {
                check_address(IpAddr::V4(ip), networks, &spec.url)?;
                None
            }
            Some(url::Host::Ipv6(ip)) => {
                check_address(IpAddr::V6(ip), networks, &spec.url)?;
                None
            }
            Some(url::Host::Domain(name)) => Some(format!("{name}:{}", url.port_or_known_default().unwrap_or(80))),
        };
        let read = |key: &str, code: &str, what: &str| {
            env(key).ok_or_else(|| {
                ErrorBody::new(code, format!("the {what} environment variable {key} is not set on the engine host"))
            })
        };
        let auth = match spec.auth {
            None => None,
            Some(AuthRef::Hmac { secret_key }) => Some(Auth::Hmac { secret: read(&secret_key, "secret_not_found", "HMAC secret")? }),
            Some(AuthRef::Bearer { token_key }) => Some(Auth::Bearer { token: read(&token_key, "token_not_found", "bearer token")? }),
            Some(AuthRef::ApiKey { header, value_key }) => {
                Some(Auth::ApiKey { value: read(&value_key, "api_key_not_found", "API key")?, header })
            }
        };
        Ok(Endpoint {
            url: spec.url,
            method: spec.method,
            timeout: Duration::from_millis(timeout_ms),
            headers,
            auth,
            host_name,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

/// A header the registration names: a token name (RFC 9110) and a value without control
/// characters other than tab.
fn check_header(name: &str, value: &str) -> Result<(), String> {
    let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("{name:?} is not a valid header name"));
    }
    if value.bytes().any(|c| (c < 0x20 && c != b'\t') || c == 0x7f) {
        return Err(format!("the value of header {name} holds control characters"));
    }
    Ok(())
}

/// An address outside `allowed_networks`, as the error every call then answers.
fn check_address(ip: IpAddr, networks: &[Network], url: &str) -> Result<(), ErrorBody> {
    if networks.iter().any(|n| n.contains(ip)) {
        Ok(())
    } else {
        Err(ErrorBody::new("url_validation_failed", refusal(url, ip, networks)))
    }
}

fn refusal(target: &str, ip: IpAddr, networks: &[Network]) -> String {
    let allowed: Vec<String> = networks.iter().map(|n| n.to_string()).collect();
    format!(
        "URL not in allowlist: {target} leads to {ip}, outside allowed_networks [{}] of iii-http-functions",
        allowed.join(", ")
    )
}

/// The signature header of `hmac` auth: `sha256=<hex HMAC-SHA256(secret, "<ts>:<base64(body)>")>`.
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let signed = format!("{timestamp}:{}", base64::engine::general_purpose::STANDARD.encode(body));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, signed.as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in tag.as_ref() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// The resolver of the HTTP client: resolves as the system does, then keeps only the addresses
/// inside `allowed_networks`. Every connection (IP literals included) goes through it, so the
/// check holds for the address actually connected to.
#[derive(Clone)]
struct AllowlistResolver {
    networks: Arc<Vec<Network>>,
}

/// Why the resolver refused a destination; found again in the error chain to answer
/// `url_validation_failed` instead of a transport error.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl ureq::Resolver for AllowlistResolver {
    fn resolve(&self, netloc: &str) -> std::io::Result<Vec<SocketAddr>> {
        let all: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
        let allowed: Vec<SocketAddr> = all.iter().copied().filter(|a| self.networks.iter().any(|n| n.contains(a.ip()))).collect();
        match (allowed.is_empty(), all.first()) {
            (true, Some(first)) => Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                Refused(refusal(netloc, first.ip(), &self.networks)),
            )),
            _ => Ok(allowed),
        }
    }
}

/// What a finished request tells the control core.
pub struct HttpAnswer {
    pub outcome: Outcome,
    pub timed_out: bool,
}

/// One call to run.
pub struct HttpRequest {
    pub function_id: String,
    pub endpoint: Arc<Endpoint>,
    /// The call's `data`, as JSON text: sent as it is and signed as it is.
    pub body: Vec<u8>,
}

enum Job {
    /// Run a call's request.
    Call { request: HttpRequest, reply: oneshot::Sender<HttpAnswer> },
    /// Resolve `host:port` and check it against the allowlist (at registration).
    Probe { netloc: String, reply: oneshot::Sender<Result<(), String>> },
}

/// The requests are full: the call is answered at once instead of waiting.
#[derive(Debug, thiserror::Error)]
#[error("{0} HTTP requests are already waiting for a thread (max_pending_requests of iii-http-functions)")]
pub struct PoolFull(pub usize);

/// A fixed set of threads running requests from a bounded queue, sharing one HTTP agent (its
/// keep-alive connections included). Dropping the pool ends the threads once their current
/// request is done.
pub struct HttpPool {
    jobs: SyncSender<Job>,
    capacity: usize,
}

impl HttpPool {
    pub fn start(config: &HttpFunctionsConfig, metrics: Arc<HttpFunctionMetrics>) -> std::io::Result<HttpPool> {
        let resolver = AllowlistResolver { networks: Arc::new(config.networks()) };
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .try_proxy_from_env(false)
            .resolver(resolver.clone())
            .max_idle_connections_per_host(config.max_idle_connections_per_host)
            .max_idle_connections(config.max_idle_connections_per_host.saturating_mul(64))
            .user_agent(concat!("ringcast/", env!("CARGO_PKG_VERSION")))
            .no_delay(true)
            .build();
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(config.max_pending_requests);
        let queue = Arc::new(Mutex::new(queue));
        for index in 0..config.threads {
            let (agent, resolver, queue, metrics) = (agent.clone(), resolver.clone(), queue.clone(), metrics.clone());
            let max_bytes = config.max_response_bytes;
            std::thread::Builder::new()
                .name(format!("ringcast-http-{index}"))
                .spawn(move || run_thread(&agent, &resolver, &queue, max_bytes, &metrics))?;
        }
        Ok(HttpPool { jobs, capacity: config.max_pending_requests })
    }

    /// Queues a request; its answer arrives on the receiver (cancelled if the thread died).
    pub fn submit(&self, request: HttpRequest) -> Result<oneshot::Receiver<HttpAnswer>, PoolFull> {
        let (reply, answer) = oneshot::channel();
        match self.jobs.try_send(Job::Call { request, reply }) {
            Ok(()) => Ok(answer),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => Err(PoolFull(self.capacity)),
        }
    }

    /// Queues a check of where `netloc` resolves; `None` when the queue is full (the calls
    /// check it anyway).
    pub fn probe(&self, netloc: String) -> Option<oneshot::Receiver<Result<(), String>>> {
        let (reply, answer) = oneshot::channel();
        self.jobs.try_send(Job::Probe { netloc, reply }).ok().map(|()| answer)
    }
}

fn run_thread(agent: &ureq::Agent, resolver: &AllowlistResolver, queue: &Mutex<Receiver<Job>>, max_bytes: usize, metrics: &HttpFunctionMetrics) {
    loop {
        let next = queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).recv();
        let (request, reply) = match next {
            Err(_) => return,
            // Its caller was answered already (its deadline passed while it waited).
            Ok(Job::Call { reply, .. }) if reply.is_canceled() => continue,
            Ok(Job::Call { request, reply }) => (request, reply),
            Ok(Job::Probe { netloc, reply }) => {
                let checked = ureq::Resolver::resolve(resolver, &netloc).map(drop).map_err(|e| match e.get_ref().and_then(|inner| inner.downcast_ref::<Refused>()) {
                    Some(refused) => refused.0.clone(),
                    None => format!("DNS lookup of {netloc} failed: {e}"),
                });
                let _ = reply.send(checked);
                continue;
            }
        };
        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(agent, &request, max_bytes)))
            .unwrap_or_else(|_| HttpAnswer {
                outcome: Err(ErrorBody::new("http_request_failed", "the HTTP client failed unexpectedly")),
                timed_out: false,
            });
        if answer.timed_out {
            metrics.timeouts_total.fetch_add(1, Ordering::Relaxed);
        }
        if answer.outcome.is_err() {
            metrics.errors_total.fetch_add(1, Ordering::Relaxed);
        }
        let _ = reply.send(answer);
    }
}

/// Sends one request and maps its answer (§8 "Result mapping").
fn execute(agent: &ureq::Agent, request: &HttpRequest, max_bytes: usize) -> HttpAnswer {
    let endpoint = &request.endpoint;
    let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut builder = agent
        .request(endpoint.method.as_str(), &endpoint.url)
        .timeout(endpoint.timeout)
        .set("Content-Type", "application/json")
        .set("x-iii-Function-Path", &request.function_id)
        .set("x-iii-Invocation-ID", &uuid::Uuid::new_v4().to_string())
        .set("x-iii-Timestamp", &timestamp.to_string());
    for (name, value) in &endpoint.headers {
        builder = builder.set(name, value);
    }
    builder = match &endpoint.auth {
        None => builder,
        Some(Auth::Hmac { secret }) => builder.set("x-iii-Signature", &signature(secret, timestamp, &request.body)),
        Some(Auth::Bearer { token }) => builder.set("Authorization", &format!("Bearer {token}")),
        Some(Auth::ApiKey { header, value }) => builder.set(header, value),
    };
    let started = Instant::now();
    let response = match builder.send_bytes(&request.body) {
        Ok(response) | Err(ureq::Error::Status(_, response)) => response,
        Err(ureq::Error::Transport(transport)) => return transport_failure(&transport, started, endpoint.timeout),
    };
    let status = response.status();
    let declared = response.header("content-length").and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_bytes as u64) {
        return too_large(max_bytes);
    }
    let mut body = Vec::new();
    let limit = u64::try_from(max_bytes).unwrap_or(u64::MAX).saturating_add(1);
    if let Err(e) = response.into_reader().take(limit).read_to_end(&mut body) {
        let timed_out = is_timeout(&e) || started.elapsed() >= endpoint.timeout;
        let message = if timed_out {
            format!("the response was not read within {} ms: {e}", endpoint.timeout.as_millis())
        } else {
            format!("reading the response failed: {e}")
        };
        return HttpAnswer { outcome: Err(ErrorBody::new("http_response_failed", message)), timed_out };
    }
    if body.len() > max_bytes {
        return too_large(max_bytes);
    }
    HttpAnswer { outcome: outcome_of(status, &body), timed_out: false }
}

fn too_large(max_bytes: usize) -> HttpAnswer {
    HttpAnswer {
        outcome: Err(ErrorBody::new(
            "http_response_failed",
            format!("the response body is larger than {max_bytes} bytes (max_response_bytes of iii-http-functions)"),
        )),
        timed_out: false,
    }
}

/// A status and a complete body, as the call's outcome.
pub fn outcome_of(status: u16, body: &[u8]) -> Outcome {
    match status {
        200..=299 if body.is_empty() => Ok(None),
        200..=299 => serde_json::from_slice::<Value>(body)
            .map(Some)
            .map_err(|e| ErrorBody::new("invalid_response", format!("the function answered HTTP {status} with a body that is not JSON: {e}"))),
        100..=199 | 300..=399 => Ok(serde_json::from_slice::<Value>(body).ok()),
        _ => {
            let error = serde_json::from_slice::<Value>(body).ok().and_then(|v| v.get("error").cloned());
            match error {
                Some(error) if error.is_object() => Err(ErrorBody::new(
                    error.get("code").and_then(Value::as_str).unwrap_or("http_error"),
                    error.get("message").and_then(Value::as_str).unwrap_or("HTTP request failed"),
                )),
                _ => Err(ErrorBody::new("http_error", format!("HTTP {status}"))),
            }
        }
    }
}

/// A request that got no answer: refused by the allowlist, timed out, or failed in transport.
fn transport_failure(transport: &ureq::Transport, started: Instant, timeout: Duration) -> HttpAnswer {
    let mut chain = transport.to_string();
    let mut refused = None;
    let mut timed_out = false;
    let mut source = std::error::Error::source(transport);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            timed_out |= is_timeout(io);
            if let Some(r) = io.get_ref().and_then(|inner| inner.downcast_ref::<Refused>()) {
                refused = Some(r.0.clone());
            }
        }
        let text = cause.to_string();
        if !chain.contains(&text) {
            chain.push_str(": ");
            chain.push_str(&text);
        }
        source = cause.source();
    }
    if let Some(refused) = refused {
        return HttpAnswer { outcome: Err(ErrorBody::new("url_validation_failed", refused)), timed_out: false };
    }
    timed_out |= started.elapsed() >= timeout;
    let message = if timed_out { format!("no answer within {} ms: {chain}", timeout.as_millis()) } else { chain };
    HttpAnswer { outcome: Err(ErrorBody::new("http_request_failed", message)), timed_out }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn loopback() -> Vec<Network> {
        vec![Network::parse("127.0.0.0/8").unwrap()]
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_and_base64_body() {
        // The helper below against RFC 4231 test case 2 first, then the header against it.
        assert_eq!(expected_hmac("Jefe", "what do ya want for nothing?"), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert_eq!(signature("secret", 1000, b"hello"), format!("sha256={}", expected_hmac("secret", "1000:aGVsbG8=")));
    }

    /// HMAC-SHA256 written out from its definition over ring's SHA-256, to check the header
    /// against something other than the code under test.
    fn expected_hmac(key: &str, message: &str) -> String {
        use ring::digest::{digest, SHA256};
        let mut k = [0u8; 64];
        k[..key.len()].copy_from_slice(key.as_bytes());
        let mut inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
        inner.extend_from_slice(message.as_bytes());
        let inner = digest(&SHA256, &inner);
        let mut outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
        outer.extend_from_slice(inner.as_ref());
        digest(&SHA256, &outer).as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn answers_map_to_outcomes_as_the_reference() {
        assert_eq!(outcome_of(200, b""), Ok(None));
        assert_eq!(outcome_of(200, br#"{"a":1}"#), Ok(Some(json!({ "a": 1 }))));
        assert_eq!(outcome_of(201, b"nope").unwrap_err().code, "invalid_response");
        assert_eq!(outcome_of(302, b"moved"), Ok(None));
        assert_eq!(outcome_of(302, b"[1]"), Ok(Some(json!([1]))));
        let e = outcome_of(502, br#"{"error":{"code":"upstream","message":"down"}}"#).unwrap_err();
        assert_eq!((e.code.as_str(), e.message.as_str()), ("upstream", "down"));
        let e = outcome_of(500, br#"{"error":{}}"#).unwrap_err();
        assert_eq!((e.code.as_str(), e.message.as_str()), ("http_error", "HTTP request failed"));
        let e = outcome_of(404, b"not here").unwrap_err();
        assert_eq!((e.code.as_str(), e.message.as_str()), ("http_error", "HTTP 404"));
    }

    #[test]
    fn registrations_are_checked_and_secrets_read_once() {
        let env = |key: &str| (key == "SET").then(|| "s3cret".to_string());
        let ok = Endpoint::from_registration(json!({ "url": "http://127.0.0.1:9/x", "auth": { "type": "bearer", "token_key": "SET" } }), &loopback(), &HttpFunctionsConfig::default(), env).unwrap();
        assert!(matches!(ok.auth, Some(Auth::Bearer { ref token }) if token == "s3cret"));
        assert_eq!(ok.timeout, Duration::from_millis(30_000));
        let code = |v: Value| Endpoint::from_registration(v, &loopback(), &HttpFunctionsConfig::default(), env).err().map(|e| e.code);
        assert_eq!(code(json!({ "url": "http://10.0.0.1/x" })).as_deref(), Some("url_validation_failed"));
        assert_eq!(code(json!({ "url": "ftp://127.0.0.1/x" })).as_deref(), Some("url_validation_failed"));
        assert_eq!(code(json!({ "url": "not a url" })).as_deref(), Some("url_validation_failed"));
        assert_eq!(code(json!({ "url": "http://127.0.0.1/", "method": "get" })).as_deref(), Some("invalid_http_invocation"));
        assert_eq!(code(json!({ "url": "http://127.0.0.1/", "auth": { "type": "hmac", "secret_key": "UNSET" } })).as_deref(), Some("secret_not_found"));
        assert_eq!(code(json!({ "url": "http://127.0.0.1/", "auth": { "type": "bearer", "token_key": "UNSET" } })).as_deref(), Some("token_not_found"));
        assert_eq!(
            code(json!({ "url": "http://127.0.0.1/", "auth": { "type": "api_key", "header": "x-key", "value_key": "UNSET" } })).as_deref(),
            Some("api_key_not_found")
        );
        assert_eq!(code(json!({ "url": "http://127.0.0.1/", "timeout_ms": 300_001 })).as_deref(), Some("invalid_http_invocation"));
        assert_eq!(code(json!({ "url": "http://127.0.0.1/", "headers": { "bad name": "1" } })).as_deref(), Some("invalid_http_invocation"));
        assert_eq!(code(json!({ "url": "http://127.0.0.1/", "headers": { "x-a": "1\r\nx-b: 2" } })).as_deref(), Some("invalid_http_invocation"));
        assert_eq!(
            code(json!({ "url": "http://127.0.0.1/", "auth": { "type": "api_key", "header": "x:y", "value_key": "SET" } })).as_deref(),
            Some("invalid_http_invocation")
        );
        // A host name is checked at each connection, after resolution.
        let named = Endpoint::from_registration(json!({ "url": "http://localhost:9/" }), &loopback(), &HttpFunctionsConfig::default(), env).unwrap();
        assert_eq!(named.host_name.as_deref(), Some("localhost:9"));
    }

    #[test]
    fn the_resolver_keeps_only_allowed_addresses() {
        let resolver = AllowlistResolver { networks: Arc::new(vec![Network::parse("127.0.0.2/32").unwrap()]) };
        let refused = ureq::Resolver::resolve(&resolver, "127.0.0.1:80").unwrap_err();
        assert!(refused.get_ref().and_then(|e| e.downcast_ref::<Refused>()).is_some());
        assert_eq!(ureq::Resolver::resolve(&resolver, "127.0.0.2:80").unwrap(), vec!["127.0.0.2:80".parse().unwrap()]);
        assert!(ureq::Resolver::resolve(&resolver, "localhost:80").is_err(), "localhost resolves outside the list");
    }
}
