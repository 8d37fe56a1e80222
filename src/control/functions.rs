//! The function registry: function ids, per namespace, mapped to who runs them — a worker
//! connection, or an in-process builtin installed by whoever boots the engine (the engine's own
//! `engine::*` functions, the stream module's `stream::*`). Also the worker messages that change
//! it (`registerfunction`, `unregisterfunction`) and the reservation of the engine's ids.

use super::engine::Engine;
use super::http_functions::HttpFunction;
use super::invocations::Outcome;
use super::ns_map::{ns_key, NsMap, DEFAULT_NS};
use super::wire::{ErrorBody, Outbound, RegisterFunction};
use super::workers::WorkerConnId;
use serde::Deserialize;
use serde_json::{json, Value};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

/// A builtin's answer: now, or from a task that completes later.
pub enum BuiltinReply {
    Now(Outcome),
    Later(Pin<Box<dyn Future<Output = Outcome>>>),
}

/// An in-process function: runs on the control core with the engine borrowed, so it must not
/// block; work that waits goes into a [`BuiltinReply::Later`]. A closure, so that a module can
/// hand its own state (the stream module's shard inboxes) to the functions it installs.
pub type Builtin = Rc<dyn Fn(&mut Engine, Value) -> BuiltinReply>;

/// Who runs a function.
#[derive(Clone)]
pub enum Handler {
    Worker(WorkerConnId),
    Builtin(Builtin),
    /// An HTTP-invoked function (§8): registered, and owned, by `owner`; run by the engine.
    Http { owner: WorkerConnId, function: Rc<HttpFunction> },
}

impl Handler {
    /// The worker connection that runs the function, if a worker does.
    pub fn worker(&self) -> Option<WorkerConnId> {
        match self {
            Handler::Worker(conn) | Handler::Http { owner: conn, .. } => Some(*conn),
            Handler::Builtin(_) => None,
        }
    }
}

/// A registered function and who runs it.
pub struct FunctionEntry {
    pub handler: Handler,
    pub description: Option<String>,
    pub request_format: Option<Value>,
    pub response_format: Option<Value>,
    pub metadata: Option<Value>,
}

/// Every registered function by `(namespace, id)`.
#[derive(Default)]
pub struct Functions {
    by_id: NsMap<FunctionEntry>,
}

impl Functions {
    pub fn get(&self, ns: &str, id: &str) -> Option<&FunctionEntry> {
        self.by_id.get(ns, id)
    }

    pub fn insert(&mut self, ns: &str, id: &str, entry: FunctionEntry) {
        self.by_id.insert(ns, id, entry);
    }

    pub fn remove(&mut self, ns: &str, id: &str) -> Option<FunctionEntry> {
        self.by_id.remove(ns, id)
    }

    /// Every `(namespace, id, entry)`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &FunctionEntry)> {
        self.by_id.iter()
    }

    /// Namespaces other than `except` that hold `id`, sorted.
    pub fn namespaces_holding(&self, id: &str, except: &str) -> Vec<String> {
        self.by_id.namespaces_holding(id, except)
    }

    /// The worker connection that runs `(ns, id)`, if a worker does.
    pub fn owner(&self, ns: &str, id: &str) -> Option<WorkerConnId> {
        self.get(ns, id).and_then(|f| f.handler.worker())
    }

    /// Whether `id` is one of the engine's in-process functions.
    fn is_builtin(&self, id: &str) -> bool {
        matches!(self.get(DEFAULT_NS, id), Some(f) if matches!(f.handler, Handler::Builtin(_)))
    }
}

/// A builtin's answer, available now.
pub fn reply_now(outcome: Result<Value, ErrorBody>) -> BuiltinReply {
    BuiltinReply::Now(outcome.map(Some))
}

/// Decodes a builtin's input; unknown keys (such as `_caller_worker_id`) are ignored.
pub fn decode_input<T: for<'de> Deserialize<'de>>(id: &str, data: Value) -> Result<T, ErrorBody> {
    let data = if data.is_null() { json!({}) } else { data };
    serde_json::from_value(data).map_err(|e| {
        ErrorBody::new("deserialization_error", format!("Failed to deserialize input for {id}: {e}"))
    })
}

impl Engine {
    /// Installs an in-process function in the default namespace (the boot code does, for the
    /// engine's own functions and the stream module's). Its id becomes reserved: no worker can
    /// replace or shadow it.
    pub fn register_builtin(&mut self, id: &str, description: &str, run: Builtin) {
        self.functions.insert(
            DEFAULT_NS,
            id,
            FunctionEntry {
                handler: Handler::Builtin(run),
                description: Some(description.to_string()),
                request_format: None,
                response_format: None,
                metadata: None,
            },
        );
    }

    /// Whether a function `(ns, id)` is registered (by a worker or in-process).
    pub fn has_function(&self, ns: &str, id: &str) -> bool {
        self.functions.get(ns, id).is_some()
    }

    /// `registerfunction` from a worker.
    pub(super) fn register_function(&mut self, conn: WorkerConnId, mut m: RegisterFunction) {
        if m.invocation.is_some() && self.http_functions.is_none() {
            tracing::warn!(function_id = %m.id, "HTTP-invoked function ignored: iii-http-functions is off");
            return;
        }
        let ns = self.workers[conn].namespace.clone();
        if self.is_reserved_function(&ns, &m.id) {
            self.reject_reserved(conn, &ns, &m.id, "function");
            return;
        }
        if let Some(owner) = self.functions.owner(&ns, &m.id) {
            if owner != conn && self.workers.contains(owner) {
                let owner_id = self.workers[owner].worker_id.clone();
                tracing::warn!(function_id = %m.id, "function already registered by another worker; refused");
                self.workers[conn].send(&Outbound::RegistrationRejected {
                    code: "FUNCTION_NAMESPACE_CONFLICT",
                    namespace: &ns,
                    worker_name: None,
                    function_id: Some(&m.id),
                    owner_worker_id: &owner_id,
                });
                return;
            }
        }
        let handler = match m.invocation.take() {
            None => Handler::Worker(conn),
            Some(invocation) => Handler::Http { owner: conn, function: self.http_function(&m.id, invocation) },
        };
        tracing::debug!(function_id = %m.id, "function registered");
        self.functions.insert(
            &ns,
            &m.id,
            FunctionEntry {
                handler,
                description: m.description,
                request_format: m.request_format,
                response_format: m.response_format,
                metadata: m.metadata,
            },
        );
        if let Some(c) = self.workers.get_mut(conn) {
            c.functions.insert(ns_key(&ns, &m.id));
        }
        self.functions_changed();
    }

    /// `unregisterfunction` from a worker: removes the function if this worker runs it.
    pub(super) fn unregister_function(&mut self, conn: WorkerConnId, id: &str) {
        let ns = self.workers[conn].namespace.clone();
        if self.functions.owner(&ns, id) == Some(conn) {
            self.functions.remove(&ns, id);
            if let Some(c) = self.workers.get_mut(conn) {
                c.functions.remove(&ns_key(&ns, id));
            }
            self.functions_changed();
        }
    }

    /// The engine's own function ids belong to the engine in every namespace: a worker can
    /// neither replace them nor shadow them. `engine::` ids are also reserved outside `default`
    /// (as the reference); in `default` workers may add new ones (the queue worker's
    /// `engine::queue::enqueue`). Custom stream functions (`stream::get(<name>)`) are not
    /// builtin ids, so they stay open to workers.
    pub(super) fn is_reserved_function(&self, ns: &str, id: &str) -> bool {
        self.functions.is_builtin(id) || (ns != DEFAULT_NS && id.starts_with("engine::"))
    }

    /// Refuses a worker's registration of an engine-owned id. The code is
    /// `FUNCTION_NAMESPACE_CONFLICT` with an empty owner, as the reference words its reserved
    /// `engine::` refusal: the one code every SDK treats as non-fatal (any other stops a Python
    /// worker for good).
    pub(super) fn reject_reserved(&self, conn: WorkerConnId, ns: &str, id: &str, what: &str) {
        let Some(c) = self.workers.get(conn) else { return };
        tracing::warn!(worker_id = %c.worker_id, namespace = %ns, id, "refused a worker's registration of the engine's own {what}");
        c.send(&Outbound::RegistrationRejected {
            code: "FUNCTION_NAMESPACE_CONFLICT",
            namespace: ns,
            worker_name: None,
            function_id: Some(id),
            owner_worker_id: "",
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::control::test_support::{engine, on_executor, settle, FakeWorker};
    use serde_json::json;

    const CALL_ID: &str = "0b7f3c1e-8a5d-4e2f-9c61-7d2e4b9a1f03";

    #[test]
    fn the_engine_ids_are_refused_to_workers() {
        on_executor(|| async {
            let engine = engine();
            let mut worker = FakeWorker::connect(&engine);
            worker.register_function(&engine, "engine::functions::list");
            let refused = worker.next("registrationrejected");
            assert_eq!((&refused["code"], &refused["function_id"], &refused["owner_worker_id"]), (&json!("FUNCTION_NAMESPACE_CONFLICT"), &json!("engine::functions::list"), &json!("")));
            // The builtin still answers.
            worker.send(&engine, json!({ "type": "invokefunction", "invocation_id": CALL_ID, "function_id": "engine::functions::list" }));
            assert!(worker.next("invocationresult")["result"]["functions"].is_array());

            worker.send(&engine, json!({ "type": "registertriggertype", "id": "engine::workers-available", "description": "mine" }));
            assert_eq!(worker.next("registrationrejected")["function_id"], "engine::workers-available");

            // New `engine::` ids are open to workers in the default namespace only.
            worker.register_function(&engine, "engine::queue::enqueue");
            assert!(worker.drain().is_empty());
            let mut elsewhere = FakeWorker::connect(&engine);
            elsewhere.send(&engine, json!({
                "type": "invokefunction", "invocation_id": CALL_ID, "function_id": "engine::workers::register",
                "data": { "namespace": "billing" },
            }));
            assert_eq!(elsewhere.next("invocationresult")["result"], json!({ "success": true }));
            elsewhere.register_function(&engine, "engine::custom");
            let refused = elsewhere.next("registrationrejected");
            assert_eq!((&refused["namespace"], &refused["function_id"]), (&json!("billing"), &json!("engine::custom")));
            settle().await;
        });
    }

    #[test]
    fn a_function_of_another_worker_is_not_replaced() {
        on_executor(|| async {
            let engine = engine();
            let mut first = FakeWorker::connect(&engine);
            let mut second = FakeWorker::connect(&engine);
            first.register_function(&engine, "math::add");
            second.register_function(&engine, "math::add");
            let refused = second.next("registrationrejected");
            assert_eq!(refused["owner_worker_id"], first.worker_id.as_str());
            assert_eq!(engine.borrow().functions.owner("default", "math::add"), Some(first.conn));
            assert!(first.drain().is_empty());
            settle().await;
        });
    }
}
