//! `soak --chaos`: misbehaving clients beside the checked soak. While the well-behaved
//! subscribers of `soak` are checked for every event in order, a bounded number of chaos clients
//! at a time do what real networks and processes do: subscribers that vanish with a FIN or an RST
//! and no Close frame, subscribers that join and never read again, and workers killed (RST) while
//! calls to their function are pending. At the end the soak checks that the engine's open fds and
//! RSS come back to their baseline and that every call to a killed worker was answered.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read as _};
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::time::Duration;

use serde::Deserialize;

use crate::conn::{join_message, Conn, Mode, Role, ThreadStats};
use crate::report::Report;
use crate::sys::{self, now_ns, Rng, NS};
use crate::ws::{self, WsUrl, HANDSHAKE_TIMEOUT};

/// A chaos subscriber must get its sync frame within this long.
const SYNC_TIMEOUT: u64 = 5 * NS;
/// Longest time a FIN/RST subscriber stays live (reading) before it vanishes.
const MAX_LIFE: u64 = NS * 3 / 10;
/// After its FIN, a subscriber waits this long for the engine to close its side.
const FIN_WAIT: u64 = NS;
/// A worker about to be killed waits this long for the calls sent to it.
const VICTIM_WAIT: u64 = 2 * NS;
/// A worker waits this long for the answer to the call that orders its registration.
const BARRIER_TIMEOUT: u64 = 5 * NS;
/// Receive buffer of a stalled subscriber: small, so the engine's queue for it fills sooner.
const STALL_RCVBUF: i32 = 4096;
/// How much a stalled subscriber reads back per pass once its hold is over.
const STALL_DRAIN: usize = 4 << 20;
/// How long a stalled subscriber keeps draining, after its hold, for the engine's close.
const STALL_DRAIN_WAIT: u64 = 2 * NS;
/// How often the engine's RSS is sampled for the peak.
const RSS_EVERY: u64 = NS / 4;
/// Longest error text kept.
const QUOTE: usize = 200;

pub struct ChaosArgs {
    /// chaos clients alive at once (kinds take turns: FIN, RST, stall, killed worker)
    pub clients: usize,
    /// chaos clients started in all
    pub max: u64,
    /// seconds of plain soak before the first chaos client; the RSS baseline is read at its end
    pub warmup: f64,
    /// seconds a stalled subscriber holds its socket without reading before it is inspected
    pub stall_hold: f64,
    /// fail unless the engine closed every stalled subscriber within `stall_hold` (plus the
    /// drain that reads up to its close)
    pub stall_must_close: bool,
    /// calls sent to each worker that is then killed before it answers
    pub kill_calls: u32,
    /// seconds a call to a killed worker may stay unanswered before it counts as hung
    pub call_timeout: f64,
    /// the engine's fd count at the end may differ from its baseline by this many
    pub fd_tolerance: u64,
    /// the engine's RSS at the end may exceed its baseline by this many MiB
    pub rss_slack_mib: u64,
    /// seconds to wait, polling, for the engine's fds to come back after the last chaos client
    pub settle: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Fin,
    Rst,
    Stall,
    Kill,
}

const KINDS: [Kind; 4] = [Kind::Fin, Kind::Rst, Kind::Stall, Kind::Kill];

/// What the chaos clients did and what the engine did to them.
#[derive(Default, Debug)]
pub struct Tally {
    pub started: u64,
    /// subscribers that sent FIN (shutdown of their write side) without a Close frame
    pub fin: u64,
    /// … of which the engine closed its side within 1 s
    pub fin_engine_closed: u64,
    /// subscribers that vanished with an RST (SO_LINGER 0, then close)
    pub rst: u64,
    /// FIN/RST subscribers that vanished right after their join, before the sync frame
    pub left_before_sync: u64,
    /// subscribers that joined and never read again
    pub stall: u64,
    /// … closed by the engine with a Close frame, by code
    pub stall_close_codes: BTreeMap<i32, u64>,
    /// … closed by the engine without a Close frame (EOF)
    pub stall_eof: u64,
    /// … reset by the engine
    pub stall_reset: u64,
    /// … still open at the end of the hold (then reset by the harness)
    pub stall_open: u64,
    /// workers killed with an RST while calls to their function were pending
    pub killed_workers: u64,
    /// invocations those workers received before they vanished
    pub kill_invocations_received: u64,
    pub calls: u64,
    /// calls answered with an error result
    pub calls_answered: u64,
    pub answer_codes: BTreeMap<String, u64>,
    /// calls answered with a success result, which a worker that never answered cannot produce
    pub calls_bad: u64,
    /// calls without an answer within `call_timeout`
    pub calls_timed_out: u64,
    /// chaos clients that could not do their part (connect failed, no sync, closed early, …)
    pub errors: u64,
    pub first_errors: Vec<String>,
    pub rss_base_kb: Option<u64>,
    pub rss_peak_kb: u64,
    pub fds_at_chaos_start: Option<u64>,
}

impl Tally {
    fn error(&mut self, e: impl Into<String>) {
        self.errors += 1;
        if self.first_errors.len() < 4 {
            let e: String = e.into();
            self.first_errors.push(e.chars().take(QUOTE).collect());
        }
    }
}

enum Phase {
    /// joined; waiting for the sync frame
    WaitSync { deadline: u64 },
    /// reading live frames until `until`, then vanishing
    Live { until: u64 },
    /// sent FIN; reading until the engine closes its side or `deadline`
    FinWait { deadline: u64 },
    /// joined and never reads; inspected at `until`
    Stalled { until: u64 },
    /// the hold is over: reading what the engine queued, to see how it ended the connection
    /// (its close frame or FIN sits behind whatever the kernel buffered), until `deadline`
    StallDrain { deadline: u64 },
    /// registered its function; waiting for the answer to a call sent after the registration
    Barrier { id: String, deadline: u64 },
    /// calls sent to it; collecting them until all arrived or `deadline`, then killed
    Called { deadline: u64, received: u32 },
}

struct Client {
    kind: Kind,
    conn: Conn,
    phase: Phase,
    /// FIN/RST: time live after the sync frame
    life: u64,
    /// killed worker: its function's id
    function: String,
}

/// How a read pass ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Open,
    Eof,
    Reset,
    /// a Close frame with this code (-1: none given)
    Close(i32),
    Error(String),
}

impl End {
    fn describe(&self) -> String {
        match self {
            End::Open => "open".into(),
            End::Eof => "EOF without a close frame".into(),
            End::Reset => "connection reset".into(),
            End::Close(c) => format!("close frame {c}"),
            End::Error(e) => format!("read error: {e}"),
        }
    }
}

/// Reads what is there (up to about `budget` bytes) into the connection's frame walker.
fn read_some(c: &mut Conn, rbuf: &mut [u8], ts: &mut ThreadStats, budget: usize) -> End {
    let mut got = 0;
    loop {
        match (&c.sock).read(rbuf) {
            Ok(0) => return End::Eof,
            Ok(n) => {
                c.feed(&rbuf[..n], ts, now_ns());
                if c.rx.closed {
                    let ctl = &c.rx.ctl;
                    let code = match ctl.get(..2) {
                        Some(&[a, b]) => u16::from_be_bytes([a, b]) as i32,
                        _ => -1,
                    };
                    return End::Close(code);
                }
                got += n;
                if got >= budget {
                    return End::Open;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return End::Open,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return End::Reset,
            Err(e) => return End::Error(e.to_string()),
        }
    }
}

/// The complete messages of a `Mode::Full` connection, taken out of its inbox.
fn take_messages(c: &mut Conn) -> Vec<Vec<u8>> {
    let bounds = std::mem::take(&mut c.rx.bounds);
    let out = bounds
        .iter()
        .filter_map(|&(x, y)| c.rx.inbox.get(x..y).map(<[u8]>::to_vec))
        .collect();
    if c.walker.at_boundary() && c.rx.cur_fin {
        c.rx.inbox.clear();
    }
    out
}

/// The fields of a worker-protocol message the chaos clients look at.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Msg {
    #[serde(rename = "type")]
    ty: String,
    invocation_id: Option<String>,
    function_id: Option<String>,
    error: Option<serde_json::Value>,
}

fn parse(msg: &[u8]) -> Msg {
    serde_json::from_slice(msg).unwrap_or_default()
}

/// Aborts the connection with an RST: SO_LINGER 0, then close.
fn reset(conn: Conn) {
    let _ = sys::set_linger_zero(conn.fd());
    drop(conn);
}

struct Cx<'a> {
    surl: &'a WsUrl,
    wurl: &'a WsUrl,
    stream: &'a str,
    groups: u32,
    a: &'a ChaosArgs,
    rng: Rng,
    /// run prefix in function ids, so a worker leaked by an earlier run cannot collide
    prefix: u64,
    caller: Conn,
    caller_dead: bool,
    /// invocation id → deadline
    pending: HashMap<String, u64>,
    t: Tally,
    rbuf: Vec<u8>,
    ts: ThreadStats,
}

impl Cx<'_> {
    fn open(&mut self, kind: Kind, serial: u64) -> Result<Client, String> {
        let now = now_ns();
        if kind == Kind::Kill {
            let (sock, rest) = ws::connect(self.wurl, self.rng.bytes16(), HANDSHAKE_TIMEOUT)
                .map_err(|e| format!("killed worker: connect: {e}"))?;
            let mut conn = Conn::new(sock, rest, Mode::Full, self.rng.mask(), Role::Idle);
            let function = format!("chaos::victim-{:06x}-{serial}", self.prefix);
            conn.send_text(
                serde_json::json!({"type": "registerfunction", "id": function,
                    "description": "ringcast-loadtest chaos: killed before it answers"})
                .to_string()
                .as_bytes(),
            );
            // the engine applies one connection's messages in order: once this call is
            // answered, the registration above is in place and calls to the function reach us
            let id = self.rng.uuid_v4();
            conn.send_text(
                serde_json::json!({"type": "invokefunction", "invocation_id": id,
                    "function_id": "engine::workers::list", "data": {"search": function}})
                .to_string()
                .as_bytes(),
            );
            conn.write_queued_blocking()?;
            conn.sock.set_nonblocking(true).map_err(|e| e.to_string())?;
            let initial = std::mem::take(&mut conn.initial);
            conn.feed(&initial, &mut self.ts, now);
            return Ok(Client {
                kind,
                conn,
                phase: Phase::Barrier {
                    id,
                    deadline: now + BARRIER_TIMEOUT,
                },
                life: 0,
                function,
            });
        }
        let (sock, rest) = ws::connect(self.surl, self.rng.bytes16(), HANDSHAKE_TIMEOUT)
            .map_err(|e| format!("{kind:?} subscriber: connect: {e}"))?;
        if kind == Kind::Stall {
            sys::set_rcvbuf(std::os::fd::AsRawFd::as_raw_fd(&sock), STALL_RCVBUF)
                .map_err(|e| e.to_string())?;
        }
        let mode = Mode::Count {
            sample_every: u32::MAX,
            latency: false,
            first: Some(b"\"sync\""),
        };
        let mut conn = Conn::new(sock, rest, mode, self.rng.mask(), Role::Sub);
        let group = format!("g{}", self.rng.next_u64() % self.groups as u64);
        conn.send_text(join_message(&mut self.rng, self.stream, &group).as_bytes());
        conn.write_queued_blocking()?;
        conn.sock.set_nonblocking(true).map_err(|e| e.to_string())?;
        let phase = match kind {
            Kind::Stall => Phase::Stalled {
                until: now + (self.a.stall_hold * 1e9) as u64,
            },
            // one in four vanishes right after its join, while the engine builds its snapshot
            _ if self.rng.next_u64().is_multiple_of(4) => {
                self.t.left_before_sync += 1;
                Phase::Live { until: now }
            }
            _ => {
                let initial = std::mem::take(&mut conn.initial);
                conn.feed(&initial, &mut self.ts, now);
                Phase::WaitSync {
                    deadline: now + SYNC_TIMEOUT,
                }
            }
        };
        Ok(Client {
            kind,
            conn,
            phase,
            life: self.rng.next_u64() % MAX_LIFE,
            function: String::new(),
        })
    }

    /// Advances one client; None when it is gone.
    fn step(&mut self, mut c: Client, now: u64) -> Option<Client> {
        match c.phase {
            Phase::WaitSync { deadline } => {
                let end = read_some(&mut c.conn, &mut self.rbuf, &mut self.ts, 1 << 20);
                let _ = c.conn.flush(); // pongs
                if end != End::Open {
                    self.t.error(format!(
                        "{:?} subscriber closed by the engine before its sync frame: {}",
                        c.kind,
                        end.describe()
                    ));
                    return None;
                }
                if c.conn.rx.synced {
                    c.phase = Phase::Live {
                        until: now + c.life,
                    };
                } else if now >= deadline {
                    self.t
                        .error(format!("{:?} subscriber: no sync frame within 5 s", c.kind));
                    reset(c.conn);
                    return None;
                }
                Some(c)
            }
            Phase::Live { until } => {
                let end = read_some(&mut c.conn, &mut self.rbuf, &mut self.ts, 1 << 20);
                let _ = c.conn.flush();
                if end != End::Open {
                    self.t.error(format!(
                        "{:?} subscriber closed by the engine while live: {}",
                        c.kind,
                        end.describe()
                    ));
                    return None;
                }
                if now < until {
                    return Some(c);
                }
                if c.kind == Kind::Fin {
                    self.t.fin += 1;
                    if let Err(e) = c.conn.sock.shutdown(Shutdown::Write) {
                        self.t.error(format!("FIN subscriber: shutdown: {e}"));
                        return None;
                    }
                    c.phase = Phase::FinWait {
                        deadline: now + FIN_WAIT,
                    };
                    Some(c)
                } else {
                    self.t.rst += 1;
                    reset(c.conn);
                    None
                }
            }
            Phase::FinWait { deadline } => {
                let end = read_some(&mut c.conn, &mut self.rbuf, &mut self.ts, 1 << 20);
                if end != End::Open {
                    self.t.fin_engine_closed += 1;
                    return None;
                }
                if now >= deadline {
                    // drained just above: the close sends no RST for unread data
                    return None;
                }
                Some(c)
            }
            Phase::Stalled { until } => {
                if now < until {
                    return Some(c);
                }
                self.t.stall += 1;
                let initial = std::mem::take(&mut c.conn.initial);
                c.conn.feed(&initial, &mut self.ts, now);
                c.phase = Phase::StallDrain { deadline: now + STALL_DRAIN_WAIT };
                Some(c)
            }
            Phase::StallDrain { deadline } => {
                match read_some(&mut c.conn, &mut self.rbuf, &mut self.ts, STALL_DRAIN) {
                    End::Close(code) => *self.t.stall_close_codes.entry(code).or_default() += 1,
                    End::Eof => self.t.stall_eof += 1,
                    End::Reset => self.t.stall_reset += 1,
                    End::Open if now < deadline => return Some(c),
                    End::Open => {
                        self.t.stall_open += 1;
                        reset(c.conn);
                    }
                    End::Error(e) => self.t.error(format!("stalled subscriber: read error: {e}")),
                }
                None
            }
            Phase::Barrier { ref id, deadline } => {
                let end = read_some(&mut c.conn, &mut self.rbuf, &mut self.ts, 1 << 20);
                let _ = c.conn.flush();
                let mut ordered = false;
                for m in take_messages(&mut c.conn).iter().map(|m| parse(m)) {
                    if m.ty == "registrationrejected" {
                        self.t
                            .error(format!("worker {}: registration rejected", c.function));
                        reset(c.conn);
                        return None;
                    }
                    ordered |= m.invocation_id.as_deref() == Some(id.as_str());
                }
                if end != End::Open {
                    self.t.error(format!(
                        "worker closed by the engine before it was called: {}",
                        end.describe()
                    ));
                    return None;
                }
                if ordered {
                    self.call(&c.function, now);
                    c.phase = Phase::Called {
                        deadline: now + VICTIM_WAIT,
                        received: 0,
                    };
                } else if now >= deadline {
                    self.t
                        .error("worker: engine::workers::list unanswered within 5 s".to_string());
                    reset(c.conn);
                    return None;
                }
                Some(c)
            }
            Phase::Called {
                deadline,
                mut received,
            } => {
                let end = read_some(&mut c.conn, &mut self.rbuf, &mut self.ts, 1 << 20);
                for m in take_messages(&mut c.conn).iter().map(|m| parse(m)) {
                    if m.ty == "invokefunction" && m.function_id.as_deref() == Some(&c.function) {
                        received += 1;
                    }
                }
                if end != End::Open {
                    self.t.error(format!(
                        "worker closed by the engine while called: {}",
                        end.describe()
                    ));
                    return None;
                }
                if received >= self.a.kill_calls || now >= deadline {
                    // killed mid-call: it never answers
                    self.t.killed_workers += 1;
                    self.t.kill_invocations_received += received as u64;
                    reset(c.conn);
                    return None;
                }
                c.phase = Phase::Called { deadline, received };
                Some(c)
            }
        }
    }

    /// The caller sends `kill_calls` calls to `function`.
    fn call(&mut self, function: &str, now: u64) {
        let deadline = now + (self.a.call_timeout * 1e9) as u64;
        for i in 0..self.a.kill_calls {
            let id = self.rng.uuid_v4();
            self.caller.send_text(
                serde_json::json!({"type": "invokefunction", "invocation_id": id,
                    "function_id": function, "data": {"i": i}})
                .to_string()
                .as_bytes(),
            );
            self.pending.insert(id, deadline);
            self.t.calls += 1;
        }
        if let Err(e) = self.caller.flush() {
            self.caller_failed(format!("caller: write error: {e}"));
        }
    }

    fn caller_failed(&mut self, why: String) {
        if !self.caller_dead {
            self.caller_dead = true;
            self.t.error(why);
        }
    }

    fn caller_read(&mut self) {
        if self.caller_dead {
            return;
        }
        let end = read_some(&mut self.caller, &mut self.rbuf, &mut self.ts, 4 << 20);
        for m in take_messages(&mut self.caller).iter().map(|m| parse(m)) {
            if m.ty != "invocationresult" {
                continue;
            }
            let Some(id) = m.invocation_id else { continue };
            if self.pending.remove(&id).is_none() {
                continue;
            }
            match m.error {
                Some(e) if !e.is_null() => {
                    self.t.calls_answered += 1;
                    let code = e
                        .get("code")
                        .and_then(|c| c.as_str())
                        .unwrap_or("(no code)")
                        .to_string();
                    *self.t.answer_codes.entry(code).or_default() += 1;
                }
                _ => self.t.calls_bad += 1,
            }
        }
        if end != End::Open {
            self.caller_failed(format!("the engine closed the caller: {}", end.describe()));
        }
        if let Err(e) = self.caller.flush() {
            self.caller_failed(format!("caller: write error: {e}"));
        }
    }
}

/// Runs chaos clients from `start_at` until `end_at` (no new client after it), then lets the
/// last ones finish (each phase has its own deadline). Returns the tally and the caller
/// connection, which stays open until the engine's fds have been counted.
#[allow(clippy::too_many_arguments)]
pub fn run(
    surl: &WsUrl,
    wurl: &WsUrl,
    stream: &str,
    groups: u32,
    a: &ChaosArgs,
    pid: u32,
    start_at: u64,
    end_at: u64,
    caller: Conn,
) -> (Tally, Conn) {
    let mut rng = Rng::seeded();
    let prefix = rng.next_u64() & 0xff_ffff;
    let mut cx = Cx {
        surl,
        wurl,
        stream,
        groups: groups.max(1),
        a,
        rng,
        prefix,
        caller,
        caller_dead: false,
        pending: HashMap::new(),
        t: Tally::default(),
        rbuf: vec![0u8; 256 * 1024],
        ts: ThreadStats::new(),
    };
    let initial = std::mem::take(&mut cx.caller.initial);
    cx.caller.feed(&initial, &mut cx.ts, now_ns());
    // the warm-up is a stretch of time, not an event to await
    while now_ns() < start_at {
        let left = start_at.saturating_sub(now_ns());
        std::thread::sleep(Duration::from_nanos(left.min(50_000_000)));
    }
    cx.t.rss_base_kb = sys::proc_snap(pid).map(|s| s.rss_kb);
    cx.t.fds_at_chaos_start = sys::fd_count(pid);
    let mut slots: Vec<Option<Client>> = (0..a.clients.max(1)).map(|_| None).collect();
    let hard_end = end_at
        + SYNC_TIMEOUT
        + ((a.stall_hold.max(0.0) + a.call_timeout.max(0.0)) * 1e9) as u64
        + STALL_DRAIN_WAIT
        + 5 * NS;
    let mut next_rss = 0u64;
    loop {
        let now = now_ns();
        if now >= next_rss {
            if let Some(s) = sys::proc_snap(pid) {
                cx.t.rss_peak_kb = cx.t.rss_peak_kb.max(s.rss_kb);
            }
            next_rss = now + RSS_EVERY;
        }
        cx.caller_read();
        let mut connect_failed = false;
        for slot in slots.iter_mut() {
            if let Some(c) = slot.take() {
                *slot = cx.step(c, now);
            }
            if slot.is_none() && !connect_failed && now < end_at && cx.t.started < a.max {
                let kind = KINDS[(cx.t.started % KINDS.len() as u64) as usize];
                cx.t.started += 1;
                if kind == Kind::Kill && cx.caller_dead {
                    continue;
                }
                match cx.open(kind, cx.t.started) {
                    Ok(c) => *slot = Some(c),
                    Err(e) => {
                        cx.t.error(e);
                        connect_failed = true; // no retry storm: the next one waits a round
                    }
                }
            }
        }
        let mut timed_out = 0;
        cx.pending.retain(|_, d| {
            let keep = now < *d;
            timed_out += u64::from(!keep);
            keep
        });
        cx.t.calls_timed_out += timed_out;
        let idle = slots.iter().all(Option::is_none) && cx.pending.is_empty();
        if (now >= end_at && idle) || now >= hard_end {
            break;
        }
        // wait for something to read: the caller and every client that reads
        let mut fds: Vec<RawFd> = slots
            .iter()
            .flatten()
            .filter(|c| !matches!(c.phase, Phase::Stalled { .. }))
            .map(|c| c.conn.fd())
            .collect();
        if !cx.caller_dead {
            fds.push(cx.caller.fd());
        }
        sys::poll_readable(&fds, 5);
    }
    // only past hard_end can anything be left: count it, and abort it
    for c in slots.iter_mut().filter_map(Option::take) {
        cx.t.error(format!(
            "{:?} chaos client still running at the hard stop",
            c.kind
        ));
        reset(c.conn);
    }
    cx.t.calls_timed_out += cx.pending.len() as u64;
    (cx.t, cx.caller)
}

/// Polls the engine's fd count until it is within `tol` of `base` or `settle_s` has passed.
/// Returns the last count (None if /proc could not be read) and the seconds it took.
pub fn settle_fds(pid: u32, base: u64, tol: u64, settle_s: f64) -> (Option<u64>, f64) {
    let t0 = now_ns();
    let deadline = t0 + (settle_s.max(0.0) * 1e9) as u64;
    loop {
        let n = sys::fd_count(pid);
        let done = n.is_some_and(|n| n.abs_diff(base) <= tol);
        if done || n.is_none() || now_ns() >= deadline {
            return (n, (now_ns() - t0) as f64 / 1e9);
        }
        // polling the engine's state with a deadline: there is no event to await
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The engine's numbers at the end of the run.
pub struct EngineEnd {
    pub fds_base: Option<u64>,
    pub fds_end: Option<u64>,
    pub settle_s: f64,
    pub rss_end_kb: Option<u64>,
}

/// Adds the chaos rows to the report; returns the failed checks.
pub fn report(r: &mut Report, a: &ChaosArgs, t: &Tally, e: &EngineEnd) -> Vec<String> {
    let mut failed = Vec::new();
    r.int("chaos_clients", t.started);
    r.int("chaos_fin", t.fin);
    r.int("chaos_fin_engine_closed", t.fin_engine_closed);
    r.int("chaos_rst", t.rst);
    r.int("chaos_left_before_sync", t.left_before_sync);
    r.int("chaos_stalled", t.stall);
    let codes: String = t
        .stall_close_codes
        .iter()
        .map(|(c, n)| format!("{c}×{n} "))
        .collect();
    r.add(
        "chaos_stalled_closed_by_code",
        serde_json::json!(t.stall_close_codes),
        if codes.is_empty() {
            "none".into()
        } else {
            codes.trim_end().to_string()
        },
    );
    r.int("chaos_stalled_eof", t.stall_eof);
    r.int("chaos_stalled_reset", t.stall_reset);
    r.int("chaos_stalled_still_open", t.stall_open);
    r.int("chaos_killed_workers", t.killed_workers);
    r.int(
        "chaos_kill_invocations_received",
        t.kill_invocations_received,
    );
    r.int("chaos_kill_calls", t.calls);
    r.int("chaos_kill_calls_answered", t.calls_answered);
    let codes: String = t
        .answer_codes
        .iter()
        .map(|(c, n)| format!("{c}×{n} "))
        .collect();
    r.add(
        "chaos_kill_answer_codes",
        serde_json::json!(t.answer_codes),
        if codes.is_empty() {
            "none".into()
        } else {
            codes.trim_end().to_string()
        },
    );
    r.int("chaos_kill_calls_ok", t.calls_bad);
    r.int("chaos_kill_calls_timed_out", t.calls_timed_out);
    r.int("chaos_errors", t.errors);
    if !t.first_errors.is_empty() {
        r.add(
            "chaos_first_errors",
            t.first_errors.clone(),
            t.first_errors.join("\n      "),
        );
    }
    let mib = |kb: u64| kb as f64 / 1024.0;
    let opt = |v: Option<u64>| v.map_or("unreadable".to_string(), |v| v.to_string());
    r.add(
        "engine_fds",
        serde_json::json!({"baseline": e.fds_base, "chaos_start": t.fds_at_chaos_start,
            "end": e.fds_end, "tolerance": a.fd_tolerance, "settle_s": e.settle_s}),
        format!(
            "{} → {} (tolerance ±{}; {} at chaos start; waited {:.1} s)",
            opt(e.fds_base),
            opt(e.fds_end),
            a.fd_tolerance,
            opt(t.fds_at_chaos_start),
            e.settle_s
        ),
    );
    let (rb, re) = (t.rss_base_kb, e.rss_end_kb);
    r.add(
        "engine_rss_mib",
        serde_json::json!({"baseline": rb.map(mib), "peak": mib(t.rss_peak_kb),
            "end": re.map(mib), "slack": a.rss_slack_mib}),
        match (rb, re) {
            (Some(b), Some(x)) => format!(
                "{:.1} → {:.1} MiB (peak {:.1}; bound baseline + {} MiB)",
                mib(b),
                mib(x),
                mib(t.rss_peak_kb),
                a.rss_slack_mib
            ),
            _ => "unreadable".into(),
        },
    );

    for (kind, n) in [
        ("FIN", t.fin),
        ("RST", t.rst),
        ("stalled", t.stall),
        ("killed-worker", t.killed_workers),
    ] {
        if n == 0 {
            failed.push(format!("no {kind} chaos client completed"));
        }
    }
    match (e.fds_base, e.fds_end) {
        (Some(b), Some(x)) if x.abs_diff(b) <= a.fd_tolerance => {}
        (Some(b), Some(x)) => failed.push(format!(
            "engine fds {b} → {x} after {:.1} s (more than ±{} from the baseline)",
            e.settle_s, a.fd_tolerance
        )),
        _ => failed.push("the engine's fd count could not be read".into()),
    }
    match (rb, re) {
        (Some(b), Some(x)) if x <= b + a.rss_slack_mib * 1024 => {}
        (Some(b), Some(x)) => failed.push(format!(
            "engine RSS {:.1} → {:.1} MiB (more than baseline + {} MiB)",
            mib(b),
            mib(x),
            a.rss_slack_mib
        )),
        _ => failed.push("the engine's RSS could not be read".into()),
    }
    if t.calls_timed_out > 0 {
        failed.push(format!(
            "{} of {} calls to killed workers unanswered after {} s",
            t.calls_timed_out, t.calls, a.call_timeout
        ));
    }
    if t.calls_bad > 0 {
        failed.push(format!(
            "{} calls to killed workers answered with a success result",
            t.calls_bad
        ));
    }
    if a.stall_must_close && t.stall_open > 0 {
        failed.push(format!(
            "{} of {} stalled subscribers still open after {} s",
            t.stall_open, t.stall, a.stall_hold
        ));
    }
    if t.errors > 0 {
        failed.push(format!(
            "{} chaos clients could not do their part",
            t.errors
        ));
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ChaosArgs {
        ChaosArgs {
            clients: 4,
            max: 10,
            warmup: 0.0,
            stall_hold: 1.0,
            stall_must_close: false,
            kill_calls: 2,
            call_timeout: 1.0,
            fd_tolerance: 2,
            rss_slack_mib: 64,
            settle: 1.0,
        }
    }

    fn clean() -> (Tally, EngineEnd) {
        let t = Tally {
            fin: 1,
            rst: 1,
            stall: 1,
            killed_workers: 1,
            calls: 2,
            calls_answered: 2,
            rss_base_kb: Some(10_000),
            ..Tally::default()
        };
        let e = EngineEnd {
            fds_base: Some(20),
            fds_end: Some(21),
            settle_s: 0.1,
            rss_end_kb: Some(10_000 + 64 * 1024),
        };
        (t, e)
    }

    #[test]
    fn checks() {
        let a = args();
        let (t, e) = clean();
        assert_eq!(
            report(&mut Report::new("t"), &a, &t, &e),
            Vec::<String>::new()
        );

        let leak = EngineEnd {
            fds_end: Some(23),
            ..clean().1
        };
        let f = report(&mut Report::new("t"), &a, &t, &leak);
        assert!(f.len() == 1 && f[0].contains("engine fds 20 → 23"), "{f:?}");

        let grown = EngineEnd {
            rss_end_kb: Some(10_000 + 64 * 1024 + 1),
            ..clean().1
        };
        assert_eq!(report(&mut Report::new("t"), &a, &t, &grown).len(), 1);

        let hung = Tally {
            calls_timed_out: 1,
            calls_answered: 1,
            ..clean().0
        };
        assert_eq!(report(&mut Report::new("t"), &a, &hung, &e).len(), 1);

        let no_rst = Tally {
            rst: 0,
            ..clean().0
        };
        assert_eq!(report(&mut Report::new("t"), &a, &no_rst, &e).len(), 1);

        let open = Tally {
            stall_open: 1,
            ..clean().0
        };
        assert!(report(&mut Report::new("t"), &a, &open, &e).is_empty());
        let strict = ChaosArgs {
            stall_must_close: true,
            ..args()
        };
        assert_eq!(report(&mut Report::new("t"), &strict, &open, &e).len(), 1);
    }

    #[test]
    fn read_end_classification() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mk = |l: &std::net::TcpListener| {
            let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            c.set_nonblocking(true).unwrap();
            let mode = Mode::Count {
                sample_every: u32::MAX,
                latency: false,
                first: None,
            };
            (Conn::new(c, Vec::new(), mode, [0; 4], Role::Sub), s)
        };
        let mut rbuf = vec![0u8; 4096];
        let mut ts = ThreadStats::new();

        let (mut c, s) = mk(&listener);
        assert_eq!(read_some(&mut c, &mut rbuf, &mut ts, 1 << 20), End::Open);
        drop(s);
        // a FIN arrives asynchronously: poll for it with a deadline
        let mut end = End::Open;
        for _ in 0..200 {
            sys::poll_readable(&[c.fd()], 10);
            end = read_some(&mut c, &mut rbuf, &mut ts, 1 << 20);
            if end != End::Open {
                break;
            }
        }
        assert_eq!(end, End::Eof);

        let (mut c, mut s) = mk(&listener);
        let mut f = Vec::new();
        ws::encode_server_frame(&mut f, ws::OP_TEXT, b"x");
        ws::encode_server_frame(&mut f, ws::OP_CLOSE, &4008u16.to_be_bytes());
        s.write_all(&f).unwrap();
        sys::poll_readable(&[c.fd()], 2000);
        assert_eq!(
            read_some(&mut c, &mut rbuf, &mut ts, 1 << 20),
            End::Close(4008)
        );

        let (mut c, s) = mk(&listener);
        sys::set_linger_zero(std::os::fd::AsRawFd::as_raw_fd(&s)).unwrap();
        drop(s);
        sys::poll_readable(&[c.fd()], 2000);
        assert_eq!(read_some(&mut c, &mut rbuf, &mut ts, 1 << 20), End::Reset);
    }
}
