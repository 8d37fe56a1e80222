//! The per-thread epoll loop over a set of connections, running it on several threads with a
//! progress line, and collecting what the threads hand back.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8};
use std::time::Duration;

use crate::caller::{self, Caller, Phase};
use crate::conn::{Conn, Role, ThreadStats};
use crate::report::Progress;
use crate::sys::{self, now_ns, Epoll, EV_ERR, EV_ET, EV_IN, EV_OUT, NS};

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

/// Runs the loops on `buckets.len()` threads while the calling thread prints progress once a
/// second, labelled `[mode]` ("fanout" adds deliveries). The first loop to stop (its caller done
/// or `deadline` passed) stops the others.
pub fn run_threads(
    buckets: Vec<Vec<Conn>>,
    shared: &Shared,
    deadline: u64,
    mode: &str,
) -> Vec<LoopOut> {
    let mut prog = Progress::new();
    let t0 = now_ns();
    std::thread::scope(|s| {
        let handles: Vec<_> = buckets
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                std::thread::Builder::new()
                    .name(format!("loop-{i}"))
                    .spawn_scoped(s, move || {
                        let out = run_loop(
                            b,
                            shared,
                            LoopCfg {
                                stop_when_synced: None,
                                deadline_ns: Some(deadline),
                            },
                        );
                        // whoever stops first (deadline) stops everyone
                        shared.stop.store(true, Relaxed);
                        out
                    })
                    .expect("spawn")
            })
            .collect();
        let mut last_tick = now_ns();
        let mut last = Tick::default();
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
            let now = now_ns();
            if now - last_tick >= NS {
                let tick = Tick::read(shared);
                prog.line(&progress_line(
                    mode,
                    (now - t0) as f64 / 1e9,
                    &tick,
                    &last,
                    (now - last_tick) as f64 / 1e9,
                ));
                last_tick = now;
                last = tick;
            }
        }
        prog.done();
        handles
            .into_iter()
            .map(|h| h.join().expect("loop thread panicked"))
            .collect()
    })
}

/// The shared counters as one progress tick reads them.
#[derive(Default)]
struct Tick {
    phase: u8,
    synced: u64,
    acked: u64,
    delivered: u64,
    inflight: u64,
    errors: u64,
}

impl Tick {
    fn read(shared: &Shared) -> Tick {
        Tick {
            acked: shared.acked.load(Relaxed),
            delivered: shared.delivered.load(Relaxed),
            phase: shared.phase.load(Relaxed),
            synced: shared.synced.load(Relaxed),
            inflight: shared.inflight.load(Relaxed),
            errors: shared.errors.load(Relaxed),
        }
    }
}

/// One progress line: `elapsed_s` into the run, rates against the tick `dt_s` seconds before.
fn progress_line(mode: &str, elapsed_s: f64, now: &Tick, last: &Tick, dt_s: f64) -> String {
    let fanout = mode == "fanout";
    let mut line = format!("[{mode}] {elapsed_s:>6.1}s {:<9} ", Phase::name(now.phase));
    if fanout && now.phase == Phase::WaitSync as u8 {
        line.push_str(&format!("synced {}", now.synced));
        return line;
    }
    line.push_str(&format!(
        "acked {} ({:.0}/s)  ",
        now.acked,
        (now.acked - last.acked) as f64 / dt_s
    ));
    if fanout {
        line.push_str(&format!(
            "delivered {} ({:.0}/s)  ",
            now.delivered,
            (now.delivered - last.delivered) as f64 / dt_s
        ));
    }
    line.push_str(&format!("inflight {}  errors {}", now.inflight, now.errors));
    line
}

/// Takes the caller (publisher) out of the connections the loops handed back.
pub fn take_caller(outs: &mut [LoopOut]) -> Option<Box<Caller>> {
    for c in outs.iter_mut().flat_map(|o| o.conns.iter_mut()) {
        if let Role::Caller(_) = c.role {
            if let Role::Caller(cl) = std::mem::replace(&mut c.role, Role::Idle) {
                return Some(cl);
            }
        }
    }
    None
}

/// All threads' counters merged, and the number of frames the server masked.
pub fn merged_stats(outs: &[LoopOut]) -> (ThreadStats, u64) {
    let mut st = ThreadStats::new();
    let mut masked = 0;
    for o in outs {
        st.merge(&o.stats);
        masked += o.masked_frames;
    }
    (st, masked)
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
        Role::Consumer(hist) => {
            for &(a, b) in &bounds {
                if let Some(sent) = caller::consume_reply(&c.rx.inbox[a..b], &mut c.rx.out, mask, scratch) {
                    if let Some(t) = sent {
                        hist.saturating_record(now.saturating_sub(t).max(1));
                    }
                    shared.delivered.fetch_add(1, Relaxed);
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_per_mode_and_phase() {
        let last = Tick {
            acked: 100,
            delivered: 1000,
            ..Tick::default()
        };
        let mut now = Tick {
            phase: Phase::WaitSync as u8,
            synced: 7,
            acked: 300,
            delivered: 5000,
            inflight: 3,
            errors: 1,
        };
        assert_eq!(
            progress_line("fanout", 1.04, &now, &last, 2.0),
            "[fanout]    1.0s wait-sync synced 7"
        );
        now.phase = Phase::Publish as u8;
        assert_eq!(
            progress_line("fanout", 12.34, &now, &last, 2.0),
            "[fanout]   12.3s publish   acked 300 (100/s)  delivered 5000 (2000/s)  inflight 3  errors 1"
        );
        now.phase = Phase::Probe as u8;
        assert_eq!(
            progress_line("rpc", 1.0, &now, &last, 2.0),
            "[rpc]    1.0s probe     acked 300 (100/s)  inflight 3  errors 1"
        );
    }

    #[test]
    fn merged_stats_add_up_threads() {
        let out = |delivered, masked_frames| {
            let mut stats = ThreadStats::new();
            stats.delivered = delivered;
            LoopOut {
                stats,
                conns: Vec::new(),
                masked_frames,
            }
        };
        let mut outs = vec![out(3, 1), out(4, 0)];
        let (st, masked) = merged_stats(&outs);
        assert_eq!((st.delivered, masked), (7, 1));
        assert!(take_caller(&mut outs).is_none());
    }
}
