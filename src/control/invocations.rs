//! The invocation registry and invocation routing (spec §4): sync, void and enqueue calls, the
//! pending table keyed by invocation id with its engine-side deadlines, result correlation, and
//! how each call is answered.

use super::engine::Engine;
use super::functions::{BuiltinReply, Handler};
use super::ns_map::{is_blank, DEFAULT_NS};
use super::wire::{Action, ErrorBody, InvocationResult, InvokeFunction, Outbound, Payload};
use super::workers::WorkerConnId;
use futures_channel::oneshot;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Outcome of a call: a result (`None` = the function returned nothing) or an error.
pub type Outcome = Result<Option<Value>, ErrorBody>;

/// Who is told when an invocation completes.
pub enum Reply {
    /// A worker waiting with its own invocation id.
    Caller { conn: WorkerConnId, invocation_id: String, function_id: String },
    /// An engine-internal caller (enqueue, triggers, other modules).
    Internal(oneshot::Sender<Outcome>),
    /// Nobody (void calls, trigger fires, callers that left).
    Discard,
}

/// An invocation forwarded to a worker, waiting for its `invocationresult`.
pub struct Pending {
    pub owner: WorkerConnId,
    pub reply: Reply,
}

/// Invocations forwarded to workers and not answered yet.
#[derive(Default)]
pub struct Invocations {
    pending: HashMap<Uuid, Pending>,
    /// `(deadline, id)` of invocations under the engine-side timeout, in deadline order.
    deadlines: VecDeque<(Instant, Uuid)>,
}

/// What [`Invocations::pop_due`] found.
enum Due {
    /// This invocation's deadline has passed (it may already be answered).
    Expired(Uuid),
    /// The next deadline is this far away.
    In(Duration),
    /// No deadline is set.
    Nothing,
}

impl Invocations {
    fn insert(&mut self, id: Uuid, pending: Pending, deadline: Option<Instant>) {
        if let Some(deadline) = deadline {
            self.deadlines.push_back((deadline, id));
        }
        self.pending.insert(id, pending);
    }

    pub fn contains(&self, id: &Uuid) -> bool {
        self.pending.contains_key(id)
    }

    pub fn remove(&mut self, id: &Uuid) -> Option<Pending> {
        self.pending.remove(id)
    }

    pub fn get_mut(&mut self, id: &Uuid) -> Option<&mut Pending> {
        self.pending.get_mut(id)
    }

    /// Every pending invocation, removed.
    fn drain(&mut self) -> Vec<Pending> {
        self.deadlines.clear();
        self.pending.drain().map(|(_, p)| p).collect()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Takes the first deadline that has passed at `now`.
    fn pop_due(&mut self, now: Instant) -> Due {
        match self.deadlines.front() {
            None => Due::Nothing,
            Some(&(deadline, _)) if deadline > now => Due::In(deadline - now),
            Some(_) => self.deadlines.pop_front().map_or(Due::Nothing, |(_, id)| Due::Expired(id)),
        }
    }
}

/// A call to route.
pub struct Call {
    pub namespace: String,
    pub function_id: String,
    /// Forwarded as it is to a worker; decoded only when a builtin runs the call.
    pub data: Payload,
    pub metadata: Option<Payload>,
    pub traceparent: Option<String>,
    pub baggage: Option<String>,
    /// The caller's id, reused on the hop to the owner for sync calls (spec §4.2).
    pub forward_id: Option<Uuid>,
}

impl Call {
    /// An engine-originated call (trigger fires, enqueue, modules).
    pub fn internal(namespace: &str, function_id: &str, data: Value, metadata: Option<Value>) -> Call {
        Call {
            namespace: namespace.to_string(),
            function_id: function_id.to_string(),
            data: Payload::Value(data),
            metadata: metadata.map(Payload::Value),
            traceparent: None,
            baggage: None,
            forward_id: None,
        }
    }
}

/// Rewrites the `iii.function.id` baggage entry to the target, as the reference does.
fn rewrite_baggage(baggage: Option<&str>, function_id: &str) -> Option<String> {
    let baggage = baggage?;
    let entries: Vec<String> = baggage
        .split(',')
        .map(|entry| {
            if entry.trim_start().starts_with("iii.function.id=") {
                format!("iii.function.id={function_id}")
            } else {
                entry.to_string()
            }
        })
        .collect();
    Some(entries.join(","))
}

impl Engine {
    /// An `invokefunction` from a worker.
    pub fn invoke_from_worker(&mut self, conn: WorkerConnId, m: InvokeFunction) {
        let void = matches!(m.action, Some(Action::Void));
        // The caller's id, for the answer; void calls get none.
        let caller_id = if void { None } else { m.invocation_id.clone() };
        let parsed_id = match caller_id.as_deref().map(|id| (id, Uuid::parse_str(id))) {
            Some((id, Err(_))) => {
                let id = id.to_string();
                tracing::warn!(invocation_id = %id, "invokefunction with a non-UUID invocation_id refused");
                self.reply_to_worker(
                    conn,
                    &id,
                    &m.function_id,
                    Err(ErrorBody::new(
                        "invalid_invocation_id",
                        format!("invocation_id {id:?} is not a UUID"),
                    )),
                    None,
                    None,
                );
                return;
            }
            Some((_, Ok(uuid))) => Some(uuid),
            None => None,
        };
        let reply = match &caller_id {
            Some(id) => Reply::Caller { conn, invocation_id: id.clone(), function_id: m.function_id.clone() },
            None => Reply::Discard,
        };
        if is_blank(&m.namespace) {
            self.complete(reply, Err(ErrorBody::new("INVALID_NAMESPACE", "the namespace field is present but empty")), None, None);
            return;
        }
        let namespace = m.namespace.unwrap_or_else(|| DEFAULT_NS.to_string());
        if let Some(Action::Enqueue { queue }) = m.action {
            let data = m.data.map(Payload::Raw).unwrap_or_default();
            self.enqueue(&namespace, queue, m.function_id, data, m.traceparent, m.baggage, reply);
            return;
        }
        let mut data = m.data.map(Payload::Raw).unwrap_or_default();
        if data.is_object() {
            if let Some(caller) = self.workers.get(conn) {
                data = data.insert_str("_caller_worker_id", &caller.worker_id);
            }
        }
        let call = Call {
            namespace,
            function_id: m.function_id,
            data,
            metadata: m.metadata.map(Payload::Raw),
            traceparent: m.traceparent,
            baggage: m.baggage,
            forward_id: parsed_id,
        };
        self.invoke(call, reply);
    }

    /// Routes a call to its function and arranges for `reply` to be answered.
    pub fn invoke(&mut self, call: Call, reply: Reply) {
        let handler = match self.functions.get(&call.namespace, &call.function_id) {
            Some(f) => f.handler.clone(),
            None => {
                let mut message = format!("Function {} not found in namespace {}.", call.function_id, call.namespace);
                let elsewhere = self.functions.namespaces_holding(&call.function_id, &call.namespace);
                if !elsewhere.is_empty() {
                    message.push_str(&format!(" It is registered in namespace(s): {}.", elsewhere.join(", ")));
                }
                self.complete(reply, Err(ErrorBody::new("function_not_found", message)), None, None);
                return;
            }
        };
        match handler {
            Handler::Builtin(run) => {
                // Builtins read their input: decode it here, and answer why when it cannot be.
                let data = match call.data.decode(self.config.max_json_depth) {
                    Ok(data) => data,
                    Err(e) => {
                        let message = format!("Failed to deserialize input for {}: {e}", call.function_id);
                        self.complete(reply, Err(ErrorBody::new("deserialization_error", message)), None, None);
                        return;
                    }
                };
                match run(self, data) {
                    BuiltinReply::Now(outcome) => self.complete(reply, outcome, None, None),
                    BuiltinReply::Later(fut) => {
                        let engine = self.weak_self();
                        self.spawn(async move {
                            let outcome = fut.await;
                            if let Some(engine) = engine.upgrade() {
                                engine.borrow_mut().complete(reply, outcome, None, None);
                            }
                        });
                    }
                }
            }
            Handler::Worker(owner) => self.forward(owner, call, reply),
            Handler::Http { function, .. } => self.invoke_http(function, call, reply),
        }
    }

    /// Sends the call to the worker that owns the function and records it as pending.
    fn forward(&mut self, owner: WorkerConnId, call: Call, reply: Reply) {
        let id = match call.forward_id {
            Some(id) if !self.invocations.contains(&id) => id,
            _ => Uuid::new_v4(),
        };
        let id_text = id.hyphenated().to_string();
        let baggage = rewrite_baggage(call.baggage.as_deref(), &call.function_id);
        let Some(owner_conn) = self.workers.get_mut(owner) else {
            self.complete(reply, Err(ErrorBody::new("channel_send_failed", "the function's worker is gone")), None, None);
            return;
        };
        owner_conn.owner_inflight.insert(id);
        owner_conn.send(&Outbound::InvokeFunction {
            invocation_id: &id_text,
            // A prefixed session's worker knows its functions without the prefix.
            function_id: super::rbac::local_function_id(owner_conn, &call.function_id),
            data: &call.data,
            traceparent: call.traceparent.as_deref(),
            baggage: baggage.as_deref(),
            metadata: call.metadata.as_ref(),
        });
        if let Reply::Caller { conn, .. } = &reply {
            if let Some(caller) = self.workers.get_mut(*conn) {
                caller.caller_inflight.insert(id);
            }
        }
        let deadline = self.config.invocation_timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
        self.invocations.insert(id, Pending { owner, reply }, deadline);
        self.metrics.control.invocations_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.note_pending();
    }

    /// An `invocationresult` from the worker that ran a function.
    pub fn invocation_result(&mut self, _conn: WorkerConnId, m: InvocationResult) {
        let Ok(id) = Uuid::parse_str(&m.invocation_id) else {
            tracing::debug!(invocation_id = %m.invocation_id, "invocationresult with a non-UUID id dropped");
            return;
        };
        // Unknown ids (caller gone, halted, bogus) are dropped without noise.
        let Some(pending) = self.invocations.remove(&id) else { return };
        self.note_pending();
        if let Some(owner) = self.workers.get_mut(pending.owner) {
            owner.owner_inflight.remove(&id);
        }
        self.forget_caller(&pending.reply, &id);
        match pending.reply {
            // A worker waits: relay the owner's text as it is (an error wins over a result).
            Reply::Caller { conn, invocation_id, function_id } => {
                let Some(caller) = self.workers.get(conn) else { return };
                let (result, error) = match &m.error {
                    Some(error) => (None, Some(error.as_ref())),
                    None => (m.result.as_deref(), None),
                };
                caller.send(&Outbound::RelayedResult {
                    invocation_id: &invocation_id,
                    function_id: &function_id,
                    result,
                    error,
                    traceparent: m.traceparent.as_deref(),
                    baggage: m.baggage.as_deref(),
                });
            }
            // Nobody reads it (void calls, trigger fires): nothing to decode.
            Reply::Discard => {
                if let Some(error) = &m.error {
                    tracing::debug!(error = %error.get(), "call without a waiting caller failed");
                }
            }
            // The engine reads the outcome: decode it, or say why it could not be.
            reply @ Reply::Internal(_) => {
                let outcome = decode_outcome(m.result, m.error, self.config.max_json_depth);
                self.complete(reply, outcome, m.traceparent, m.baggage);
            }
        }
    }

    /// Removes `id` from the waiting caller's in-flight set.
    pub fn forget_caller(&mut self, reply: &Reply, id: &Uuid) {
        if let Reply::Caller { conn, .. } = reply {
            if let Some(caller) = self.workers.get_mut(*conn) {
                caller.caller_inflight.remove(id);
            }
        }
    }

    /// Delivers an outcome to whoever waits for it.
    pub fn complete(&mut self, reply: Reply, outcome: Outcome, traceparent: Option<String>, baggage: Option<String>) {
        match reply {
            Reply::Caller { conn, invocation_id, function_id } => {
                self.reply_to_worker(conn, &invocation_id, &function_id, outcome, traceparent, baggage)
            }
            Reply::Internal(tx) => {
                let _ = tx.send(outcome);
            }
            Reply::Discard => {
                if let Err(e) = outcome {
                    tracing::debug!(code = %e.code, message = %e.message, "call without a waiting caller failed");
                }
            }
        }
    }

    fn reply_to_worker(
        &self,
        conn: WorkerConnId,
        invocation_id: &str,
        function_id: &str,
        outcome: Outcome,
        traceparent: Option<String>,
        baggage: Option<String>,
    ) {
        let Some(caller) = self.workers.get(conn) else { return };
        let (result, error) = match &outcome {
            Ok(result) => (result.as_ref(), None),
            Err(e) => (None, Some(e)),
        };
        caller.send(&Outbound::InvocationResult {
            invocation_id,
            function_id,
            result,
            error,
            traceparent: traceparent.as_deref(),
            baggage: baggage.as_deref(),
        });
    }

    /// Enqueue (spec §4.5): handed to `engine::queue::enqueue`, answered with a receipt.
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &mut self,
        namespace: &str,
        queue: String,
        function_id: String,
        data: Payload,
        traceparent: Option<String>,
        baggage: Option<String>,
        reply: Reply,
    ) {
        const PROVIDER: &str = "engine::queue::enqueue";
        if self.functions.get(DEFAULT_NS, PROVIDER).is_none() {
            // No worker provides a queue: ringcast's own takes the message.
            if let Some(service) = self.builtin_queue.clone() {
                let message = ringcast_shards::queue::NewMessage {
                    id: Uuid::new_v4().to_string(),
                    queue,
                    namespace: namespace.to_string(),
                    function_id,
                    data: crate::queue::payload_text(&data),
                    traceparent,
                    baggage,
                };
                crate::queue::enqueue(&service, self, message, reply);
                return;
            }
            self.complete(
                reply,
                Err(ErrorBody::new(
                    "enqueue_error",
                    format!(
                        "cannot enqueue to queue {queue:?}: no queue is configured (ringcast has no built-in queue; \
                         connect a worker that provides {PROVIDER}, such as the iii queue worker)"
                    ),
                )),
                None,
                None,
            );
            return;
        }
        let receipt = Uuid::new_v4().to_string();
        // The caller's data goes to the queue provider as it arrived.
        let payload = EnqueuePayload {
            queue: &queue,
            function_id: &function_id,
            data: &data,
            message_receipt_id: &receipt,
            traceparent: traceparent.as_deref(),
            baggage: baggage.as_deref(),
            namespace: (namespace != DEFAULT_NS).then_some(namespace),
        };
        let payload = match serde_json::value::to_raw_value(&payload) {
            Ok(raw) => Payload::Raw(raw),
            Err(e) => {
                self.complete(reply, Err(ErrorBody::new("enqueue_error", format!("cannot encode the queued call: {e}"))), None, None);
                return;
            }
        };
        let (tx, rx) = oneshot::channel();
        let mut call = Call::internal(DEFAULT_NS, PROVIDER, Value::Null, None);
        call.data = payload;
        self.invoke(call, Reply::Internal(tx));
        let engine = self.weak_self();
        self.spawn(async move {
            let outcome = match rx.await {
                Ok(Ok(_)) => Ok(Some(serde_json::json!({ "messageReceiptId": receipt }))),
                Ok(Err(e)) => Err(ErrorBody::new("enqueue_error", format!("{}: {}", e.code, e.message))),
                Err(_) => Err(ErrorBody::new("enqueue_error", "the queue provider went away")),
            };
            if let Some(engine) = engine.upgrade() {
                engine.borrow_mut().complete(reply, outcome, None, None);
            }
        });
    }

    /// Fails invocations older than the configured engine-side timeout. Returns how long until
    /// the next deadline, if any.
    pub fn expire_invocations(&mut self, now: Instant) -> Option<Duration> {
        loop {
            let id = match self.invocations.pop_due(now) {
                Due::Expired(id) => id,
                Due::In(wait) => return Some(wait),
                Due::Nothing => return None,
            };
            if let Some(pending) = self.take_pending(&id) {
                let timeout = self.config.invocation_timeout_ms.unwrap_or_default();
                self.complete(
                    pending.reply,
                    Err(ErrorBody::new("invocation_timeout", format!("no result within {timeout} ms (invocation_timeout_ms)"))),
                    None,
                    None,
                );
            }
        }
    }

    /// Removes a pending invocation and its marks on the owner and the caller.
    fn take_pending(&mut self, id: &Uuid) -> Option<Pending> {
        let pending = self.invocations.remove(id)?;
        self.note_pending();
        if let Some(owner) = self.workers.get_mut(pending.owner) {
            owner.owner_inflight.remove(id);
        }
        self.forget_caller(&pending.reply, id);
        Some(pending)
    }

    /// Gives up an engine-internal call that was forwarded with `forward_id` = `id`: its
    /// pending entry goes, so a late result is dropped as unknown. The caller is not answered.
    pub fn abandon_invocation(&mut self, id: Uuid) {
        if let Some(pending) = self.invocations.remove(&id) {
            if let Some(owner) = self.workers.get_mut(pending.owner) {
                owner.owner_inflight.remove(&id);
            }
            self.note_pending();
        }
    }

    /// Publishes the number of pending invocations to the metrics.
    pub(super) fn note_pending(&self) {
        self.metrics.control.invocations_in_flight.store(self.invocations.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Answers every waiting caller with `engine_shutdown` (shutdown).
    pub(super) fn fail_all_invocations(&mut self) {
        for pending in self.invocations.drain() {
            self.complete(
                pending.reply,
                Err(ErrorBody::new("engine_shutdown", "ringcast is shutting down")),
                None,
                None,
            );
        }
    }
}

/// The input of `engine::queue::enqueue`.
#[derive(Serialize)]
struct EnqueuePayload<'a> {
    queue: &'a str,
    function_id: &'a str,
    data: &'a Payload,
    #[serde(rename = "messageReceiptId")]
    message_receipt_id: &'a str,
    traceparent: Option<&'a str>,
    baggage: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
}

/// A worker's `invocationresult` for an engine-internal caller, decoded: the result under the
/// rules of `Payload::decode`, the error as an `ErrorBody`. What does not decode becomes an error
/// that names the problem, so the caller is never left waiting or handed a changed value.
fn decode_outcome(result: Option<Box<RawValue>>, error: Option<Box<RawValue>>, max_depth: usize) -> Outcome {
    if let Some(error) = error {
        return Err(serde_json::from_str::<ErrorBody>(error.get()).unwrap_or_else(|e| {
            ErrorBody::new("invalid_result", format!("the function's error could not be decoded: {e}"))
        }));
    }
    match result.map(|raw| Payload::Raw(raw).decode(max_depth)).transpose() {
        Ok(result) => Ok(result),
        Err(e) => Err(ErrorBody::new("invalid_result", format!("the function's result could not be decoded: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::rewrite_baggage;
    use crate::control::test_support::{engine, on_executor, settle, FakeWorker};
    use serde_json::json;

    const CALL_ID: &str = "6f1c7a52-3b1e-4c53-9d3a-2a0f3e0b9d11";

    #[test]
    fn a_call_goes_to_the_owner_and_its_result_back_to_the_caller() {
        on_executor(|| async {
            let engine = engine();
            let mut owner = FakeWorker::connect(&engine);
            let mut caller = FakeWorker::connect(&engine);
            owner.register_function(&engine, "math::add");
            caller.send(&engine, json!({ "type": "invokefunction", "invocation_id": CALL_ID, "function_id": "math::add", "data": { "a": 1 } }));
            let call = owner.next("invokefunction");
            assert_eq!(call["invocation_id"], CALL_ID, "a sync call keeps the caller's id on the hop");
            assert_eq!(call["data"], json!({ "a": 1, "_caller_worker_id": caller.worker_id }));
            assert!(caller.drain().is_empty(), "nothing for the caller before the result");
            owner.answer(&engine, &call, json!(3));
            let result = caller.next("invocationresult");
            assert_eq!((&result["invocation_id"], &result["function_id"], &result["result"]), (&json!(CALL_ID), &json!("math::add"), &json!(3)));
            // A second result for the same id is dropped: the call is answered once.
            owner.answer(&engine, &call, json!(4));
            assert!(caller.drain().is_empty());
            settle().await;
        });
    }

    #[test]
    fn an_unknown_function_is_answered_function_not_found() {
        on_executor(|| async {
            let engine = engine();
            let mut caller = FakeWorker::connect(&engine);
            caller.send(&engine, json!({ "type": "invokefunction", "invocation_id": CALL_ID, "function_id": "nobody::home" }));
            let result = caller.next("invocationresult");
            assert_eq!(result["invocation_id"], CALL_ID);
            assert_eq!(result["error"]["code"], "function_not_found");
        });
    }

    #[test]
    fn an_owner_that_disconnects_stops_its_invocations() {
        on_executor(|| async {
            let engine = engine();
            let mut owner = FakeWorker::connect(&engine);
            let mut caller = FakeWorker::connect(&engine);
            owner.register_function(&engine, "slow::job");
            caller.send(&engine, json!({ "type": "invokefunction", "invocation_id": CALL_ID, "function_id": "slow::job" }));
            owner.next("invokefunction");
            engine.borrow_mut().disconnect(owner.conn);
            let result = caller.next("invocationresult");
            assert_eq!(result["error"]["code"], "invocation_stopped");
            // The function left with its worker.
            caller.send(&engine, json!({ "type": "invokefunction", "invocation_id": CALL_ID, "function_id": "slow::job" }));
            assert_eq!(caller.next("invocationresult")["error"]["code"], "function_not_found");
            settle().await;
        });
    }

    #[test]
    fn a_caller_that_disconnects_gets_nothing_and_the_owner_result_is_dropped() {
        on_executor(|| async {
            let engine = engine();
            let mut owner = FakeWorker::connect(&engine);
            let caller = FakeWorker::connect(&engine);
            owner.register_function(&engine, "math::add");
            caller.send(&engine, json!({ "type": "invokefunction", "invocation_id": CALL_ID, "function_id": "math::add" }));
            let call = owner.next("invokefunction");
            engine.borrow_mut().disconnect(caller.conn);
            owner.answer(&engine, &call, json!(3));
            assert!(owner.drain().is_empty());
            assert_eq!(engine.borrow().invocations.len(), 0);
            settle().await;
        });
    }

    #[test]
    fn baggage_function_id_is_rewritten_to_the_target() {
        assert_eq!(
            rewrite_baggage(Some("a=1,iii.function.id=caller::fn"), "math::add").as_deref(),
            Some("a=1,iii.function.id=math::add")
        );
        assert_eq!(rewrite_baggage(Some("a=1"), "x").as_deref(), Some("a=1"));
        assert_eq!(rewrite_baggage(None, "x"), None);
    }
}
