//! HTTP-invoked functions on the control core: the registry entry of one (its checked endpoint,
//! or why the registration was refused), and the per-function limit — at most
//! `max_concurrency_per_function` requests running, at most `max_queue_per_function` calls
//! waiting, anything beyond answered `http_queue_full` at once. The requests themselves run on
//! the HTTP threads (`crate::http_functions::client`); the control core only hands them over
//! and delivers the outcome, so a slow endpoint never holds it.

use super::engine::Engine;
use super::invocations::{Call, Reply};
use super::wire::ErrorBody;
use crate::http_functions::client::{Endpoint, HttpRequest};
use crate::http_functions::HttpService;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

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

struct Waiting {
    body: Vec<u8>,
    reply: Reply,
}

impl Engine {
    /// Checks a registration's `invocation`: the function is registered either way; a refused
    /// one answers each call with the reason (and the refusal is logged now).
    pub(super) fn http_function(&self, id: &str, invocation: Value) -> Rc<HttpFunction> {
        let endpoint = match &self.http_functions {
            Some(service) => Endpoint::from_registration(invocation, &service.networks, &service.config, |key| std::env::var(key).ok()),
            None => Err(ErrorBody::new("function_not_invokable", "iii-http-functions is off")),
        };
        match &endpoint {
            Ok(e) => match &e.host_name {
                Some(host) => tracing::info!(function_id = id, url = e.url(), "HTTP function registered; {host} is resolved and checked against allowed_networks at each connection"),
                None => tracing::info!(function_id = id, url = e.url(), "HTTP function registered"),
            },
            Err(e) => tracing::warn!(function_id = id, code = %e.code, "HTTP function registration refused: {}; its calls answer this error", e.message),
        }
        Rc::new(HttpFunction { id: id.to_string(), endpoint: endpoint.map(Arc::new), slots: RefCell::default() })
    }

    /// Runs a call of an HTTP-invoked function: now if the function has a free slot, later if
    /// its queue has room, else refused.
    pub(super) fn invoke_http(&mut self, function: Rc<HttpFunction>, call: Call, reply: Reply) {
        let Some(service) = self.http_functions.clone() else {
            self.complete(reply, Err(ErrorBody::new("function_not_invokable", "iii-http-functions is off")), None, None);
            return;
        };
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
        let mut slots = function.slots.borrow_mut();
        if slots.running < service.config.max_concurrency_per_function {
            slots.running += 1;
            drop(slots);
            if let Err(reply) = self.start_http(&service, &function, body, reply) {
                self.refuse_full(&service, reply, format!("{} HTTP requests are already waiting for a thread (max_pending_requests of iii-http-functions)", service.config.max_pending_requests));
                self.http_slot_freed(&service, &function);
            }
        } else if slots.waiting.len() < service.config.max_queue_per_function {
            slots.waiting.push_back(Waiting { body, reply });
            service.metrics.queued.fetch_add(1, Ordering::Relaxed);
        } else {
            let message = format!(
                "{} has {} requests running and {} calls waiting (max_concurrency_per_function / max_queue_per_function of iii-http-functions); try again later",
                function.id, slots.running, slots.waiting.len()
            );
            drop(slots);
            self.refuse_full(&service, reply, message);
        }
    }

    fn refuse_full(&mut self, service: &HttpService, reply: Reply, message: String) {
        service.metrics.rejected_total.fetch_add(1, Ordering::Relaxed);
        service.metrics.errors_total.fetch_add(1, Ordering::Relaxed);
        self.complete(reply, Err(ErrorBody::new("http_queue_full", message)), None, None);
    }

    /// Hands a request to the HTTP threads; a slot of `function` is already taken for it. The
    /// reply comes back when the threads' queue is full.
    fn start_http(&mut self, service: &Rc<HttpService>, function: &Rc<HttpFunction>, body: Vec<u8>, reply: Reply) -> Result<(), Reply> {
        let Ok(endpoint) = &function.endpoint else { return Err(reply) };
        let request = HttpRequest { function_id: function.id.clone(), endpoint: endpoint.clone(), body };
        let Ok(answer) = service.pool.submit(request) else { return Err(reply) };
        service.metrics.calls_total.fetch_add(1, Ordering::Relaxed);
        service.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        let weak = self.weak_self();
        let (service, function) = (service.clone(), function.clone());
        self.spawn(async move {
            let outcome = match answer.await {
                Ok(answer) => answer.outcome,
                Err(_) => Err(ErrorBody::new("http_request_failed", "the HTTP request was dropped by its thread")),
            };
            service.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
            if let Some(engine) = weak.upgrade() {
                let mut engine = engine.borrow_mut();
                engine.complete(reply, outcome, None, None);
                engine.http_slot_freed(&service, &function);
            }
        });
        Ok(())
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
            match self.start_http(service, function, next.body, next.reply) {
                Ok(()) => return,
                Err(reply) => self.refuse_full(service, reply, format!("{} HTTP requests are already waiting for a thread (max_pending_requests of iii-http-functions)", service.config.max_pending_requests)),
            }
        }
    }

    /// Installs the HTTP function service (the boot code does, when `iii-http-functions` is on).
    pub fn install_http_functions(&mut self, service: HttpService) {
        self.http_functions = Some(Rc::new(service));
    }
}
