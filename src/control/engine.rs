//! The control core's state: the four registries (workers, functions, invocations, triggers),
//! each in its own file with the messages that change it, and the dispatch of each decoded
//! worker message to them.
//!
//! The engine lives on one executor in an `Rc<RefCell<_>>`; every handler runs to completion
//! without awaiting, so no borrow is held across a suspension point. Work that must wait (a
//! builtin calling a shard, a provider's answer) is spawned as a task that re-borrows on
//! completion. The engine starts empty: whoever boots it installs the in-process functions and
//! trigger types ([`Engine::register_builtin`], [`Engine::register_engine_trigger_type`]).

use super::functions::Functions;
use super::invocations::Invocations;
use super::triggers::Triggers;
use super::wire::{Inbound, Outbound};
use super::workers::{WorkerConnId, Workers};
use crate::config::WorkerManagerConfig;
use crate::metrics::Metrics;
use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;

/// The control core's whole state. Private to the control core: the rest of the crate talks to
/// it through methods.
pub struct Engine {
    pub(super) config: WorkerManagerConfig,
    pub(super) metrics: Arc<Metrics>,
    pub(super) workers: Workers,
    pub(super) functions: Functions,
    pub(super) invocations: Invocations,
    pub(super) triggers: Triggers,
    /// Set when the function set changed and `engine::functions-available` is due.
    pub(super) functions_changed_scheduled: bool,
    pub(super) shutting_down: bool,
    /// Lets handlers spawn tasks that come back to the engine.
    self_ref: Weak<RefCell<Engine>>,
    /// The telemetry thread's handle; `None` (frames discarded) until the boot code sets it.
    pub(super) telemetry: Option<crate::telemetry::Telemetry>,
    /// Runs HTTP-invoked functions; `None` until installed (or when `iii-http-functions` is off).
    pub(super) http_functions: Option<super::http_functions::HttpCalls>,
    /// Where the worker port hands channel connections (`/ws/channels/…`); set by
    /// `channels::install`, `None` in engines built without channels.
    pub(crate) channels: Option<crate::channels::Channels>,
    /// The built-in queue, for enqueues no worker's `engine::queue::enqueue` takes.
    pub(super) builtin_queue: Option<Rc<crate::queue::QueueService>>,
}

impl Engine {
    /// An engine with no workers, no functions and no trigger types.
    pub fn new(config: WorkerManagerConfig, metrics: Arc<Metrics>) -> Rc<RefCell<Engine>> {
        Rc::new_cyclic(|self_ref| {
            RefCell::new(Engine {
                config,
                metrics,
                workers: Workers::default(),
                functions: Functions::default(),
                invocations: Invocations::default(),
                triggers: Triggers::default(),
                functions_changed_scheduled: false,
                shutting_down: false,
                self_ref: self_ref.clone(),
                telemetry: None,
                http_functions: None,
                channels: None,
                builtin_queue: None,
            })
        })
    }

    /// The worker-port settings the engine runs with.
    pub fn config(&self) -> &WorkerManagerConfig {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where worker telemetry frames go (set once, by the boot code).
    pub fn set_telemetry(&mut self, telemetry: crate::telemetry::Telemetry) {
        self.telemetry = Some(telemetry);
    }

    /// A handle for tasks that come back to the engine when they complete.
    pub fn weak_self(&self) -> Weak<RefCell<Engine>> {
        self.self_ref.clone()
    }

    /// Applies one decoded message from connection `conn`.
    pub fn handle(&mut self, conn: WorkerConnId, message: Inbound) {
        if !self.workers.contains(conn) {
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
            Inbound::Ping => self.send_to(conn, &Outbound::Pong),
            Inbound::Pong => {}
            Inbound::Unknown => tracing::debug!(conn, "ignored message of unknown type"),
        }
    }

    /// Answers every waiting caller with an error and closes every socket with "going away".
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
        self.fail_all_invocations();
        self.fail_http_calls();
        self.close_all_workers();
    }

    /// Makes `queue` take the enqueues that no worker's `engine::queue::enqueue` takes.
    pub fn set_builtin_queue(&mut self, queue: Rc<crate::queue::QueueService>) {
        self.builtin_queue = Some(queue);
    }

    /// Spawns `fut` on the control executor, to run after the current handler.
    pub fn spawn(&self, fut: impl std::future::Future<Output = ()> + 'static) {
        ringcast_shards::runtime::spawn_deferred(fut);
    }
}
