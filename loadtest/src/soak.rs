//! `soak`: a bounded mixed run. One `stream::set` publisher writes per-group sequence numbers
//! while a churning population of group subscribers joins, checks that its live frames continue
//! the sync snapshot without gap, duplicate or reorder, and leaves again.

use std::borrow::Cow;
use std::io::Write as _;

use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::chaos::{self, ChaosArgs};
use crate::conn::{join_message, new_hist, open_worker, Conn, Mode, Role, ThreadStats};
use crate::report::{self, count_error, Progress, Report};
use crate::sys::{self, now_ns, Epoll, Rng, EV_ERR, EV_ET, EV_IN, EV_OUT, NS};
use crate::ws::{self, WsUrl, HANDSHAKE_TIMEOUT};
use crate::Common;

/// A subscriber must get its sync frame within this long after its join.
const SYNC_TIMEOUT: u64 = 5 * NS;
/// A leaving subscriber waits this long for the events the publisher saw acknowledged.
const LINGER_TIMEOUT: u64 = 2 * NS;
/// After `--duration`: time for in-flight sets to be answered.
const DRAIN_TIMEOUT: u64 = 2 * NS;
/// Hard stop after `--duration`, whatever is still open.
const HARD_STOP: u64 = 10 * NS;
/// How many violations are described in the report.
const DESCRIBE: usize = 8;
const PUB_TOKEN: u64 = u64::MAX;
/// invocation ids carry (group << GROUP_SHIFT) | n
const GROUP_SHIFT: u32 = 28;

pub struct SoakArgs {
    pub subs: usize,
    pub groups: u32,
    pub rate: f64,
    pub items: u32,
    pub stream: String,
    pub min_life: f64,
    pub max_life: f64,
    /// leave by closing the TCP socket without a WebSocket close frame
    pub abrupt: bool,
    /// misbehaving clients beside the checked ones (`--chaos`)
    pub chaos: Option<ChaosArgs>,
}

// ---------------------------------------------------------------------------------------------
// the per-subscriber sequence checker

#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub struct Violations {
    /// live frames whose seq skipped ahead (one per jump)
    pub gaps: u64,
    /// sequence numbers never delivered (in gaps, and missing at leave time)
    pub missing: u64,
    /// live frames whose seq was already delivered live
    pub duplicates: u64,
    /// live frames that arrived after a later seq (filling an earlier gap)
    pub out_of_order: u64,
    /// live frames with seq ≤ the snapshot's max seq
    pub in_snapshot: u64,
    /// data frames before the sync frame
    pub live_before_sync: u64,
    /// sync snapshot that is not exactly the latest value of every item up to its max seq
    pub bad_snapshot: u64,
    /// sync snapshot older than a set acknowledged before the join was sent
    pub stale_snapshot: u64,
    /// subscribers that left without the events acknowledged to the publisher before leaving
    pub tail_missing: u64,
    /// subscribers without a sync frame within 5 s
    pub no_sync: u64,
    /// frames that are not the expected shape (unparsable, wrong group, delete, second sync, …)
    pub bad_frames: u64,
    /// subscriber sockets closed by the server
    pub dropped: u64,
}

impl Violations {
    pub fn total(&self) -> u64 {
        self.gaps
            + self.duplicates
            + self.out_of_order
            + self.in_snapshot
            + self.live_before_sync
            + self.bad_snapshot
            + self.stale_snapshot
            + self.tail_missing
            + self.no_sync
            + self.bad_frames
            + self.dropped
    }
    fn merge(&mut self, o: &Violations) {
        self.gaps += o.gaps;
        self.missing += o.missing;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.in_snapshot += o.in_snapshot;
        self.live_before_sync += o.live_before_sync;
        self.bad_snapshot += o.bad_snapshot;
        self.stale_snapshot += o.stale_snapshot;
        self.tail_missing += o.tail_missing;
        self.no_sync += o.no_sync;
        self.bad_frames += o.bad_frames;
        self.dropped += o.dropped;
    }
}

/// Checks one subscriber's frames of its group: snapshot, then live seqs max+1, max+2, …
#[derive(Default)]
pub struct SeqCheck {
    /// max seq in the sync snapshot (-1 = empty); None before the sync frame
    pub snap_max: Option<i64>,
    /// highest seq delivered (snapshot max, then live)
    pub last: i64,
    /// inclusive ranges skipped by gaps (a later arrival inside one is out of order)
    missing: Vec<(i64, i64)>,
    pub frames: u64,
    pub v: Violations,
    /// descriptions of the first violations, with their kind
    pub notes: Vec<(&'static str, String)>,
}

impl SeqCheck {
    fn note(&mut self, kind: &'static str, s: String) {
        if self.notes.len() < DESCRIBE {
            self.notes.push((kind, s));
        }
    }

    /// The sync frame's item seqs. `items`: distinct item ids per group; `acked_floor`: highest
    /// seq of the group acknowledged to the publisher before the join was sent (-1 = none).
    pub fn on_sync(&mut self, seqs: &[i64], items: u32, acked_floor: i64) {
        if self.snap_max.is_some() {
            self.v.bad_frames += 1;
            self.note("bad_frames", "second sync frame".into());
            return;
        }
        let max = seqs.iter().copied().max().unwrap_or(-1);
        self.snap_max = Some(max);
        self.last = max;
        // every set is acknowledged before the next one of its group is sent, and item ids
        // cycle, so a consistent snapshot holds exactly the last min(max+1, items) seqs
        let k = (max + 1).min(items as i64).max(0);
        let mut sorted = seqs.to_vec();
        sorted.sort_unstable();
        let want: Vec<i64> = (max + 1 - k..=max).collect();
        if sorted != want {
            self.v.bad_snapshot += 1;
            self.note(
                "bad_snapshot",
                format!(
                    "snapshot seqs {sorted:?} are not the latest value of each item up to {max}"
                ),
            );
        }
        if max < acked_floor {
            self.v.stale_snapshot += 1;
            self.note(
                "stale_snapshot",
                format!(
                    "snapshot max seq {max} < {acked_floor}, acknowledged before the join was sent"
                ),
            );
        }
    }

    /// One live create/update frame's seq.
    pub fn on_live(&mut self, seq: i64) {
        self.frames += 1;
        let Some(snap) = self.snap_max else {
            self.v.live_before_sync += 1;
            self.note(
                "live_before_sync",
                format!("live seq {seq} before the sync frame"),
            );
            return;
        };
        if seq <= snap {
            self.v.in_snapshot += 1;
            let what = if self.last == snap {
                "first live frame"
            } else {
                "live frame"
            };
            self.note(
                "in_snapshot",
                format!("{what} seq {seq} ≤ snapshot max {snap} (already in the snapshot)"),
            );
        } else if seq == self.last + 1 {
            self.last = seq;
        } else if seq > self.last + 1 {
            self.v.gaps += 1;
            self.v.missing += (seq - self.last - 1) as u64;
            self.note(
                "gaps",
                format!(
                    "gap: expected seq {} got {seq} (snapshot max {snap}; {} missing)",
                    self.last + 1,
                    seq - self.last - 1
                ),
            );
            self.missing.push((self.last + 1, seq - 1));
            self.last = seq;
        } else if let Some(i) = self.missing.iter().position(|&(a, b)| a <= seq && seq <= b) {
            self.v.out_of_order += 1;
            self.v.missing -= 1;
            let last = self.last;
            self.note(
                "out_of_order",
                format!("out of order: seq {seq} after {last} (snapshot max {snap})"),
            );
            let (a, b) = self.missing[i];
            self.missing.remove(i);
            if a < seq {
                self.missing.push((a, seq - 1));
            }
            if seq < b {
                self.missing.push((seq + 1, b));
            }
        } else {
            self.v.duplicates += 1;
            let last = self.last;
            self.note(
                "duplicates",
                format!("duplicate: seq {seq} again after {last} (snapshot max {snap})"),
            );
        }
    }

    /// Leaving: everything up to `target` (acknowledged before the leave) must have arrived.
    pub fn on_leave(&mut self, target: i64) {
        if self.snap_max.is_some() && self.last < target {
            self.v.tail_missing += 1;
            self.v.missing += (target - self.last) as u64;
            let last = self.last;
            self.note(
                "tail_missing",
                format!(
                    "left after {}s of waiting with seq {last}, but {target} was acknowledged",
                    LINGER_TIMEOUT / NS
                ),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// frames

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "groupId", default, borrow)]
    group_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    event: Option<Event<'a>>,
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Val {
    seq: i64,
}

enum Parsed {
    Sync(Vec<i64>),
    Live(i64),
    Bad(String),
}

/// Longest frame or error text quoted in a violation or error.
const QUOTE: usize = 200;

fn snippet(b: &[u8]) -> String {
    report::snippet(b, QUOTE)
}

fn parse_frame(msg: &[u8], group: &str) -> Parsed {
    let Ok(f) = serde_json::from_slice::<Frame>(msg) else {
        return Parsed::Bad(format!("unparsable frame {}", snippet(msg)));
    };
    let Some(ev) = f.event else {
        return Parsed::Bad(format!("frame without event {}", snippet(msg)));
    };
    if f.group_id.as_deref() != Some(group) {
        return Parsed::Bad(format!("frame of another group {}", snippet(msg)));
    }
    let data = ev.data.map(|d| d.get()).unwrap_or("null");
    match &*ev.ty {
        "sync" => match serde_json::from_str::<Vec<Val>>(data) {
            Ok(v) => Parsed::Sync(v.into_iter().map(|x| x.seq).collect()),
            Err(_) => Parsed::Bad(format!("sync frame without seqs {}", snippet(msg))),
        },
        "create" | "update" => match serde_json::from_str::<Val>(data) {
            Ok(v) => Parsed::Live(v.seq),
            Err(_) => Parsed::Bad(format!("live frame without seq {}", snippet(msg))),
        },
        _ => Parsed::Bad(format!("unexpected frame {}", snippet(msg))),
    }
}

// ---------------------------------------------------------------------------------------------
// the publisher: one set in flight per group, so the engine applies each group's sets in order

struct Publisher {
    conn: Conn,
    stream_json: String,
    items: u32,
    rate: f64,
    prefix: u32,
    /// next seq to send per group (advances only on a successful ack)
    next: Vec<i64>,
    inflight: Vec<Option<i64>>,
    /// highest acknowledged seq per group
    acked_max: Vec<i64>,
    rr: usize,
    start: u64,
    sent: u64,
    acked: u64,
    errors: u64,
    first_error: Option<String>,
    ack_hist: Histogram<u64>,
    scratch: Vec<u8>,
}

#[derive(Deserialize)]
struct Ack<'a> {
    #[serde(default, borrow)]
    invocation_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
}

impl Publisher {
    fn inflight_count(&self) -> usize {
        self.inflight.iter().filter(|x| x.is_some()).count()
    }

    fn pump(&mut self, now: u64) {
        let groups = self.next.len();
        let mut budget = if self.rate > 0.0 {
            let due = ((now - self.start) as f64 * self.rate / 1e9) as u64 + 1;
            due.saturating_sub(self.sent) as usize
        } else {
            groups
        };
        if self.conn.pending_out() > (8 << 20) {
            budget = 0;
        }
        let mut tried = 0;
        while budget > 0 && tried < groups {
            let g = self.rr;
            self.rr = (self.rr + 1) % groups;
            tried += 1;
            if self.inflight[g].is_some() {
                continue;
            }
            let n = self.next[g];
            self.inflight[g] = Some(n);
            let mut id = [0u8; 36];
            sys::encode_id(
                self.prefix,
                ((g as u64) << GROUP_SHIFT) | n as u64,
                now,
                &mut id,
            );
            let id = std::str::from_utf8(&id).unwrap();
            let s = &mut self.scratch;
            s.clear();
            let _ = write!(
                s,
                r#"{{"type":"invokefunction","invocation_id":"{id}","function_id":"stream::set","data":{{"stream_name":{},"group_id":"g{g}","item_id":"i{}","data":{{"seq":{n}}}}}}}"#,
                self.stream_json,
                n % self.items as i64
            );
            let mask = self.conn.rx.mask;
            ws::encode_client_frame(&mut self.conn.rx.out, ws::OP_TEXT, s, mask);
            self.sent += 1;
            budget -= 1;
        }
    }

    fn on_message(&mut self, msg: &[u8], now: u64) {
        let Ok(a) = serde_json::from_slice::<Ack>(msg) else {
            return;
        };
        let Some(id) = a.invocation_id else { return };
        let Some((prefix, seq, t)) = sys::decode_id(id.as_bytes()) else {
            return;
        };
        if prefix != self.prefix {
            return;
        }
        let g = (seq >> GROUP_SHIFT) as usize;
        let n = (seq & ((1 << GROUP_SHIFT) - 1)) as i64;
        if g >= self.inflight.len() || self.inflight[g] != Some(n) {
            return;
        }
        self.inflight[g] = None;
        let err = a.error.is_some_and(|e| e.get().trim() != "null");
        if err {
            // resent with the same seq; counted, and reported
            count_error(&mut self.errors, &mut self.first_error, msg, QUOTE);
            return;
        }
        self.acked += 1;
        self.acked_max[g] = n;
        self.next[g] = n + 1;
        self.ack_hist
            .saturating_record(now.saturating_sub(t).max(1));
    }
}

// ---------------------------------------------------------------------------------------------
// subscribers

enum SubState {
    WaitSync { deadline: u64 },
    Live { leave_at: u64 },
    Leaving { target: i64, deadline: u64 },
}

struct Sub {
    conn: Conn,
    serial: u64,
    group: usize,
    gname: String,
    /// highest seq of the group acknowledged before the join was sent
    floor: i64,
    state: SubState,
    check: SeqCheck,
}

#[derive(Default)]
struct Totals {
    joins: u64,
    served: u64,
    frames: u64,
    connect_errors: u64,
    abrupt: bool,
    first_connect_error: Option<String>,
    v: Violations,
    /// the first descriptions of each kind of violation
    notes: Vec<(&'static str, String)>,
}

impl Totals {
    fn retire(&mut self, s: Sub, t0: u64) {
        self.frames += s.check.frames;
        self.v.merge(&s.check.v);
        if s.check.snap_max.is_some() {
            self.served += 1;
        }
        for (kind, n) in s.check.notes {
            if self.notes.iter().filter(|x| x.0 == kind).count() < 2
                && self.notes.len() < 4 * DESCRIBE
            {
                self.notes.push((
                    kind,
                    format!(
                        "subscriber #{} (g{}, snapshot max {}, left at {:.2}s): {n}",
                        s.serial,
                        s.group,
                        s.check.snap_max.unwrap_or(i64::MIN),
                        (now_ns() - t0) as f64 / 1e9
                    ),
                ));
            }
        }
        if !self.abrupt {
            s.conn.write_close(1000);
        }
    }
}

fn life_ns(rng: &mut Rng, a: &SoakArgs) -> u64 {
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    ((a.min_life + u * (a.max_life - a.min_life)) * 1e9) as u64
}

struct Ctx<'a> {
    url: &'a WsUrl,
    a: &'a SoakArgs,
    rng: Rng,
    serial: u64,
}

fn open_sub(cx: &mut Ctx, acked_max: &[i64], ep: &Epoll, token: u64) -> Result<Sub, String> {
    let (sock, rest) = ws::connect(cx.url, cx.rng.bytes16(), HANDSHAKE_TIMEOUT)
        .map_err(|e| format!("{}: {e}", cx.url))?;
    let group = (cx.rng.next_u64() % cx.a.groups as u64) as usize;
    let gname = format!("g{group}");
    let mut conn = Conn::new(sock, rest, Mode::Full, cx.rng.mask(), Role::Sub);
    conn.send_text(join_message(&mut cx.rng, &cx.a.stream, &gname).as_bytes());
    // the floor is read before the join leaves: anything acknowledged by now is in the snapshot
    let floor = acked_max[group];
    conn.write_queued_blocking()?;
    conn.sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    ep.add(conn.fd(), token, EV_IN | EV_OUT | EV_ET | EV_ERR)
        .map_err(|e| e.to_string())?;
    cx.serial += 1;
    Ok(Sub {
        conn,
        serial: cx.serial,
        group,
        gname,
        state: SubState::WaitSync {
            deadline: now_ns() + SYNC_TIMEOUT,
        },
        floor,
        check: SeqCheck::default(),
    })
}

/// Reads until the socket is drained (edge-triggered). Returns (alive, why it is not).
fn read_sub(c: &mut Conn, rbuf: &mut [u8], ts: &mut ThreadStats) -> (bool, String) {
    use std::io::{ErrorKind, Read};
    loop {
        match (&c.sock).read(rbuf) {
            Ok(0) => return (false, "EOF without a close frame".into()),
            Ok(n) => {
                c.feed(&rbuf[..n], ts, now_ns());
                if c.rx.closed {
                    let ctl = &c.rx.ctl;
                    let code = if ctl.len() >= 2 {
                        u16::from_be_bytes([ctl[0], ctl[1]]) as i32
                    } else {
                        -1
                    };
                    let reason = String::from_utf8_lossy(ctl.get(2..).unwrap_or(&[])).into_owned();
                    return (false, format!("close frame {code} {reason:?}"));
                }
                if n < rbuf.len() {
                    return (true, String::new());
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return (true, String::new()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (false, format!("read error: {e}")),
        }
    }
}

/// Handles the complete messages in a subscriber's inbox.
fn sub_messages(s: &mut Sub, items: u32, publishing: bool, rng: &mut Rng, a: &SoakArgs) {
    let bounds = std::mem::take(&mut s.conn.rx.bounds);
    let now = now_ns();
    for &(x, y) in &bounds {
        let msg = &s.conn.rx.inbox[x..y];
        match parse_frame(msg, &s.gname) {
            Parsed::Sync(seqs) => {
                s.check.on_sync(&seqs, items, s.floor);
                if matches!(s.state, SubState::WaitSync { .. }) {
                    s.state = if publishing {
                        SubState::Live {
                            leave_at: now + life_ns(rng, a),
                        }
                    } else {
                        SubState::Live { leave_at: now }
                    };
                }
            }
            Parsed::Live(seq) => s.check.on_live(seq),
            Parsed::Bad(why) => {
                s.check.v.bad_frames += 1;
                s.check.note("bad_frames", why);
            }
        }
    }
    let mut bounds = bounds;
    bounds.clear();
    s.conn.rx.bounds = bounds;
    if s.conn.walker.at_boundary() && s.conn.rx.cur_fin {
        s.conn.rx.inbox.clear();
    }
}

// ---------------------------------------------------------------------------------------------
// the run

pub fn run(c: &Common, mut a: SoakArgs) -> Result<(Report, bool), String> {
    let wurl = c.parsed_worker_url()?;
    let surl = c.parsed_stream_url()?;
    if a.subs == 0 || a.groups == 0 || a.items == 0 {
        return Err("--subscribers, --groups and --items must be ≥ 1".into());
    }
    if a.groups as u64 >= 1 << 12 {
        return Err("--groups must be < 4096".into());
    }
    if !(a.min_life >= 0.0 && a.max_life >= a.min_life && a.max_life <= 3600.0) {
        return Err("need 0 ≤ --min-life ≤ --max-life ≤ 3600".into());
    }
    let chaos_args = a.chaos.take();
    let chaos_pid = match (&chaos_args, c.server_pid) {
        (Some(_), None) => return Err("--chaos needs --engine-pid (the engine's fds and RSS are checked)".into()),
        (Some(ch), Some(pid)) => {
            if ch.clients == 0 || !(ch.warmup >= 0.0 && ch.warmup < c.duration) {
                return Err("--chaos-clients must be ≥ 1 and --chaos-warmup in [0, --duration)".into());
            }
            if !(ch.stall_hold > 0.0 && ch.call_timeout > 0.0 && ch.settle >= 0.0)
                || ch.stall_hold > 600.0
                || ch.call_timeout > 600.0
                || ch.settle > 600.0
            {
                return Err("--stall-hold and --call-timeout must be in (0, 600], --settle in [0, 600]".into());
            }
            Some(pid)
        }
        (None, _) => None,
    };
    sys::check_fd_limit(a.subs + 8 + chaos_args.as_ref().map_or(0, |ch| ch.clients))?;
    let mut rng = Rng::seeded();
    let groups = a.groups as usize;
    let mut ep = Epoll::new(1024).map_err(|e| e.to_string())?;
    let mut ts = ThreadStats::new();
    let mut rbuf = vec![0u8; 256 * 1024];
    let mut prog = Progress::new();

    let pconn = open_worker(&wurl, &mut rng, Mode::Full, Role::Idle)?;
    pconn
        .sock
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    ep.add(pconn.fd(), PUB_TOKEN, EV_IN | EV_OUT | EV_ET | EV_ERR)
        .map_err(|e| e.to_string())?;
    let mut p = Publisher {
        conn: pconn,
        stream_json: serde_json::to_string(&a.stream).unwrap(),
        items: a.items,
        rate: a.rate,
        prefix: (rng.next_u64() & 0xff_ffff) as u32,
        next: vec![0; groups],
        inflight: vec![None; groups],
        acked_max: vec![-1; groups],
        rr: 0,
        start: 0,
        sent: 0,
        acked: 0,
        errors: 0,
        first_error: None,
        ack_hist: new_hist(),
        scratch: Vec::with_capacity(512),
    };
    let initial = std::mem::take(&mut p.conn.initial);
    p.conn.feed(&initial, &mut ts, now_ns());

    // chaos: the caller of killed workers is opened now, so that the fd baseline holds exactly
    // the harness's long-lived connections (publisher, caller), as the end count does
    let chaos_caller = match &chaos_args {
        Some(_) => {
            let caller = open_worker(&wurl, &mut rng, Mode::Full, Role::Idle)?;
            caller.sock.set_nonblocking(true).map_err(|e| e.to_string())?;
            Some(caller)
        }
        None => None,
    };
    let fds_base = chaos_pid.and_then(sys::fd_count);

    let mut cx = Ctx {
        url: &surl,
        a: &a,
        rng: Rng::seeded(),
        serial: 0,
    };
    let mut tot = Totals {
        abrupt: a.abrupt,
        ..Totals::default()
    };
    let mut slots: Vec<Option<Sub>> = (0..a.subs).map(|_| None).collect();
    let cpu0 = sys::self_cpu_secs();
    let proc0 = c.server_pid.and_then(sys::proc_snap);
    let t0 = now_ns();
    p.start = t0;
    let pub_end = t0 + (c.duration * 1e9) as u64;
    // the chaos clients run on their own thread, from the end of the warm-up to `pub_end`
    let chaos_thread = match (chaos_args, chaos_caller, chaos_pid) {
        (Some(ch), Some(caller), Some(pid)) => {
            let (surl, wurl, stream, groups) = (surl.clone(), wurl.clone(), a.stream.clone(), a.groups);
            let start_at = t0 + (ch.warmup * 1e9) as u64;
            Some(
                std::thread::Builder::new()
                    .name("chaos".into())
                    .spawn(move || {
                        let (t, caller) =
                            chaos::run(&surl, &wurl, &stream, groups, &ch, pid, start_at, pub_end, caller);
                        (t, caller, ch)
                    })
                    .map_err(|e| format!("chaos thread: {e}"))?,
            )
        }
        _ => None,
    };
    let mut ended_at = 0u64; // when publishing stopped and everyone was told to leave
    let mut abort: Option<String> = None;
    let mut consecutive_connect_errors = 0u32;
    let mut last_tick = t0;
    let mut last_acked = 0u64;

    loop {
        let now = now_ns();
        let publishing = now < pub_end;
        if publishing {
            p.pump(now);
        } else if ended_at == 0 {
            ended_at = now;
            for s in slots.iter_mut().flatten() {
                if let SubState::Live { leave_at } = &mut s.state {
                    *leave_at = now;
                }
            }
        }
        if p.conn.flush().is_err() {
            abort = Some("the worker connection failed while writing".into());
            break;
        }

        // subscriber lifecycle: leave, linger, time out, replace
        for (i, slot) in slots.iter_mut().enumerate() {
            let mut close = false;
            if let Some(s) = slot.as_mut() {
                match s.state {
                    SubState::WaitSync { deadline } if now >= deadline => {
                        s.check.v.no_sync += 1;
                        s.check
                            .note("no_sync", "no sync frame within 5 s of the join".into());
                        close = true;
                    }
                    SubState::Live { leave_at } if now >= leave_at => {
                        let target = p.acked_max[s.group];
                        s.state = SubState::Leaving {
                            target,
                            deadline: now + LINGER_TIMEOUT,
                        };
                    }
                    _ => {}
                }
                if let SubState::Leaving { target, deadline } = s.state {
                    if s.check.last >= target || now >= deadline {
                        s.check.on_leave(target);
                        close = true;
                    }
                }
            }
            if close {
                let s = slot.take().unwrap();
                ep.del(s.conn.fd());
                tot.retire(s, t0);
            }
            if slot.is_none() && publishing {
                match open_sub(&mut cx, &p.acked_max, &ep, i as u64) {
                    Ok(s) => {
                        tot.joins += 1;
                        consecutive_connect_errors = 0;
                        *slot = Some(s);
                    }
                    Err(e) => {
                        tot.connect_errors += 1;
                        consecutive_connect_errors += 1;
                        if tot.first_connect_error.is_none() {
                            tot.first_connect_error = Some(e.clone());
                        }
                        if consecutive_connect_errors >= 50 {
                            abort = Some(format!("50 subscriber connects failed in a row: {e}"));
                        }
                        break;
                    }
                }
            }
        }
        if abort.is_some() {
            break;
        }

        if !publishing {
            let drained = p.inflight_count() == 0 || now >= ended_at + DRAIN_TIMEOUT;
            if (drained && slots.iter().all(|s| s.is_none())) || now >= pub_end + HARD_STOP {
                break;
            }
        }

        if now - last_tick >= NS {
            let dt = (now - last_tick) as f64 / 1e9;
            let live = slots.iter().flatten().count();
            let frames: u64 =
                tot.frames + slots.iter().flatten().map(|s| s.check.frames).sum::<u64>();
            let viol: u64 = tot.v.total()
                + slots
                    .iter()
                    .flatten()
                    .map(|s| s.check.v.total())
                    .sum::<u64>();
            prog.line(&format!(
                "[soak] {:>5.1}s {}  subs {live}  joins {}  frames {frames}  acked {} ({:.0}/s)  violations {viol}",
                (now - t0) as f64 / 1e9,
                if publishing { "publish" } else { "drain" },
                tot.joins,
                p.acked,
                (p.acked - last_acked) as f64 / dt
            ));
            last_tick = now;
            last_acked = p.acked;
        }

        let timeout = if publishing { 1 } else { 5 };
        let n = ep.wait(timeout);
        for k in 0..n {
            let (tok, ev) = ep.event(k);
            if tok == PUB_TOKEN {
                if ev & (EV_IN | EV_ERR) != 0 {
                    let alive = p.conn.read_ready(&mut rbuf, &mut ts);
                    let bounds = std::mem::take(&mut p.conn.rx.bounds);
                    let now = now_ns();
                    for &(x, y) in &bounds {
                        let msg = p.conn.rx.inbox[x..y].to_vec();
                        p.on_message(&msg, now);
                    }
                    if p.conn.walker.at_boundary() && p.conn.rx.cur_fin {
                        p.conn.rx.inbox.clear();
                    }
                    if !alive {
                        abort = Some("the engine closed the worker connection".into());
                    }
                }
                continue;
            }
            let Some(s) = slots.get_mut(tok as usize).and_then(|s| s.as_mut()) else {
                continue;
            };
            let mut alive = true;
            let mut why = String::new();
            if ev & (EV_IN | EV_ERR) != 0 {
                (alive, why) = read_sub(&mut s.conn, &mut rbuf, &mut ts);
                if !s.conn.rx.bounds.is_empty() {
                    sub_messages(s, a.items, now_ns() < pub_end, &mut cx.rng, &a);
                }
            }
            if alive && s.conn.pending_out() > 0 {
                if let Err(e) = s.conn.flush() {
                    alive = false;
                    why = format!("write error: {e}");
                }
            }
            if !alive {
                s.check.v.dropped += 1;
                let state = match s.state {
                    SubState::WaitSync { .. } => "waiting for sync",
                    SubState::Live { .. } => "live",
                    SubState::Leaving { .. } => "leaving",
                };
                s.check.note(
                    "dropped",
                    format!(
                    "the server closed the subscriber socket while {state} ({why}; last seq {})",
                    s.check.last
                ),
                );
                ep.del(s.conn.fd());
                let s = slots[tok as usize].take().unwrap();
                tot.retire(s, t0);
            }
        }
        if abort.is_some() {
            break;
        }
    }
    prog.done();
    let t1 = now_ns();
    for slot in slots.iter_mut() {
        if let Some(s) = slot.take() {
            ep.del(s.conn.fd());
            tot.retire(s, t0);
        }
    }
    if let Some(why) = abort {
        return Err(format!("soak aborted: {why}"));
    }
    // chaos: every chaos client is gone when the thread ends; then the engine's fds must come
    // back to the baseline (polled, bounded) and its RSS stay within its bound
    let chaos_end = match chaos_thread {
        Some(h) => {
            let (t, caller, ch) = h.join().map_err(|_| "the chaos thread panicked".to_string())?;
            let pid = chaos_pid.unwrap_or_default();
            let (fds_end, settle_s) = match fds_base {
                Some(b) => chaos::settle_fds(pid, b, ch.fd_tolerance, ch.settle),
                None => (None, 0.0),
            };
            let end = chaos::EngineEnd {
                fds_base,
                fds_end,
                settle_s,
                rss_end_kb: sys::proc_snap(pid).map(|s| s.rss_kb),
            };
            drop(caller); // counted in both the baseline and the end
            Some((t, ch, end))
        }
        None => None,
    };
    let cpu1 = sys::self_cpu_secs();
    let proc1 = c.server_pid.and_then(sys::proc_snap);
    let pub_secs = (ended_at.max(t0) - t0) as f64 / 1e9;
    let window = (t1 - t0) as f64 / 1e9;

    let v = &tot.v;
    let mut r = Report::new("soak");
    r.add("stream", a.stream.as_str(), a.stream.as_str());
    r.int("groups", a.groups as u64);
    r.int("items", a.items as u64);
    r.int("subscriber_slots", a.subs as u64);
    let leave = if a.abrupt {
        "TCP close, no close frame"
    } else {
        "close frame 1000, then TCP close"
    };
    r.add("leave", leave, leave);
    r.num(
        "rate_target",
        a.rate,
        0,
        "sets/s (0 = unbounded; 1 in flight per group)",
    );
    r.num("publish_s", pub_secs, 2, "s");
    r.num("run_s", window, 2, "s");
    r.int("sets_sent", p.sent);
    r.int("sets_acked", p.acked);
    r.int("set_errors", p.errors);
    r.rate("sets_per_s", p.acked as f64, pub_secs, 0, "sets/s");
    r.latency("set_ack_latency", &p.ack_hist);
    r.int("joins", tot.joins);
    r.int("subscribers_served", tot.served);
    r.int("connect_errors", tot.connect_errors);
    r.int("frames_checked", tot.frames);
    r.rate("frames_per_s", tot.frames as f64, window, 0, "frames/s");
    r.int("violations", v.total());
    r.int("gaps", v.gaps);
    r.int("missing_seqs", v.missing);
    r.int("duplicates", v.duplicates);
    r.int("out_of_order", v.out_of_order);
    r.int("live_in_snapshot", v.in_snapshot);
    r.int("live_before_sync", v.live_before_sync);
    r.int("bad_snapshots", v.bad_snapshot);
    r.int("stale_snapshots", v.stale_snapshot);
    r.int("tail_missing", v.tail_missing);
    r.int("no_sync", v.no_sync);
    r.int("bad_frames", v.bad_frames);
    r.int("dropped_by_server", v.dropped);
    r.num("harness_cpu_s", cpu1 - cpu0, 2, "s");
    r.server_rows(proc0, proc1, window, None);
    if let Some(e) = &p.first_error {
        r.add("first_set_error", e.clone(), e.clone());
    }
    if let Some(e) = &tot.first_connect_error {
        r.add("first_connect_error", e.clone(), e.clone());
    }
    if !tot.notes.is_empty() {
        let notes: Vec<String> = tot.notes.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        r.add("first_violations", notes.clone(), notes.join("\n      "));
    }
    if p.conn.walker.masked_frames > 0 {
        r.note("the server masked frames on the worker connection (servers must not mask)");
    }
    let mut ok = v.total() == 0;
    if p.acked == 0 || tot.served == 0 {
        r.note("nothing was checked: no acknowledged set or no subscriber got its sync frame");
        ok = false;
    }
    if let Some((t, ch, end)) = &chaos_end {
        let failed = chaos::report(&mut r, ch, t, end);
        if !failed.is_empty() {
            ok = false;
            r.add("failed_checks", failed.clone(), failed.join("\n      "));
        }
    }
    let res = if ok { "pass" } else { "FAIL" };
    r.add("result", res, res);
    Ok((r, ok))
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn synced(seqs: &[i64]) -> SeqCheck {
        let mut c = SeqCheck::default();
        c.on_sync(seqs, 4, -1);
        c
    }

    #[test]
    fn in_order_is_clean() {
        let mut c = synced(&[]);
        assert_eq!(c.snap_max, Some(-1));
        for s in 0..10 {
            c.on_live(s);
        }
        c.on_leave(9);
        assert_eq!(c.v, Violations::default());
        assert_eq!(c.frames, 10);
        let mut c = synced(&[7, 4, 6, 5]);
        c.on_live(8);
        c.on_live(9);
        assert_eq!(c.v.total(), 0);
        assert_eq!(c.last, 9);
    }

    #[test]
    fn gap() {
        let mut c = synced(&[4, 5, 2, 3]);
        c.on_live(6);
        c.on_live(9);
        c.on_live(10);
        assert_eq!(c.v.gaps, 1);
        assert_eq!(c.v.missing, 2);
        assert_eq!(c.v.total(), 1);
        // the first live frame must be max+1
        let mut c = synced(&[4, 5, 2, 3]);
        c.on_live(7);
        assert_eq!((c.v.gaps, c.v.missing), (1, 1));
    }

    #[test]
    fn duplicate() {
        let mut c = synced(&[0, 1]);
        c.on_live(2);
        c.on_live(3);
        c.on_live(3);
        c.on_live(2);
        c.on_live(4);
        assert_eq!(c.v.duplicates, 2);
        assert_eq!(c.v.total(), 2);
        assert_eq!(c.last, 4);
    }

    #[test]
    fn reorder() {
        let mut c = synced(&[]);
        c.on_live(0);
        c.on_live(2);
        c.on_live(1);
        c.on_live(3);
        assert_eq!(c.v.gaps, 1);
        assert_eq!(c.v.out_of_order, 1);
        assert_eq!(c.v.missing, 0);
        assert_eq!(c.v.duplicates, 0);
        // a second arrival of the reordered seq is a duplicate
        c.on_live(1);
        assert_eq!(c.v.duplicates, 1);
        // out of order within a longer gap
        let mut c = synced(&[]);
        c.on_live(0);
        c.on_live(5);
        c.on_live(3);
        c.on_live(2);
        c.on_live(3);
        assert_eq!((c.v.gaps, c.v.out_of_order, c.v.duplicates), (1, 2, 1));
        assert_eq!(c.v.missing, 2);
    }

    #[test]
    fn first_live_frame_rule() {
        // a live frame already in the snapshot
        let mut c = synced(&[10, 11, 12, 13]);
        c.on_live(13);
        c.on_live(14);
        c.on_live(12);
        assert_eq!(c.v.in_snapshot, 2);
        assert_eq!(c.v.total(), 2);
        assert_eq!(c.last, 14);
        // a live frame before the sync frame
        let mut c = SeqCheck::default();
        c.on_live(0);
        assert_eq!(c.v.live_before_sync, 1);
        c.on_sync(&[0], 4, -1);
        c.on_live(1);
        assert_eq!(c.v.total(), 1);
    }

    #[test]
    fn snapshot_checks() {
        // fewer seqs than items, complete
        assert_eq!(synced(&[1, 0, 2]).v.total(), 0);
        // a hole: item of seq 5 holds an older value
        assert_eq!(synced(&[7, 1, 6, 4]).v.bad_snapshot, 1);
        // stale: seq 9 was acknowledged before the join
        let mut c = SeqCheck::default();
        c.on_sync(&[5, 6, 7, 8], 4, 9);
        assert_eq!(c.v.stale_snapshot, 1);
        // a second sync is a bad frame
        let mut c = synced(&[]);
        c.on_sync(&[], 4, -1);
        assert_eq!(c.v.bad_frames, 1);
    }

    #[test]
    fn tail() {
        let mut c = synced(&[0]);
        c.on_live(1);
        c.on_leave(3);
        assert_eq!((c.v.tail_missing, c.v.missing), (1, 2));
        let mut c = synced(&[0]);
        c.on_leave(0);
        assert_eq!(c.v.total(), 0);
    }

    #[test]
    fn frames_parse() {
        let sync = br#"{"type":"stream","timestamp":1,"streamName":"s","groupId":"g1","id":null,"event":{"type":"sync","data":[{"seq":3},{"seq":2}]}}"#;
        assert!(matches!(parse_frame(sync, "g1"), Parsed::Sync(v) if v == vec![3, 2]));
        let live = br#"{"type":"stream","timestamp":1,"streamName":"s","groupId":"g1","id":"i3","event":{"type":"update","data":{"seq":19}}}"#;
        assert!(matches!(parse_frame(live, "g1"), Parsed::Live(19)));
        assert!(matches!(parse_frame(live, "g2"), Parsed::Bad(_)));
        let del = br#"{"type":"stream","timestamp":1,"streamName":"s","groupId":"g1","id":"i3","event":{"type":"delete","data":{"seq":19}}}"#;
        assert!(matches!(parse_frame(del, "g1"), Parsed::Bad(_)));
    }
}
