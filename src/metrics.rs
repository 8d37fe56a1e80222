//! Engine metrics: counters the cores update with relaxed atomics, served in the Prometheus text
//! format on `/metrics` (and `/healthz`) by a small thread off the hot path.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpListener;
use ringcast_shards::metrics::{AllShardMetrics, ShardMetrics};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counters of the control core.
#[derive(Default)]
pub struct ControlMetrics {
    pub workers_connected: AtomicU64,
    pub invocations_in_flight: AtomicU64,
    pub invocations_total: AtomicU64,
    /// Workers closed because their outbox passed `max_outbox_bytes`.
    pub worker_outbox_closes_total: AtomicU64,
    /// Workers closed because nothing arrived within the ping timeout.
    pub worker_ping_timeouts_total: AtomicU64,
}

/// Everything `/metrics` reports.
pub struct Metrics {
    pub control: ControlMetrics,
    /// Counters of each shard, by index (the shards update them).
    pub shards: AllShardMetrics,
    /// Worker telemetry frames (`/otel`).
    pub telemetry: crate::telemetry::TelemetryMetrics,
    /// HTTP-invoked functions (`ringcast_http_function_*`).
    pub http_functions: Arc<crate::http_functions::HttpFunctionMetrics>,
    /// Counters of the RBAC listeners (`ringcast_rbac_*`).
    pub rbac: crate::control::rbac::RbacMetrics,
    /// Counters of the channels executor.
    pub channels: Arc<crate::channels::ChannelMetrics>,
    /// Counters of each queue of the built-in queue (its shard updates them).
    pub queues: Arc<ringcast_shards::queue::QueueMetrics>,
}

impl Metrics {
    pub fn new(shards: usize) -> Arc<Metrics> {
        Arc::new(Metrics {
            control: ControlMetrics::default(),
            shards: ringcast_shards::metrics::for_shards(shards),
            telemetry: Default::default(),
            http_functions: Arc::default(),
            rbac: Default::default(),
            channels: Default::default(),
            queues: Arc::default(),
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
            ("ringcast_worker_outbox_closes_total", "Workers closed with 4008 because their outbox passed max_outbox_bytes", "counter", &c.worker_outbox_closes_total),
            ("ringcast_worker_ping_timeouts_total", "Workers closed because nothing arrived within the ping timeout", "counter", &c.worker_ping_timeouts_total),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", value.load(Ordering::Relaxed));
        }
        let per_shard: [(&str, &str, &str, ShardField); 11] = [
            ("ringcast_subscribers", "Subscriber connections", "gauge", |s| &s.subscribers),
            ("ringcast_subscriptions", "Active subscriptions", "gauge", |s| &s.subscriptions),
            ("ringcast_events_total", "Events published by owned groups", "counter", |s| &s.events_total),
            ("ringcast_deliveries_total", "Frames queued to subscribers", "counter", |s| &s.deliveries_total),
            ("ringcast_slow_subscriber_closes_total", "Subscribers closed by the slow-subscriber policy", "counter", |s| &s.slow_subscriber_closes_total),
            ("ringcast_store_bytes", "Bytes of stored item values", "gauge", |s| &s.store_bytes),
            ("ringcast_redis_commands_total", "Commands sent to Redis (redis adapter)", "counter", |s| &s.redis_commands_total),
            ("ringcast_redis_writes_total", "Socket writes carrying them; commands per write is the pipelining", "counter", |s| &s.redis_writes_total),
            ("ringcast_redis_errors_total", "Redis commands that failed or could not be sent", "counter", |s| &s.redis_errors_total),
            ("ringcast_redis_events_received_total", "Events received on Redis group channels", "counter", |s| &s.redis_events_received_total),
            ("ringcast_redis_resyncs_total", "Fresh syncs sent to a group's subscribers after a gap or a lost Redis connection", "counter", |s| &s.redis_resyncs_total),
        ];
        for (name, help, kind, field) in per_shard {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (i, shard) in self.shards.iter().enumerate() {
                let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", field(shard).load(Ordering::Relaxed));
            }
        }
        let name = "ringcast_outbound_queue_bytes";
        let _ = writeln!(out, "# HELP {name} Bytes waiting in subscriber outbound queues\n# TYPE {name} gauge");
        for (i, shard) in self.shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", shard.queued_bytes.load(Ordering::Relaxed));
        }
        self.telemetry.render(&mut out);
        self.http_functions.render(&mut out);
        self.rbac.render(&mut out);
        self.channels.render(&mut out);
        self.queues.render(&mut out);
        out
    }
}

/// Metrics connections served at once; more are answered 503 and closed at once.
const MAX_CONNECTIONS: usize = 32;
/// Whole-request deadline: a client that trickles its request head is cut off after this,
/// however often it sends a byte.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Deadline for writing the answer to a client that does not read it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest request head read; a longer one is answered 431.
const MAX_REQUEST_BYTES: usize = 8192;

/// Serves `/metrics` and `/healthz` on `listener`: an accept thread and one short-lived thread
/// per connection (at most `MAX_CONNECTIONS`), each under its own read and write deadlines, so
/// no client can hold the endpoint for another.
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let spawned = std::thread::Builder::new().name("ringcast-metrics".into()).spawn(move || {
        let active = Arc::new(AtomicUsize::new(0));
        for stream in listener.incoming().flatten() {
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::AcqRel);
                refuse_busy(stream);
                continue;
            }
            let slot = Slot(active.clone());
            let metrics = metrics.clone();
            let worker = std::thread::Builder::new().name("ringcast-metrics-conn".into()).spawn(move || {
                let _slot = slot;
                let _ = answer(stream, &metrics);
            });
            if let Err(e) = worker {
                tracing::warn!("metrics connection dropped: no thread: {e}");
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("metrics endpoint not started: {e}");
    }
}

/// One counted metrics connection; the count drops when its thread ends, however it ends
/// (or when the thread could not be started and the closure is dropped unrun).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn refuse_busy(mut stream: std::net::TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = stream.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
}

/// Why a request head could not be read in full.
enum HeadError {
    TooLarge,
    Io(std::io::Error),
}

/// Reads the request head (it may arrive in pieces) within `REQUEST_DEADLINE` in total.
fn read_head(stream: &mut std::net::TcpStream) -> Result<Vec<u8>, HeadError> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        if request.len() >= MAX_REQUEST_BYTES {
            return Err(HeadError::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadError::Io(std::io::ErrorKind::TimedOut.into()));
        }
        stream.set_read_timeout(Some(left)).map_err(HeadError::Io)?;
        let n = stream.read(&mut chunk).map_err(HeadError::Io)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    Ok(request)
}

fn answer(mut stream: std::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let request = match read_head(&mut stream) {
        Ok(request) => request,
        Err(HeadError::TooLarge) => {
            return stream.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        }
        Err(HeadError::Io(e)) => return Err(e),
    };
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
