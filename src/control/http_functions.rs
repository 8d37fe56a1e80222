//! HTTP-invoked functions on the control core: the registry entry of one (its checked endpoint,
//! or why the registration was refused), the per-function limit — at most
//! `max_concurrency_per_function` requests running, at most `max_queue_per_function` calls
//! waiting, anything beyond answered `http_queue_full` at once — and the table of calls not
//! answered yet, which is the one owner of their replies (shutdown answers them all). The
//! requests themselves run on the HTTP threads (`crate::http_functions::client`); the control
//! core only hands them over and delivers the outcome, so a slow endpoint never holds it.

use super::engine::Engine;
use super::invocations::{Call, Outcome, Reply};
use super::wire::ErrorBody;
use crate::http_functions::client::{Endpoint, HttpRequest};
use crate::http_functions::HttpService;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use futures_util::future::{select, Either};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long past a request's own timeout its caller waits before it is answered anyway.
const CALLER_DEADLINE_GRACE: Duration = Duration::from_secs(1);

/// One registered HTTP-invoked function.
pub struct HttpFunction {
    id: String,
    /// The checked endpoint, or the registration's error, which every call then answers.
    endpoint: Result<Arc<Endpoint>, ErrorBody>,
    slots: RefCell<Slots>,
}

/// The function's running requests and the calls waiting for one of its slots.
#[derive(Default)]
struct Slots {
    running: usize,
    waiting: VecDeque<Waiting>,
}

/// A call waiting for a slot: its number in [`HttpCalls`] and its request body.
struct Waiting {
    call: u64,
    body: Vec<u8>,
}

/// The HTTP service and the replies of the calls it has not answered yet, by call number, with
/// the size of each call's request body.
pub struct HttpCalls {
    service: Rc<HttpService>,
    replies: HashMap<u64, (Reply, usize)>,
    last: u64,
    /// Request bytes of the calls in `replies`.
    bytes: usize,
}

impl Engine {
    /// Installs the HTTP function service (the boot code does, when `iii-http-functions` is on).
    pub fn install_http_functions(&mut self, service: HttpService) {
        self.http_functions = Some(HttpCalls { service: Rc::new(service), replies: HashMap::new(), last: 0, bytes: 0 });
    }

    /// Checks a registration's `invocation`: the function is registered either way; a refused
    /// one answers each call with the reason (and the refusal is logged now).
    pub(super) fn http_function(&self, id: &str, invocation: Value) -> Rc<HttpFunction> {
        let endpoint = match &self.http_functions {
            Some(http) => Endpoint::from_registration(invocation, &http.service.networks, &http.service.config, |key| std::env::var(key).ok()),
            None => Err(ErrorBody::new("function_not_invokable", "iii-http-functions is off")),
        };
        match &endpoint {
            Ok(e) => {
                tracing::info!(function_id = id, url = e.url(), "HTTP function registered");
                if let (Some(netloc), Some(http)) = (&e.host_name, &self.http_functions) {
                    self.probe_host(&http.service, id, netloc.clone());
                }
            }
            Err(e) => tracing::warn!(function_id = id, code = %e.code, "HTTP function registration refused: {}; its calls answer this error", e.message),
        }
        Rc::new(HttpFunction { id: id.to_string(), endpoint: endpoint.map(Arc::new), slots: RefCell::default() })
    }

    /// A URL with a host name is checked at each connection, on the addresses the name then
    /// resolves to; one lookup at registration tells the log early when it leads outside
    /// `allowed_networks`.
    fn probe_host(&self, service: &HttpService, id: &str, netloc: String) {
        let Some(checked) = service.pool.probe(netloc) else { return };
        let id = id.to_string();
        self.spawn(async move {
            if let Ok(Err(why)) = checked.await {
                tracing::warn!(function_id = %id, "HTTP function registered, but its calls will fail while this holds: {why}");
            }
        });
    }

    /// Runs a call of an HTTP-invoked function: now if the function has a free slot, later if
    /// its queue has room, else refused.
    pub(super) fn invoke_http(&mut self, function: Rc<HttpFunction>, call: Call, reply: Reply) {
        let Some(http) = &mut self.http_functions else {
            self.complete(reply, Err(ErrorBody::new("function_not_invokable", "iii-http-functions is off")), None, None);
            return;
        };
        let service = http.service.clone();
        if let Err(e) = &function.endpoint {
            service.metrics.errors_total.fetch_add(1, Ordering::Relaxed);
            self.complete(reply, Err(e.clone()), None, None);
            return;
        }
        let body = match serde_json::to_vec(&call.data) {
            Ok(body) => body,
            Err(e) => {
                self.complete(reply, Err(ErrorBody::new("serialization_error", e.to_string())), None, None);
                return;
            }
        };
        if http.bytes > 0 && http.bytes.saturating_add(body.len()) > service.config.max_buffered_bytes {
            let message = format!(
                "HTTP function calls already hold {} bytes of requests (max_buffered_bytes of iii-http-functions); try again later",
                http.bytes
            );
            service.metrics.rejected_total.fetch_add(1, Ordering::Relaxed);
            service.metrics.errors_total.fetch_add(1, Ordering::Relaxed);
            self.complete(reply, Err(ErrorBody::new("http_queue_full", message)), None, None);
            return;
        }
        let mut slots = function.slots.borrow_mut();
        let running = slots.running;
        if running < service.config.max_concurrency_per_function {
            slots.running += 1;
            drop(slots);
            let number = http.remember(reply, body.len());
            if !self.start_http(&service, &function, number, body) {
                self.http_slot_freed(&service, &function);
            }
        } else if slots.waiting.len() < service.config.max_queue_per_function {
            let number = http.remember(reply, body.len());
            slots.waiting.push_back(Waiting { call: number, body });
            service.metrics.queued.fetch_add(1, Ordering::Relaxed);
        } else {
            let message = format!(
                "{} has {running} requests running and {} calls waiting (max_concurrency_per_function / max_queue_per_function of iii-http-functions); try again later",
                function.id,
                slots.waiting.len()
            );
            drop(slots);
            service.metrics.rejected_total.fetch_add(1, Ordering::Relaxed);
            service.metrics.errors_total.fetch_add(1, Ordering::Relaxed);
            self.complete(reply, Err(ErrorBody::new("http_queue_full", message)), None, None);
        }
    }

    /// Hands call `number` to the HTTP threads; a slot of `function` is taken for it. When the
    /// threads' queue is full the call is answered `http_queue_full` and `false` returned (the
    /// slot is still the caller's to free).
    fn start_http(&mut self, service: &Rc<HttpService>, function: &Rc<HttpFunction>, number: u64, body: Vec<u8>) -> bool {
        let Ok(endpoint) = &function.endpoint else { return false };
        let request = HttpRequest { function_id: function.id.clone(), endpoint: endpoint.clone(), body };
        let answer = match service.pool.submit(request) {
            Ok(answer) => answer,
            Err(full) => {
                service.metrics.rejected_total.fetch_add(1, Ordering::Relaxed);
                service.metrics.errors_total.fetch_add(1, Ordering::Relaxed);
                self.answer_http(number, Err(ErrorBody::new("http_queue_full", full.to_string())));
                return false;
            }
        };
        service.metrics.calls_total.fetch_add(1, Ordering::Relaxed);
        service.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        let weak = self.weak_self();
        let (service, function) = (service.clone(), function.clone());
        // The request's own timeout normally answers first; this deadline covers what it does
        // not: a wait for a free HTTP thread, a system DNS lookup that hangs. Giving up drops
        // the answer's receiver, so a thread that had not started the request skips it.
        let deadline = endpoint.timeout + CALLER_DEADLINE_GRACE;
        self.spawn(async move {
            let outcome = match select(answer, std::pin::pin!(glommio::timer::sleep(deadline))).await {
                Either::Left((Ok(answer), _)) => answer.outcome,
                Either::Left((Err(_), _)) => Err(ErrorBody::new("http_request_failed", "the HTTP request was dropped by its thread")),
                Either::Right(((), _)) => {
                    service.metrics.timeouts_total.fetch_add(1, Ordering::Relaxed);
                    service.metrics.errors_total.fetch_add(1, Ordering::Relaxed);
                    let message = format!("no answer within {} ms: no HTTP thread was free, or it is stuck (a DNS lookup that hangs?)", deadline.as_millis());
                    Err(ErrorBody::new("http_request_failed", message))
                }
            };
            service.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
            if let Some(engine) = weak.upgrade() {
                let mut engine = engine.borrow_mut();
                engine.answer_http(number, outcome);
                engine.http_slot_freed(&service, &function);
            }
        });
        true
    }

    /// Answers call `number`, unless it was answered already (shutdown).
    fn answer_http(&mut self, number: u64, outcome: Outcome) {
        if let Some(reply) = self.http_functions.as_mut().and_then(|http| http.forget(number)) {
            self.complete(reply, outcome, None, None);
        }
    }

    /// A request of `function` ended: its slot goes to the next waiting call, if any.
    fn http_slot_freed(&mut self, service: &Rc<HttpService>, function: &Rc<HttpFunction>) {
        loop {
            let next = {
                let mut slots = function.slots.borrow_mut();
                match slots.waiting.pop_front() {
                    Some(next) => next,
                    None => {
                        slots.running = slots.running.saturating_sub(1);
                        return;
                    }
                }
            };
            service.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            let waits = self.http_functions.as_ref().is_some_and(|http| http.replies.contains_key(&next.call));
            if waits && self.start_http(service, function, next.call, next.body) {
                return;
            }
        }
    }

    /// Answers every HTTP call not answered yet with `engine_shutdown` (shutdown).
    pub(super) fn fail_http_calls(&mut self) {
        let Some(http) = &mut self.http_functions else { return };
        let replies: Vec<Reply> = http.replies.drain().map(|(_, (reply, _))| reply).collect();
        http.bytes = 0;
        http.service.metrics.buffered_bytes.store(0, Ordering::Relaxed);
        for reply in replies {
            self.complete(reply, Err(ErrorBody::new("engine_shutdown", "ringcast is shutting down")), None, None);
        }
    }
}

impl HttpCalls {
    /// Keeps a call's reply until it is answered, counting its request's `bytes`; returns its
    /// number.
    fn remember(&mut self, reply: Reply, bytes: usize) -> u64 {
        self.last += 1;
        self.replies.insert(self.last, (reply, bytes));
        self.bytes += bytes;
        self.service.metrics.buffered_bytes.store(self.bytes as u64, Ordering::Relaxed);
        self.last
    }

    /// Takes a call's reply to answer it.
    fn forget(&mut self, number: u64) -> Option<Reply> {
        let (reply, bytes) = self.replies.remove(&number)?;
        self.bytes = self.bytes.saturating_sub(bytes);
        self.service.metrics.buffered_bytes.store(self.bytes as u64, Ordering::Relaxed);
        Some(reply)
    }
}
