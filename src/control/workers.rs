//! The worker registry: connected workers, their namespace and metadata and what each one
//! owns, and a connection's life in the engine — connect, reattach, and the one cleanup path
//! when it goes away (spec §4.6).

use super::engine::Engine;
use super::ns_map::{NsKey, DEFAULT_NS};
use super::outbox::{OutFrame, Outbox, CLOSE_GOING_AWAY, CLOSE_POLICY};
use super::invocations::Reply;
use super::wire::{ErrorBody, Outbound};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use uuid::Uuid;

/// The control core's number for a worker connection; never reused.
pub type WorkerConnId = u64;

/// Metadata a worker reports through `engine::workers::register` (its `telemetry` is accepted
/// and not kept: nothing reads it).
#[derive(Debug, Default, Clone)]
pub struct WorkerMeta {
    pub runtime: Option<String>,
    pub version: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub os: Option<String>,
    pub pid: Option<u64>,
    pub isolation: Option<Value>,
}

/// One connected worker, as the control core knows it.
pub struct WorkerConn {
    pub worker_id: String,
    pub reattach_token: String,
    pub outbox: Rc<Outbox>,
    pub namespace: String,
    /// Set once `engine::workers::register` has fixed the namespace.
    pub namespace_declared: bool,
    pub meta: WorkerMeta,
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
    /// Its rights, when it came in through an RBAC listener (`rbac.rs`).
    pub session: Option<Rc<super::rbac::Session>>,
}

impl WorkerConn {
    /// Queues one frame for this worker.
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

    /// The name the worker gave itself, else its id.
    pub fn display_name(&self) -> String {
        self.meta.name.clone().unwrap_or_else(|| self.worker_id.clone())
    }
}

/// Connected workers by connection number, and by the worker id they were given.
#[derive(Default)]
pub struct Workers {
    by_conn: HashMap<WorkerConnId, WorkerConn>,
    by_worker_id: HashMap<String, WorkerConnId>,
    /// Never 0, so a connection number is never confused with "none".
    last_conn: WorkerConnId,
}

impl Workers {
    /// Adds a connection under a fresh number.
    fn insert(&mut self, conn: WorkerConn) -> WorkerConnId {
        self.last_conn += 1;
        let id = self.last_conn;
        self.by_worker_id.insert(conn.worker_id.clone(), id);
        self.by_conn.insert(id, conn);
        id
    }

    fn remove(&mut self, id: WorkerConnId) -> Option<WorkerConn> {
        let conn = self.by_conn.remove(&id)?;
        self.by_worker_id.remove(&conn.worker_id);
        Some(conn)
    }

    pub fn get(&self, id: WorkerConnId) -> Option<&WorkerConn> {
        self.by_conn.get(&id)
    }

    pub fn get_mut(&mut self, id: WorkerConnId) -> Option<&mut WorkerConn> {
        self.by_conn.get_mut(&id)
    }

    pub fn contains(&self, id: WorkerConnId) -> bool {
        self.by_conn.contains_key(&id)
    }

    /// The connection of the worker that was given `worker_id`.
    pub fn by_worker_id(&self, worker_id: &str) -> Option<WorkerConnId> {
        self.by_worker_id.get(worker_id).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (WorkerConnId, &WorkerConn)> {
        self.by_conn.iter().map(|(id, c)| (*id, c))
    }

    pub fn len(&self) -> usize {
        self.by_conn.len()
    }
}

/// `workers[conn]` for a connection the caller knows is registered (the handler of one of its
/// frames, say); panics otherwise.
impl std::ops::Index<WorkerConnId> for Workers {
    type Output = WorkerConn;

    fn index(&self, id: WorkerConnId) -> &WorkerConn {
        &self.by_conn[&id]
    }
}

impl Engine {
    /// Registers a new worker connection and queues its `workerregistered` frame.
    pub fn connect(&mut self, outbox: Rc<Outbox>, ip_address: String) -> WorkerConnId {
        let worker_id = Uuid::new_v4().to_string();
        let conn = WorkerConn {
            worker_id: worker_id.clone(),
            reattach_token: Uuid::new_v4().to_string(),
            outbox,
            namespace: DEFAULT_NS.to_string(),
            namespace_declared: false,
            meta: WorkerMeta::default(),
            connected_at_ms: ringcast_shards::runtime::unix_time_ms(),
            ip_address,
            functions: HashSet::new(),
            trigger_types: HashSet::new(),
            triggers: HashSet::new(),
            owner_inflight: HashSet::new(),
            caller_inflight: HashSet::new(),
            session: None,
        };
        conn.send(&Outbound::WorkerRegistered {
            worker_id: &conn.worker_id,
            reattach_token: &conn.reattach_token,
        });
        tracing::info!(worker_id = %worker_id, ip = %conn.ip_address, "worker connected");
        let id = self.workers.insert(conn);
        self.metrics.control.workers_connected.store(self.workers.len() as u64, Relaxed);
        self.fire_workers_available("worker_connected", &worker_id);
        id
    }

    /// `reattach`: a worker that reconnected retires its previous connection, if it proves it
    /// is the same worker with that connection's token.
    pub(super) fn reattach(&mut self, conn: WorkerConnId, previous: &str, token: Option<&str>) {
        if Uuid::parse_str(previous).is_err() {
            return;
        }
        let Some(old) = self.workers.by_worker_id(previous) else { return };
        if old == conn || token != Some(self.workers[old].reattach_token.as_str()) {
            return;
        }
        tracing::info!(previous, "reattach: retiring the previous connection of this worker");
        self.workers[old].close(CLOSE_POLICY, "replaced by a reattached connection");
        self.disconnect(old);
    }

    /// Full cleanup of a connection (spec §4.6); runs once, synchronously.
    pub fn disconnect(&mut self, conn: WorkerConnId) {
        let Some(c) = self.workers.remove(conn) else { return };
        self.metrics.control.workers_connected.store(self.workers.len() as u64, Relaxed);
        if let Some(telemetry) = &self.telemetry {
            telemetry.worker_gone(conn);
        }
        let mut functions_removed = false;
        for (ns, id) in &c.functions {
            if self.functions.owner(ns, id) == Some(conn) {
                self.functions.remove(ns, id);
                functions_removed = true;
            }
        }
        for id in &c.owner_inflight {
            if let Some(pending) = self.invocations.remove(id) {
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
            if let Some(pending) = self.invocations.get_mut(id) {
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

    /// Closes every worker socket with "going away" (shutdown).
    pub(super) fn close_all_workers(&self) {
        for (_, conn) in self.workers.iter() {
            conn.close(CLOSE_GOING_AWAY, "engine shutting down");
        }
    }

    /// Queues `message` for connection `conn`, if it is still connected.
    pub fn send_to(&self, conn: WorkerConnId, message: &Outbound<'_>) {
        if let Some(c) = self.workers.get(conn) {
            c.send(message);
        }
    }
}
