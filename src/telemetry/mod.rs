//! SDK telemetry (`/otel` and the prefixed binary frames of the worker socket, spec §10.1):
//! worker log records become engine log lines, spans and metrics are counted, and everything
//! that decodes may be forwarded unchanged to an OTLP/HTTP collector.
//!
//! The control core only looks at a frame's four prefix bytes and hands the frame (its bytes
//! are shared, not copied) to the telemetry thread through a queue bounded in bytes
//! (`queue_bytes`); when the queue is full the frame is dropped and counted, never waited for.
//! The telemetry thread decodes (`otlp.rs`), logs each record through `tracing` under the target
//! `worker` (so `RUST_LOG=info,worker=debug` or `worker=off` filter them), counts, and offers
//! the frame to the forwarder (`forward.rs`), which has its own byte-bounded queue.
//!
//! A worker's name: the `/otel` socket carries no identity (spec §1.2), and the SDKs' OTel
//! resource has `service.name` (`iii-node` / `iii-python-sdk` unless `OTEL_SERVICE_NAME` or
//! `otel.serviceName` set it), `service.instance.id` (a random UUID) and the SDK language, but
//! not the worker name. So the name is found in this order: the worker connection itself (frames
//! on the worker socket); for an `/otel` socket from this host, the registered worker whose
//! process (its `pid` in `engine::workers::register`) holds the socket's other end, read from
//! `/proc` (`peer.rs`); the resource's `service.name` when it is not an SDK default; the record's
//! own `service.name` attribute (`new Logger(undefined, name)`); the one worker registered from
//! the same address (matched by runtime when there are several); else the resource's
//! `service.name` as sent.

mod forward;
pub mod otlp;
mod peer;

use crate::metrics::Metrics;
use bytes::Bytes;
use otlp::{Decoded, Kind, LogLine, Severity};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `tracing` target of worker log lines.
pub const LOG_TARGET: &str = "worker";

/// Bytes charged per queued frame on top of its length (the queue entry itself), so that a
/// flood of tiny frames is bounded too.
const ENTRY_OVERHEAD: usize = 64;

/// Longest worker name shown in a log line.
const MAX_NAME_BYTES: usize = 128;

/// `telemetry:` inside `iii-worker-manager` (ringcast extra; every key optional).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Log each SDK log record as an engine log line (target `worker`).
    #[serde(default = "default_true")]
    pub worker_logs: bool,
    /// Bytes of frames that may wait for the telemetry thread; a frame that does not fit is
    /// dropped and counted. 0 drops every frame.
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: usize,
    /// Longest message (and attribute data) of one worker log line; longer ones are cut and end
    /// with `…[+N bytes]`.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// OTLP/HTTP collector (`http://host:port`, optional base path): frames that decode are
    /// posted unchanged to `<endpoint>/v1/{traces,metrics,logs}` as `application/json`.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Bytes that may wait for the collector; past it, frames are dropped and counted.
    #[serde(default = "default_queue_bytes")]
    pub forward_queue_bytes: usize,
    /// Limit on connecting to the collector and on each request.
    #[serde(default = "default_forward_timeout_ms")]
    pub forward_timeout_ms: u64,
}

fn default_true() -> bool {
    true
}
fn default_queue_bytes() -> usize {
    8 << 20
}
fn default_max_line_bytes() -> usize {
    4096
}
fn default_forward_timeout_ms() -> u64 {
    5000
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            worker_logs: true,
            queue_bytes: default_queue_bytes(),
            max_line_bytes: default_max_line_bytes(),
            otlp_endpoint: None,
            forward_queue_bytes: default_queue_bytes(),
            forward_timeout_ms: default_forward_timeout_ms(),
        }
    }
}

impl TelemetryConfig {
    /// Checks what serde cannot: the collector address. `Err` names the key and the problem.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(endpoint) = &self.otlp_endpoint {
            forward::Endpoint::parse(endpoint).map_err(|e| ("otlp_endpoint", e))?;
        }
        if self.forward_timeout_ms == 0 {
            return Err(("forward_timeout_ms", "must be at least 1".into()));
        }
        Ok(())
    }
}

/// Counters of the telemetry path, by kind where it has one (index: traces, metrics, logs).
#[derive(Default)]
pub struct TelemetryMetrics {
    /// Frames that arrived with a known prefix.
    pub frames_total: [AtomicU64; 3],
    /// Binary frames on `/otel` without a known prefix, and text frames there.
    pub unknown_frames_total: AtomicU64,
    /// Frames whose payload was not OTLP/JSON of their kind.
    pub malformed_frames_total: [AtomicU64; 3],
    /// Frames dropped because the telemetry queue was full.
    pub dropped_frames_total: [AtomicU64; 3],
    pub spans_total: AtomicU64,
    pub metrics_total: AtomicU64,
    pub log_records_total: AtomicU64,
    /// Bytes waiting for the telemetry thread (frames plus a fixed cost per frame).
    pub queue_bytes: AtomicU64,
    /// Frames the collector accepted (2xx).
    pub forwarded_frames_total: AtomicU64,
    /// Frames not forwarded: forward queue full.
    pub forward_dropped_total: AtomicU64,
    /// Frames not forwarded: connection error, timeout or a non-2xx answer.
    pub forward_errors_total: AtomicU64,
    pub forward_queue_bytes: AtomicU64,
}

fn index(kind: Kind) -> usize {
    match kind {
        Kind::Traces => 0,
        Kind::Metrics => 1,
        Kind::Logs => 2,
    }
}

const KINDS: [Kind; 3] = [Kind::Traces, Kind::Metrics, Kind::Logs];

impl TelemetryMetrics {
    /// Appends the Prometheus text of every counter to `out`.
    pub fn render(&self, out: &mut String) {
        for (name, help, counters) in [
            ("ringcast_telemetry_frames_total", "Telemetry frames received, by kind", &self.frames_total),
            (
                "ringcast_telemetry_malformed_frames_total",
                "Telemetry frames that were not OTLP/JSON of their kind (ignored)",
                &self.malformed_frames_total,
            ),
            (
                "ringcast_telemetry_dropped_frames_total",
                "Telemetry frames dropped because the telemetry queue was full",
                &self.dropped_frames_total,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for kind in KINDS {
                let _ = writeln!(out, "{name}{{kind=\"{}\"}} {}", kind.label(), counters[index(kind)].load(Relaxed));
            }
        }
        for (name, help, kind, value) in [
            (
                "ringcast_telemetry_unknown_frames_total",
                "Frames on /otel without a known telemetry prefix (ignored)",
                "counter",
                &self.unknown_frames_total,
            ),
            ("ringcast_telemetry_spans_total", "Spans received in OTLP frames", "counter", &self.spans_total),
            ("ringcast_telemetry_metrics_total", "Metrics received in MTRC frames", "counter", &self.metrics_total),
            (
                "ringcast_telemetry_log_records_total",
                "Log records received in LOGS frames",
                "counter",
                &self.log_records_total,
            ),
            ("ringcast_telemetry_queue_bytes", "Bytes waiting for the telemetry thread", "gauge", &self.queue_bytes),
            (
                "ringcast_telemetry_forwarded_frames_total",
                "Telemetry frames accepted by the OTLP collector",
                "counter",
                &self.forwarded_frames_total,
            ),
            (
                "ringcast_telemetry_forward_dropped_total",
                "Telemetry frames not forwarded because the forward queue was full",
                "counter",
                &self.forward_dropped_total,
            ),
            (
                "ringcast_telemetry_forward_errors_total",
                "Telemetry frames the OTLP collector did not accept (error, timeout, non-2xx)",
                "counter",
                &self.forward_errors_total,
            ),
            (
                "ringcast_telemetry_forward_queue_bytes",
                "Bytes waiting to be forwarded to the OTLP collector",
                "gauge",
                &self.forward_queue_bytes,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", value.load(Relaxed));
        }
    }
}

/// Where a frame came from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A worker socket (`/`), by the control core's connection number: the frame is that
    /// worker's.
    Worker(u64),
    /// An `/otel` socket.
    Otel(Arc<OtelPeer>),
}

/// One `/otel` connection, as name resolution needs it.
#[derive(Debug)]
pub struct OtelPeer {
    /// Unique per connection (never reused).
    id: u64,
    /// The peer's IP address, as the worker registry writes it.
    ip: String,
    /// `(peer, local)` socket addresses, when known.
    addrs: Option<(SocketAddr, SocketAddr)>,
}

enum Job {
    Frame {
        kind: Kind,
        frame: Bytes,
        source: Source,
        cost: usize,
    },
    /// An `/otel` connection ended: what the thread cached about it goes.
    OtelClosed(u64),
}

/// A registered worker, as name resolution needs it.
struct Named {
    ip: String,
    name: String,
    runtime: Option<String>,
    pid: Option<u32>,
}

/// How long the thread waits before it looks for an `/otel` peer's process again: doubling
/// from the first to the last value while it is not found (a lookup reads `/proc`).
const OWNER_RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(60));

/// What the thread found out about an `/otel` connection's process.
struct Owner {
    /// The worker name, once a registered worker's process is known to hold the connection.
    name: Option<String>,
    /// When to look again while not found.
    retry_at: Instant,
    /// The wait before the next look.
    backoff: Duration,
    /// The directory's generation at the last look.
    generation: u64,
}

/// Names of the workers that registered one, by connection (kept by the control core).
#[derive(Default)]
struct Directory {
    by_conn: HashMap<u64, Named>,
    /// Counts registrations, so that a connection not matched yet is looked at again at once
    /// when a worker registers.
    generation: u64,
}

impl Directory {
    /// The one worker name registered from `ip` (by runtime when several are), if there is one.
    fn sole_worker_at(&self, ip: &str, sdk_language: Option<&str>) -> Option<&str> {
        let at: Vec<&Named> = self.by_conn.values().filter(|w| w.ip == ip).collect();
        let runtime = sdk_language.map(|l| if l == "nodejs" { "node" } else { l });
        let same_runtime: Vec<&Named> =
            at.iter().copied().filter(|w| runtime.is_some() && w.runtime.as_deref() == runtime).collect();
        let candidates = if same_runtime.is_empty() { at } else { same_runtime };
        let first = candidates.first()?;
        candidates.iter().all(|w| w.name == first.name).then_some(first.name.as_str())
    }
}

/// The engine's handle on the telemetry thread; cheap to clone (one per connection).
#[derive(Clone)]
pub struct Telemetry {
    tx: mpsc::Sender<Job>,
    budget: usize,
    metrics: Arc<Metrics>,
    directory: Arc<Mutex<Directory>>,
}

impl Telemetry {
    /// Starts the telemetry thread (and the forwarder when `otlp_endpoint` is set). Call it
    /// from an unpinned thread: the threads inherit its CPUs. If a thread cannot be started the
    /// engine runs without it (frames are then dropped and counted), with a warning.
    pub fn start(config: &TelemetryConfig, metrics: Arc<Metrics>) -> Telemetry {
        let (tx, rx) = mpsc::channel();
        let directory = Arc::new(Mutex::new(Directory::default()));
        let forwarder = config.otlp_endpoint.as_deref().and_then(|endpoint| {
            match forward::Forwarder::start(
                endpoint,
                config.forward_queue_bytes,
                config.forward_timeout_ms,
                metrics.clone(),
            ) {
                Ok(f) => {
                    tracing::info!("telemetry: forwarding worker spans, metrics and logs to {endpoint}");
                    Some(f)
                }
                Err(e) => {
                    tracing::warn!("telemetry: not forwarding to {endpoint}: {e}");
                    None
                }
            }
        });
        let worker = Decoder {
            worker_logs: config.worker_logs,
            max_line_bytes: config.max_line_bytes,
            metrics: metrics.clone(),
            directory: directory.clone(),
            forwarder,
            owners: HashMap::new(),
        };
        let spawned = std::thread::Builder::new().name("ringcast-telemetry".into()).spawn(move || worker.run(rx));
        if let Err(e) = spawned {
            tracing::warn!("telemetry thread not started ({e}); worker telemetry frames will be dropped");
        }
        Telemetry { tx, budget: config.queue_bytes, metrics, directory }
    }

    /// Takes one telemetry frame (prefix included) from the network without waiting: false if
    /// it has no telemetry prefix (the caller decides what that means). A frame that does not
    /// fit in the queue is dropped and counted.
    pub fn submit(&self, frame: Bytes, source: Source) -> bool {
        self.submit_frame(frame, source)
    }

    /// An `/otel` connection from `peer` (an IP address) on `addrs` (`(peer, local)`); pass
    /// what it returns to [`Telemetry::submit`] and [`Telemetry::otel_closed`].
    pub fn otel_connection(&self, peer: &str, addrs: Option<(SocketAddr, SocketAddr)>) -> Arc<OtelPeer> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Arc::new(OtelPeer { id: NEXT.fetch_add(1, Relaxed), ip: peer.to_owned(), addrs })
    }

    /// The `/otel` connection ended.
    pub fn otel_closed(&self, peer: &OtelPeer) {
        // Not charged to the queue: one tiny entry per connection.
        let _ = self.tx.send(Job::OtelClosed(peer.id));
    }

    fn submit_frame(&self, frame: Bytes, source: Source) -> bool {
        let Some((kind, _)) = otlp::split_prefix(&frame) else { return false };
        let m = &self.metrics.telemetry;
        m.frames_total[index(kind)].fetch_add(1, Relaxed);
        let cost = frame.len() + ENTRY_OVERHEAD;
        let queued = &m.queue_bytes;
        let before = queued.fetch_add(cost as u64, Relaxed);
        if before + cost as u64 > self.budget as u64 {
            queued.fetch_sub(cost as u64, Relaxed);
            self.dropped(kind);
            return true;
        }
        if self.tx.send(Job::Frame { kind, frame, source, cost }).is_err() {
            queued.fetch_sub(cost as u64, Relaxed);
            self.dropped(kind);
        }
        true
    }

    /// Counts a frame on `/otel` that is not telemetry (ignored, as the reference does).
    pub fn unknown_frame(&self) {
        self.metrics.telemetry.unknown_frames_total.fetch_add(1, Relaxed);
    }

    fn dropped(&self, kind: Kind) {
        let n = self.metrics.telemetry.dropped_frames_total[index(kind)].fetch_add(1, Relaxed) + 1;
        // One line at the 1st, 2nd, 4th, 8th… drop: visible without flooding the log.
        if n.is_power_of_two() {
            tracing::warn!(dropped = n, "telemetry queue full (queue_bytes): worker telemetry frames dropped");
        }
    }

    /// Records the name a worker registered with (for its `/otel` frames).
    pub fn worker_named(&self, conn: u64, ip: &str, name: &str, runtime: Option<&str>, pid: Option<u64>) {
        let named = Named {
            ip: ip.to_owned(),
            name: name.to_owned(),
            runtime: runtime.map(str::to_owned),
            pid: pid.and_then(|p| u32::try_from(p).ok()),
        };
        let mut directory = self.directory.lock().unwrap_or_else(|e| e.into_inner());
        directory.by_conn.insert(conn, named);
        directory.generation += 1;
    }

    /// Forgets a worker connection that went away.
    pub fn worker_gone(&self, conn: u64) {
        self.directory.lock().unwrap_or_else(|e| e.into_inner()).by_conn.remove(&conn);
    }
}

/// The telemetry thread's state.
struct Decoder {
    worker_logs: bool,
    max_line_bytes: usize,
    metrics: Arc<Metrics>,
    directory: Arc<Mutex<Directory>>,
    forwarder: Option<forward::Forwarder>,
    /// Per open `/otel` connection: its process's worker name, once found.
    owners: HashMap<u64, Owner>,
}

impl Decoder {
    /// Serves the queue until every sender is gone (the engine stopped).
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            match job {
                Job::Frame { kind, frame, source, cost } => {
                    let decoded = self.handle(kind, &frame, &source);
                    self.metrics.telemetry.queue_bytes.fetch_sub(cost as u64, Relaxed);
                    match &self.forwarder {
                        Some(forwarder) if decoded => forwarder.offer(kind, frame),
                        _ => {}
                    }
                }
                Job::OtelClosed(id) => {
                    self.owners.remove(&id);
                }
            }
        }
    }

    /// Decodes, counts and logs one frame; false when it is malformed.
    fn handle(&mut self, kind: Kind, frame: &Bytes, source: &Source) -> bool {
        let m = &self.metrics.telemetry;
        let payload = frame.get(4..).unwrap_or_default();
        match otlp::decode(kind, payload, self.max_line_bytes) {
            Ok(Decoded::Traces { spans }) => {
                m.spans_total.fetch_add(spans as u64, Relaxed);
                true
            }
            Ok(Decoded::Metrics { metrics }) => {
                m.metrics_total.fetch_add(metrics as u64, Relaxed);
                true
            }
            Ok(Decoded::Logs(lines)) => {
                m.log_records_total.fetch_add(lines.len() as u64, Relaxed);
                if self.worker_logs && !lines.is_empty() {
                    let owner = self.owner_of(source);
                    for line in &lines {
                        let name = self.name_of(line, source, owner.as_deref());
                        emit(line, &name);
                    }
                }
                true
            }
            Err(e) => {
                let n = m.malformed_frames_total[index(kind)].fetch_add(1, Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        kind = kind.label(),
                        malformed = n,
                        "ignored a malformed worker telemetry frame: {e}"
                    );
                }
                false
            }
        }
    }

    /// For an `/otel` connection from this host: the name of the registered worker whose
    /// process holds the other end (found through `/proc`, remembered for the connection,
    /// looked for again with a doubling wait while not found: a worker registers after it
    /// connects, and a process that is not a registered worker is not looked for often).
    fn owner_of(&mut self, source: &Source) -> Option<String> {
        let Source::Otel(peer) = source else { return None };
        let (remote, local) = peer.addrs.filter(|(remote, local)| peer::is_local(*remote, *local))?;
        let known = self.owners.get(&peer.id);
        if let Some(name) = known.and_then(|o| o.name.as_ref()) {
            return Some(name.clone());
        }
        let candidates: Vec<(u32, String)>;
        let generation;
        {
            let directory = self.directory.lock().unwrap_or_else(|e| e.into_inner());
            generation = directory.generation;
            if known.is_some_and(|o| o.generation == generation && Instant::now() < o.retry_at) {
                return None;
            }
            candidates = directory.by_conn.values().filter_map(|w| Some((w.pid?, w.name.clone()))).collect();
        }
        let backoff = match known {
            Some(o) if o.generation == generation => (o.backoff * 2).min(OWNER_RETRY.1),
            _ => OWNER_RETRY.0,
        };
        let name = if candidates.is_empty() {
            None
        } else {
            peer::socket_inode(remote, local).and_then(|inode| {
                candidates.into_iter().find(|(pid, _)| peer::process_holds(*pid, inode)).map(|(_, name)| name)
            })
        };
        self.owners
            .insert(peer.id, Owner { name: name.clone(), retry_at: Instant::now() + backoff, backoff, generation });
        name
    }

    /// The worker a log line is shown under (see the module documentation for the order).
    fn name_of(&self, line: &LogLine, source: &Source, owner: Option<&str>) -> String {
        let directory = self.directory.lock().unwrap_or_else(|e| e.into_inner());
        if let Source::Worker(conn) = source {
            if let Some(w) = directory.by_conn.get(conn) {
                return otlp::clip(&w.name, MAX_NAME_BYTES);
            }
        }
        if let Some(owner) = owner {
            return otlp::clip(owner, MAX_NAME_BYTES);
        }
        let chosen = line
            .resource_service
            .as_deref()
            .filter(|s| !is_sdk_default_service(s))
            .or(line.record_service.as_deref())
            .or_else(|| match source {
                Source::Otel(peer) => directory.sole_worker_at(&peer.ip, line.sdk_language.as_deref()),
                Source::Worker(_) => None,
            })
            .or(line.resource_service.as_deref())
            .unwrap_or("unknown");
        otlp::clip(chosen, MAX_NAME_BYTES)
    }
}

/// The `service.name` an SDK sends when nobody set one: npm iii-sdk 0.22.1 `iii-node`, PyPI
/// iii-sdk 0.25.0 `iii-python-sdk`, OpenTelemetry's `unknown_service[:…]`.
fn is_sdk_default_service(name: &str) -> bool {
    name.is_empty() || name == "iii-node" || name == "iii-python-sdk" || name.starts_with("unknown_service")
}

/// Logs one worker log record at its level, under target `worker`.
fn emit(line: &LogLine, worker: &str) {
    let trace_id = line.trace_id.as_deref().map(tracing::field::display);
    let data = line.data.as_deref().map(tracing::field::display);
    let message = &line.message;
    match line.severity {
        Severity::Trace => tracing::trace!(target: LOG_TARGET, worker = %worker, trace_id, data, "{message}"),
        Severity::Debug => tracing::debug!(target: LOG_TARGET, worker = %worker, trace_id, data, "{message}"),
        Severity::Info => tracing::info!(target: LOG_TARGET, worker = %worker, trace_id, data, "{message}"),
        Severity::Warn => tracing::warn!(target: LOG_TARGET, worker = %worker, trace_id, data, "{message}"),
        Severity::Error => tracing::error!(target: LOG_TARGET, worker = %worker, trace_id, data, "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(ip: &str, name: &str, runtime: &str) -> Named {
        Named { ip: ip.into(), name: name.into(), runtime: Some(runtime.into()), pid: None }
    }

    #[test]
    fn the_sole_worker_at_an_address_names_its_telemetry() {
        let mut d = Directory::default();
        d.by_conn.insert(1, named("10.0.0.1", "orders", "node"));
        assert_eq!(d.sole_worker_at("10.0.0.1", Some("nodejs")), Some("orders"));
        assert_eq!(d.sole_worker_at("10.0.0.2", Some("nodejs")), None);
        d.by_conn.insert(2, named("10.0.0.1", "billing", "python"));
        assert_eq!(d.sole_worker_at("10.0.0.1", Some("python")), Some("billing"), "the runtime decides");
        assert_eq!(d.sole_worker_at("10.0.0.1", None), None, "ambiguous");
        d.by_conn.insert(3, named("10.0.0.1", "orders-2", "node"));
        assert_eq!(d.sole_worker_at("10.0.0.1", Some("nodejs")), None, "two node workers");
    }

    #[test]
    fn config_defaults_and_validation() {
        let config: TelemetryConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(config, TelemetryConfig::default());
        assert_eq!(config.queue_bytes, 8 << 20);
        assert_eq!(config.max_line_bytes, 4096);
        assert!(config.validate().is_ok());
        let bad = TelemetryConfig { otlp_endpoint: Some("https://collector:4318".into()), ..Default::default() };
        assert_eq!(bad.validate().map_err(|e| e.0), Err("otlp_endpoint"));
        assert!(serde_yaml::from_str::<TelemetryConfig>("queue_size: 1").is_err(), "unknown keys are errors");
    }
}
