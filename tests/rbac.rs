//! RBAC listeners (spec worker-protocol §1.3) over real sockets: an engine with its main worker
//! port and a second `iii-worker-manager` entry with an `rbac` block; a trusted raw worker on
//! the main port hosts the auth function and the registration hooks, and raw WebSocket clients
//! play the browser on the RBAC port.

mod common;

use common::{free_port, http_get, uuid, wait_until, Engine, Worker, FRAME_WAIT};
use serde_json::{json, Value};
use std::net::TcpStream;
use std::time::Duration;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

const AUTH: &str = "app::auth";
const FN_HOOK: &str = "app::on-function";
const TRIGGER_HOOK: &str = "app::on-trigger";
const TYPE_HOOK: &str = "app::on-trigger-type";

/// An engine with an RBAC listener, and the trusted worker that serves its auth function and hooks.
struct Rig {
    engine: Engine,
    rbac_port: u16,
    metrics_port: u16,
    trusted: Worker,
}

/// `rbac` is the YAML of the block's keys, indented by 8 spaces.
fn rig(rbac: &str) -> Rig {
    let (rbac_port, metrics_port) = (free_port(), free_port());
    let extra = format!(
        "  - name: iii-worker-manager\n    config:\n      host: 127.0.0.1\n      port: {rbac_port}\n      rbac:\n{rbac}"
    );
    let engine = Engine::start_full(&format!("metrics: 127.0.0.1:{metrics_port}\n"), &extra, "", &["--shards", "1"]);
    let mut trusted = Worker::connect(&engine);
    trusted.register_worker("trusted");
    for id in [AUTH, FN_HOOK, TRIGGER_HOOK, TYPE_HOOK] {
        trusted.register_function(id);
    }
    Rig { engine, rbac_port, metrics_port, trusted }
}

const STANDARD: &str = "        auth_function_id: app::auth\n        auth_timeout_ms: 400\n        hook_timeout_ms: 400\n        expose_functions:\n          - match(\"api::*\")\n          - metadata:\n              public: true\n";

type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to the RBAC port without reading anything.
fn open(rig: &Rig, query: &str, headers: &[(&'static str, &str)]) -> Socket {
    use tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://127.0.0.1:{}/{query}", rig.rbac_port).into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    let (ws, _) = tungstenite::connect(request).expect("upgrade on the RBAC port");
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(FRAME_WAIT)).unwrap();
    }
    ws
}

fn next_json(ws: &mut Socket) -> Value {
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => return serde_json::from_str(&text).expect("JSON"),
            Ok(Message::Close(frame)) => panic!("closed: {frame:?}"),
            Ok(_) => continue,
            Err(e) => panic!("no frame within {FRAME_WAIT:?}: {e}"),
        }
    }
}

/// The close code of the socket's close frame.
fn close_code(ws: &mut Socket) -> Option<u16> {
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame.map(|f| f.code.into()),
            Ok(Message::Text(text)) => panic!("a frame instead of the close: {text}"),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// The auth call the trusted worker receives.
fn auth_call(rig: &mut Rig) -> Value {
    let call = rig.trusted.recv_type("invokefunction");
    assert_eq!(call["function_id"], AUTH, "{call}");
    call
}

/// A browser admitted with `answer` as its auth result.
fn admitted(rig: &mut Rig, answer: Value) -> Worker {
    let mut ws = open(rig, "?token=t", &[]);
    let call = auth_call(rig);
    rig.trusted.answer(&call, answer);
    let first = next_json(&mut ws);
    assert_eq!(first["type"], "workerregistered", "{first}");
    Worker {
        ws,
        worker_id: first["worker_id"].as_str().unwrap().to_string(),
        reattach_token: first["reattach_token"].as_str().unwrap().to_string(),
    }
}

fn metric(rig: &Rig, name: &str) -> u64 {
    let text = http_get(rig.metrics_port, "/metrics", Duration::from_secs(2)).expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

/// The trusted worker serves `id` once: takes the call, answers `result`.
fn serve_once(worker: &mut Worker, id: &str, result: Value) -> Value {
    let call = worker.recv_type("invokefunction");
    assert_eq!(call["function_id"], id, "{call}");
    worker.answer(&call, result);
    call
}

/// Answers a hook call with an error (a throwing hook).
fn fail(worker: &mut Worker, call: &Value) {
    worker.send(json!({
        "type": "invocationresult", "invocation_id": call["invocation_id"], "function_id": call["function_id"],
        "error": {"code": "invocation_failed", "message": "denied by policy"}
    }));
}

#[test]
fn auth_gets_headers_query_and_address_and_its_context_reaches_the_hooks() {
    let mut rig = rig(&format!("{STANDARD}        on_function_registration_function_id: {FN_HOOK}\n"));
    let mut ws = open(&rig, "?token=abc&token=def&mode=x", &[("authorization", "Bearer abc")]);
    let call = auth_call(&mut rig);
    let input = &call["data"];
    assert_eq!(input["headers"]["authorization"], "Bearer abc", "{input}");
    assert_eq!(input["headers"]["host"], format!("127.0.0.1:{}", rig.rbac_port));
    assert_eq!(input["query_params"], json!({"token": ["abc", "def"], "mode": ["x"]}));
    assert_eq!(input["ip_address"], "127.0.0.1");
    // Nothing before the auth function answered.
    rig.trusted.answer(&call, json!({"context": {"user": "ada", "role": "viewer"}}));
    assert_eq!(next_json(&mut ws)["type"], "workerregistered");
    // The context goes to the registration hook with what is registered.
    ws.send(Message::text(json!({"type": "registerfunction", "id": "ui::render", "metadata": {"v": 1}}).to_string())).unwrap();
    let hook = serve_once(&mut rig.trusted, FN_HOOK, json!({}));
    assert_eq!(hook["data"]["context"], json!({"user": "ada", "role": "viewer"}));
    assert_eq!((&hook["data"]["function_id"], &hook["data"]["metadata"], &hook["data"]["namespace"]), (&json!("ui::render"), &json!({"v": 1}), &json!("default")));
    assert_eq!(metric(&rig, "ringcast_rbac_auth_ok_total"), 1);
}

#[test]
fn a_failing_or_empty_auth_answer_refuses_the_worker_with_auth_error_and_1008() {
    let mut rig = rig(STANDARD);
    for answer in ["error", "null", "not-an-object", "bad-shape"] {
        let mut ws = open(&rig, "", &[]);
        let call = auth_call(&mut rig);
        match answer {
            "error" => fail(&mut rig.trusted, &call),
            "null" => rig.trusted.answer(&call, Value::Null),
            "not-an-object" => rig.trusted.answer(&call, json!("yes")),
            _ => rig.trusted.answer(&call, json!({"allowed_functions": "api::x"})),
        }
        let frame = next_json(&mut ws);
        assert_eq!(frame["type"], "error", "{answer}: {frame}");
        assert_eq!(frame["error"]["code"], "AUTH_ERROR", "{answer}: {frame}");
        assert!(frame["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{frame}");
        if answer == "error" {
            assert!(frame["error"]["message"].as_str().unwrap().contains("denied by policy"), "{frame}");
        }
        assert_eq!(close_code(&mut ws), Some(1008), "{answer}");
    }
    assert_eq!(metric(&rig, "ringcast_rbac_auth_denied_total"), 4);
    assert_eq!(metric(&rig, "ringcast_rbac_auth_ok_total"), 0);
    assert_eq!(metric(&rig, "ringcast_workers_connected"), 1, "only the trusted worker");
}

#[test]
fn an_auth_function_that_does_not_answer_in_time_refuses_and_its_late_answer_is_dropped() {
    let mut rig = rig(STANDARD);
    let mut ws = open(&rig, "", &[]);
    let call = auth_call(&mut rig);
    let frame = next_json(&mut ws);
    assert_eq!(frame["error"]["code"], "AUTH_ERROR");
    assert!(frame["error"]["message"].as_str().unwrap().contains("400 ms"), "{frame}");
    assert_eq!(close_code(&mut ws), Some(1008));
    wait_until(Duration::from_secs(3), "the given-up auth call to leave the pending table", || {
        metric(&rig, "ringcast_invocations_in_flight") == 0
    });
    rig.trusted.answer(&call, json!({}));
    rig.trusted.assert_quiet();
}

#[test]
fn auth_worker_gone_or_missing_refuses_the_worker() {
    let mut rig = rig(STANDARD);
    let mut ws = open(&rig, "", &[]);
    auth_call(&mut rig);
    // The auth worker vanishes mid-call.
    drop(std::mem::replace(&mut rig.trusted, Worker::connect(&rig.engine)));
    let frame = next_json(&mut ws);
    assert_eq!(frame["error"]["code"], "AUTH_ERROR", "{frame}");
    assert!(frame["error"]["message"].as_str().unwrap().contains("Invocation stopped"), "{frame}");
    assert_eq!(close_code(&mut ws), Some(1008));
    // No auth function registered at all.
    let mut ws = open(&rig, "", &[]);
    let frame = next_json(&mut ws);
    assert!(frame["error"]["message"].as_str().unwrap().contains("not found"), "{frame}");
    assert_eq!(close_code(&mut ws), Some(1008));
}

#[test]
fn a_session_calls_only_exposed_functions_and_gets_forbidden_otherwise() {
    let mut rig = rig(STANDARD);
    for (id, metadata) in [("api::echo", json!(null)), ("internal::secret", json!(null)), ("tools::shared", json!({"public": true})), ("tools::hidden", json!({"public": "yes"})), ("api::delete", json!(null))] {
        rig.trusted.send(json!({"type": "registerfunction", "id": id, "metadata": metadata}));
    }
    rig.trusted.sync();
    let mut browser = admitted(&mut rig, json!({"forbidden_functions": ["api::delete"], "allowed_functions": ["internal::granted"]}));

    // Exposed by `match("api::*")`: forwarded, answered.
    let id = uuid();
    browser.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "api::echo", "data": {"x": 1}}));
    let call = serve_once(&mut rig.trusted, "api::echo", json!({"echo": 1}));
    assert_eq!(call["data"]["_caller_worker_id"], browser.worker_id);
    let result = browser.recv_type("invocationresult");
    assert_eq!((&result["invocation_id"], &result["result"]), (&json!(id), &json!({"echo": 1})));
    // Exposed by its metadata.
    browser.send(json!({"type": "invokefunction", "invocation_id": uuid(), "function_id": "tools::shared"}));
    serve_once(&mut rig.trusted, "tools::shared", json!(2));
    assert_eq!(browser.recv_type("invocationresult")["result"], 2);

    // Not exposed: FORBIDDEN with the caller's id; the owner never hears of it.
    for (target, hint) in [("internal::secret", "expose_functions"), ("tools::hidden", "expose_functions"), ("api::delete", "forbidden_functions"), ("nobody::home", "expose_functions")] {
        let id = uuid();
        browser.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": target, "data": {}}));
        let refused = browser.recv_type("invocationresult");
        assert_eq!(refused["invocation_id"], id.as_str());
        assert_eq!(refused["function_id"], target);
        assert!(refused.get("result").is_none(), "{refused}");
        assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(message.contains(target) && message.contains(hint), "{message}");
    }
    // A void call is refused too, under a fresh id (as the reference).
    browser.send(json!({"type": "invokefunction", "function_id": "internal::secret", "action": {"type": "void"}}));
    let refused = browser.recv_type("invocationresult");
    assert_eq!(refused["error"]["code"], "FORBIDDEN");
    assert!(uuid::Uuid::parse_str(refused["invocation_id"].as_str().unwrap()).is_ok());
    // Enqueue goes through the same check.
    browser.send(json!({"type": "invokefunction", "invocation_id": uuid(), "function_id": "internal::secret", "action": {"type": "enqueue", "queue": "q"}}));
    assert_eq!(browser.recv_type("invocationresult")["error"]["code"], "FORBIDDEN");
    rig.trusted.assert_quiet();
    assert_eq!(metric(&rig, "ringcast_rbac_forbidden_calls_total"), 6);

    // The main port is not restricted.
    let mut inside = Worker::connect(&rig.engine);
    inside.send(json!({"type": "invokefunction", "invocation_id": uuid(), "function_id": "internal::secret"}));
    serve_once(&mut rig.trusted, "internal::secret", json!("ok"));
    assert_eq!(inside.recv_type("invocationresult")["result"], "ok");
}

#[test]
fn the_sdk_infrastructure_calls_work_under_restricted_exposure_and_other_engine_calls_do_not() {
    let mut rig = rig("        auth_function_id: app::auth\n        expose_functions: []\n");
    let mut browser = admitted(&mut rig, json!({}));
    // What every SDK sends on connect (void), then the same as a sync call.
    browser.register_worker("browser");
    let result = browser.call("engine::workers::register", json!({"name": "browser", "runtime": "browser"}));
    assert!(result.get("error").is_none(), "{result}");
    for id in ["engine::functions::list", "engine::workers::list", "engine::triggers::list"] {
        let result = browser.call(id, json!({}));
        assert_eq!(result["error"]["code"], "FORBIDDEN", "{id}: {result}");
    }
    // Sessions scoped to namespaces may declare only those.
    let mut scoped = admitted(&mut rig, json!({"namespaces": {"shop": []}}));
    let result = scoped.call("engine::workers::register", json!({"namespace": "billing"}));
    assert_eq!(result["error"]["code"], "FORBIDDEN", "{result}");
    assert!(result["error"]["message"].as_str().unwrap().contains("shop"), "{result}");
    let result = scoped.call("engine::workers::register", json!({"namespace": "shop"}));
    assert!(result.get("error").is_none(), "{result}");
}

#[test]
fn function_list_and_info_show_a_session_only_what_it_may_call() {
    let mut rig = rig("        auth_function_id: app::auth\n        expose_functions:\n          - match(\"api::*\")\n          - match(\"engine::functions::*\")\n          - metadata:\n              public: true\n");
    for (id, metadata) in [("api::echo", json!(null)), ("internal::secret", json!(null)), ("tools::shared", json!({"public": true}))] {
        rig.trusted.send(json!({"type": "registerfunction", "id": id, "metadata": metadata}));
    }
    rig.trusted.sync();
    let mut browser = admitted(&mut rig, json!({"forbidden_functions": ["tools::shared"]}));
    let listed = browser.ok("engine::functions::list", json!({}));
    let ids: Vec<&str> = listed["functions"].as_array().unwrap().iter().map(|f| f["function_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["api::echo"], "{listed}");
    let internal = browser.ok("engine::functions::list", json!({"include_internal": true}));
    let ids: Vec<&str> = internal["functions"].as_array().unwrap().iter().map(|f| f["function_id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"engine::functions::list") && !ids.contains(&"engine::workers::list") && !ids.contains(&"stream::set"), "{internal}");
    let refused = browser.call("engine::functions::info", json!({"function_id": "internal::secret"}));
    assert_eq!(refused["error"]["code"], "FORBIDDEN", "{refused}");
    let seen = browser.ok("engine::functions::info", json!({"function_id": "api::echo"}));
    assert_eq!(seen["function_id"], "api::echo");
    let batch = browser.ok("engine::functions::info", json!({"function_ids": ["api::echo", "internal::secret", "missing::one"]}));
    assert_eq!(batch["functions"][0]["function_id"], "api::echo");
    assert_eq!(batch["functions"][1], json!({"function_id": "internal::secret", "error": "forbidden"}));
    assert_eq!(batch["functions"][2]["error"], "not_found");
    // The trusted worker still sees everything.
    let all = rig.trusted.ok("engine::functions::list", json!({}));
    assert!(all["functions"].as_array().unwrap().iter().any(|f| f["function_id"] == "internal::secret"));
}

#[test]
fn a_registration_prefix_is_added_for_the_engine_and_stripped_for_the_worker() {
    let mut rig = rig(STANDARD);
    let mut browser = admitted(&mut rig, json!({"function_registration_prefix": "tenant-7"}));
    browser.register_function("echo");
    let id = uuid();
    rig.trusted.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "tenant-7::echo", "data": {"hi": 1}}));
    let call = browser.recv_type("invokefunction");
    assert_eq!(call["function_id"], "echo", "the worker sees its own id");
    browser.answer(&call, json!("pong"));
    let result = rig.trusted.recv_type("invocationresult");
    assert_eq!((&result["function_id"], &result["result"]), (&json!("tenant-7::echo"), &json!("pong")));
    assert_eq!(rig.trusted.call("echo", json!({}))["error"]["code"], "function_not_found");
    // Unregistering uses the worker's own id too.
    browser.send(json!({"type": "unregisterfunction", "id": "echo"}));
    browser.sync();
    assert_eq!(rig.trusted.call("tenant-7::echo", json!({}))["error"]["code"], "function_not_found");
}

#[test]
fn the_function_hook_may_rewrite_or_deny_and_the_session_may_be_barred_from_registering() {
    let mut rig = rig(&format!("{STANDARD}        on_function_registration_function_id: {FN_HOOK}\n"));
    let mut browser = admitted(&mut rig, json!({"context": {"tenant": "t1"}}));
    // Rewrite: id and metadata.
    browser.send(json!({"type": "registerfunction", "id": "draw", "description": "d"}));
    serve_once(&mut rig.trusted, FN_HOOK, json!({"function_id": "api::draw", "metadata": {"owner": "t1"}}));
    browser.sync();
    let info = rig.trusted.ok("engine::functions::info", json!({"function_id": "api::draw"}));
    assert_eq!((&info["metadata"], &info["description"]), (&json!({"owner": "t1"}), &json!("d")));
    // Deny: a hook that throws, and one that answers no object.
    for deny in [true, false] {
        let id = format!("denied{deny}");
        browser.send(json!({"type": "registerfunction", "id": id}));
        let call = rig.trusted.recv_type("invokefunction");
        if deny {
            fail(&mut rig.trusted, &call);
        } else {
            rig.trusted.answer(&call, json!(null));
        }
        browser.sync();
        assert_eq!(rig.trusted.call(&id, json!({}))["error"]["code"], "function_not_found");
    }
    // A session whose auth result bars registration: the hook is not even asked.
    let mut barred = admitted(&mut rig, json!({"allow_function_registration": false}));
    barred.register_function("api::mine");
    rig.trusted.assert_quiet();
    assert_eq!(rig.trusted.call("api::mine", json!({}))["error"]["code"], "function_not_found");
    assert_eq!(metric(&rig, "ringcast_rbac_registrations_denied_total"), 3);
}

#[test]
fn a_hook_that_does_not_answer_in_time_denies_and_frames_stay_in_order() {
    let mut rig = rig(&format!("{STANDARD}        on_function_registration_function_id: {FN_HOOK}\n"));
    let mut browser = admitted(&mut rig, json!({}));
    browser.send(json!({"type": "registerfunction", "id": "api::slow"}));
    browser.send(json!({"type": "registerfunction", "id": "api::next"}));
    let first = rig.trusted.recv_type("invokefunction");
    assert_eq!(first["data"]["function_id"], "api::slow");
    // The second registration waits for the first hook (400 ms limit), then gets its own call.
    let second = serve_once(&mut rig.trusted, FN_HOOK, json!({}));
    assert_eq!(second["data"]["function_id"], "api::next");
    rig.trusted.answer(&first, json!({})); // too late: ignored
    browser.sync();
    assert_eq!(rig.trusted.call("api::slow", json!({}))["error"]["code"], "function_not_found");
    let fine = uuid();
    rig.trusted.send(json!({"type": "invokefunction", "invocation_id": fine, "function_id": "api::next"}));
    let call = browser.recv_type("invokefunction");
    assert_eq!(call["function_id"], "api::next");
}

#[test]
fn trigger_and_trigger_type_hooks_rewrite_or_deny_and_session_rights_apply() {
    let mut rig = rig(&format!(
        "{STANDARD}        on_trigger_registration_function_id: {TRIGGER_HOOK}\n        on_trigger_type_registration_function_id: {TYPE_HOOK}\n"
    ));
    // The trusted worker provides a trigger type and an exposed target.
    rig.trusted.send(json!({"type": "registertriggertype", "id": "webhook", "description": "hooks"}));
    rig.trusted.register_function("api::on-hook");
    let mut browser = admitted(&mut rig, json!({"context": {"k": 1}, "allow_trigger_type_registration": true, "allowed_trigger_types": ["webhook"]}));

    // Trigger rewritten by the hook: the provider receives the rewritten binding.
    browser.send(json!({"type": "registertrigger", "id": "t1", "trigger_type": "webhook", "function_id": "api::on-hook", "config": {"path": "/a"}}));
    let hook = serve_once(&mut rig.trusted, TRIGGER_HOOK, json!({"config": {"path": "/rewritten"}, "trigger_id": "t1-mapped"}));
    assert_eq!((&hook["data"]["trigger_type"], &hook["data"]["context"]), (&json!("webhook"), &json!({"k": 1})));
    let bound = rig.trusted.recv_type("registertrigger");
    assert_eq!((&bound["id"], &bound["config"], &bound["function_id"]), (&json!("t1-mapped"), &json!({"path": "/rewritten"}), &json!("api::on-hook")));
    // Trigger denied by the hook: FORBIDDEN result to the browser.
    browser.send(json!({"type": "registertrigger", "id": "t2", "trigger_type": "webhook", "function_id": "api::on-hook", "config": {}}));
    let call = rig.trusted.recv_type("invokefunction");
    fail(&mut rig.trusted, &call);
    let refused = browser.recv_type("triggerregistrationresult");
    assert_eq!((&refused["id"], &refused["error"]["code"]), (&json!("t2"), &json!("FORBIDDEN")), "{refused}");
    // A type outside allowed_trigger_types, and a target the session may not call: refused before any hook.
    browser.send(json!({"type": "registertrigger", "id": "t3", "trigger_type": "cron", "function_id": "api::on-hook", "config": {}}));
    let refused = browser.recv_type("triggerregistrationresult");
    assert!(refused["error"]["message"].as_str().unwrap().contains("allowed_trigger_types"), "{refused}");
    browser.send(json!({"type": "registertrigger", "id": "t4", "trigger_type": "webhook", "function_id": "internal::x", "config": {}}));
    serve_once(&mut rig.trusted, TRIGGER_HOOK, json!({}));
    let refused = browser.recv_type("triggerregistrationresult");
    assert!(refused["error"]["message"].as_str().unwrap().contains("internal::x"), "{refused}");

    // Trigger type rewritten by its hook, then denied by it.
    browser.send(json!({"type": "registertriggertype", "id": "ui-event", "description": "d"}));
    let hook = serve_once(&mut rig.trusted, TYPE_HOOK, json!({"trigger_type_id": "browser::ui-event"}));
    assert_eq!((&hook["data"]["trigger_type_id"], &hook["data"]["context"]), (&json!("ui-event"), &json!({"k": 1})));
    browser.sync();
    let types = rig.trusted.ok("engine::triggers::list", json!({}));
    let text = types.to_string();
    assert!(text.contains("browser::ui-event") && !text.contains("\"ui-event\""), "{types}");
    browser.send(json!({"type": "registertriggertype", "id": "other", "description": "d"}));
    let call = rig.trusted.recv_type("invokefunction");
    fail(&mut rig.trusted, &call);
    browser.sync();
    assert!(!rig.trusted.ok("engine::triggers::list", json!({})).to_string().contains("\"other\""));

    // Without allow_trigger_type_registration (the default when an auth function exists).
    let mut plain = admitted(&mut rig, json!({}));
    plain.send(json!({"type": "registertriggertype", "id": "plain-type", "description": "d"}));
    plain.sync();
    rig.trusted.assert_quiet();
    assert!(!rig.trusted.ok("engine::triggers::list", json!({})).to_string().contains("plain-type"));
}

#[test]
fn without_an_auth_function_every_worker_is_admitted_and_expose_functions_gates_calls() {
    let mut rig = rig("        expose_functions:\n          - match(\"api::*\")\n        function_registration_prefix: anon\n");
    rig.trusted.register_function("api::open");
    rig.trusted.register_function("internal::closed");
    let mut ws = open(&rig, "", &[]);
    assert_eq!(next_json(&mut ws)["type"], "workerregistered");
    let mut browser = Worker { ws, worker_id: String::new(), reattach_token: String::new() };
    assert_eq!(browser.call("internal::closed", json!({}))["error"]["code"], "FORBIDDEN");
    browser.send(json!({"type": "invokefunction", "invocation_id": uuid(), "function_id": "api::open"}));
    serve_once(&mut rig.trusted, "api::open", json!(1));
    assert_eq!(browser.recv_type("invocationresult")["result"], 1);
    // The listener's default prefix applies.
    browser.register_function("mine");
    rig.trusted.send(json!({"type": "invokefunction", "invocation_id": uuid(), "function_id": "anon::mine"}));
    assert_eq!(browser.recv_type("invokefunction")["function_id"], "mine");
}

#[test]
fn the_telemetry_socket_of_an_rbac_listener_is_authenticated_too() {
    let mut rig = rig(STANDARD);
    let mut ws = open(&rig, "otel", &[]);
    let call = auth_call(&mut rig);
    fail(&mut rig.trusted, &call);
    assert_eq!(next_json(&mut ws)["error"]["code"], "AUTH_ERROR");
    assert_eq!(close_code(&mut ws), Some(1008));
}

#[test]
fn an_extra_listener_without_rbac_is_a_plain_worker_port_of_the_same_engine() {
    let second = free_port();
    let extra = format!("  - name: iii-worker-manager\n    config:\n      host: 127.0.0.1\n      port: {second}\n      max_message_bytes: 1024\n");
    let engine = Engine::start_with(&extra, "", &[]);
    let mut main = Worker::connect(&engine);
    main.register_function("math::double");
    let mut other = Worker::connect_url(&format!("ws://127.0.0.1:{second}/"));
    other.send(json!({"type": "invokefunction", "invocation_id": uuid(), "function_id": "math::double", "data": {"x": 2}}));
    serve_once(&mut main, "math::double", json!(4));
    assert_eq!(other.recv_type("invocationresult")["result"], 4);
    // Its own settings apply to its sockets: a message over its 1 KiB limit closes with 1009.
    other.send(json!({"type": "registerfunction", "id": "x".repeat(2048)}));
    assert_eq!(other.recv_close(), Some(1009));
}

#[test]
fn clients_that_vanish_during_auth_leave_no_socket_or_worker_behind() {
    let mut rig = rig(STANDARD);
    let baseline = rig.engine.fd_count();
    // Half vanish while their auth call is pending and are admitted anyway; half are refused.
    for i in 0..20 {
        let ws = open(&rig, "", &[]);
        drop(ws); // no Close frame: the socket just goes
        let call = auth_call(&mut rig);
        if i % 2 == 0 {
            rig.trusted.answer(&call, json!({}));
        } else {
            fail(&mut rig.trusted, &call);
        }
    }
    wait_until(Duration::from_secs(5), "the vanished clients to be cleaned up", || {
        metric(&rig, "ringcast_workers_connected") == 1 && rig.engine.fd_count() <= baseline + 2
    });
    assert_eq!(metric(&rig, "ringcast_rbac_auth_ok_total"), 10);
    assert_eq!(metric(&rig, "ringcast_rbac_auth_denied_total"), 10);
    // The listener still serves.
    let mut browser = admitted(&mut rig, json!({}));
    assert!(browser.call("engine::workers::register", json!({"name": "after"})).get("error").is_none());
}

#[test]
fn a_session_cannot_answer_calls_it_was_not_sent_nor_remove_bindings_it_does_not_own() {
    let mut rig = rig(STANDARD);
    let mut owner = Worker::connect(&rig.engine);
    owner.register_function("api::slow");
    rig.trusted.send(json!({"type": "registertriggertype", "id": "webhook", "description": "hooks"}));
    rig.trusted.send(json!({"type": "registertrigger", "id": "trusted-binding", "trigger_type": "webhook", "function_id": "api::slow", "config": {}}));
    rig.trusted.recv_type("registertrigger"); // the engine routes it to its provider (trusted itself)
    let mut browser = admitted(&mut rig, json!({}));

    // A call between trusted workers: the browser tries to answer it first.
    let id = uuid();
    rig.trusted.send(json!({"type": "invokefunction", "invocation_id": id, "function_id": "api::slow", "data": {}}));
    let call = owner.recv_type("invokefunction");
    browser.send(json!({"type": "invocationresult", "invocation_id": id, "function_id": "api::slow", "result": "spoofed"}));
    browser.sync();
    owner.answer(&call, json!("real"));
    assert_eq!(rig.trusted.recv_type("invocationresult")["result"], "real");

    // The trusted binding survives the browser's unregistertrigger.
    browser.send(json!({"type": "unregistertrigger", "id": "trusted-binding", "trigger_type": "webhook"}));
    browser.sync();
    let bindings = rig.trusted.ok("engine::registered-triggers::list", json!({}));
    assert!(bindings.to_string().contains("trusted-binding"), "{bindings}");
}

#[test]
fn connections_past_max_pending_auth_are_refused_at_once_and_the_slots_come_back() {
    let mut rig = rig(&format!("{STANDARD}        max_pending_auth: 2\n"));
    let (mut first, mut second) = (open(&rig, "", &[]), open(&rig, "", &[]));
    let calls = [auth_call(&mut rig), auth_call(&mut rig)];
    wait_until(Duration::from_secs(3), "two pending auth calls", || metric(&rig, "ringcast_rbac_auth_pending") == 2);
    let mut third = open(&rig, "", &[]);
    let frame = next_json(&mut third);
    assert!(frame["error"]["message"].as_str().unwrap().contains("too many connections waiting"), "{frame}");
    assert_eq!(close_code(&mut third), Some(1008));
    for call in &calls {
        rig.trusted.answer(call, json!({}));
    }
    assert_eq!(next_json(&mut first)["type"], "workerregistered");
    assert_eq!(next_json(&mut second)["type"], "workerregistered");
    assert_eq!(metric(&rig, "ringcast_rbac_auth_pending"), 0);
    // The slots are free again.
    admitted(&mut rig, json!({}));
}
