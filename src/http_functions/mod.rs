//! HTTP-invoked functions (spec/worker-protocol.md §8): a worker registers a function with an
//! `invocation` (URL, method, headers, timeout, auth) and the engine runs each call of it as an
//! HTTP request instead of sending it to the worker.
//!
//! `config.rs` holds the `iii-http-functions` settings and the destination allowlist;
//! `client.rs` the checked endpoint, the thread pool that runs the blocking requests off the
//! control core, and the mapping of answers to outcomes. The control core's side (the registry
//! entry, the per-function limit and queue) is `control/http_functions.rs`.

pub mod client;
pub mod config;

pub use config::HttpFunctionsConfig;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counters of HTTP-invoked functions (`ringcast_http_function_*`).
#[derive(Default)]
pub struct HttpFunctionMetrics {
    /// Calls sent as HTTP requests.
    pub calls_total: AtomicU64,
    /// Calls that ended with an error, timeouts and refusals included.
    pub errors_total: AtomicU64,
    /// Requests that got no complete answer within their timeout.
    pub timeouts_total: AtomicU64,
    /// Calls refused at once because a queue was full.
    pub rejected_total: AtomicU64,
    /// Requests running or waiting for a thread.
    pub in_flight: AtomicU64,
    /// Calls waiting for a free slot of their function.
    pub queued: AtomicU64,
    /// Request bytes held by calls not answered yet.
    pub buffered_bytes: AtomicU64,
}

impl HttpFunctionMetrics {
    /// The Prometheus text of these counters, appended to `out`.
    pub fn render(&self, out: &mut String) {
        for (name, help, kind, value) in [
            ("ringcast_http_function_calls_total", "Calls of HTTP-invoked functions sent as HTTP requests", "counter", &self.calls_total),
            ("ringcast_http_function_errors_total", "Calls of HTTP-invoked functions that ended with an error", "counter", &self.errors_total),
            ("ringcast_http_function_timeouts_total", "HTTP function requests without a complete answer within their timeout", "counter", &self.timeouts_total),
            ("ringcast_http_function_rejected_total", "HTTP function calls refused because a queue was full", "counter", &self.rejected_total),
            ("ringcast_http_function_in_flight", "HTTP function requests running or waiting for a thread", "gauge", &self.in_flight),
            ("ringcast_http_function_queued", "HTTP function calls waiting for a slot of their function", "gauge", &self.queued),
            ("ringcast_http_function_buffered_bytes", "Request bytes held by HTTP function calls not answered yet", "gauge", &self.buffered_bytes),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", value.load(Ordering::Relaxed));
        }
    }
}

/// What the control core holds to run HTTP-invoked functions.
pub struct HttpService {
    pub config: HttpFunctionsConfig,
    pub networks: Vec<config::Network>,
    pub pool: client::HttpPool,
    pub metrics: Arc<HttpFunctionMetrics>,
}

impl HttpService {
    /// Starts the request threads. `None` (with a log line) when the module is off or the
    /// threads cannot be started: registrations with `invocation` are then ignored.
    pub fn start(config: &HttpFunctionsConfig, metrics: Arc<HttpFunctionMetrics>) -> Option<HttpService> {
        if !config.enabled {
            tracing::info!("iii-http-functions is off (enabled: false): registrations with an invocation are ignored");
            return None;
        }
        if config.security.is_some() {
            tracing::warn!("iii-http-functions.security is accepted and not used: ringcast limits destinations with allowed_networks");
        }
        match client::HttpPool::start(config, metrics.clone()) {
            Ok(pool) => Some(HttpService { config: config.clone(), networks: config.networks(), pool, metrics }),
            Err(e) => {
                tracing::error!("cannot start the HTTP function threads ({e}); registrations with an invocation are ignored");
                None
            }
        }
    }
}
