//! The metrics endpoint: Prometheus text on /metrics, /healthz, counters that move.

mod common;

use common::*;
use serde_json::json;
use std::io::{Read, Write};

fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, response.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn metrics_report_workers_subscribers_events_and_deliveries() {
    let port = free_port();
    let engine = Engine::start_full(&format!("metrics: 127.0.0.1:{port}\n"), "", "", &["--shards", "1"]);
    assert_eq!(get(port, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(port, "/nope").0, 404);

    let mut w = Worker::connect(&engine);
    let mut sub = Subscriber::connect(&engine);
    sub.join_sync("s", "m", "g", None);
    for n in 0..5 {
        w.set("m", "g", &format!("i{n}"), json!(n));
        sub.recv();
    }
    let (status, text) = get(port, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "ringcast_workers_connected "), 1);
    assert_eq!(metric(&text, "ringcast_subscribers{shard=\"0\"}"), 1);
    assert_eq!(metric(&text, "ringcast_subscriptions{shard=\"0\"}"), 1);
    assert_eq!(metric(&text, "ringcast_events_total{shard=\"0\"}"), 5);
    assert!(metric(&text, "ringcast_deliveries_total{shard=\"0\"}") >= 5);
    assert!(metric(&text, "ringcast_store_bytes{shard=\"0\"}") >= 5);
    assert_eq!(metric(&text, "ringcast_slow_subscriber_closes_total{shard=\"0\"}"), 0);
    assert_eq!(metric(&text, "ringcast_invocations_in_flight "), 0);
}
