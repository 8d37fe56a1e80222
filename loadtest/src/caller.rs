//! The calling side of a worker connection (`stream::set` publisher or RPC caller) and the echo
//! worker's reply path.

use std::borrow::Cow;
use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;

use hdrhistogram::Histogram;
use memchr::memmem::Finder;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::conn::new_hist;
use crate::report::{count_error, snippet};
use crate::runloop::Shared;
use crate::sys::{self, ProcSnap, NS};
use crate::ws;

/// Sequence numbers at or above this mark availability probes (not counted).
const PROBE_BASE: u64 = 1 << 39;

pub enum CallKind {
    StreamSet {
        /// JSON-escaped stream name (with quotes)
        stream_json: String,
        groups: u32,
        items: u32,
        subs_per_group: Vec<u64>,
        total_subs: u64,
    },
    Echo {
        /// JSON-escaped function id (with quotes)
        function_json: String,
    },
    /// `TriggerAction.Enqueue` of the function to a queue; the probe is a plain call (the
    /// function is callable), and the run drains until every acknowledged message was delivered.
    Enqueue {
        /// JSON-escaped function id and queue name (with quotes)
        function_json: String,
        queue_json: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Probe = 0,
    WaitSync = 1,
    Publish = 2,
    Drain = 3,
    Done = 4,
}

impl Phase {
    pub fn name(v: u8) -> &'static str {
        match v {
            0 => "probe",
            1 => "wait-sync",
            2 => "publish",
            3 => "drain",
            _ => "done",
        }
    }
}

pub struct CallerCfg {
    pub inflight: u64,
    pub rate: f64,
    pub duration_ns: u64,
    pub payload: usize,
    pub server_pid: Option<u32>,
    pub prefix: u32,
}

pub struct Caller {
    pub kind: CallKind,
    cfg: CallerCfg,
    pad: String,
    pub phase: Phase,
    pub sent: u64,
    pub acked: u64,
    pub errors: u64,
    pub inflight: u64,
    pub expected: u64,
    pub foreign: u64,
    pub pub_start: u64,
    pub pub_end: u64,
    pub end_ns: u64,
    drain_deadline: u64,
    phase_deadline: u64,
    pub ack_hist: Histogram<u64>,
    pub first_error: Option<String>,
    pub abort: Option<String>,
    scratch: Vec<u8>,
    probe_seq: u64,
    probe_outstanding: bool,
    probe_retry_at: u64,
    pub cpu_start: f64,
    pub cpu_end: f64,
    pub proc_start: Option<ProcSnap>,
    pub proc_end: Option<ProcSnap>,
    id_finder: Finder<'static>,
    err_finder: Finder<'static>,
}

/// Longest error text kept from a failed call.
const ERROR_TEXT: usize = 400;

impl Caller {
    /// Seconds from the first call to the end of publishing (or of the run, if sooner).
    pub fn publish_secs(&self) -> f64 {
        (self.pub_end.min(self.end_ns) - self.pub_start) as f64 / 1e9
    }

    /// Seconds from the first call to the end of the drain: the window rates are taken over.
    pub fn window_secs(&self) -> f64 {
        (self.end_ns - self.pub_start) as f64 / 1e9
    }

    pub fn new(kind: CallKind, cfg: CallerCfg, now: u64) -> Caller {
        // the data object is {"t":<≤20 digits>,"seq":<≤12 digits>,"pad":"…"}: ~50 bytes of overhead
        let pad = "x".repeat(cfg.payload.saturating_sub(50));
        let phase = match kind {
            CallKind::StreamSet { .. } => Phase::WaitSync,
            CallKind::Echo { .. } | CallKind::Enqueue { .. } => Phase::Probe,
        };
        Caller {
            kind,
            cfg,
            pad,
            phase,
            sent: 0,
            acked: 0,
            errors: 0,
            inflight: 0,
            expected: 0,
            foreign: 0,
            pub_start: 0,
            pub_end: 0,
            end_ns: 0,
            drain_deadline: 0,
            phase_deadline: now + 30 * NS,
            ack_hist: new_hist(),
            first_error: None,
            abort: None,
            scratch: Vec::with_capacity(4096),
            probe_seq: 0,
            probe_outstanding: false,
            probe_retry_at: 0,
            cpu_start: 0.0,
            cpu_end: 0.0,
            proc_start: None,
            proc_end: None,
            id_finder: Finder::new(b"\"invocation_id\""),
            err_finder: Finder::new(b"\"error\""),
        }
    }

    fn set_phase(&mut self, p: Phase, shared: &Shared) {
        self.phase = p;
        shared.phase.store(p as u8, Relaxed);
    }

    fn start_publish(&mut self, now: u64, shared: &Shared) {
        self.pub_start = now;
        self.pub_end = now + self.cfg.duration_ns;
        self.cpu_start = sys::self_cpu_secs();
        self.proc_start = self.cfg.server_pid.and_then(sys::proc_snap);
        self.set_phase(Phase::Publish, shared);
    }

    fn finish(&mut self, now: u64, shared: &Shared) {
        if self.pub_start == 0 {
            self.pub_start = now;
            self.pub_end = now;
        }
        self.end_ns = now;
        self.cpu_end = sys::self_cpu_secs();
        self.proc_end = self.cfg.server_pid.and_then(sys::proc_snap);
        self.publish_counters(shared);
        self.set_phase(Phase::Done, shared);
        shared.stop.store(true, Relaxed);
    }

    fn publish_counters(&self, shared: &Shared) {
        shared.sent.store(self.sent, Relaxed);
        shared.acked.store(self.acked, Relaxed);
        shared.errors.store(self.errors, Relaxed);
        shared.inflight.store(self.inflight, Relaxed);
    }

    pub fn fail(&mut self, why: String, shared: &Shared) {
        if self.abort.is_none() {
            self.abort = Some(why);
        }
        self.finish(sys::now_ns(), shared);
    }

    fn build(&mut self, seq: u64, now: u64, out: &mut Vec<u8>, mask: [u8; 4]) {
        let mut id = [0u8; 36];
        sys::encode_id(self.cfg.prefix, seq, now, &mut id);
        let id = std::str::from_utf8(&id).unwrap();
        let s = &mut self.scratch;
        s.clear();
        match &self.kind {
            CallKind::StreamSet {
                stream_json,
                groups,
                items,
                ..
            } => {
                let g = seq % *groups as u64;
                let item = (seq / *groups as u64) % *items as u64;
                let _ = write!(
                    s,
                    r#"{{"type":"invokefunction","invocation_id":"{id}","function_id":"stream::set","data":{{"stream_name":{stream_json},"group_id":"g{g}","item_id":"i{item}","data":{{"t":{now},"seq":{seq},"pad":"{}"}}}}}}"#,
                    self.pad
                );
            }
            CallKind::Echo { function_json } => {
                let _ = write!(
                    s,
                    r#"{{"type":"invokefunction","invocation_id":"{id}","function_id":{function_json},"data":{{"t":{now},"seq":{seq},"pad":"{}"}}}}"#,
                    self.pad
                );
            }
            CallKind::Enqueue { function_json, .. } if seq >= PROBE_BASE => {
                let _ = write!(
                    s,
                    r#"{{"type":"invokefunction","invocation_id":"{id}","function_id":{function_json},"data":{{"probe":true}}}}"#
                );
            }
            CallKind::Enqueue { function_json, queue_json } => {
                let _ = write!(
                    s,
                    r#"{{"type":"invokefunction","invocation_id":"{id}","function_id":{function_json},"data":{{"t":{now},"seq":{seq},"pad":"{}"}},"action":{{"type":"enqueue","queue":{queue_json}}}}}"#,
                    self.pad
                );
            }
        }
        ws::encode_client_frame(out, ws::OP_TEXT, s, mask);
    }

    /// Sends what is due. Returns how long the loop may sleep (ms).
    pub fn pump(
        &mut self,
        now: u64,
        out: &mut Vec<u8>,
        out_pending: usize,
        mask: [u8; 4],
        shared: &Shared,
    ) -> i32 {
        let t = match self.phase {
            Phase::Probe => {
                if now > self.phase_deadline {
                    let f = match &self.kind {
                        CallKind::Echo { function_json } | CallKind::Enqueue { function_json, .. } => function_json.clone(),
                        _ => String::new(),
                    };
                    self.fail(
                        format!("function {f} did not become callable within 30 s"),
                        shared,
                    );
                    return 0;
                }
                if !self.probe_outstanding && now >= self.probe_retry_at {
                    self.probe_outstanding = true;
                    self.probe_seq += 1;
                    self.build(PROBE_BASE + self.probe_seq, now, out, mask);
                }
                10
            }
            Phase::WaitSync => {
                let total = match &self.kind {
                    CallKind::StreamSet { total_subs, .. } => *total_subs,
                    _ => 0,
                };
                let synced = shared.synced.load(Relaxed);
                if synced >= total {
                    self.start_publish(now, shared);
                    return self.pump(now, out, out_pending, mask, shared);
                }
                if now > self.phase_deadline {
                    self.fail(format!("only {synced} of {total} subscribers received their sync frame within 30 s"), shared);
                    return 0;
                }
                5
            }
            Phase::Publish => {
                if now >= self.pub_end {
                    self.drain_deadline = now + 2 * NS;
                    self.set_phase(Phase::Drain, shared);
                    return 1;
                }
                let mut n = self.cfg.inflight.saturating_sub(self.inflight);
                if self.cfg.rate > 0.0 {
                    let due = ((now - self.pub_start) as f64 * self.cfg.rate / 1e9) as u64 + 1;
                    n = n.min(due.saturating_sub(self.sent));
                }
                if out_pending > (8 << 20) {
                    n = 0; // the socket is not taking our writes: do not pile up
                }
                for _ in 0..n.min(4096) {
                    let seq = self.sent;
                    self.sent += 1;
                    self.inflight += 1;
                    let t = sys::now_ns();
                    self.build(seq, t, out, mask);
                }
                let mut ms = 10u64;
                if self.cfg.rate > 0.0 {
                    let next = self.pub_start + (self.sent as f64 * 1e9 / self.cfg.rate) as u64;
                    ms = next.saturating_sub(now).div_ceil(1_000_000).min(10);
                }
                ms = ms.min((self.pub_end - now).div_ceil(1_000_000));
                ms as i32
            }
            Phase::Drain => {
                let complete = self.inflight == 0
                    && match self.kind {
                        CallKind::StreamSet { .. } => {
                            shared.delivered.load(Relaxed) >= self.expected
                        }
                        CallKind::Echo { .. } => true,
                        CallKind::Enqueue { .. } => shared.delivered.load(Relaxed) >= self.acked,
                    };
                if complete || now >= self.drain_deadline {
                    self.finish(now, shared);
                    return 0;
                }
                2
            }
            Phase::Done => 20,
        };
        self.publish_counters(shared);
        t
    }

    fn is_error(&self, msg: &[u8]) -> bool {
        let mut from = 0;
        while let Some(p) = self.err_finder.find(&msg[from..]) {
            let mut i = from + p + 7;
            while i < msg.len() && msg[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < msg.len() && msg[i] == b':' {
                i += 1;
                while i < msg.len() && msg[i].is_ascii_whitespace() {
                    i += 1;
                }
                if i < msg.len() && msg[i] == b'{' {
                    return true;
                }
            }
            from = from + p + 7;
        }
        false
    }

    /// Handles one complete message from the engine.
    pub fn on_message(&mut self, msg: &[u8], now: u64, shared: &Shared) {
        let Some(p) = self.id_finder.find(msg) else {
            return;
        };
        let mut i = p + 15;
        while i < msg.len() && (msg[i].is_ascii_whitespace() || msg[i] == b':') {
            i += 1;
        }
        if i >= msg.len() || msg[i] != b'"' || i + 37 > msg.len() {
            return;
        }
        let Some((prefix, seq, t)) = sys::decode_id(&msg[i + 1..i + 37]) else {
            return;
        };
        if prefix != self.cfg.prefix {
            self.foreign += 1;
            return;
        }
        let err = self.is_error(msg);
        if seq >= PROBE_BASE {
            self.probe_outstanding = false;
            if self.phase != Phase::Probe {
                return;
            }
            if err {
                if memchr::memmem::find(msg, b"function_not_found").is_some() {
                    self.probe_retry_at = now + 50_000_000;
                } else {
                    self.fail(format!("probe call failed: {}", snippet(msg, ERROR_TEXT)), shared);
                }
            } else {
                self.start_publish(now, shared);
            }
            return;
        }
        self.inflight = self.inflight.saturating_sub(1);
        if err {
            count_error(&mut self.errors, &mut self.first_error, msg, ERROR_TEXT);
            return;
        }
        self.acked += 1;
        self.ack_hist
            .saturating_record(now.saturating_sub(t).max(1));
        if let CallKind::StreamSet {
            groups,
            subs_per_group,
            ..
        } = &self.kind
        {
            self.expected += subs_per_group[(seq % *groups as u64) as usize];
        }
    }
}

#[derive(Deserialize)]
struct Invocation<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default, borrow)]
    invocation_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    function_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// Echo worker: answers an `invokefunction` with an `invocationresult` carrying its data.
pub fn echo_reply(msg: &[u8], out: &mut Vec<u8>, mask: [u8; 4], scratch: &mut Vec<u8>) -> bool {
    let Ok(inv) = serde_json::from_slice::<Invocation>(msg) else {
        return false;
    };
    if inv.ty != "invokefunction" {
        return false;
    }
    let Some(id) = inv.invocation_id else {
        return false;
    };
    scratch.clear();
    scratch.extend_from_slice(br#"{"type":"invocationresult","invocation_id":"#);
    serde_json::to_writer(&mut *scratch, &id).ok();
    scratch.extend_from_slice(br#","function_id":"#);
    serde_json::to_writer(&mut *scratch, &inv.function_id.unwrap_or_default()).ok();
    scratch.extend_from_slice(br#","result":"#);
    scratch.extend_from_slice(inv.data.map(|d| d.get()).unwrap_or("null").as_bytes());
    scratch.push(b'}');
    ws::encode_client_frame(out, ws::OP_TEXT, scratch, mask);
    true
}

#[derive(Deserialize)]
struct SentAt {
    t: u64,
}

/// Queue consumer: answers like [`echo_reply`] and returns the send time (`t`) the producer
/// put in the delivered message's data, if it has one (probes have none).
pub fn consume_reply(msg: &[u8], out: &mut Vec<u8>, mask: [u8; 4], scratch: &mut Vec<u8>) -> Option<Option<u64>> {
    if !echo_reply(msg, out, mask, scratch) {
        return None;
    }
    let inv = serde_json::from_slice::<Invocation>(msg).ok()?;
    Some(inv.data.and_then(|d| serde_json::from_str::<SentAt>(d.get()).ok()).map(|s| s.t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_reply_shape() {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        let msg = br#"{"type":"invokefunction","invocation_id":"0f8a3c62-3a3e-4a57-b2b6-8d1a2a0b1f77","function_id":"loadtest::echo","data":{"t":5,"_caller_worker_id":"w"}}"#;
        assert!(echo_reply(msg, &mut out, [0, 0, 0, 0], &mut scratch));
        let v: serde_json::Value = serde_json::from_slice(&scratch).unwrap();
        assert_eq!(v["type"], "invocationresult");
        assert_eq!(v["invocation_id"], "0f8a3c62-3a3e-4a57-b2b6-8d1a2a0b1f77");
        assert_eq!(v["function_id"], "loadtest::echo");
        assert_eq!(v["result"]["t"], 5);
        assert!(!echo_reply(
            br#"{"type":"workerregistered","worker_id":"x"}"#,
            &mut out,
            [0; 4],
            &mut scratch
        ));
    }

    #[test]
    fn publish_and_window_seconds() {
        let cfg = CallerCfg {
            inflight: 1,
            rate: 0.0,
            duration_ns: NS,
            payload: 64,
            server_pid: None,
            prefix: 1,
        };
        let function_json = "\"f\"".to_string();
        let mut cl = Caller::new(CallKind::Echo { function_json }, cfg, 0);
        (cl.pub_start, cl.pub_end, cl.end_ns) = (NS, 3 * NS, 4 * NS);
        assert_eq!((cl.publish_secs(), cl.window_secs()), (2.0, 3.0));
        // a run cut short ends publishing at its end
        cl.end_ns = 2 * NS;
        assert_eq!((cl.publish_secs(), cl.window_secs()), (1.0, 1.0));
    }
}
