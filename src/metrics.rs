//! Engine metrics: counters the cores update with relaxed atomics, served in the Prometheus text
//! format on `/metrics` (and `/healthz`) by a small thread off the hot path.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Counters of the control core.
#[derive(Default)]
pub struct ControlMetrics {
    pub workers_connected: AtomicU64,
    pub invocations_in_flight: AtomicU64,
    pub invocations_total: AtomicU64,
}

/// Counters of one shard.
#[derive(Default)]
pub struct ShardMetrics {
    pub subscribers: AtomicU64,
    pub subscriptions: AtomicU64,
    /// Events published by groups this shard owns.
    pub events_total: AtomicU64,
    /// Frames queued to this shard's subscribers.
    pub deliveries_total: AtomicU64,
    pub slow_subscriber_closes_total: AtomicU64,
    /// Bytes of item values held by this shard's store.
    pub store_bytes: AtomicU64,
}

/// Everything `/metrics` reports.
pub struct Metrics {
    pub control: ControlMetrics,
    pub shards: Vec<ShardMetrics>,
    /// Bytes queued for subscribers, per shard (shared with the backpressure check).
    pub queued_bytes: Vec<Arc<AtomicUsize>>,
}

impl Metrics {
    pub fn new(shards: usize) -> Arc<Metrics> {
        Arc::new(Metrics {
            control: ControlMetrics::default(),
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
            queued_bytes: (0..shards).map(|_| Arc::default()).collect(),
        })
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        /// Picks one counter out of a shard's metrics.
        type ShardField = fn(&ShardMetrics) -> &AtomicU64;
        let mut out = String::new();
        let c = &self.control;
        for (name, help, kind, value) in [
            ("ringcast_workers_connected", "Connected worker sockets", "gauge", &c.workers_connected),
            ("ringcast_invocations_in_flight", "Invocations waiting for a worker's result", "gauge", &c.invocations_in_flight),
            ("ringcast_invocations_total", "Invocations routed to workers", "counter", &c.invocations_total),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", value.load(Ordering::Relaxed));
        }
        let per_shard: [(&str, &str, &str, ShardField); 6] = [
            ("ringcast_subscribers", "Subscriber connections", "gauge", |s| &s.subscribers),
            ("ringcast_subscriptions", "Active subscriptions", "gauge", |s| &s.subscriptions),
            ("ringcast_events_total", "Events published by owned groups", "counter", |s| &s.events_total),
            ("ringcast_deliveries_total", "Frames queued to subscribers", "counter", |s| &s.deliveries_total),
            ("ringcast_slow_subscriber_closes_total", "Subscribers closed by the slow-subscriber policy", "counter", |s| &s.slow_subscriber_closes_total),
            ("ringcast_store_bytes", "Bytes of stored item values", "gauge", |s| &s.store_bytes),
        ];
        for (name, help, kind, field) in per_shard {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (i, shard) in self.shards.iter().enumerate() {
                let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", field(shard).load(Ordering::Relaxed));
            }
        }
        let name = "ringcast_outbound_queue_bytes";
        let _ = writeln!(out, "# HELP {name} Bytes waiting in subscriber outbound queues\n# TYPE {name} gauge");
        for (i, bytes) in self.queued_bytes.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", bytes.load(Ordering::Relaxed));
        }
        out
    }
}

/// Serves `/metrics` and `/healthz` on `listener` from a background thread.
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let spawned = std::thread::Builder::new().name("ringcast-metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = answer(stream, &metrics);
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("metrics endpoint not started: {e}");
    }
}

fn answer(mut stream: std::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    // Read the whole request head (it may arrive in pieces) before answering and closing.
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (status, content_type, body) = match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
        _ => ("404 Not Found", "text/plain", "not found: try /metrics or /healthz\n".to_string()),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_counter_per_shard() {
        let metrics = Metrics::new(2);
        metrics.control.workers_connected.store(3, Ordering::Relaxed);
        metrics.shards[1].deliveries_total.store(42, Ordering::Relaxed);
        let text = metrics.render();
        assert!(text.contains("ringcast_workers_connected 3"), "{text}");
        assert!(text.contains("ringcast_deliveries_total{shard=\"1\"} 42"), "{text}");
        assert!(text.contains("ringcast_outbound_queue_bytes{shard=\"0\"} 0"), "{text}");
        assert!(text.contains("# TYPE ringcast_events_total counter"), "{text}");
    }
}
