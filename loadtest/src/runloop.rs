//! The per-thread epoll loop over a set of connections.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8};

use crate::caller;
use crate::conn::{Conn, Role, ThreadStats};
use crate::sys::{self, Epoll, EV_ERR, EV_ET, EV_IN, EV_OUT};

#[derive(Default)]
pub struct Shared {
    pub stop: AtomicBool,
    pub phase: AtomicU8,
    pub synced: AtomicU64,
    pub delivered: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    pub inflight: AtomicU64,
    pub closed: AtomicU64,
}

pub struct LoopCfg {
    /// stop once this many connections (all threads) are synced
    pub stop_when_synced: Option<u64>,
    /// stop at this harness time (ns)
    pub deadline_ns: Option<u64>,
}

pub struct LoopOut {
    pub stats: ThreadStats,
    pub conns: Vec<Conn>,
    pub masked_frames: u64,
}

const RBUF: usize = 256 * 1024;

fn flush_stats(ts: &mut ThreadStats, shared: &Shared) {
    if ts.delivered != ts.delivered_flushed {
        shared
            .delivered
            .fetch_add(ts.delivered - ts.delivered_flushed, Relaxed);
        ts.delivered_flushed = ts.delivered;
    }
    if ts.synced != ts.synced_flushed {
        shared
            .synced
            .fetch_add(ts.synced - ts.synced_flushed, Relaxed);
        ts.synced_flushed = ts.synced;
    }
}

/// Runs until `shared.stop` (set by a caller reaching Done, by the main thread, or by `cfg`).
pub fn run_loop(mut conns: Vec<Conn>, shared: &Shared, cfg: LoopCfg) -> LoopOut {
    let mut ts = ThreadStats::new();
    let mut ep = Epoll::new(1024).expect("epoll_create1");
    let mut rbuf = vec![0u8; RBUF];
    let mut scratch = Vec::with_capacity(4096);
    let mut callers = Vec::new();
    for (i, c) in conns.iter_mut().enumerate() {
        c.sock.set_nonblocking(true).expect("set_nonblocking");
        ep.add(c.fd(), i as u64, EV_IN | EV_OUT | EV_ET | EV_ERR)
            .expect("epoll_ctl");
        if matches!(c.role, Role::Caller(_)) {
            callers.push(i);
        }
        if !c.initial.is_empty() {
            let init = std::mem::take(&mut c.initial);
            c.feed(&init, &mut ts, sys::now_ns());
        }
    }
    // messages that came with the handshake response
    for c in conns.iter_mut() {
        handle_messages(c, &mut scratch, shared);
        let _ = c.flush();
    }
    loop {
        let now = sys::now_ns();
        let mut timeout = 20;
        for &i in &callers {
            let c = &mut conns[i];
            let pending = c.pending_out();
            let mask = c.rx.mask;
            if let Role::Caller(cl) = &mut c.role {
                timeout = timeout.min(cl.pump(now, &mut c.rx.out, pending, mask, shared));
            }
            if c.flush().is_err() && !c.dead {
                c.dead = true;
                if let Role::Caller(cl) = &mut c.role {
                    cl.fail("worker connection failed while writing".into(), shared);
                }
            }
        }
        flush_stats(&mut ts, shared);
        if shared.stop.load(Relaxed) {
            break;
        }
        if let Some(target) = cfg.stop_when_synced {
            if shared.synced.load(Relaxed) >= target {
                break;
            }
        }
        if let Some(d) = cfg.deadline_ns {
            if now >= d {
                break;
            }
            timeout = timeout.min(((d - now) / 1_000_000) as i32 + 1);
        }
        let n = ep.wait(timeout);
        for k in 0..n {
            let (tok, ev) = ep.event(k);
            let c = &mut conns[tok as usize];
            if c.dead {
                continue;
            }
            let mut alive = true;
            if ev & (EV_IN | EV_ERR) != 0 {
                alive = c.read_ready(&mut rbuf, &mut ts);
                handle_messages(c, &mut scratch, shared);
            }
            if alive && (ev & EV_OUT != 0 || c.pending_out() > 0) && c.flush().is_err() {
                alive = false;
            }
            if !alive {
                c.dead = true;
                ts.closed += 1;
                shared.closed.fetch_add(1, Relaxed);
                ep.del(c.fd());
                if let Role::Caller(cl) = &mut c.role {
                    if cl.phase != caller::Phase::Done {
                        cl.fail("the engine closed the worker connection".into(), shared);
                    }
                }
            }
        }
    }
    flush_stats(&mut ts, shared);
    let masked_frames = conns.iter().map(|c| c.walker.masked_frames).sum();
    LoopOut {
        stats: ts,
        conns,
        masked_frames,
    }
}

fn handle_messages(c: &mut Conn, scratch: &mut Vec<u8>, shared: &Shared) {
    if c.rx.bounds.is_empty() {
        return;
    }
    let now = sys::now_ns();
    let mask = c.rx.mask;
    let bounds = std::mem::take(&mut c.rx.bounds);
    match &mut c.role {
        Role::Caller(cl) => {
            for &(a, b) in &bounds {
                cl.on_message(&c.rx.inbox[a..b], now, shared);
            }
        }
        Role::Echo => {
            for &(a, b) in &bounds {
                caller::echo_reply(&c.rx.inbox[a..b], &mut c.rx.out, mask, scratch);
            }
        }
        Role::Sub | Role::Idle => {}
    }
    let mut bounds = bounds;
    bounds.clear();
    c.rx.bounds = bounds;
    // keep a partially received message (it starts after the last complete one)
    if c.walker.at_boundary() && c.rx.cur_fin {
        c.rx.inbox.clear();
    }
}
