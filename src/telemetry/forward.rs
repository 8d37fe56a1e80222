//! Forwarding of worker telemetry to an OTLP/HTTP collector: each frame that decoded is posted
//! unchanged (its OTLP/JSON payload, prefix removed) to `<endpoint>/v1/traces`, `/v1/metrics` or
//! `/v1/logs` as `application/json`, one request per frame on its own connection
//! (`Connection: close`), from a dedicated thread. Its queue is bounded in bytes; a frame that
//! does not fit, or that the collector does not accept (connection error, timeout, non-2xx), is
//! dropped and counted, never retried: a collector that is down or slow costs the engine nothing
//! but those counters.

use super::otlp::Kind;
use crate::metrics::Metrics;
use bytes::Bytes;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Bytes charged per queued frame on top of its payload.
const ENTRY_OVERHEAD: usize = 64;
/// Most bytes of a collector's answer read (the status line is all that is used).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// OTLP/HTTP's default port.
const DEFAULT_PORT: u16 = 4318;

/// A parsed `http://host[:port][/base]` collector address.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Endpoint {
    /// `host:port` as given (for `Host:` and connecting).
    authority: String,
    /// Base path without a trailing slash (`""` for none).
    base_path: String,
}

impl Endpoint {
    pub(super) fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?}: only http:// collectors are supported (OTLP/HTTP without TLS)"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains(['@', '?', '#']) || path.contains(['?', '#']) {
            return Err(format!("{url:?}: expected http://host[:port][/path]"));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{url:?}: the path has spaces or control characters"));
        }
        // An IPv6 literal is bracketed; a port follows the last ':' outside the brackets.
        let has_port = match authority.rfind(']') {
            Some(end) => authority.get(end + 1..).is_some_and(|p| p.starts_with(':')),
            None => authority.contains(':'),
        };
        let authority = if has_port {
            let (_, port) = authority.rsplit_once(':').unwrap_or_default();
            port.parse::<u16>().map_err(|_| format!("{url:?}: bad port {port:?}"))?;
            authority.to_owned()
        } else {
            format!("{authority}:{DEFAULT_PORT}")
        };
        Ok(Endpoint { authority, base_path: path.trim_end_matches('/').to_owned() })
    }
}

struct Job {
    kind: Kind,
    frame: Bytes,
    cost: usize,
}

/// The engine's side of the forwarding thread.
pub(super) struct Forwarder {
    tx: mpsc::Sender<Job>,
    budget: usize,
    metrics: Arc<Metrics>,
}

impl Forwarder {
    /// Starts the forwarding thread for `endpoint` (already validated with the config).
    pub(super) fn start(
        endpoint: &str,
        budget: usize,
        timeout_ms: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Forwarder, String> {
        let endpoint = Endpoint::parse(endpoint)?;
        let timeout = Duration::from_millis(timeout_ms.max(1));
        let (tx, rx) = mpsc::channel::<Job>();
        let thread_metrics = metrics.clone();
        std::thread::Builder::new()
            .name("ringcast-otlp-forward".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let m = &thread_metrics.telemetry;
                    let payload = job.frame.get(4..).unwrap_or_default();
                    match post(&endpoint, job.kind, payload, timeout) {
                        Ok(()) => {
                            m.forwarded_frames_total.fetch_add(1, Relaxed);
                        }
                        Err(e) => {
                            let n = m.forward_errors_total.fetch_add(1, Relaxed) + 1;
                            if n.is_power_of_two() {
                                tracing::warn!(
                                    errors = n,
                                    "telemetry: the OTLP collector did not take a frame (dropped): {e}"
                                );
                            }
                        }
                    }
                    m.forward_queue_bytes.fetch_sub(job.cost as u64, Relaxed);
                }
            })
            .map_err(|e| format!("no thread: {e}"))?;
        Ok(Forwarder { tx, budget, metrics })
    }

    /// Queues one frame (prefix included) unless the queue is full (then it is counted).
    pub(super) fn offer(&self, kind: Kind, frame: Bytes) {
        let m = &self.metrics.telemetry;
        let cost = frame.len() + ENTRY_OVERHEAD;
        let before = m.forward_queue_bytes.fetch_add(cost as u64, Relaxed);
        if before + cost as u64 > self.budget as u64 || self.tx.send(Job { kind, frame, cost }).is_err() {
            m.forward_queue_bytes.fetch_sub(cost as u64, Relaxed);
            let n = m.forward_dropped_total.fetch_add(1, Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "telemetry: forward queue full (forward_queue_bytes): frames not forwarded"
                );
            }
        }
    }
}

/// One POST; `Ok` when the collector answered 2xx.
fn post(endpoint: &Endpoint, kind: Kind, payload: &[u8], timeout: Duration) -> Result<(), String> {
    let addrs = endpoint.authority.to_socket_addrs().map_err(|e| format!("{}: {e}", endpoint.authority))?;
    let mut last_error = format!("{}: no address", endpoint.authority);
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_error = format!("{addr}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last_error)?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let head = format!(
        "POST {}{} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        endpoint.base_path,
        kind.http_path(),
        endpoint.authority,
        payload.len()
    );
    stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(payload)).map_err(|e| format!("sending: {e}"))?;
    let mut answer = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    while !answer.contains(&b'\n') && answer.len() < MAX_RESPONSE_BYTES {
        let n = stream.read(&mut chunk).map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
    let status_line = answer.split(|&b| b == b'\n').next().unwrap_or_default();
    let status_line = String::from_utf8_lossy(status_line);
    let code = status_line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(200..=299) => {
            // Read the rest (bounded) so closing does not reset the collector's side.
            let mut rest = 0;
            while rest < MAX_RESPONSE_BYTES {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => rest += n,
                }
            }
            Ok(())
        }
        Some(code) => Err(format!("HTTP {code}")),
        None => Err(format!("not an HTTP answer: {:?}", super::otlp::clip(&status_line, 80))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("http://127.0.0.1:4318").unwrap();
        assert_eq!((e.authority.as_str(), e.base_path.as_str()), ("127.0.0.1:4318", ""));
        let e = Endpoint::parse("http://collector/otlp/").unwrap();
        assert_eq!((e.authority.as_str(), e.base_path.as_str()), ("collector:4318", "/otlp"));
        let e = Endpoint::parse("http://[::1]:9000").unwrap();
        assert_eq!(e.authority, "[::1]:9000");
        let e = Endpoint::parse("http://[::1]").unwrap();
        assert_eq!(e.authority, "[::1]:4318");
        for bad in ["https://c:4318", "c:4318", "http://", "http://c:99999", "http://c:x", "http://u@c", "http://c/a b"]
        {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
