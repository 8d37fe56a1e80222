//! The engine's own functions (spec §6): worker registration and the introspection and trigger
//! functions, run in-process on the control core.

use super::engine::Engine;
use super::functions::{decode_input, reply_now, BuiltinReply, FunctionEntry};
use super::ns_map::{is_blank, ns_key, DEFAULT_NS};
use super::outbox::CLOSE_POLICY;
use super::triggers::{Binding, Provider, ENGINE_TRIGGER_TYPES};
use super::wire::{ErrorBody, Outbound, RegisterTrigger};
use super::workers::{WorkerConnId, WorkerMeta};
use serde::Deserialize;
use serde_json::{json, Value};
use std::rc::Rc;
use std::time::Duration;

/// An engine builtin: a plain function of the engine and the call's input.
type EngineFn = fn(&mut Engine, Value) -> BuiltinReply;

const BUILTINS: &[(&str, &str, EngineFn)] = &[
    ("engine::workers::register", "Records a worker's metadata and namespace", workers_register),
    ("engine::functions::list", "Lists registered functions", functions_list),
    ("engine::functions::info", "Describes one or more functions", functions_info),
    ("engine::workers::list", "Lists connected workers", workers_list),
    ("engine::workers::info", "Describes one worker", workers_info),
    ("engine::triggers::list", "Lists trigger types", triggers_list),
    ("engine::triggers::info", "Describes a trigger type", triggers_info),
    ("engine::registered-triggers::list", "Lists trigger bindings", registered_triggers_list),
    ("engine::registered-triggers::info", "Describes a trigger binding", registered_triggers_info),
    ("engine::register_trigger", "Creates an engine-owned trigger binding", register_trigger),
    ("engine::unregister_trigger", "Removes a trigger binding", unregister_trigger),
];

/// Installs the engine's own functions and trigger types (the boot code calls it).
pub fn install(engine: &mut Engine) {
    for (id, description, run) in BUILTINS {
        engine.register_builtin(id, description, Rc::new(*run));
    }
    for (id, description) in ENGINE_TRIGGER_TYPES {
        engine.register_engine_trigger_type(id, description);
    }
}

/// Removes control and bidi characters, caps at 280 characters; blank becomes absent.
fn sanitize(text: Option<String>) -> Option<String> {
    let cleaned: String = text?
        .chars()
        .filter(|c| !c.is_control() && !matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'))
        .take(280)
        .collect();
    (!cleaned.trim().is_empty()).then_some(cleaned)
}

#[derive(Deserialize)]
struct RegisterInput {
    _caller_worker_id: Option<String>,
    runtime: Option<String>,
    version: Option<String>,
    name: Option<String>,
    description: Option<String>,
    os: Option<String>,
    pid: Option<u64>,
    isolation: Option<Value>,
    namespace: Option<String>,
}

fn workers_register(engine: &mut Engine, data: Value) -> BuiltinReply {
    const ID: &str = "engine::workers::register";
    let input: RegisterInput = match decode_input(ID, data) {
        Ok(i) => i,
        Err(e) => return BuiltinReply::Now(Err(e)),
    };
    let Some(conn) = input._caller_worker_id.as_deref().and_then(|w| engine.workers.by_worker_id(w)) else {
        return reply_now(Err(ErrorBody::new("deserialization_error", format!("Failed to deserialize input for {ID}: missing field `_caller_worker_id`"))));
    };
    if is_blank(&input.namespace) {
        return reply_now(Err(ErrorBody::new("INVALID_NAMESPACE", "namespace is present but empty")));
    }
    let namespace = input.namespace.clone().unwrap_or_else(|| DEFAULT_NS.to_string());
    let name = sanitize(input.name);
    if let Some(name) = &name {
        let holder = engine
            .workers
            .iter()
            .find(|(id, c)| *id != conn && c.namespace == namespace && c.meta.name.as_deref() == Some(name));
        if let Some((_, holder)) = holder {
            let owner = holder.worker_id.clone();
            let c = &engine.workers[conn];
            tracing::warn!(worker = %name, namespace = %namespace, "worker name already in use; connection refused");
            c.send(&Outbound::RegistrationRejected {
                code: "WORKER_NAMESPACE_CONFLICT",
                namespace: &namespace,
                worker_name: Some(name),
                function_id: None,
                owner_worker_id: &owner,
            });
            c.close(CLOSE_POLICY, "worker name already in use");
            return reply_now(Ok(json!({ "success": false })));
        }
    }
    if !engine.workers[conn].namespace_declared && namespace != engine.workers[conn].namespace {
        rehome(engine, conn, &namespace);
    }
    let Some(c) = engine.workers.get_mut(conn) else { return reply_now(Ok(json!({ "success": false }))) };
    c.namespace_declared = true;
    c.meta = WorkerMeta {
        runtime: input.runtime,
        version: input.version,
        name,
        description: sanitize(input.description),
        os: input.os,
        pid: input.pid,
        isolation: input.isolation,
    };
    tracing::info!(worker_id = %c.worker_id, name = %c.display_name(), runtime = ?c.meta.runtime, "worker registered");
    if let (Some(telemetry), Some(name)) = (&engine.telemetry, &c.meta.name) {
        telemetry.worker_named(conn, &c.ip_address, name, c.meta.runtime.as_deref(), c.meta.pid);
    }
    let worker_id = c.worker_id.clone();
    engine.fire_workers_available("worker_metadata_updated", &worker_id);
    reply_now(Ok(json!({ "success": true })))
}

/// Moves what a connection registered before declaring its namespace into that namespace.
fn rehome(engine: &mut Engine, conn: WorkerConnId, namespace: &str) {
    let Some(c) = engine.workers.get_mut(conn) else { return };
    let old_ns = std::mem::replace(&mut c.namespace, namespace.to_string());
    let functions: Vec<_> = c.functions.iter().filter(|(ns, _)| *ns == old_ns).cloned().collect();
    for (ns, id) in functions {
        if let Some(c) = engine.workers.get_mut(conn) {
            c.functions.remove(&(ns.clone(), id.clone()));
        }
        if let Some(entry) = engine.functions.remove(&ns, &id) {
            let taken = matches!(engine.functions.get(namespace, &id), Some(f) if f.handler.worker() != Some(conn))
                || engine.is_reserved_function(namespace, &id);
            if taken {
                continue;
            }
            engine.functions.insert(namespace, &id, entry);
            if let Some(c) = engine.workers.get_mut(conn) {
                c.functions.insert(ns_key(namespace, &id));
            }
        }
    }
    engine.triggers.rehome_bindings(conn, namespace);
    engine.functions_changed();
}

/// `{function_id, namespace, worker_name, description?, metadata?}` for each listed function.
impl Engine {
    pub fn function_summaries(&self, include_internal: bool) -> Vec<Value> {
        let mut rows: Vec<Value> = self
            .functions
            .iter()
            .filter(|(_, id, f)| include_internal || !is_internal(id, f))
            .map(|(ns, id, f)| self.function_summary(ns, id, f))
            .collect();
        rows.sort_by(|a, b| a["function_id"].as_str().cmp(&b["function_id"].as_str()));
        rows
    }

    fn function_summary(&self, ns: &str, id: &str, f: &FunctionEntry) -> Value {
        let mut row = json!({
            "function_id": id,
            "namespace": ns,
            "worker_name": self.worker_name_of(f, id),
        });
        if let Some(d) = &f.description {
            row["description"] = json!(d);
        }
        if let Some(m) = &f.metadata {
            row["metadata"] = m.clone();
        }
        row
    }

    fn worker_name_of(&self, f: &FunctionEntry, id: &str) -> String {
        f.handler
            .worker()
            .and_then(|conn| self.workers.get(conn))
            .map(|c| c.display_name())
            .unwrap_or_else(|| id.split("::").next().unwrap_or(id).to_string())
    }
}

fn is_internal(id: &str, f: &FunctionEntry) -> bool {
    (id.starts_with("engine::") && !id.starts_with("engine::queue::"))
        || f.metadata.as_ref().and_then(|m| m.get("internal")).and_then(Value::as_bool) == Some(true)
}

fn matches_search(search: &Option<String>, fields: &[&str]) -> bool {
    match search {
        None => true,
        Some(s) => {
            let s = s.to_lowercase();
            fields.iter().any(|f| f.to_lowercase().contains(&s))
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FunctionsListInput {
    search: Option<String>,
    prefix: Option<String>,
    worker: Option<String>,
    workers: Option<Vec<String>>,
    include_internal: Option<bool>,
}

fn functions_list(engine: &mut Engine, data: Value) -> BuiltinReply {
    let input: FunctionsListInput = match decode_input("engine::functions::list", data) {
        Ok(i) => i,
        Err(e) => return BuiltinReply::Now(Err(e)),
    };
    let rows: Vec<Value> = engine
        .function_summaries(input.include_internal.unwrap_or(false))
        .into_iter()
        .filter(|row| {
            let id = row["function_id"].as_str().unwrap_or_default();
            let worker = row["worker_name"].as_str().unwrap_or_default();
            let description = row["description"].as_str().unwrap_or_default();
            input.prefix.as_ref().is_none_or(|p| id.starts_with(p.as_str()))
                && input.worker.as_ref().is_none_or(|w| w == worker)
                && input.workers.as_ref().is_none_or(|ws| ws.iter().any(|w| w == worker))
                && matches_search(&input.search, &[id, description])
        })
        .collect();
    reply_now(Ok(json!({ "functions": rows })))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FunctionsInfoInput {
    function_id: Option<String>,
    function_ids: Option<Vec<String>>,
    namespace: Option<String>,
}

impl Engine {
    fn function_detail(&self, ns: &str, id: &str) -> Option<Value> {
        let f = self.functions.get(ns, id)?;
        let mut detail = self.function_summary(ns, id, f);
        if let Some(s) = &f.request_format {
            detail["request_schema"] = s.clone();
        }
        if let Some(s) = &f.response_format {
            detail["response_schema"] = s.clone();
        }
        let triggers: Vec<Value> = self
            .triggers
            .bindings()
            .filter(|b| b.function_id == id && b.namespace == ns)
            .map(|b| json!({ "id": b.id, "trigger_type": b.trigger_type, "config": b.config }))
            .collect();
        detail["registered_triggers"] = json!(triggers);
        Some(detail)
    }
}

fn functions_info(engine: &mut Engine, data: Value) -> BuiltinReply {
    let input: FunctionsInfoInput = match decode_input("engine::functions::info", data) {
        Ok(i) => i,
        Err(e) => return BuiltinReply::Now(Err(e)),
    };
    let ns = input.namespace.unwrap_or_else(|| DEFAULT_NS.to_string());
    match (input.function_id, input.function_ids) {
        (Some(id), None) => reply_now(engine
            .function_detail(&ns, &id)
            .ok_or_else(|| ErrorBody::new("NOT_FOUND", format!("function {id} not found in namespace {ns}")))),
        (None, Some(mut ids)) => {
            ids.dedup();
            if ids.is_empty() || ids.len() > 32 {
                return reply_now(Err(ErrorBody::new("INVALID_ARGUMENTS", "function_ids must hold 1 to 32 ids")));
            }
            let mut seen = std::collections::HashSet::new();
            let rows: Vec<Value> = ids
                .iter()
                .filter(|id| seen.insert(id.as_str()))
                .map(|id| engine.function_detail(&ns, id).unwrap_or_else(|| json!({ "function_id": id, "error": "not_found" })))
                .collect();
            reply_now(Ok(json!({ "functions": rows })))
        }
        _ => reply_now(Err(ErrorBody::new("INVALID_ARGUMENTS", "give exactly one of function_id or function_ids"))),
    }
}

impl Engine {
    fn worker_summary(&self, conn: WorkerConnId) -> Value {
        let c = &self.workers[conn];
        let active = c.owner_inflight.len();
        json!({
            "name": c.meta.name,
            "description": c.meta.description,
            "version": c.meta.version,
            "id": c.worker_id,
            "namespace": c.namespace,
            "runtime": c.meta.runtime.clone().unwrap_or_else(|| "unknown".into()),
            "os": c.meta.os,
            "status": "connected",
            "function_count": c.functions.len(),
            "connected_at_ms": c.connected_at_ms,
            "active_invocations": active,
            "isolation": c.meta.isolation,
            "ip_address": c.ip_address,
        })
    }
}

fn engine_module_summary() -> Value {
    json!({
        "name": "iii-engine-functions",
        "description": "ringcast built-in engine functions",
        "version": env!("CARGO_PKG_VERSION"),
        "id": "iii-engine-functions",
        "namespace": DEFAULT_NS,
        "runtime": "engine",
        "os": std::env::consts::OS,
        "status": "available",
        "function_count": BUILTINS.len(),
        "connected_at_ms": null,
        "active_invocations": 0,
        "isolation": "in-process",
        "ip_address": null,
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WorkersListInput {
    search: Option<String>,
    runtime: Option<String>,
    status: Option<String>,
}

fn workers_list(engine: &mut Engine, data: Value) -> BuiltinReply {
    let input: WorkersListInput = match decode_input("engine::workers::list", data) {
        Ok(i) => i,
        Err(e) => return BuiltinReply::Now(Err(e)),
    };
    let mut conns: Vec<WorkerConnId> = engine.workers.iter().filter(|(_, c)| c.meta.pid.is_some()).map(|(id, _)| id).collect();
    conns.sort_unstable();
    let rows: Vec<Value> = std::iter::once(engine_module_summary())
        .chain(conns.into_iter().map(|c| engine.worker_summary(c)))
        .filter(|row| {
            let field = |k: &str| row[k].as_str().unwrap_or_default().to_string();
            input.runtime.as_ref().is_none_or(|r| *r == field("runtime"))
                && input.status.as_ref().is_none_or(|s| *s == field("status"))
                && matches_search(&input.search, &[&field("name"), &field("description"), &field("id")])
        })
        .collect();
    reply_now(Ok(json!({ "workers": rows })))
}

#[derive(Deserialize)]
struct WorkersInfoInput {
    name: String,
    namespace: Option<String>,
}

fn workers_info(engine: &mut Engine, data: Value) -> BuiltinReply {
    let input: WorkersInfoInput = match decode_input("engine::workers::info", data) {
        Ok(i) => i,
        Err(e) => return BuiltinReply::Now(Err(e)),
    };
    let matches: Vec<WorkerConnId> = engine
        .workers
        .iter()
        .filter(|(_, c)| c.meta.name.as_deref() == Some(input.name.as_str()))
        .filter(|(_, c)| input.namespace.as_ref().is_none_or(|ns| *ns == c.namespace))
        .map(|(id, _)| id)
        .collect();
    let [conn] = matches[..] else {
        let why = if matches.is_empty() { "not found" } else { "ambiguous: several workers have this name" };
        return reply_now(Err(ErrorBody::new("NOT_FOUND", format!("worker {}: {why}", input.name))));
    };
    let c = &engine.workers[conn];
    let mut worker = engine.worker_summary(conn);
    worker["pid"] = json!(c.meta.pid);
    worker["internal"] = json!(false);
    let mut functions: Vec<Value> = c
        .functions
        .iter()
        .filter_map(|(ns, id)| engine.functions.get(ns, id).map(|f| engine.function_summary(ns, id, f)))
        .collect();
    functions.sort_by(|a, b| a["function_id"].as_str().cmp(&b["function_id"].as_str()));
    let trigger_types: Vec<Value> = c.trigger_types.iter().map(|(ns, id)| trigger_type_summary(engine, ns, id)).collect();
    let triggers: Vec<Value> = c
        .triggers
        .iter()
        .filter_map(|id| engine.triggers.binding(id))
        .map(|b| json!({ "id": b.id, "trigger_type": b.trigger_type, "function_id": b.function_id, "config": b.config }))
        .collect();
    reply_now(Ok(json!({ "worker": worker, "functions": functions, "trigger_types": trigger_types, "registered_triggers": triggers })))
}

fn trigger_type_summary(engine: &Engine, ns: &str, id: &str) -> Value {
    let Some(t) = engine.triggers.trigger_type(ns, id) else { return Value::Null };
    let worker_name = match t.provider {
        Provider::Engine => "iii-engine-functions".to_string(),
        Provider::Worker(conn) => engine.workers.get(conn).map(|c| c.display_name()).unwrap_or_default(),
    };
    json!({ "id": id, "namespace": ns, "worker_name": worker_name, "description": t.description })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TriggersListInput {
    search: Option<String>,
    prefix: Option<String>,
    worker: Option<String>,
    include_internal: Option<bool>,
}

fn triggers_list(engine: &mut Engine, data: Value) -> BuiltinReply {
    let input: TriggersListInput = match decode_input("engine::triggers::list", data) {
        Ok(i) => i,
        Err(e) => return BuiltinReply::Now(Err(e)),
    };
    let include_internal = input.include_internal.unwrap_or(false);
    let mut rows: Vec<Value> = engine
        .triggers
        .trigger_types()
        .filter(|(_, id, _)| include_internal || !ENGINE_TRIGGER_TYPES.iter().any(|(e, _)| e == id))
        .map(|(ns, id, _)| trigger_type_summary(engine, ns, id))
        .filter(|row| {
            let id = row["id"].as_str().unwrap_or_default();
            let worker = row["worker_name"].as_str().unwrap_or_default();
            input.prefix.as_ref().is_none_or(|p| id.starts_with(p.as_str()))
                && input.worker.as_ref().is_none_or(|w| w == worker)
                && matches_search(&input.search, &[id, row["description"].as_str().unwrap_or_default()])
        })
        .collect();
    rows.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    reply_now(Ok(json!({ "triggers": rows })))
}

#[derive(Deserialize)]
struct TriggersInfoInput {
    id: String,
    namespace: Option<String>,
}

fn triggers_info(engine: &mut Engine, data: Value) -> BuiltinReply {
    let input: TriggersInfoInput = match decode_input("engine::triggers::info", data) {
        Ok(i) => i,
        Err(e) => return BuiltinReply::Now(Err(e)),
    };
    let ns = input.namespace.unwrap_or_else(|| DEFAULT_NS.to_string());
    let Some(t) = engine.triggers.trigger_type(&ns, &input.id) else {
        return reply_now(Err(ErrorBody::new("NOT_FOUND", format!("trigger type {} not found in namespace {ns}", input.id))));
    };
    let mut row = trigger_type_summary(engine, &ns, &input.id);
    if let Some(s) = &t.trigger_request_format {
        row["configuration_schema"] = s.clone();
    }
    if let Some(s) = &t.call_request_format {
        row["request_schema"] = s.clone();
    }
    row["instance_count"] = json!(engine
        .triggers
        .bindings()
        .filter(|b| b.trigger_type == input.id && b.routed_ns.as_deref() == Some(ns.as_str()))
        .count());
    reply_now(Ok(row))
}

impl Engine {
    fn binding_summary(&self, b: &Binding) -> Value {
        let worker_name = b
            .owner
            .and_then(|o| self.workers.get(o))
            .map(|c| c.display_name())
            .unwrap_or_else(|| "engine".to_string());
        let config_summary = match &b.config {
            Value::Object(map) => map.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", "),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        json!({
            "id": b.id, "trigger_type": b.trigger_type, "function_id": b.function_id,
            "worker_name": worker_name, "config": b.config, "config_summary": config_summary,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RegisteredTriggersListInput {
    search: Option<String>,
    trigger_type: Option<String>,
    function_id: Option<String>,
    worker: Option<String>,
    include_internal: Option<bool>,
}

fn registered_triggers_list(engine: &mut Engine, data: Value) -> BuiltinReply {
    let input: RegisteredTriggersListInput = match decode_input("engine::registered-triggers::list", data) {
        Ok(i) => i,
        Err(e) => return BuiltinReply::Now(Err(e)),
    };
    let include_internal = input.include_internal.unwrap_or(false);
    let mut rows: Vec<Value> = engine
        .triggers
        .bindings()
        .filter(|b| include_internal || !b.function_id.starts_with("engine::"))
        .filter(|b| input.trigger_type.as_ref().is_none_or(|t| *t == b.trigger_type))
        .filter(|b| input.function_id.as_ref().is_none_or(|f| *f == b.function_id))
        .map(|b| engine.binding_summary(b))
        .filter(|row| {
            input.worker.as_ref().is_none_or(|w| row["worker_name"].as_str() == Some(w.as_str()))
                && matches_search(
                    &input.search,
                    &[row["id"].as_str().unwrap_or_default(), row["function_id"].as_str().unwrap_or_default(), row["trigger_type"].as_str().unwrap_or_default()],
                )
        })
        .collect();
    rows.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    reply_now(Ok(json!({ "registered_triggers": rows })))
}

#[derive(Deserialize)]
struct IdInput {
    id: String,
}

fn registered_triggers_info(engine: &mut Engine, data: Value) -> BuiltinReply {
    let input: IdInput = match decode_input("engine::registered-triggers::info", data) {
        Ok(i) => i,
        Err(e) => return BuiltinReply::Now(Err(e)),
    };
    let Some(b) = engine.triggers.binding(&input.id) else {
        return reply_now(Err(ErrorBody::new("NOT_FOUND", format!("trigger {} not found", input.id))));
    };
    let mut row = engine.binding_summary(b);
    row.as_object_mut().unwrap().remove("config_summary");
    if let Some(m) = &b.metadata {
        row["metadata"] = m.clone();
    }
    row["trigger"] = b.routed_ns.as_ref().map(|ns| trigger_type_summary(engine, ns, &b.trigger_type)).unwrap_or(Value::Null);
    row["function"] = engine.function_detail(&b.namespace, &b.function_id).unwrap_or(Value::Null);
    reply_now(Ok(row))
}

#[derive(Deserialize)]
struct RegisterTriggerInput {
    trigger_type: String,
    function_id: String,
    #[serde(default)]
    config: Value,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    trigger_namespace: Option<String>,
}

/// How long `engine::register_trigger` waits for a worker provider's verdict.
const PROVIDER_VERDICT_WAIT: Duration = Duration::from_secs(10);

fn register_trigger(engine: &mut Engine, data: Value) -> BuiltinReply {
    let input: RegisterTriggerInput = match decode_input("engine::register_trigger", data) {
        Ok(i) => i,
        Err(e) => return BuiltinReply::Now(Err(e)),
    };
    if is_blank(&input.trigger_namespace) {
        return reply_now(Err(ErrorBody::new("INVALID_NAMESPACE", "trigger_namespace is present but empty")));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let provider = engine.register_binding(
        None,
        RegisterTrigger {
            id: id.clone(),
            trigger_type: input.trigger_type,
            function_id: input.function_id,
            config: input.config,
            metadata: input.metadata,
            namespace: None,
            trigger_namespace: input.trigger_namespace,
        },
    );
    let result = json!({ "id": id });
    if provider.is_none() {
        return reply_now(Ok(result));
    }
    let (tx, rx) = futures_channel::oneshot::channel();
    engine.triggers.add_waiter(&id, tx);
    let engine_ref = engine.weak_self();
    BuiltinReply::Later(Box::pin(async move {
        let verdict = glommio::timer::timeout(PROVIDER_VERDICT_WAIT, async { Ok(rx.await.ok().flatten()) }).await;
        if let Some(engine) = engine_ref.upgrade() {
            engine.borrow_mut().triggers.remove_waiter(&id);
        }
        match verdict {
            Ok(Some(error)) => Err(ErrorBody::new("trigger_registration_failed", format!("{}: {}", error.code, error.message))),
            // No answer in time, or the provider went away: counted as success, as the reference does.
            _ => Ok(Some(result)),
        }
    }))
}

#[derive(Deserialize)]
struct UnregisterTriggerInput {
    id: String,
}

fn unregister_trigger(engine: &mut Engine, data: Value) -> BuiltinReply {
    let input: UnregisterTriggerInput = match decode_input("engine::unregister_trigger", data) {
        Ok(i) => i,
        Err(e) => return BuiltinReply::Now(Err(e)),
    };
    let removed = engine.unregister_binding(&input.id);
    reply_now(Ok(json!({ "removed": removed })))
}

#[cfg(test)]
mod tests {
    use super::sanitize;

    #[test]
    fn sanitize_strips_controls_caps_length_and_blanks() {
        assert_eq!(sanitize(Some("a\u{0007}b\u{202e}c".into())).as_deref(), Some("abc"));
        assert_eq!(sanitize(Some("x".repeat(300))).map(|s| s.len()), Some(280));
        assert_eq!(sanitize(Some("  ".into())), None);
        assert_eq!(sanitize(None), None);
    }
}
