//! Worker telemetry (spec §10.1): raw `OTLP`/`MTRC`/`LOGS` frames on `/otel` and on the worker
//! socket. Log records become engine log lines (target `worker`: level, worker name, message,
//! trace id); spans and metrics are counted in /metrics; malformed, unknown and oversize frames
//! are counted and ignored; a full queue drops and counts; decoded frames are forwarded
//! unchanged to an OTLP/HTTP collector when one is configured.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;
use tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

type Socket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

fn otel_socket(engine: &Engine) -> Socket {
    let (ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{}/otel", engine.worker_port)).expect("/otel upgrade");
    ws
}

fn send_frame(ws: &mut Socket, prefix: &str, payload: &[u8]) {
    let mut frame = prefix.as_bytes().to_vec();
    frame.extend_from_slice(payload);
    ws.send(Message::binary(frame)).expect("send telemetry frame");
}

/// An ExportLogsServiceRequest as the SDKs write it: one resource, `records` as
/// `(severityNumber, body, traceId)`.
fn logs(service: &str, language: &str, records: &[(u8, &str, Option<&str>)]) -> String {
    let records: Vec<Value> = records
        .iter()
        .map(|(severity, body, trace)| {
            let mut record = json!({
                "timeUnixNano": "1765000000000000000",
                "severityNumber": severity,
                "body": {"stringValue": body},
                "attributes": [{"key": "log.data", "value": {"kvlistValue": {"values": [
                    {"key": "order", "value": {"stringValue": "ord_1"}}]}}}],
            });
            if let Some(trace) = trace {
                record["traceId"] = json!(trace);
                record["spanId"] = json!("00f067aa0ba902b7");
            }
            record
        })
        .collect();
    json!({"resourceLogs": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": service}},
            {"key": "telemetry.sdk.language", "value": {"stringValue": language}},
        ]},
        "scopeLogs": [{"scope": {"name": "test"}, "logRecords": records}],
    }]})
    .to_string()
}

fn spans(n: usize) -> String {
    let spans: Vec<Value> =
        (0..n).map(|i| json!({"traceId": TRACE_ID, "spanId": format!("{i:016x}"), "name": "s"})).collect();
    json!({"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"spans": spans}]}]}).to_string()
}

fn metrics_payload(n: usize) -> String {
    let metrics: Vec<Value> =
        (0..n).map(|i| json!({"name": format!("iii.worker.m{i}"), "gauge": {"dataPoints": []}})).collect();
    json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": metrics}]}]}).to_string()
}

/// The value of the sample `name` (labels included) on `/metrics`.
fn metric(port: u16, name: &str) -> u64 {
    let text = http_get(port, "/metrics", Duration::from_secs(2)).expect("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn wait_metric(port: u16, name: &str, want: u64) {
    let mut last = 0;
    let held = eventually(WAIT, || {
        last = metric(port, name);
        last == want
    });
    assert!(held, "{name} is {last}, expected {want}");
}

fn logged_engine(worker_extra: &str) -> (Engine, EngineLog, u16) {
    let port = free_port();
    let (engine, log) =
        Engine::start_logged(&format!("metrics: 127.0.0.1:{port}\n"), worker_extra, "warn,worker=trace");
    (engine, log, port)
}

#[test]
fn log_records_become_engine_log_lines_with_level_worker_and_trace_id() {
    let (engine, log, port) = logged_engine("");
    let mut ws = otel_socket(&engine);
    let payload = logs(
        "billing",
        "python",
        &[
            (5, "cache lookup", None),
            (9, "order processed", Some(TRACE_ID)),
            (13, "retry attempt", None),
            (17, "payment failed", None),
            (21, "fatal thing", None),
            (0, "forged\nINFO ringcast: fake line", None),
        ],
    );
    send_frame(&mut ws, "LOGS", payload.as_bytes());

    log.wait_for(&["DEBUG", "worker:", "cache lookup", "worker=billing"], WAIT);
    let info = log.wait_for(&["INFO", "worker:", "order processed", "worker=billing"], WAIT);
    assert!(info.contains(&format!("trace_id={TRACE_ID}")), "{info}");
    assert!(info.contains(r#"data={"order":"ord_1"}"#), "{info}");
    let warn = log.wait_for(&["WARN", "worker:", "retry attempt", "worker=billing"], WAIT);
    assert!(!warn.contains("trace_id"), "no trace id when the record has none: {warn}");
    log.wait_for(&["ERROR", "worker:", "payment failed"], WAIT);
    log.wait_for(&["ERROR", "worker:", "fatal thing"], WAIT);
    // A newline in a message is escaped: a worker cannot forge an engine log line.
    log.wait_for(&["INFO", "worker:", r"forged\nINFO ringcast: fake line"], WAIT);
    assert!(!log.lines().iter().any(|l| l.starts_with("INFO ringcast: fake line")));

    assert_eq!(metric(port, "ringcast_telemetry_frames_total{kind=\"logs\"}"), 1);
    assert_eq!(metric(port, "ringcast_telemetry_log_records_total"), 6);
    assert_eq!(metric(port, "ringcast_telemetry_malformed_frames_total{kind=\"logs\"}"), 0);
}

#[test]
fn rust_log_filters_worker_lines_by_their_own_target() {
    let port = free_port();
    let (engine, log) = Engine::start_logged(&format!("metrics: 127.0.0.1:{port}\n"), "", "info,worker=warn");
    let mut ws = otel_socket(&engine);
    send_frame(
        &mut ws,
        "LOGS",
        logs("svc", "nodejs", &[(9, "quiet info", None), (13, "loud warning", None)]).as_bytes(),
    );
    log.wait_for(&["WARN", "worker:", "loud warning"], WAIT);
    wait_metric(port, "ringcast_telemetry_log_records_total", 2);
    assert!(!log.lines().iter().any(|l| l.contains("quiet info")), "worker=warn hides info lines");
}

#[test]
fn the_worker_name_comes_from_its_registration_when_the_sdk_sends_its_default_service_name() {
    let (engine, log, _port) = logged_engine("");
    let mut worker = Worker::connect(&engine);
    worker.register_worker("orders-worker");
    worker.sync();
    let mut ws = otel_socket(&engine);
    send_frame(&mut ws, "LOGS", logs("iii-node", "nodejs", &[(9, "from the otel socket", None)]).as_bytes());
    log.wait_for(&["INFO", "worker:", "from the otel socket", "worker=orders-worker"], WAIT);

    // A service name the user chose wins over the address match.
    send_frame(&mut ws, "LOGS", logs("checkout", "nodejs", &[(9, "named by its service", None)]).as_bytes());
    log.wait_for(&["named by its service", "worker=checkout"], WAIT);

    // Telemetry on the worker socket itself is that worker's, whatever its service name.
    worker.send_raw(Message::binary(
        [b"LOGS".as_slice(), logs("other", "nodejs", &[(13, "on the worker socket", None)]).as_bytes()].concat(),
    ));
    log.wait_for(&["WARN", "worker:", "on the worker socket", "worker=orders-worker"], WAIT);
    worker.assert_quiet();

    // Once the worker is gone, its address names nothing: the SDK default shows.
    drop(worker);
    let gone = eventually(WAIT, || {
        send_frame(&mut ws, "LOGS", logs("iii-node", "nodejs", &[(9, "after it left", None)]).as_bytes());
        std::thread::sleep(Duration::from_millis(50));
        log.lines().iter().any(|l| l.contains("after it left") && l.contains("worker=iii-node"))
    });
    assert!(gone, "no line named by the SDK default after the worker left");
}

#[test]
fn a_local_worker_is_found_by_the_process_that_holds_its_telemetry_socket() {
    let (engine, log, _port) = logged_engine("");
    // Two node workers on this address: the address alone names neither.
    let mut other = Worker::connect(&engine);
    other.register_worker("someone-else");
    other.sync();
    let mut me = Worker::connect(&engine);
    me.send(json!({
        "type": "invokefunction", "function_id": "engine::workers::register", "action": {"type": "void"},
        "data": {"runtime": "node", "name": "this-process", "pid": std::process::id()}
    }));
    me.sync();
    let mut ws = otel_socket(&engine);
    send_frame(&mut ws, "LOGS", logs("iii-node", "nodejs", &[(9, "whose line is it", None)]).as_bytes());
    let line = log.wait_for(&["INFO", "worker:", "whose line is it"], WAIT);
    assert!(line.contains("worker=this-process"), "{line}");
}

#[test]
fn spans_and_metrics_are_counted_and_dropped() {
    let (engine, log, port) = logged_engine("");
    let mut ws = otel_socket(&engine);
    send_frame(&mut ws, "OTLP", spans(2).as_bytes());
    send_frame(&mut ws, "OTLP", spans(3).as_bytes());
    send_frame(&mut ws, "MTRC", metrics_payload(4).as_bytes());
    wait_metric(port, "ringcast_telemetry_spans_total", 5);
    wait_metric(port, "ringcast_telemetry_metrics_total", 4);
    assert_eq!(metric(port, "ringcast_telemetry_frames_total{kind=\"traces\"}"), 2);
    assert_eq!(metric(port, "ringcast_telemetry_frames_total{kind=\"metrics\"}"), 1);
    assert_eq!(metric(port, "ringcast_telemetry_forwarded_frames_total"), 0, "no collector configured");
    assert!(!log.lines().iter().any(|l| l.contains("worker:")), "spans and metrics log nothing");
}

#[test]
fn worker_logs_false_counts_records_without_logging_them() {
    let (engine, log, port) = logged_engine("      telemetry:\n        worker_logs: false\n");
    let mut ws = otel_socket(&engine);
    send_frame(&mut ws, "LOGS", logs("svc", "python", &[(17, "not shown", None), (9, "nor this", None)]).as_bytes());
    wait_metric(port, "ringcast_telemetry_log_records_total", 2);
    assert!(!log.lines().iter().any(|l| l.contains("worker:")), "no worker line with worker_logs: false");
}

#[test]
fn malformed_and_unknown_frames_are_counted_and_ignored() {
    let (engine, log, port) = logged_engine("");
    let mut ws = otel_socket(&engine);
    send_frame(&mut ws, "LOGS", b"not json");
    send_frame(&mut ws, "OTLP", b"{\"resourceSpans\": 7}");
    send_frame(&mut ws, "MTRC", &[0xff, 0xfe, 0x00]);
    send_frame(&mut ws, "LOGS", b"");
    send_frame(&mut ws, "LOGS", "[".repeat(100_000).as_bytes());
    send_frame(&mut ws, "XXXX", b"{}");
    ws.send(Message::text("LOGS{}")).unwrap();
    // The socket still works, and so does the engine.
    send_frame(&mut ws, "LOGS", logs("svc", "python", &[(9, "still alive", None)]).as_bytes());
    log.wait_for(&["INFO", "worker:", "still alive"], WAIT);
    assert_eq!(metric(port, "ringcast_telemetry_malformed_frames_total{kind=\"logs\"}"), 3);
    assert_eq!(metric(port, "ringcast_telemetry_malformed_frames_total{kind=\"traces\"}"), 1);
    assert_eq!(metric(port, "ringcast_telemetry_malformed_frames_total{kind=\"metrics\"}"), 1);
    assert_eq!(metric(port, "ringcast_telemetry_unknown_frames_total"), 2);
    assert_eq!(metric(port, "ringcast_telemetry_log_records_total"), 1);
    log.wait_for(&["WARN", "malformed worker telemetry frame"], WAIT);

    // Malformed telemetry on the worker socket does not disturb the worker either.
    let mut worker = Worker::connect(&engine);
    worker.send_raw(Message::binary(b"LOGS{{{".to_vec()));
    worker.assert_quiet();
    wait_metric(port, "ringcast_telemetry_malformed_frames_total{kind=\"logs\"}", 4);
}

#[test]
fn oversize_frames_and_lines_are_bounded() {
    let (engine, log, port) = logged_engine(
        "      max_message_bytes: 200000\n      telemetry:\n        queue_bytes: 100000\n        max_line_bytes: 40\n",
    );
    let mut ws = otel_socket(&engine);
    // Longer than the line limit: cut, with what was cut said.
    let long = format!("begin {} end", "x".repeat(500));
    send_frame(&mut ws, "LOGS", logs("svc", "python", &[(9, &long, None)]).as_bytes());
    let line = log.wait_for(&["INFO", "worker:", "begin xxx", "…[+"], WAIT);
    assert!(!line.contains(" end"), "{line}");
    // Larger than the whole queue: dropped and counted.
    let big = logs("svc", "python", &[(9, &"y".repeat(150_000), None)]);
    send_frame(&mut ws, "LOGS", big.as_bytes());
    wait_metric(port, "ringcast_telemetry_dropped_frames_total{kind=\"logs\"}", 1);
    // Larger than max_message_bytes: that socket is closed; the engine serves on.
    send_frame(&mut ws, "LOGS", &vec![b' '; 300_000]);
    let closed = eventually(WAIT, || match ws.read() {
        Ok(Message::Close(_)) | Err(_) => true,
        Ok(_) => false,
    });
    assert!(closed, "an over-limit message ends the telemetry socket");
    let mut again = otel_socket(&engine);
    send_frame(&mut again, "LOGS", logs("svc", "python", &[(9, "after the big one", None)]).as_bytes());
    log.wait_for(&["after the big one"], WAIT);
    assert_eq!(metric(port, "ringcast_telemetry_log_records_total"), 2);
}

#[test]
fn a_full_queue_drops_and_counts() {
    // No room at all: every frame is dropped and counted, and nothing is decoded.
    let (engine, log, port) = logged_engine("      telemetry:\n        queue_bytes: 0\n");
    let mut ws = otel_socket(&engine);
    for _ in 0..5 {
        send_frame(&mut ws, "LOGS", logs("svc", "python", &[(9, "never logged", None)]).as_bytes());
    }
    send_frame(&mut ws, "OTLP", spans(1).as_bytes());
    wait_metric(port, "ringcast_telemetry_dropped_frames_total{kind=\"logs\"}", 5);
    wait_metric(port, "ringcast_telemetry_dropped_frames_total{kind=\"traces\"}", 1);
    assert_eq!(metric(port, "ringcast_telemetry_frames_total{kind=\"logs\"}"), 5);
    assert_eq!(metric(port, "ringcast_telemetry_log_records_total"), 0);
    assert_eq!(metric(port, "ringcast_telemetry_queue_bytes"), 0);
    log.wait_for(&["WARN", "telemetry queue full"], WAIT);
    assert!(!log.lines().iter().any(|l| l.contains("never logged")));
    drop(engine);

    // Room for about one big frame: a burst of them outruns the thread; what is not dropped is
    // logged, and the queue drains back to empty.
    let (engine, _log, port) = logged_engine("      telemetry:\n        queue_bytes: 200000\n");
    let mut ws = otel_socket(&engine);
    let records: Vec<(u8, &str, Option<&str>)> = (0..600).map(|_| (9u8, "burst", None)).collect();
    let frame = logs("svc", "python", &records);
    assert!(frame.len() > 100_000 && frame.len() < 200_000, "{}", frame.len());
    const FRAMES: u64 = 40;
    for _ in 0..FRAMES {
        send_frame(&mut ws, "LOGS", frame.as_bytes());
    }
    wait_metric(port, "ringcast_telemetry_frames_total{kind=\"logs\"}", FRAMES);
    let dropped = metric(port, "ringcast_telemetry_dropped_frames_total{kind=\"logs\"}");
    assert!(dropped > 0, "a burst past the queue bound drops");
    wait_metric(port, "ringcast_telemetry_log_records_total", (FRAMES - dropped) * 600);
    wait_metric(port, "ringcast_telemetry_queue_bytes", 0);
}

/// A loopback OTLP/HTTP collector: answers `status` to every request and reports
/// `(request line, body)`.
fn collector(status: &'static str) -> (u16, mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut length = 0;
            let mut content_type = String::new();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
                let lower = header.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if let Some(v) = lower.strip_prefix("content-type:") {
                    content_type = v.trim().to_owned();
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            assert_eq!(content_type, "application/json");
            let mut stream = reader.into_inner();
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
            if tx.send((request_line.trim_end().to_owned(), body)).is_err() {
                break;
            }
        }
    });
    (port, rx)
}

#[test]
fn decoded_frames_are_forwarded_unchanged_to_an_otlp_collector() {
    let (collector_port, requests) = collector("200 OK");
    let (engine, _log, port) =
        logged_engine(&format!("      telemetry:\n        otlp_endpoint: http://127.0.0.1:{collector_port}/base/\n"));
    let mut ws = otel_socket(&engine);
    let log_payload = logs("svc", "nodejs", &[(9, "forward me", Some(TRACE_ID))]);
    let span_payload = spans(2);
    let metric_payload = metrics_payload(1);
    send_frame(&mut ws, "LOGS", log_payload.as_bytes());
    send_frame(&mut ws, "LOGS", b"{broken");
    send_frame(&mut ws, "OTLP", span_payload.as_bytes());
    send_frame(&mut ws, "MTRC", metric_payload.as_bytes());
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(requests.recv_timeout(WAIT).expect("a forwarded request"));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("POST /base/v1/logs HTTP/1.1".to_owned(), log_payload.into_bytes()),
            ("POST /base/v1/metrics HTTP/1.1".to_owned(), metric_payload.into_bytes()),
            ("POST /base/v1/traces HTTP/1.1".to_owned(), span_payload.into_bytes()),
        ]
    );
    wait_metric(port, "ringcast_telemetry_forwarded_frames_total", 3);
    assert!(requests.recv_timeout(Duration::from_millis(300)).is_err(), "the malformed frame is not forwarded");
    assert_eq!(metric(port, "ringcast_telemetry_forward_errors_total"), 0);
}

#[test]
fn a_collector_that_refuses_or_is_gone_costs_only_counters() {
    let (collector_port, requests) = collector("500 Internal Server Error");
    let (engine, log, port) =
        logged_engine(&format!("      telemetry:\n        otlp_endpoint: http://127.0.0.1:{collector_port}\n"));
    let mut ws = otel_socket(&engine);
    send_frame(&mut ws, "OTLP", spans(1).as_bytes());
    requests.recv_timeout(WAIT).expect("the collector was asked");
    wait_metric(port, "ringcast_telemetry_forward_errors_total", 1);
    log.wait_for(&["WARN", "OTLP collector did not take a frame", "HTTP 500"], WAIT);
    drop(engine);

    let gone = free_port();
    let (engine, log, port) =
        logged_engine(&format!("      telemetry:\n        otlp_endpoint: http://127.0.0.1:{gone}\n"));
    let mut ws = otel_socket(&engine);
    send_frame(&mut ws, "LOGS", logs("svc", "python", &[(9, "logged anyway", None)]).as_bytes());
    log.wait_for(&["INFO", "worker:", "logged anyway"], WAIT);
    wait_metric(port, "ringcast_telemetry_forward_errors_total", 1);
    assert_eq!(metric(port, "ringcast_telemetry_forwarded_frames_total"), 0);
}

#[test]
fn a_bad_collector_address_is_a_config_error() {
    let dir = scratch_dir();
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        "workers:\n  - name: iii-worker-manager\n    config:\n      telemetry:\n        otlp_endpoint: https://collector:4318\n",
    )
    .unwrap();
    let out = std::process::Command::new(binary()).arg("check-config").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("telemetry.otlp_endpoint"), "{text}");
    std::fs::write(
        &path,
        "workers:\n  - name: iii-worker-manager\n    config:\n      telemetry:\n        queue_size: 5\n",
    )
    .unwrap();
    let out = std::process::Command::new(binary()).arg("check-config").arg(&path).output().unwrap();
    assert!(!out.status.success(), "unknown telemetry keys are errors");
    let _ = std::fs::remove_dir_all(&dir);
}
