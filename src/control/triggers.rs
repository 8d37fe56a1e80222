//! The trigger registry (spec §5): trigger types and their providers, trigger bindings, and
//! their dispatch — resolving a binding's provider, parking bindings whose provider is absent
//! and replaying them when one registers, and firing the engine's own trigger types.

use super::engine::Engine;
use super::invocations::{Call, Reply};
use super::ns_map::{is_blank, ns_key, NsMap, DEFAULT_NS};
use super::wire::{ErrorBody, Outbound, RegisterTrigger, RegisterTriggerType, TriggerRegistrationResult};
use super::workers::WorkerConnId;
use futures_channel::oneshot;
use serde_json::Value;
use std::collections::HashMap;

/// Who implements a trigger type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Worker(WorkerConnId),
    /// Implemented inside ringcast.
    Engine,
}

/// A registered trigger type.
pub struct TriggerType {
    pub provider: Provider,
    pub description: String,
    pub trigger_request_format: Option<Value>,
    pub call_request_format: Option<Value>,
}

/// A trigger binding: fire `function_id` when `trigger_type` says so.
#[derive(Debug, Clone)]
pub struct Binding {
    pub id: String,
    pub trigger_type: String,
    pub function_id: String,
    pub config: Value,
    pub metadata: Option<Value>,
    /// Namespace the target function resolves in.
    pub namespace: String,
    /// Where to look for the provider; `None` = the registering connection's, then default.
    pub trigger_namespace: Option<String>,
    /// The connection that registered it; `None` for `engine::register_trigger` bindings.
    pub owner: Option<WorkerConnId>,
    /// Namespace of the provider's trigger type it is routed to now; `None` = parked.
    pub routed_ns: Option<String>,
    /// Namespace of the registering connection at registration time.
    pub home_ns: String,
    /// Registration order; bindings of one event fire in this order.
    pub seq: u64,
}

/// Trigger types by `(namespace, id)` and trigger bindings by id.
#[derive(Default)]
pub struct Triggers {
    types: NsMap<TriggerType>,
    bindings: HashMap<String, Binding>,
    /// `engine::register_trigger` calls waiting for the provider's answer, by binding id.
    waiters: HashMap<String, oneshot::Sender<Option<ErrorBody>>>,
    /// The `seq` of the next binding.
    next_seq: u64,
}

impl Triggers {
    pub fn trigger_type(&self, ns: &str, id: &str) -> Option<&TriggerType> {
        self.types.get(ns, id)
    }

    /// Every `(namespace, id, trigger type)`.
    pub fn trigger_types(&self) -> impl Iterator<Item = (&str, &str, &TriggerType)> {
        self.types.iter()
    }

    pub fn binding(&self, id: &str) -> Option<&Binding> {
        self.bindings.get(id)
    }

    /// Every binding, live or parked, in no particular order.
    pub fn bindings(&self) -> impl Iterator<Item = &Binding> {
        self.bindings.values()
    }

    /// Every binding registered by connection `owner`: it moved to namespace `ns`.
    pub fn rehome_bindings(&mut self, owner: WorkerConnId, ns: &str) {
        for binding in self.bindings.values_mut() {
            if binding.owner == Some(owner) {
                binding.home_ns = ns.to_string();
            }
        }
    }

    /// Notes an `engine::register_trigger` call waiting for the verdict on binding `id`.
    pub fn add_waiter(&mut self, id: &str, waiter: oneshot::Sender<Option<ErrorBody>>) {
        self.waiters.insert(id.to_string(), waiter);
    }

    pub fn remove_waiter(&mut self, id: &str) -> Option<oneshot::Sender<Option<ErrorBody>>> {
        self.waiters.remove(id)
    }

    fn provider_of(&self, ns: &str, trigger_type: &str) -> Option<Provider> {
        self.types.get(ns, trigger_type).map(|t| t.provider)
    }

    /// Provider namespace for a binding: strict `trigger_namespace`, else home, else default.
    fn resolve_provider(&self, binding: &Binding) -> Option<String> {
        match &binding.trigger_namespace {
            Some(ns) => self.types.get(ns, &binding.trigger_type).map(|_| ns.clone()),
            None => [binding.home_ns.as_str(), DEFAULT_NS]
                .into_iter()
                .find(|ns| self.types.get(ns, &binding.trigger_type).is_some())
                .map(str::to_string),
        }
    }

    /// The live (not parked) bindings of `trigger_type`, in registration order.
    fn live(&self, trigger_type: &str) -> Vec<Binding> {
        let mut found: Vec<Binding> = self
            .bindings
            .values()
            .filter(|b| b.trigger_type == trigger_type && b.routed_ns.is_some())
            .cloned()
            .collect();
        found.sort_by_key(|b| b.seq);
        found
    }
}

/// Checks the config of a binding served by the engine itself.
fn validate_engine_binding(binding: &Binding) -> Result<(), String> {
    if binding.trigger_type == "stream" && !binding.config.get("stream_name").is_some_and(Value::is_string) {
        return Err("a stream trigger needs config.stream_name (a string)".into());
    }
    Ok(())
}

/// Trigger types implemented by the engine itself.
pub const ENGINE_TRIGGER_TYPES: &[(&str, &str)] = &[
    ("engine::functions-available", "Fires when the set of registered functions changes"),
    ("engine::workers-available", "Fires when workers connect, disconnect or update their metadata"),
];

impl Engine {
    /// Installs a trigger type served by the engine itself, in the default namespace (the boot
    /// code does, for the engine's own types and the stream module's). Its id becomes
    /// reserved: no worker can provide it in any namespace.
    pub fn register_engine_trigger_type(&mut self, id: &str, description: &str) {
        self.triggers.types.insert(
            DEFAULT_NS,
            id,
            TriggerType {
                provider: Provider::Engine,
                description: description.to_string(),
                trigger_request_format: None,
                call_request_format: None,
            },
        );
    }

    fn resolve_provider(&self, binding: &Binding) -> Option<String> {
        self.triggers.resolve_provider(binding)
    }

    fn provider_of(&self, ns: &str, trigger_type: &str) -> Option<Provider> {
        self.triggers.provider_of(ns, trigger_type)
    }

    /// Tells a worker provider to start serving `binding`.
    fn send_register(&self, provider: WorkerConnId, binding: &Binding, provider_ns: &str) {
        if let Some(conn) = self.workers.get(provider) {
            conn.send(&Outbound::RegisterTrigger {
                id: &binding.id,
                trigger_type: &binding.trigger_type,
                function_id: &binding.function_id,
                config: &binding.config,
                metadata: binding.metadata.as_ref(),
                namespace: (binding.namespace != DEFAULT_NS).then_some(binding.namespace.as_str()),
                trigger_namespace: (provider_ns != DEFAULT_NS).then_some(provider_ns),
            });
        }
    }

    fn send_unregister(&self, binding: &Binding) {
        let Some(ns) = &binding.routed_ns else { return };
        if let Some(Provider::Worker(provider)) = self.provider_of(ns, &binding.trigger_type) {
            if let Some(conn) = self.workers.get(provider) {
                conn.send(&Outbound::UnregisterTrigger { id: &binding.id, trigger_type: &binding.trigger_type });
            }
        }
    }

    /// Sends a failed registration back to the binding's owner.
    fn report_binding_error(&self, owner: Option<WorkerConnId>, m: &Binding, error: &ErrorBody) {
        if let Some(conn) = owner.and_then(|o| self.workers.get(o)) {
            conn.send(&Outbound::TriggerRegistrationResult {
                id: &m.id,
                trigger_type: &m.trigger_type,
                function_id: &m.function_id,
                error: Some(error),
            });
        }
    }

    /// `registertrigger` from a worker (`owner`) or `engine::register_trigger` (`None`).
    /// Returns the worker provider it was routed to, if any.
    pub fn register_binding(&mut self, owner: Option<WorkerConnId>, m: RegisterTrigger) -> Option<WorkerConnId> {
        let home_ns = owner
            .and_then(|o| self.workers.get(o))
            .map(|c| c.namespace.clone())
            .unwrap_or_else(|| DEFAULT_NS.to_string());
        let mut binding = Binding {
            id: m.id,
            trigger_type: m.trigger_type,
            function_id: m.function_id,
            config: m.config,
            metadata: m.metadata,
            namespace: m.namespace.clone().unwrap_or_else(|| DEFAULT_NS.to_string()),
            trigger_namespace: m.trigger_namespace.clone(),
            owner,
            routed_ns: None,
            home_ns,
            seq: self.triggers.next_seq,
        };
        self.triggers.next_seq += 1;
        for (field, value) in [("namespace", &m.namespace), ("trigger_namespace", &m.trigger_namespace)] {
            if is_blank(value) {
                let error = ErrorBody::new("INVALID_NAMESPACE", format!("{field} is present but empty"));
                self.report_binding_error(owner, &binding, &error);
                return None;
            }
        }
        binding.routed_ns = self.resolve_provider(&binding);
        if let Some(ns) = &binding.routed_ns {
            if self.provider_of(ns, &binding.trigger_type) == Some(Provider::Engine) {
                if let Err(message) = validate_engine_binding(&binding) {
                    let error = ErrorBody::new("trigger_registration_failed", message);
                    self.report_binding_error(owner, &binding, &error);
                    return None;
                }
            }
        }
        let previous = self.triggers.bindings.remove(&binding.id);
        if let Some(previous) = &previous {
            if let Some(old_owner) = previous.owner.and_then(|o| self.workers.get_mut(o)) {
                old_owner.triggers.remove(&previous.id);
            }
        }
        let mut routed_to = None;
        match &binding.routed_ns {
            None => tracing::warn!(
                trigger_id = %binding.id,
                trigger_type = %binding.trigger_type,
                "no provider for this trigger type yet; the binding is parked until one registers"
            ),
            Some(ns) => {
                if let Some(Provider::Worker(provider)) = self.provider_of(ns, &binding.trigger_type) {
                    // A replaced binding served by another provider is withdrawn from it first.
                    if let Some(previous) = &previous {
                        if previous.routed_ns.as_deref() != Some(ns.as_str()) {
                            self.send_unregister(previous);
                        }
                    }
                    self.send_register(provider, &binding, ns);
                    routed_to = Some(provider);
                }
            }
        }
        if let Some(conn) = owner.and_then(|o| self.workers.get_mut(o)) {
            conn.triggers.insert(binding.id.clone());
        }
        self.triggers.bindings.insert(binding.id.clone(), binding);
        routed_to
    }

    /// `unregistertrigger`: removes a live or parked binding and tells its provider.
    pub fn unregister_binding(&mut self, id: &str) -> bool {
        let Some(binding) = self.triggers.bindings.remove(id) else { return false };
        self.send_unregister(&binding);
        if let Some(owner) = binding.owner.and_then(|o| self.workers.get_mut(o)) {
            owner.triggers.remove(id);
        }
        true
    }

    /// `triggerregistrationresult` from a provider.
    pub fn trigger_registration_result(&mut self, conn: WorkerConnId, m: TriggerRegistrationResult) {
        let Some(binding) = self.triggers.bindings.get(&m.id) else { return };
        let from_provider = binding
            .routed_ns
            .as_ref()
            .and_then(|ns| self.provider_of(ns, &binding.trigger_type))
            == Some(Provider::Worker(conn));
        if !from_provider {
            return;
        }
        if let Some(waiter) = self.triggers.waiters.remove(&m.id) {
            let _ = waiter.send(m.error.clone());
        }
        let Some(error) = m.error else { return };
        tracing::warn!(trigger_id = %m.id, code = %error.code, message = %error.message, "provider rejected trigger binding; parked");
        let Some(binding) = self.triggers.bindings.get_mut(&m.id) else { return };
        binding.routed_ns = None;
        let (owner, binding) = (binding.owner, binding.clone());
        self.report_binding_error(owner, &binding, &error);
    }

    /// `registertriggertype`: (re)places the provider and delivers every binding that now
    /// resolves to it.
    pub fn register_trigger_type(&mut self, conn: WorkerConnId, m: RegisterTriggerType) {
        if is_blank(&m.namespace) {
            tracing::warn!(trigger_type = %m.id, "registertriggertype with an empty namespace ignored");
            return;
        }
        let ns = m.namespace.unwrap_or_else(|| self.workers[conn].namespace.clone());
        // The engine's trigger types are reserved in every namespace: a worker provider in its
        // own namespace would capture bindings the engine fires itself.
        if self.provider_of(DEFAULT_NS, &m.id) == Some(Provider::Engine) {
            self.reject_reserved(conn, &ns, &m.id, "trigger type");
            return;
        }
        let previous = self.triggers.types.insert(
            &ns,
            &m.id,
            TriggerType {
                provider: Provider::Worker(conn),
                description: m.description,
                trigger_request_format: m.trigger_request_format,
                call_request_format: m.call_request_format,
            },
        );
        if let Some(TriggerType { provider: Provider::Worker(old), .. }) = previous {
            if old != conn {
                if let Some(old_conn) = self.workers.get_mut(old) {
                    old_conn.trigger_types.remove(&ns_key(&ns, &m.id));
                }
            }
        }
        if let Some(c) = self.workers.get_mut(conn) {
            c.trigger_types.insert(ns_key(&ns, &m.id));
        }
        tracing::debug!(trigger_type = %m.id, namespace = %ns, "trigger type registered");
        self.reroute_bindings(&m.id, Some(&ns));
    }

    /// Re-resolves every binding of `trigger_type`. Bindings that resolve to `fresh_ns` (a
    /// provider that just registered) are delivered to it even when they were routed there
    /// before (a replay); bindings that move are withdrawn from their old provider.
    fn reroute_bindings(&mut self, trigger_type: &str, fresh_ns: Option<&str>) {
        let ids: Vec<String> = self
            .triggers
            .bindings
            .values()
            .filter(|b| b.trigger_type == trigger_type)
            .map(|b| b.id.clone())
            .collect();
        for id in ids {
            let Some(binding) = self.triggers.bindings.get(&id).cloned() else { continue };
            let target = self.resolve_provider(&binding);
            let moved = target != binding.routed_ns;
            if !moved && target.as_deref() != fresh_ns {
                continue;
            }
            if moved {
                self.send_unregister(&binding);
            }
            match &target {
                Some(ns) => {
                    if let Some(Provider::Worker(provider)) = self.provider_of(ns, trigger_type) {
                        self.send_register(provider, &binding, ns);
                    }
                }
                None => tracing::warn!(trigger_id = %id, trigger_type, "[DISABLED] trigger binding parked: its provider is gone"),
            }
            if let Some(binding) = self.triggers.bindings.get_mut(&id) {
                binding.routed_ns = target;
            }
        }
    }

    /// `unregistertriggertype` (ignored by the reference): removes the type if `conn` provides it.
    pub fn unregister_trigger_type(&mut self, conn: WorkerConnId, id: &str, namespace: Option<String>) {
        let ns = namespace.unwrap_or_else(|| self.workers[conn].namespace.clone());
        if let Some(c) = self.workers.get_mut(conn) {
            c.trigger_types.remove(&ns_key(&ns, id));
        }
        self.remove_trigger_type(conn, &ns, id);
    }

    /// Removes trigger type `(ns, id)` if `conn` still provides it, re-routing or parking its
    /// bindings.
    pub fn remove_trigger_type(&mut self, conn: WorkerConnId, ns: &str, id: &str) {
        if self.provider_of(ns, id) != Some(Provider::Worker(conn)) {
            return;
        }
        // Bindings still point at the departing provider: forget the route without telling it.
        for binding in self.triggers.bindings.values_mut() {
            if binding.trigger_type == id && binding.routed_ns.as_deref() == Some(ns) {
                binding.routed_ns = None;
            }
        }
        self.triggers.types.remove(ns, id);
        self.reroute_bindings(id, None);
    }

    /// The live (not parked) bindings of `trigger_type`, in registration order.
    pub fn live_bindings(&self, trigger_type: &str) -> Vec<Binding> {
        self.triggers.live(trigger_type)
    }

    /// Fires every binding of an engine-provided trigger type with `payload`.
    pub fn fire_engine_trigger(&mut self, trigger_type: &str, payload: Value) {
        for b in self.live_bindings(trigger_type) {
            self.invoke(Call::internal(&b.namespace, &b.function_id, payload.clone(), b.metadata), Reply::Discard);
        }
    }

    pub fn fire_workers_available(&mut self, event: &str, worker_id: &str) {
        if self.shutting_down {
            return;
        }
        self.fire_engine_trigger(
            "engine::workers-available",
            serde_json::json!({ "event": event, "worker_id": worker_id }),
        );
    }

    /// Notes that the function set changed; `engine::functions-available` fires once for a burst
    /// of changes (a reconnecting worker replays all its functions at once).
    pub fn functions_changed(&mut self) {
        if self.functions_changed_scheduled || self.shutting_down {
            return;
        }
        self.functions_changed_scheduled = true;
        let engine = self.weak_self();
        self.spawn(async move {
            glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
            if let Some(engine) = engine.upgrade() {
                let mut engine = engine.borrow_mut();
                engine.functions_changed_scheduled = false;
                let functions = engine.function_summaries(false);
                engine.fire_engine_trigger(
                    "engine::functions-available",
                    serde_json::json!({ "event": "functions_changed", "functions": functions }),
                );
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::control::test_support::{engine, on_executor, settle, FakeWorker};
    use serde_json::json;

    fn live(engine: &std::rc::Rc<std::cell::RefCell<crate::control::engine::Engine>>, trigger_type: &str) -> Vec<String> {
        engine.borrow().live_bindings(trigger_type).into_iter().map(|b| b.id).collect()
    }

    #[test]
    fn a_binding_without_provider_is_parked_and_replayed_to_each_provider_that_registers() {
        on_executor(|| async {
            let engine = engine();
            let mut owner = FakeWorker::connect(&engine);
            let binding = json!({ "type": "registertrigger", "id": "t1", "trigger_type": "cron", "function_id": "jobs::tick", "config": { "every": "1m" } });
            owner.send(&engine, binding);
            assert!(live(&engine, "cron").is_empty(), "parked: no provider yet");
            assert!(owner.drain().is_empty(), "parking is not an error");

            let mut provider = FakeWorker::connect(&engine);
            provider.send(&engine, json!({ "type": "registertriggertype", "id": "cron", "description": "cron" }));
            let delivered = provider.next("registertrigger");
            assert_eq!((&delivered["id"], &delivered["function_id"], &delivered["config"]), (&json!("t1"), &json!("jobs::tick"), &json!({ "every": "1m" })));
            assert_eq!(live(&engine, "cron"), ["t1"]);

            engine.borrow_mut().disconnect(provider.conn);
            assert!(live(&engine, "cron").is_empty(), "parked again when its provider leaves");

            let mut replacement = FakeWorker::connect(&engine);
            replacement.send(&engine, json!({ "type": "registertriggertype", "id": "cron", "description": "cron" }));
            assert_eq!(replacement.next("registertrigger")["id"], "t1", "replayed to the next provider");

            owner.send(&engine, json!({ "type": "unregistertrigger", "id": "t1" }));
            assert_eq!(replacement.next("unregistertrigger")["id"], "t1");
            assert!(live(&engine, "cron").is_empty());
            settle().await;
        });
    }

    #[test]
    fn a_provider_rejection_parks_the_binding_and_tells_its_owner() {
        on_executor(|| async {
            let engine = engine();
            let mut provider = FakeWorker::connect(&engine);
            provider.send(&engine, json!({ "type": "registertriggertype", "id": "cron", "description": "cron" }));
            let mut owner = FakeWorker::connect(&engine);
            owner.send(&engine, json!({ "type": "registertrigger", "id": "t1", "trigger_type": "cron", "function_id": "jobs::tick" }));
            provider.next("registertrigger");
            provider.send(&engine, json!({
                "type": "triggerregistrationresult", "id": "t1", "trigger_type": "cron", "function_id": "jobs::tick",
                "error": { "code": "bad_config", "message": "no schedule" },
            }));
            assert_eq!(owner.next("triggerregistrationresult")["error"]["code"], "bad_config");
            assert!(live(&engine, "cron").is_empty());
        });
    }

    #[test]
    fn an_engine_trigger_reaches_its_function_once_the_function_is_registered() {
        on_executor(|| async {
            let engine = engine();
            let mut owner = FakeWorker::connect(&engine);
            owner.send(&engine, json!({ "type": "registertrigger", "id": "w", "trigger_type": "engine::workers-available", "function_id": "watch::workers" }));
            assert_eq!(live(&engine, "engine::workers-available"), ["w"], "engine trigger types are always provided");
            // Fired before its function exists: the call finds no function, and nobody hears of it.
            let early = FakeWorker::connect(&engine);
            assert!(owner.drain().is_empty());
            owner.register_function(&engine, "watch::workers");
            let late = FakeWorker::connect(&engine);
            let call = owner.next("invokefunction");
            assert_eq!(call["function_id"], "watch::workers");
            assert_eq!(call["data"], json!({ "event": "worker_connected", "worker_id": late.worker_id }));
            assert_ne!(early.worker_id, late.worker_id);
            settle().await;
        });
    }

    #[test]
    fn a_stream_binding_without_stream_name_is_refused() {
        on_executor(|| async {
            let engine = engine();
            engine.borrow_mut().register_engine_trigger_type("stream", "stream changes");
            let mut owner = FakeWorker::connect(&engine);
            owner.send(&engine, json!({ "type": "registertrigger", "id": "s", "trigger_type": "stream", "function_id": "h::f", "config": {} }));
            assert_eq!(owner.next("triggerregistrationresult")["error"]["code"], "trigger_registration_failed");
            assert!(live(&engine, "stream").is_empty());
        });
    }
}
