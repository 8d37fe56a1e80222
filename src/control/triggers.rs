//! Trigger types and trigger bindings (spec §5): resolving a binding's provider, parking
//! bindings whose provider is absent and replaying them when one registers, and firing the
//! engine's own trigger types.

use super::engine::{ConnId, Engine};
use super::invocation::{Call, Reply};
use super::registry::{is_blank, ns_key, DEFAULT_NS};
use super::wire::{ErrorBody, Outbound, RegisterTrigger, RegisterTriggerType, TriggerRegistrationResult};
use serde_json::Value;

/// Who implements a trigger type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Worker(ConnId),
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
    pub owner: Option<ConnId>,
    /// Namespace of the provider's trigger type it is routed to now; `None` = parked.
    pub routed_ns: Option<String>,
    /// Namespace of the registering connection at registration time.
    pub home_ns: String,
    /// Registration order; bindings of one event fire in this order.
    pub seq: u64,
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
    /// Installs the engine's own trigger types.
    pub fn install_engine_trigger_types(&mut self, types: &[(&str, &str)]) {
        for (id, description) in types {
            self.trigger_types.insert(
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
    }

    /// Provider namespace for a binding: strict `trigger_namespace`, else home, else default.
    fn resolve_provider(&self, binding: &Binding) -> Option<String> {
        match &binding.trigger_namespace {
            Some(ns) => self.trigger_types.get(ns, &binding.trigger_type).map(|_| ns.clone()),
            None => [binding.home_ns.as_str(), DEFAULT_NS]
                .into_iter()
                .find(|ns| self.trigger_types.get(ns, &binding.trigger_type).is_some())
                .map(str::to_string),
        }
    }

    fn provider_of(&self, ns: &str, trigger_type: &str) -> Option<Provider> {
        self.trigger_types.get(ns, trigger_type).map(|t| t.provider)
    }

    /// Tells a worker provider to start serving `binding`.
    fn send_register(&self, provider: ConnId, binding: &Binding, provider_ns: &str) {
        if let Some(conn) = self.conns.get(&provider) {
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
            if let Some(conn) = self.conns.get(&provider) {
                conn.send(&Outbound::UnregisterTrigger { id: &binding.id, trigger_type: &binding.trigger_type });
            }
        }
    }

    /// Sends a failed registration back to the binding's owner.
    fn report_binding_error(&self, owner: Option<ConnId>, m: &Binding, error: &ErrorBody) {
        if let Some(conn) = owner.and_then(|o| self.conns.get(&o)) {
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
    pub fn register_binding(&mut self, owner: Option<ConnId>, m: RegisterTrigger) -> Option<ConnId> {
        let home_ns = owner
            .and_then(|o| self.conns.get(&o))
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
            seq: self.next_binding_seq,
        };
        self.next_binding_seq += 1;
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
        let previous = self.bindings.remove(&binding.id);
        if let Some(previous) = &previous {
            if let Some(old_owner) = previous.owner.and_then(|o| self.conns.get_mut(&o)) {
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
        if let Some(conn) = owner.and_then(|o| self.conns.get_mut(&o)) {
            conn.triggers.insert(binding.id.clone());
        }
        self.bindings.insert(binding.id.clone(), binding);
        routed_to
    }

    /// `unregistertrigger`: removes a live or parked binding and tells its provider.
    pub fn unregister_binding(&mut self, id: &str) -> bool {
        let Some(binding) = self.bindings.remove(id) else { return false };
        self.send_unregister(&binding);
        if let Some(owner) = binding.owner.and_then(|o| self.conns.get_mut(&o)) {
            owner.triggers.remove(id);
        }
        true
    }

    /// `triggerregistrationresult` from a provider.
    pub fn trigger_registration_result(&mut self, conn: ConnId, m: TriggerRegistrationResult) {
        let Some(binding) = self.bindings.get(&m.id) else { return };
        let from_provider = binding
            .routed_ns
            .as_ref()
            .and_then(|ns| self.provider_of(ns, &binding.trigger_type))
            == Some(Provider::Worker(conn));
        if !from_provider {
            return;
        }
        if let Some(waiter) = self.trigger_waiters.remove(&m.id) {
            let _ = waiter.send(m.error.clone());
        }
        let Some(error) = m.error else { return };
        tracing::warn!(trigger_id = %m.id, code = %error.code, message = %error.message, "provider rejected trigger binding; parked");
        let binding = self.bindings.get_mut(&m.id).unwrap();
        binding.routed_ns = None;
        let (owner, binding) = (binding.owner, binding.clone());
        self.report_binding_error(owner, &binding, &error);
    }

    /// `registertriggertype`: (re)places the provider and delivers every binding that now
    /// resolves to it.
    pub fn register_trigger_type(&mut self, conn: ConnId, m: RegisterTriggerType) {
        if is_blank(&m.namespace) {
            tracing::warn!(trigger_type = %m.id, "registertriggertype with an empty namespace ignored");
            return;
        }
        let ns = m.namespace.unwrap_or_else(|| self.conns[&conn].namespace.clone());
        // The engine's trigger types are reserved in every namespace: a worker provider in its
        // own namespace would capture bindings the engine fires itself.
        if self.provider_of(DEFAULT_NS, &m.id) == Some(Provider::Engine) {
            self.reject_reserved(conn, &ns, &m.id, "trigger type");
            return;
        }
        let previous = self.trigger_types.insert(
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
                if let Some(old_conn) = self.conns.get_mut(&old) {
                    old_conn.trigger_types.remove(&ns_key(&ns, &m.id));
                }
            }
        }
        self.conns.get_mut(&conn).unwrap().trigger_types.insert(ns_key(&ns, &m.id));
        tracing::debug!(trigger_type = %m.id, namespace = %ns, "trigger type registered");
        self.reroute_bindings(&m.id, Some(&ns));
    }

    /// Re-resolves every binding of `trigger_type`. Bindings that resolve to `fresh_ns` (a
    /// provider that just registered) are delivered to it even when they were routed there
    /// before (a replay); bindings that move are withdrawn from their old provider.
    fn reroute_bindings(&mut self, trigger_type: &str, fresh_ns: Option<&str>) {
        let ids: Vec<String> = self
            .bindings
            .values()
            .filter(|b| b.trigger_type == trigger_type)
            .map(|b| b.id.clone())
            .collect();
        for id in ids {
            let binding = self.bindings[&id].clone();
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
            self.bindings.get_mut(&id).unwrap().routed_ns = target;
        }
    }

    /// `unregistertriggertype` (ignored by the reference): removes the type if `conn` provides it.
    pub fn unregister_trigger_type(&mut self, conn: ConnId, id: &str, namespace: Option<String>) {
        let ns = namespace.unwrap_or_else(|| self.conns[&conn].namespace.clone());
        self.conns.get_mut(&conn).unwrap().trigger_types.remove(&ns_key(&ns, id));
        self.remove_trigger_type(conn, &ns, id);
    }

    /// Removes trigger type `(ns, id)` if `conn` still provides it, re-routing or parking its
    /// bindings.
    pub fn remove_trigger_type(&mut self, conn: ConnId, ns: &str, id: &str) {
        if self.provider_of(ns, id) != Some(Provider::Worker(conn)) {
            return;
        }
        // Bindings still point at the departing provider: forget the route without telling it.
        for binding in self.bindings.values_mut() {
            if binding.trigger_type == id && binding.routed_ns.as_deref() == Some(ns) {
                binding.routed_ns = None;
            }
        }
        self.trigger_types.remove(ns, id);
        self.reroute_bindings(id, None);
    }

    /// The live (not parked) bindings of `trigger_type`, in registration order.
    pub fn live_bindings(&self, trigger_type: &str) -> Vec<Binding> {
        let mut found: Vec<Binding> = self
            .bindings
            .values()
            .filter(|b| b.trigger_type == trigger_type && b.routed_ns.is_some())
            .cloned()
            .collect();
        found.sort_by_key(|b| b.seq);
        found
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
        let engine = self.self_ref.clone();
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
