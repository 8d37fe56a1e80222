//! The control core's state: connected workers, the function registry, pending invocations and
//! trigger bindings, and the dispatch of each decoded worker message.
//!
//! The engine lives on one executor in an `Rc<RefCell<_>>`; every handler runs to completion
//! without awaiting, so no borrow is held across a suspension point. Work that must wait (a
//! builtin calling a shard, a provider's answer) is spawned as a task that re-borrows on
//! completion.

use super::builtins::{self, Handler};
use super::invocation::{Pending, Reply};
use super::registry::{ns_key, NsKey, NsMap, DEFAULT_NS};
use super::triggers::{Binding, TriggerType};
use super::wire::{ErrorBody, Inbound, Outbound};
use crate::config::WorkerManagerConfig;
use futures_channel::mpsc::UnboundedSender;
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// Engine-local connection number; never reused.
pub type ConnId = u64;

/// What a connection's writer task sends.
#[derive(Debug)]
pub enum OutFrame {
    Text(String),
    /// A WebSocket ping (liveness check of a silent worker).
    Ping,
    /// Send a Close frame with this code and reason, then stop writing.
    Close(u16, String),
}

/// Close code for a socket the engine closes because it is shutting down.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for a worker refused by a name conflict or retired by `reattach`.
pub const CLOSE_POLICY: u16 = 1008;
/// Close code for a worker whose outbox passed `max_outbox_bytes` (it is not reading); the
/// same code the stream port uses for a slow subscriber.
pub const CLOSE_OUTBOX_FULL: u16 = 4008;

/// A worker connection's outbound queue, bounded in bytes, and the signal that ends the
/// connection. The connection task owns the socket; everything that must end it (a full
/// outbox, a ping timeout, a policy close, the peer going away) goes through `end`, which
/// wakes both the reader and the writer.
pub struct Outbox {
    tx: UnboundedSender<OutFrame>,
    /// Bytes of text frames queued and not yet handed to the socket writer.
    queued: Cell<usize>,
    limit: usize,
    /// Why the connection ends (`Some` once `end` ran): the close frame to try to send, if any.
    ended: RefCell<Option<Option<(u16, String)>>>,
    waiters: RefCell<Vec<Waker>>,
}

impl Outbox {
    pub fn new(tx: UnboundedSender<OutFrame>, limit: usize) -> Outbox {
        Outbox { tx, queued: Cell::new(0), limit, ended: RefCell::new(None), waiters: RefCell::new(Vec::new()) }
    }

    /// Queues a text frame. A backlog that would pass the limit ends the connection instead
    /// (4008); a frame is always accepted when nothing is queued, so one message of any
    /// allowed size can still go out to a worker that reads.
    pub fn push(&self, text: String) {
        if self.is_ended() {
            return;
        }
        let queued = self.queued.get();
        if queued > 0 && queued.saturating_add(text.len()) > self.limit {
            self.end(Some((CLOSE_OUTBOX_FULL, "outbox full: the worker is not reading".into())));
            return;
        }
        self.queued.set(queued.saturating_add(text.len()));
        // A closed channel means the writer is gone; the connection task cleans up.
        let _ = self.tx.unbounded_send(OutFrame::Text(text));
    }

    /// Queues a frame that is not counted (pings, ordered close frames).
    pub fn push_control(&self, frame: OutFrame) {
        if !self.is_ended() {
            let _ = self.tx.unbounded_send(frame);
        }
    }

    /// The writer took `bytes` of text off the queue.
    pub fn taken(&self, bytes: usize) {
        self.queued.set(self.queued.get().saturating_sub(bytes));
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued.get()
    }

    /// Ends the connection now: the writer drops what is queued and tries `close` (bounded in
    /// time), the reader stops. The first call decides the close frame.
    pub fn end(&self, close: Option<(u16, String)>) {
        {
            let mut ended = self.ended.borrow_mut();
            if ended.is_some() {
                return;
            }
            *ended = Some(close);
        }
        self.tx.close_channel();
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    pub fn is_ended(&self) -> bool {
        self.ended.borrow().is_some()
    }

    /// The close frame chosen by `end`, if it ran and chose one.
    pub fn close_frame(&self) -> Option<(u16, String)> {
        self.ended.borrow().clone().flatten()
    }

    /// Resolves once `end` has run.
    pub fn ended(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.is_ended() {
                return Poll::Ready(());
            }
            let mut waiters = self.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }
}

/// Metadata a worker reports through `engine::workers::register`.
#[derive(Debug, Default, Clone)]
pub struct WorkerMeta {
    pub runtime: Option<String>,
    pub version: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub os: Option<String>,
    pub pid: Option<u64>,
    pub isolation: Option<Value>,
    pub telemetry: Option<Value>,
}

/// One connected worker.
pub struct Conn {
    pub worker_id: String,
    pub reattach_token: String,
    pub outbox: Rc<Outbox>,
    pub namespace: String,
    /// Set once `engine::workers::register` has fixed the namespace.
    pub namespace_declared: bool,
    pub meta: WorkerMeta,
    pub registered: bool,
    pub connected_at_ms: u64,
    pub ip_address: String,
    /// Functions this connection owns, by `(namespace, id)`.
    pub functions: HashSet<NsKey>,
    /// Trigger types this connection provides.
    pub trigger_types: HashSet<NsKey>,
    /// Trigger bindings this connection registered.
    pub triggers: HashSet<String>,
    /// Invocations forwarded to this connection (it is the owner).
    pub owner_inflight: HashSet<Uuid>,
    /// Invocations this connection is waiting for (it is the caller).
    pub caller_inflight: HashSet<Uuid>,
}

impl Conn {
    pub fn send(&self, message: &Outbound<'_>) {
        // An ended outbox means the connection is going away; its cleanup handles the rest.
        if !self.outbox.is_ended() {
            self.outbox.push(message.to_text());
        }
    }

    /// Closes after everything queued before it (a rejection frame, say) has gone out.
    pub fn close(&self, code: u16, reason: &str) {
        self.outbox.push_control(OutFrame::Close(code, reason.to_string()));
    }

    pub fn display_name(&self) -> String {
        self.meta.name.clone().unwrap_or_else(|| self.worker_id.clone())
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

/// The control core's whole state.
pub struct Engine {
    pub config: WorkerManagerConfig,
    pub conns: HashMap<ConnId, Conn>,
    pub conn_by_worker_id: HashMap<String, ConnId>,
    next_conn: ConnId,
    pub functions: NsMap<FunctionEntry>,
    pub pending: HashMap<Uuid, Pending>,
    /// `(deadline, id)` of invocations under the engine-side timeout, in deadline order.
    pub deadlines: VecDeque<(Instant, Uuid)>,
    pub trigger_types: NsMap<TriggerType>,
    pub bindings: HashMap<String, Binding>,
    /// `engine::register_trigger` calls waiting for the provider's answer, by binding id.
    pub trigger_waiters: HashMap<String, futures_channel::oneshot::Sender<Option<ErrorBody>>>,
    /// Set when the function set changed and `engine::functions-available` is due.
    pub functions_changed_scheduled: bool,
    pub shutting_down: bool,
    pub next_binding_seq: u64,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// The stream module, when `iii-stream` is configured.
    pub streams: Option<Rc<crate::stream::StreamService>>,
    /// Lets handlers spawn tasks that come back to the engine.
    pub self_ref: Weak<RefCell<Engine>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Engine {
    pub fn new(
        config: WorkerManagerConfig,
        streams: Option<crate::stream::StreamService>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Rc<RefCell<Engine>> {
        let engine = Rc::new(RefCell::new(Engine {
            config,
            conns: HashMap::new(),
            conn_by_worker_id: HashMap::new(),
            next_conn: 1,
            functions: NsMap::default(),
            pending: HashMap::new(),
            deadlines: VecDeque::new(),
            trigger_types: NsMap::default(),
            bindings: HashMap::new(),
            trigger_waiters: HashMap::new(),
            functions_changed_scheduled: false,
            shutting_down: false,
            next_binding_seq: 0,
            metrics,
            streams: streams.map(Rc::new),
            self_ref: Weak::new(),
        }));
        {
            let mut e = engine.borrow_mut();
            e.self_ref = Rc::downgrade(&engine);
            builtins::install(&mut e);
            if e.streams.is_some() {
                crate::stream::functions::install(&mut e);
            }
        }
        engine
    }

    /// Registers a new worker connection and queues its `workerregistered` frame.
    pub fn connect(&mut self, outbox: Rc<Outbox>, ip_address: String) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        let worker_id = Uuid::new_v4().to_string();
        let conn = Conn {
            worker_id: worker_id.clone(),
            reattach_token: Uuid::new_v4().to_string(),
            outbox,
            namespace: DEFAULT_NS.to_string(),
            namespace_declared: false,
            meta: WorkerMeta::default(),
            registered: false,
            connected_at_ms: now_ms(),
            ip_address,
            functions: HashSet::new(),
            trigger_types: HashSet::new(),
            triggers: HashSet::new(),
            owner_inflight: HashSet::new(),
            caller_inflight: HashSet::new(),
        };
        conn.send(&Outbound::WorkerRegistered {
            worker_id: &conn.worker_id,
            reattach_token: &conn.reattach_token,
        });
        tracing::info!(worker_id = %worker_id, ip = %conn.ip_address, "worker connected");
        self.conns.insert(id, conn);
        self.conn_by_worker_id.insert(worker_id.clone(), id);
        self.metrics.control.workers_connected.store(self.conns.len() as u64, Relaxed);
        self.fire_workers_available("worker_connected", &worker_id);
        id
    }

    /// Applies one decoded message from connection `conn`.
    pub fn handle(&mut self, conn: ConnId, message: Inbound) {
        if !self.conns.contains_key(&conn) {
            return; // retired by a reattach while this frame was in flight
        }
        match message {
            Inbound::Reattach(m) => self.reattach(conn, &m.previous_worker_id, m.reattach_token.as_deref()),
            Inbound::RegisterFunction(m) => self.register_function(conn, m),
            Inbound::UnregisterFunction(m) => self.unregister_function(conn, &m.id),
            Inbound::InvokeFunction(m) => self.invoke_from_worker(conn, m),
            Inbound::InvocationResult(m) => self.invocation_result(conn, m),
            Inbound::RegisterTriggerType(m) => self.register_trigger_type(conn, m),
            Inbound::UnregisterTriggerType(m) => self.unregister_trigger_type(conn, &m.id, m.namespace),
            Inbound::RegisterTrigger(m) => {
                self.register_binding(Some(conn), m);
            }
            Inbound::UnregisterTrigger(m) => {
                self.unregister_binding(&m.id);
            }
            Inbound::TriggerRegistrationResult(m) => self.trigger_registration_result(conn, m),
            Inbound::RegisterService(m) => {
                tracing::debug!(service = %m.id, "registerservice recorded");
            }
            Inbound::Ping => self.conns[&conn].send(&Outbound::Pong),
            Inbound::Pong => {}
            Inbound::Unknown => tracing::debug!(conn, "ignored message of unknown type"),
        }
    }

    fn reattach(&mut self, conn: ConnId, previous: &str, token: Option<&str>) {
        if Uuid::parse_str(previous).is_err() {
            return;
        }
        let Some(&old) = self.conn_by_worker_id.get(previous) else { return };
        if old == conn || token != Some(self.conns[&old].reattach_token.as_str()) {
            return;
        }
        tracing::info!(previous, "reattach: retiring the previous connection of this worker");
        self.conns[&old].close(CLOSE_POLICY, "replaced by a reattached connection");
        self.disconnect(old);
    }

    fn register_function(&mut self, conn: ConnId, m: super::wire::RegisterFunction) {
        if m.invocation.is_some() {
            tracing::warn!(function_id = %m.id, "HTTP-invoked functions are not supported by ringcast; registration ignored");
            return;
        }
        let ns = self.conns[&conn].namespace.clone();
        if self.is_reserved_function(&ns, &m.id) {
            self.reject_reserved(conn, &ns, &m.id, "function");
            return;
        }
        if let Some(existing) = self.functions.get(&ns, &m.id) {
            if let Handler::Worker(owner) = existing.handler {
                if owner != conn && self.conns.contains_key(&owner) {
                    let owner_id = self.conns[&owner].worker_id.clone();
                    tracing::warn!(function_id = %m.id, "function already registered by another worker; refused");
                    self.conns[&conn].send(&Outbound::RegistrationRejected {
                        code: "FUNCTION_NAMESPACE_CONFLICT",
                        namespace: &ns,
                        worker_name: None,
                        function_id: Some(&m.id),
                        owner_worker_id: &owner_id,
                    });
                    return;
                }
            }
        }
        tracing::debug!(function_id = %m.id, "function registered");
        self.functions.insert(
            &ns,
            &m.id,
            FunctionEntry {
                handler: Handler::Worker(conn),
                description: m.description,
                request_format: m.request_format,
                response_format: m.response_format,
                metadata: m.metadata,
            },
        );
        self.conns.get_mut(&conn).unwrap().functions.insert(ns_key(&ns, &m.id));
        self.functions_changed();
    }

    /// The engine's own function ids belong to the engine in every namespace: a worker can
    /// neither replace them nor shadow them. `engine::` ids are also reserved outside `default`
    /// (as the reference); in `default` workers may add new ones (the queue worker's
    /// `engine::queue::enqueue`). Custom stream functions (`stream::get(<name>)`) are not
    /// builtin ids, so they stay open to workers.
    pub fn is_reserved_function(&self, ns: &str, id: &str) -> bool {
        matches!(self.functions.get(DEFAULT_NS, id), Some(f) if matches!(f.handler, Handler::Builtin(_)))
            || (ns != DEFAULT_NS && id.starts_with("engine::"))
    }

    /// Refuses a worker's registration of an engine-owned id. The code is
    /// `FUNCTION_NAMESPACE_CONFLICT` with an empty owner, as the reference words its reserved
    /// `engine::` refusal: the one code every SDK treats as non-fatal (any other stops a Python
    /// worker for good).
    pub fn reject_reserved(&self, conn: ConnId, ns: &str, id: &str, what: &str) {
        let Some(c) = self.conns.get(&conn) else { return };
        tracing::warn!(worker_id = %c.worker_id, namespace = %ns, id, "refused a worker's registration of the engine's own {what}");
        c.send(&Outbound::RegistrationRejected {
            code: "FUNCTION_NAMESPACE_CONFLICT",
            namespace: ns,
            worker_name: None,
            function_id: Some(id),
            owner_worker_id: "",
        });
    }

    fn unregister_function(&mut self, conn: ConnId, id: &str) {
        let ns = self.conns[&conn].namespace.clone();
        let owned = matches!(self.functions.get(&ns, id), Some(f) if f.handler == Handler::Worker(conn));
        if owned {
            self.functions.remove(&ns, id);
            self.conns.get_mut(&conn).unwrap().functions.remove(&ns_key(&ns, id));
            self.functions_changed();
        }
    }

    /// Full cleanup of a connection (spec §4.6); runs once, synchronously.
    pub fn disconnect(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else { return };
        self.conn_by_worker_id.remove(&c.worker_id);
        self.metrics.control.workers_connected.store(self.conns.len() as u64, Relaxed);
        let mut functions_removed = false;
        for (ns, id) in &c.functions {
            if matches!(self.functions.get(ns, id), Some(f) if f.handler == Handler::Worker(conn)) {
                self.functions.remove(ns, id);
                functions_removed = true;
            }
        }
        for id in &c.owner_inflight {
            if let Some(pending) = self.pending.remove(id) {
                self.forget_caller(&pending.reply, id);
                self.complete(
                    pending.reply,
                    Err(ErrorBody::new("invocation_stopped", "Invocation stopped")),
                    None,
                    None,
                );
            }
        }
        for id in &c.caller_inflight {
            if let Some(pending) = self.pending.get_mut(id) {
                pending.reply = Reply::Discard;
            }
        }
        for binding in &c.triggers {
            self.unregister_binding(binding);
        }
        for (ns, id) in &c.trigger_types {
            self.remove_trigger_type(conn, ns, id);
        }
        self.note_pending();
        tracing::info!(worker_id = %c.worker_id, name = %c.display_name(), "worker disconnected");
        if functions_removed {
            self.functions_changed();
        }
        self.fire_workers_available("worker_disconnected", &c.worker_id);
    }

    /// Publishes the number of pending invocations to the metrics.
    pub fn note_pending(&self) {
        self.metrics.control.invocations_in_flight.store(self.pending.len() as u64, Relaxed);
    }

    /// Answers every waiting caller with an error and closes every socket with "going away".
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
        let ids: Vec<Uuid> = self.pending.keys().copied().collect();
        for id in ids {
            if let Some(pending) = self.pending.remove(&id) {
                self.complete(
                    pending.reply,
                    Err(ErrorBody::new("engine_shutdown", "ringcast is shutting down")),
                    None,
                    None,
                );
            }
        }
        for conn in self.conns.values() {
            conn.close(CLOSE_GOING_AWAY, "engine shutting down");
        }
    }

    /// Spawns `fut` on the control executor, to run after the current handler.
    pub fn spawn(&self, fut: impl std::future::Future<Output = ()> + 'static) {
        ringcast_shards::runtime::spawn_deferred(fut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_bounds_the_backlog_and_ends_once() {
        let (tx, mut rx) = futures_channel::mpsc::unbounded();
        let outbox = Outbox::new(tx, 10);
        outbox.push("x".repeat(25)); // an empty outbox takes one frame of any size
        assert_eq!(outbox.queued_bytes(), 25);
        outbox.taken(25);
        outbox.push("12345".into());
        outbox.push("12345".into());
        assert!(!outbox.is_ended(), "exactly at the limit is allowed");
        outbox.push("1".into());
        assert_eq!(outbox.close_frame().map(|(code, _)| code), Some(CLOSE_OUTBOX_FULL));
        outbox.end(Some((CLOSE_POLICY, "later".into())));
        assert_eq!(outbox.close_frame().map(|(code, _)| code), Some(CLOSE_OUTBOX_FULL), "the first end decides");
        outbox.push("dropped".into());
        let mut texts = 0;
        while let Ok(OutFrame::Text(_)) = rx.try_recv() {
            texts += 1;
        }
        assert_eq!(texts, 3, "nothing is queued past the end");
    }
}
