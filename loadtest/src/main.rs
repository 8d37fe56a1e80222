//! ringcast-loadtest: load harness for ringcast (and any iii engine) over the public worker
//! (49134) and stream subscriber (3112) WebSocket protocols.

mod caller;
mod chaos;
mod conn;
mod report;
mod runloop;
mod soak;
mod sys;
mod ws;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use caller::{CallKind, Caller, CallerCfg, Phase};
use conn::{Conn, Mode, Role, ThreadStats};
use report::{Progress, Report};
use runloop::{LoopCfg, LoopOut, Shared};
use sys::{now_ns, Epoll, Rng};
use ws::WsUrl;

const NS: u64 = 1_000_000_000;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// When `connect` reads the engine's RSS after closing its connections.
const AFTER_CLOSE: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(
    name = "ringcast-loadtest",
    version,
    about = "Load harness for ringcast over the public iii WebSocket protocols"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Common {
    /// Worker protocol URL (engine port)
    #[arg(long, global = true, default_value = "ws://127.0.0.1:49134/")]
    worker_url: String,
    /// Stream subscriber URL
    #[arg(long, global = true, default_value = "ws://127.0.0.1:3112/")]
    stream_url: String,
    /// Measurement duration in seconds
    #[arg(long, global = true, default_value_t = 10.0)]
    duration: f64,
    /// Engine process id: report its RSS (VmRSS) and CPU seconds (utime+stime) over the run;
    /// `soak --chaos` also checks its open fds and RSS against their baseline
    #[arg(long, global = true, visible_alias = "engine-pid")]
    server_pid: Option<u32>,
    /// Print exactly one JSON line at the end instead of the table
    #[arg(long, global = true)]
    json: bool,
    /// Harness threads running the socket loops
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Allow non-loopback URLs
    #[arg(long, global = true)]
    allow_remote: bool,
    /// Write the latency distribution as an SVG file (fanout, rpc)
    #[arg(long, global = true)]
    plot: Option<PathBuf>,
    /// Run the harness at idle CPU priority (SCHED_IDLE), so that on a host it shares with the
    /// engine it only uses CPU time the engine leaves. Fan-out latency comes from kernel receive
    /// timestamps, so the harness's own delay does not enter it
    #[arg(long, global = true)]
    idle_priority: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stream fan-out: S subscribers over G groups, one stream::set publisher. Delivery latency
    /// is taken at the subscriber socket: the kernel's receive timestamp of the frame minus
    /// the time its set was sent, so the harness's own delay in reading is not counted
    Fanout {
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[arg(long, default_value_t = 1)]
        groups: u32,
        /// sets per second, 0 = as fast as the in-flight window allows
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value_t = 64)]
        inflight: u64,
        /// approximate size of each set's data object in bytes
        #[arg(long, default_value_t = 256)]
        payload: usize,
        /// time one delivered frame in this many
        #[arg(long, default_value_t = 16)]
        sample_every: u32,
        #[arg(long, default_value = "loadtest")]
        stream: String,
        /// distinct item ids per group (bounds the size of the sync snapshot)
        #[arg(long, default_value_t = 64)]
        items: u32,
        /// deliveries/s measured by `limit` on this machine: report the fraction reached
        #[arg(long)]
        ceiling: Option<f64>,
    },
    /// Worker RPC: worker B registers an echo function, worker A calls it with N in flight
    Rpc {
        #[arg(long, default_value_t = 16)]
        inflight: u64,
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// calls per second, 0 = as fast as the in-flight window allows
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value = "loadtest::echo")]
        function: String,
    },
    /// Open S idle connections, report connections/s and server RSS per connection, close them
    Connect {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// stream: subscriber sockets that join a group; worker: worker-protocol sockets
        #[arg(long, value_enum, default_value_t = Target::Stream)]
        target: Target,
        #[arg(long, default_value_t = 1)]
        groups: u32,
        #[arg(long, default_value = "loadtest")]
        stream: String,
        /// seconds to hold the connections open before measuring RSS and closing
        #[arg(long, default_value_t = 1.0)]
        hold: f64,
    },
    /// Mixed soak: a stream::set publisher over G groups and churning subscribers whose live
    /// frames are checked against their sync snapshot (no gap, duplicate or reorder)
    Soak {
        /// concurrent subscribers (each one leaves after a random lifetime and is replaced)
        #[arg(long, default_value_t = 200)]
        subscribers: usize,
        #[arg(long, default_value_t = 8)]
        groups: u32,
        /// sets per second over all groups, 0 = as fast as one set in flight per group allows
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// distinct item ids per group (the sync snapshot holds up to this many values)
        #[arg(long, default_value_t = 16)]
        items: u32,
        /// stream name (default: soak-<random>, fresh for every run)
        #[arg(long)]
        stream: Option<String>,
        /// shortest subscriber lifetime after its sync frame, seconds
        #[arg(long, default_value_t = 0.2)]
        min_life: f64,
        /// longest subscriber lifetime after its sync frame, seconds
        #[arg(long, default_value_t = 2.0)]
        max_life: f64,
        /// leave by closing the TCP socket without sending a WebSocket close frame first
        #[arg(long)]
        abrupt_leave: bool,
        #[command(flatten)]
        chaos: ChaosFlags,
    },
    /// This machine's delivery ceiling: an in-process bare writer feeding S loopback sockets
    Limit {
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[arg(long, default_value_t = 256)]
        payload: usize,
    },
}

/// `soak --chaos`: misbehaving clients beside the checked subscribers, then the engine's fds
/// and RSS checked against their baseline (needs --engine-pid)
#[derive(Args)]
struct ChaosFlags {
    /// Run misbehaving clients too: subscribers that vanish with FIN or RST (no Close frame),
    /// subscribers that stall (never read), workers killed (RST) with calls pending
    #[arg(long)]
    chaos: bool,
    /// chaos clients alive at once; the kinds take turns
    #[arg(long, default_value_t = 8)]
    chaos_clients: usize,
    /// chaos clients started in all (a bound on count; time is bounded by --duration)
    #[arg(long, default_value_t = 2000)]
    chaos_max: u64,
    /// seconds of plain soak before the first chaos client (RSS baseline read at its end)
    #[arg(long, default_value_t = 1.0)]
    chaos_warmup: f64,
    /// seconds a stalled subscriber holds its socket unread before it is inspected (closed by
    /// the engine with which code, EOF, reset, or still open — then the harness resets it)
    #[arg(long, default_value_t = 2.0)]
    stall_hold: f64,
    /// fail unless the engine closed every stalled subscriber within --stall-hold (use with an
    /// engine whose ping or slow-subscriber timeout is shorter than the hold)
    #[arg(long)]
    stall_must_close: bool,
    /// calls sent to each worker that is then killed before it answers
    #[arg(long, default_value_t = 4)]
    kill_calls: u32,
    /// seconds a call to a killed worker may stay unanswered before it counts as hung
    #[arg(long, default_value_t = 5.0)]
    call_timeout: f64,
    /// the engine's fd count at the end may differ from its baseline by this many
    #[arg(long, default_value_t = 2)]
    fd_tolerance: u64,
    /// the engine's RSS at the end may exceed its baseline by this many MiB
    #[arg(long, default_value_t = 64)]
    rss_slack_mib: u64,
    /// seconds to wait, polling, for the engine's fds to come back after the last chaos client
    #[arg(long, default_value_t = 5.0)]
    settle: f64,
}

impl ChaosFlags {
    fn args(&self) -> Option<chaos::ChaosArgs> {
        self.chaos.then(|| chaos::ChaosArgs {
            clients: self.chaos_clients,
            max: self.chaos_max,
            warmup: self.chaos_warmup,
            stall_hold: self.stall_hold,
            stall_must_close: self.stall_must_close,
            kill_calls: self.kill_calls.max(1),
            call_timeout: self.call_timeout,
            fd_tolerance: self.fd_tolerance,
            rss_slack_mib: self.rss_slack_mib,
            settle: self.settle,
        })
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Target {
    Stream,
    Worker,
}

fn main() -> ExitCode {
    sys::init_clock();
    let cli = Cli::parse();
    let c = &cli.common;
    if c.threads == 0 || !(c.duration > 0.0 && c.duration <= 86_400.0) {
        eprintln!("error: --threads must be ≥ 1 and --duration in (0, 86400]");
        return ExitCode::from(2);
    }
    if c.idle_priority {
        if let Err(e) = sys::idle_priority() {
            eprintln!("error: --idle-priority: {e}");
            return ExitCode::from(2);
        }
    }
    let res = match &cli.cmd {
        Cmd::Fanout {
            subscribers,
            groups,
            rate,
            inflight,
            payload,
            sample_every,
            stream,
            items,
            ceiling,
        } => fanout(
            c,
            FanoutArgs {
                subs: *subscribers,
                groups: (*groups).max(1),
                rate: *rate,
                inflight: (*inflight).max(1),
                payload: *payload,
                sample_every: (*sample_every).max(1),
                stream: stream.clone(),
                items: (*items).max(1),
                ceiling: *ceiling,
            },
        )
        .map(|r| (r, true)),
        Cmd::Rpc {
            inflight,
            payload,
            rate,
            function,
        } => rpc(c, (*inflight).max(1), *payload, *rate, function).map(|r| (r, true)),
        Cmd::Connect {
            subscribers,
            target,
            groups,
            stream,
            hold,
        } => connect(c, *subscribers, *target, (*groups).max(1), stream, *hold).map(|r| (r, true)),
        Cmd::Limit {
            subscribers,
            payload,
        } => limit(c, (*subscribers).max(1), *payload).map(|r| (r, true)),
        Cmd::Soak {
            subscribers,
            groups,
            rate,
            items,
            stream,
            min_life,
            max_life,
            abrupt_leave,
            chaos,
        } => soak::soak(
            c,
            soak::SoakArgs {
                subs: *subscribers,
                groups: *groups,
                rate: *rate,
                items: *items,
                stream: stream.clone().unwrap_or_else(|| {
                    format!("soak-{:06x}", Rng::seeded().next_u64() & 0xff_ffff)
                }),
                min_life: *min_life,
                max_life: *max_life,
                abrupt: *abrupt_leave,
                chaos: chaos.args(),
            },
        ),
    };
    match res {
        Ok((r, ok)) => {
            r.print(c.json);
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            if c.json {
                println!("{}", serde_json::json!({"error": e}));
            }
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

fn join_msg(rng: &mut Rng, stream: &str, group: &str) -> String {
    serde_json::json!({"type": "join", "data": {
        "subscriptionId": rng.uuid_v4(), "streamName": stream, "groupId": group}})
    .to_string()
}

/// Opens a subscriber socket and sends its join (blocking); the sync frame is awaited later.
fn open_subscriber(
    url: &WsUrl,
    rng: &mut Rng,
    stream: &str,
    group: &str,
    sample_every: u32,
) -> Result<Conn, String> {
    let (sock, rest) = ws::connect(url, rng.bytes16(), HANDSHAKE_TIMEOUT)
        .map_err(|e| format!("{}: {e}", ws_name(url)))?;
    let mut c = Conn::new(
        sock,
        rest,
        Mode::Count {
            sample_every,
            latency: true,
            first: Some(b"\"sync\""),
        },
        rng.mask(),
        Role::Sub,
    );
    c.send_text(join_msg(rng, stream, group).as_bytes());
    write_all_blocking(&mut c)?;
    Ok(c)
}

fn open_worker(url: &WsUrl, rng: &mut Rng, mode: Mode, role: Role) -> Result<Conn, String> {
    let (sock, rest) = ws::connect(url, rng.bytes16(), HANDSHAKE_TIMEOUT)
        .map_err(|e| format!("{}: {e}", ws_name(url)))?;
    Ok(Conn::new(sock, rest, mode, rng.mask(), role))
}

fn ws_name(u: &WsUrl) -> String {
    format!("ws://{}:{}{}", u.host, u.port, u.path)
}

fn write_all_blocking(c: &mut Conn) -> Result<(), String> {
    (&c.sock).write_all(&c.rx.out).map_err(|e| e.to_string())?;
    c.rx.out.clear();
    Ok(())
}

fn urls(c: &Common, worker: bool, stream: bool) -> Result<(Option<WsUrl>, Option<WsUrl>), String> {
    let w = if worker {
        Some(WsUrl::parse(&c.worker_url, c.allow_remote)?)
    } else {
        None
    };
    let s = if stream {
        Some(WsUrl::parse(&c.stream_url, c.allow_remote)?)
    } else {
        None
    };
    Ok((w, s))
}

fn check_fds(need: usize) -> Result<(), String> {
    let lim = sys::raise_nofile();
    if (need as u64) + 64 > lim {
        return Err(format!(
            "need about {} file descriptors but RLIMIT_NOFILE is {lim} (raise it with ulimit -n)",
            need + 64
        ));
    }
    Ok(())
}

/// Runs the loops on `buckets.len()` threads while the calling thread prints progress.
fn run_threads(
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
                        run_loop_with(
                            b,
                            shared,
                            LoopCfg {
                                stop_when_synced: None,
                                deadline_ns: Some(deadline),
                            },
                        )
                    })
                    .expect("spawn")
            })
            .collect();
        let mut last_tick = now_ns();
        let (mut last_acked, mut last_deliv) = (0u64, 0u64);
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
            let now = now_ns();
            if now - last_tick >= NS {
                let dt = (now - last_tick) as f64 / 1e9;
                let acked = shared.acked.load(Relaxed);
                let deliv = shared.delivered.load(Relaxed);
                let phase = shared.phase.load(Relaxed);
                let mut line = format!(
                    "[{mode}] {:>6.1}s {:<9} ",
                    (now - t0) as f64 / 1e9,
                    Phase::name(phase),
                );
                if mode == "fanout" && phase == Phase::WaitSync as u8 {
                    line.push_str(&format!("synced {}", shared.synced.load(Relaxed)));
                } else {
                    line.push_str(&format!(
                        "acked {} ({:.0}/s)  ",
                        acked,
                        (acked - last_acked) as f64 / dt
                    ));
                    if mode == "fanout" {
                        line.push_str(&format!(
                            "delivered {} ({:.0}/s)  ",
                            deliv,
                            (deliv - last_deliv) as f64 / dt
                        ));
                    }
                    line.push_str(&format!(
                        "inflight {}  errors {}",
                        shared.inflight.load(Relaxed),
                        shared.errors.load(Relaxed)
                    ));
                }
                prog.line(&line);
                last_tick = now;
                last_acked = acked;
                last_deliv = deliv;
            }
        }
        prog.done();
        handles
            .into_iter()
            .map(|h| h.join().expect("loop thread panicked"))
            .collect()
    })
}

fn run_loop_with(conns: Vec<Conn>, shared: &Shared, cfg: LoopCfg) -> LoopOut {
    let out = runloop::run_loop(conns, shared, cfg);
    // whoever stops first (deadline) stops everyone
    shared.stop.store(true, Relaxed);
    out
}

fn take_caller(outs: &mut [LoopOut]) -> Option<Box<Caller>> {
    for o in outs.iter_mut() {
        for c in o.conns.iter_mut() {
            if let Role::Caller(_) = c.role {
                if let Role::Caller(cl) = std::mem::replace(&mut c.role, Role::Idle) {
                    return Some(cl);
                }
            }
        }
    }
    None
}

fn merged_stats(outs: &[LoopOut]) -> (ThreadStats, u64) {
    let mut st = ThreadStats::new();
    let mut masked = 0;
    for o in outs {
        st.merge(&o.stats);
        masked += o.masked_frames;
    }
    (st, masked)
}

/// A "CPU nanoseconds per unit of work" row, when any work was done.
fn per_unit_cpu(r: &mut Report, key: &str, cpu_s: f64, units: u64, unit: &str) {
    if units > 0 {
        r.num(key, cpu_s * 1e9 / units as f64, 0, unit);
    }
}

fn server_rows(
    r: &mut Report,
    a: Option<sys::ProcSnap>,
    b: Option<sys::ProcSnap>,
    secs: f64,
    per: Option<(u64, &str)>,
) {
    if let (Some(a), Some(b)) = (a, b) {
        r.num("server_rss_start_mb", a.rss_kb as f64 / 1024.0, 1, "MiB");
        r.num("server_rss_end_mb", b.rss_kb as f64 / 1024.0, 1, "MiB");
        let cpu = b.cpu_secs - a.cpu_secs;
        r.num("server_cpu_s", cpu, 2, "s");
        r.rate("server_cpu_cores", cpu, secs, 2, "cores");
        if let Some((n, what)) = per {
            if n > 0 {
                r.num(
                    &format!("server_cpu_ns_per_{what}"),
                    cpu * 1e9 / n as f64,
                    0,
                    "ns",
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// fanout

struct FanoutArgs {
    subs: usize,
    groups: u32,
    rate: f64,
    inflight: u64,
    payload: usize,
    sample_every: u32,
    stream: String,
    items: u32,
    ceiling: Option<f64>,
}

fn fanout(c: &Common, a: FanoutArgs) -> Result<Report, String> {
    let (wurl, surl) = urls(c, true, true)?;
    let (wurl, surl) = (wurl.unwrap(), surl.unwrap());
    if a.subs == 0 {
        return Err("--subscribers must be ≥ 1".into());
    }
    check_fds(a.subs + 2)?;
    let mut rng = Rng::seeded();
    let threads = c.threads.min(a.subs).max(1);
    let mut prog = Progress::new();

    let mut subs_per_group = vec![0u64; a.groups as usize];
    let mut buckets: Vec<Vec<Conn>> = (0..threads).map(|_| Vec::new()).collect();
    let t_conn = now_ns();
    let mut last = t_conn;
    for j in 0..a.subs {
        let g = (j % a.groups as usize) as u32;
        subs_per_group[g as usize] += 1;
        let conn = open_subscriber(&surl, &mut rng, &a.stream, &format!("g{g}"), a.sample_every)?;
        buckets[j % threads].push(conn);
        if now_ns() - last > NS {
            last = now_ns();
            prog.line(&format!(
                "[fanout] connecting subscribers {}/{}",
                j + 1,
                a.subs
            ));
        }
    }
    prog.done();
    let connect_secs = (now_ns() - t_conn) as f64 / 1e9;

    let prefix = (rng.next_u64() & 0xff_ffff) as u32;
    let caller = Caller::new(
        CallKind::StreamSet {
            stream_json: serde_json::to_string(&a.stream).unwrap(),
            groups: a.groups,
            items: a.items,
            subs_per_group,
            total_subs: a.subs as u64,
        },
        CallerCfg {
            inflight: a.inflight,
            rate: a.rate,
            duration_ns: (c.duration * 1e9) as u64,
            payload: a.payload,
            server_pid: c.server_pid,
            prefix,
        },
        now_ns(),
    );
    let publisher = open_worker(&wurl, &mut rng, Mode::Full, Role::Caller(Box::new(caller)))?;
    buckets[0].push(publisher);

    let shared = Shared::default();
    shared.phase.store(Phase::WaitSync as u8, Relaxed);
    let deadline = now_ns() + (c.duration * 1e9) as u64 + 40 * NS;
    let mut outs = run_threads(buckets, &shared, deadline, "fanout");
    let cl = take_caller(&mut outs).ok_or("publisher lost")?;
    let (st, masked) = merged_stats(&outs);

    let mut r = Report::new("fanout");
    r.int("subscribers", a.subs as u64);
    r.int("groups", a.groups as u64);
    r.int("threads", threads as u64);
    r.int("payload_bytes", a.payload as u64);
    r.num(
        "rate_target",
        a.rate,
        0,
        if a.rate > 0.0 {
            "sets/s"
        } else {
            "sets/s (0 = unbounded)"
        },
    );
    r.int("inflight", a.inflight);
    r.num("connect_s", connect_secs, 2, "s");
    if let Some(why) = &cl.abort {
        return Err(format!("fanout aborted: {why}"));
    }
    let pub_secs = (cl.pub_end.min(cl.end_ns) - cl.pub_start) as f64 / 1e9;
    let window = (cl.end_ns - cl.pub_start) as f64 / 1e9;
    let drain = cl.end_ns.saturating_sub(cl.pub_end) as f64 / 1e9;
    r.num("publish_s", pub_secs, 2, "s");
    r.num("drain_s", drain, 2, "s");
    r.int("sets_sent", cl.sent);
    r.int("sets_acked", cl.acked);
    r.int("set_errors", cl.errors);
    r.int("sets_unanswered", cl.inflight);
    r.rate("sets_per_s", cl.acked as f64, pub_secs, 0, "sets/s");
    r.int("expected_deliveries", cl.expected);
    r.int("received_deliveries", st.delivered);
    let loss = cl.expected as i64 - st.delivered as i64;
    r.add("loss", loss, loss.to_string());
    r.num(
        "loss_pct",
        if cl.expected > 0 {
            loss as f64 * 100.0 / cl.expected as f64
        } else {
            0.0
        },
        3,
        "%",
    );
    let dps = st.delivered as f64 / window.max(1e-9);
    r.num("deliveries_per_s", dps, 0, "frames/s");
    r.rate("rx_mb_per_s", st.bytes_in as f64 / 1e6, window, 1, "MB/s");
    if let Some(ceil) = a.ceiling {
        r.num(
            "ceiling_fraction",
            dps / ceil,
            3,
            "of the limit-mode ceiling",
        );
    }
    r.latency("delivery_latency", &st.hist);
    r.latency("set_ack_latency", &cl.ack_hist);
    let cpu = cl.cpu_end - cl.cpu_start;
    r.num("harness_cpu_s", cpu, 2, "s");
    r.rate("harness_cpu_cores", cpu, window, 2, "cores");
    per_unit_cpu(&mut r, "harness_cpu_ns_per_delivery", cpu, st.delivered, "ns");
    server_rows(
        &mut r,
        cl.proc_start,
        cl.proc_end,
        window,
        Some((st.delivered, "delivery")),
    );
    r.int("subscriber_sockets_closed", st.closed);
    r.int("unexpected_first_frames", st.unexpected);
    r.int("samples_without_t", st.no_t);
    if let Some(e) = &cl.first_error {
        r.add("first_set_error", e.clone(), e.clone());
    }
    if let Some(e) = &st.first_unexpected {
        r.add("first_unexpected_frame", e.clone(), e.clone());
    }
    if masked > 0 {
        r.note(format!(
            "{masked} frames from the server were masked (servers must not mask)"
        ));
    }
    r.note("window = first set → end of drain; deliveries/s and CPU are over that window");
    r.note("delivery latency = kernel receive timestamp at the subscriber socket (SO_TIMESTAMPNS, last packet of each read) − the set's send time");
    if let Some(p) = &c.plot {
        report::plot_svg(
            p,
            &format!("fanout set→delivery latency ({} subs)", a.subs),
            &st.hist,
        )
        .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// rpc

fn rpc(
    c: &Common,
    inflight: u64,
    payload: usize,
    rate: f64,
    function: &str,
) -> Result<Report, String> {
    let (wurl, _) = urls(c, true, false)?;
    let wurl = wurl.unwrap();
    let mut rng = Rng::seeded();
    let function_json = serde_json::to_string(function).unwrap();

    // worker B: registers the echo function, then announces itself (drains the registration)
    let mut echo = open_worker(&wurl, &mut rng, Mode::Full, Role::Echo)?;
    echo.send_text(format!(r#"{{"type":"registerfunction","id":{function_json},"description":"ringcast-loadtest echo"}}"#).as_bytes());
    let name = format!(
        "ringcast-loadtest-{}-{:x}",
        std::process::id(),
        rng.next_u64() & 0xffff
    );
    echo.send_text(
        serde_json::json!({"type": "invokefunction", "function_id": "engine::workers::register",
            "action": {"type": "void"},
            "data": {"runtime": "rust", "name": name, "pid": std::process::id()}})
        .to_string()
        .as_bytes(),
    );

    let prefix = (rng.next_u64() & 0xff_ffff) as u32;
    let caller = Caller::new(
        CallKind::Echo { function_json },
        CallerCfg {
            inflight,
            rate,
            duration_ns: (c.duration * 1e9) as u64,
            payload,
            server_pid: c.server_pid,
            prefix,
        },
        now_ns(),
    );
    let a = open_worker(&wurl, &mut rng, Mode::Full, Role::Caller(Box::new(caller)))?;
    let threads = c.threads.min(2);
    let buckets = if threads >= 2 {
        vec![vec![a], vec![echo]]
    } else {
        vec![vec![a, echo]]
    };
    let shared = Shared::default();
    let deadline = now_ns() + (c.duration * 1e9) as u64 + 40 * NS;
    let mut outs = run_threads(buckets, &shared, deadline, "rpc");
    let cl = take_caller(&mut outs).ok_or("caller lost")?;
    if let Some(why) = &cl.abort {
        return Err(format!("rpc aborted: {why}"));
    }
    let pub_secs = (cl.pub_end.min(cl.end_ns) - cl.pub_start) as f64 / 1e9;
    let window = (cl.end_ns - cl.pub_start) as f64 / 1e9;
    let mut r = Report::new("rpc");
    r.add("function", function, function);
    r.int("threads", threads as u64);
    r.int("inflight", inflight);
    r.int("payload_bytes", payload as u64);
    r.num("duration_s", pub_secs, 2, "s");
    r.int("calls_sent", cl.sent);
    r.int("calls_ok", cl.acked);
    r.int("call_errors", cl.errors);
    r.int("calls_unanswered", cl.inflight);
    r.rate("calls_per_s", cl.acked as f64, pub_secs, 0, "calls/s");
    r.latency("call_latency", &cl.ack_hist);
    let cpu = cl.cpu_end - cl.cpu_start;
    r.num("harness_cpu_s", cpu, 2, "s");
    per_unit_cpu(&mut r, "harness_cpu_ns_per_call", cpu, cl.acked, "ns");
    server_rows(
        &mut r,
        cl.proc_start,
        cl.proc_end,
        window,
        Some((cl.acked, "call")),
    );
    if let Some(e) = &cl.first_error {
        r.add("first_call_error", e.clone(), e.clone());
    }
    r.note("harness CPU includes the echo worker (both sides of every call run in this process)");
    if let Some(p) = &c.plot {
        report::plot_svg(
            p,
            &format!("rpc call latency ({inflight} in flight)"),
            &cl.ack_hist,
        )
        .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// connect

fn connect(
    c: &Common,
    n: usize,
    target: Target,
    groups: u32,
    stream: &str,
    hold: f64,
) -> Result<Report, String> {
    let (wurl, surl) = urls(c, target == Target::Worker, target == Target::Stream)?;
    let url = wurl.or(surl).unwrap();
    if n == 0 {
        return Err("--subscribers must be ≥ 1".into());
    }
    check_fds(n)?;
    let mut rng = Rng::seeded();
    let mut prog = Progress::new();
    let before = c.server_pid.and_then(sys::proc_snap);
    let cpu0 = sys::self_cpu_secs();
    let t0 = now_ns();
    let mut conns = Vec::with_capacity(n);
    let mut last = t0;
    for j in 0..n {
        let conn = match target {
            Target::Stream => open_subscriber(
                &url,
                &mut rng,
                stream,
                &format!("g{}", j as u32 % groups),
                1,
            )?,
            Target::Worker => {
                let (sock, rest) = ws::connect(&url, rng.bytes16(), HANDSHAKE_TIMEOUT)
                    .map_err(|e| format!("connection {j}: {e}"))?;
                Conn::new(
                    sock,
                    rest,
                    Mode::Count {
                        sample_every: 1,
                        latency: false,
                        first: Some(b"workerregistered"),
                    },
                    rng.mask(),
                    Role::Sub,
                )
            }
        };
        conns.push(conn);
        if now_ns() - last > NS {
            last = now_ns();
            prog.line(&format!("[connect] {}/{n} upgraded", j + 1));
        }
    }
    let t1 = now_ns();
    prog.line(&format!(
        "[connect] {n}/{n} upgraded, waiting for first frames"
    ));
    let shared = Shared::default();
    let out = runloop::run_loop(
        conns,
        &shared,
        LoopCfg {
            stop_when_synced: Some(n as u64),
            deadline_ns: Some(now_ns() + 30 * NS),
        },
    );
    prog.done();
    let t2 = now_ns();
    let cpu1 = sys::self_cpu_secs();
    let ready = out.stats.synced;
    std::thread::sleep(Duration::from_secs_f64(hold.clamp(0.0, 3600.0)));
    let after = c.server_pid.and_then(sys::proc_snap);

    // close: a close frame each, then drop
    let t3 = now_ns();
    let mut conns = out.conns;
    for cn in conns.iter_mut() {
        let mask = cn.rx.mask;
        let mut f = Vec::with_capacity(8);
        ws::encode_client_frame(&mut f, ws::OP_CLOSE, &1000u16.to_be_bytes(), mask);
        let _ = (&cn.sock).write(&f);
    }
    drop(conns);
    let t4 = now_ns();
    // Read the engine's RSS once it has let the connections go: closing ones keep their state
    // for up to 2 s (the engine's close-flush limit) and freed memory goes back after that.
    let after_close = c.server_pid.and_then(|p| {
        std::thread::sleep(AFTER_CLOSE);
        sys::proc_snap(p)
    });

    let what = match target {
        Target::Stream => "subscriber (join + sync)",
        Target::Worker => "worker (workerregistered)",
    };
    let mut r = Report::new("connect");
    r.add(
        "target",
        if target == Target::Stream {
            "stream"
        } else {
            "worker"
        },
        what,
    );
    r.int("connections", n as u64);
    r.int("ready", ready);
    r.num("upgrade_s", (t1 - t0) as f64 / 1e9, 3, "s");
    r.num("ready_s", (t2 - t0) as f64 / 1e9, 3, "s");
    r.rate("connections_per_s", ready as f64, (t2 - t0) as f64 / 1e9, 0, "conn/s (sequential upgrades)");
    r.num(
        "harness_cpu_us_per_connection",
        (cpu1 - cpu0) * 1e6 / n as f64,
        1,
        "µs",
    );
    r.num("close_s", (t4 - t3) as f64 / 1e9, 3, "s");
    if let (Some(b), Some(a)) = (before, after) {
        r.num("server_rss_before_mb", b.rss_kb as f64 / 1024.0, 1, "MiB");
        r.num("server_rss_after_mb", a.rss_kb as f64 / 1024.0, 1, "MiB");
        r.num(
            "server_rss_per_connection_kb",
            (a.rss_kb as f64 - b.rss_kb as f64) / n as f64,
            2,
            "KiB",
        );
        r.num(
            "server_cpu_us_per_connection",
            (a.cpu_secs - b.cpu_secs) * 1e6 / n as f64,
            1,
            "µs",
        );
        if let Some(ac) = after_close {
            r.num("server_rss_after_close_mb", ac.rss_kb as f64 / 1024.0, 1, "MiB");
        }
    }
    if ready < n as u64 {
        r.note(format!(
            "only {ready} of {n} connections got their first frame within 30 s"
        ));
    }
    if let Some(e) = &out.stats.first_unexpected {
        r.add("first_unexpected_frame", e.clone(), e.clone());
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// limit

/// The frame a server would send for one `stream::set` of this payload size.
fn prebuilt_stream_frame(payload: usize) -> Vec<u8> {
    let pad = "x".repeat(payload.saturating_sub(50));
    let text = format!(
        r#"{{"type":"stream","timestamp":1718000000000,"streamName":"loadtest","groupId":"g0","id":"i0","event":{{"type":"create","data":{{"t":1234567890123,"seq":1234567,"pad":"{pad}"}}}}}}"#
    );
    let mut f = Vec::with_capacity(text.len() + 10);
    ws::encode_server_frame(&mut f, ws::OP_TEXT, text.as_bytes());
    f
}

fn limit(c: &Common, n: usize, payload: usize) -> Result<Report, String> {
    check_fds(2 * n + 4)?;
    let mut rng = Rng::seeded();
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let frame = prebuilt_stream_frame(payload);
    let batch: Vec<u8> = frame.repeat(64);
    let threads = c.threads.min(n).max(1);
    let mut buckets: Vec<Vec<Conn>> = (0..threads).map(|_| Vec::new()).collect();
    let mut servers: Vec<TcpStream> = Vec::with_capacity(n);
    for j in 0..n {
        let cl = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let (sv, _) = listener.accept().map_err(|e| e.to_string())?;
        sv.set_nodelay(true).ok();
        sv.set_nonblocking(true).map_err(|e| e.to_string())?;
        servers.push(sv);
        buckets[j % threads].push(Conn::new(
            cl,
            Vec::new(),
            Mode::Count {
                sample_every: u32::MAX,
                latency: false,
                first: None,
            },
            rng.mask(),
            Role::Sub,
        ));
    }
    let shared = Shared::default();
    shared.phase.store(Phase::Publish as u8, Relaxed);
    let dur_ns = (c.duration * 1e9) as u64;
    let warm_ns = NS / 2;
    let deadline = now_ns() + warm_ns + dur_ns + 5 * NS;
    let mut window = (0u64, 0u64, 0f64, 0f64, 0u64, 0u64); // (d0, d1, cpu0, cpu1, t0, t1)
    let mut written = 0u64;
    let writer_stop = &AtomicBool::new(false);
    let outs = std::thread::scope(|s| {
        let shared = &shared;
        let writer = std::thread::Builder::new()
            .name("limit-writer".into())
            .spawn_scoped(s, || bare_writer(servers, &batch, writer_stop))
            .expect("spawn");
        let loops: Vec<_> = buckets
            .into_iter()
            .map(|b| {
                s.spawn(move || {
                    runloop::run_loop(
                        b,
                        shared,
                        LoopCfg {
                            stop_when_synced: None,
                            deadline_ns: Some(deadline),
                        },
                    )
                })
            })
            .collect();
        let mut prog = Progress::new();
        std::thread::sleep(Duration::from_nanos(warm_ns));
        window.0 = shared.delivered.load(Relaxed);
        window.2 = sys::self_cpu_secs();
        window.4 = now_ns();
        let mut last = (window.4, window.0);
        while now_ns() < window.4 + dur_ns && !shared.stop.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(50).min(Duration::from_nanos(
                (window.4 + dur_ns).saturating_sub(now_ns()),
            )));
            let now = now_ns();
            if now - last.0 >= NS {
                let d = shared.delivered.load(Relaxed);
                prog.line(&format!(
                    "[limit] {:>5.1}s delivered {} ({:.0}/s)",
                    (now - window.4) as f64 / 1e9,
                    d,
                    (d - last.1) as f64 / ((now - last.0) as f64 / 1e9)
                ));
                last = (now, d);
            }
        }
        window.1 = shared.delivered.load(Relaxed);
        window.3 = sys::self_cpu_secs();
        window.5 = now_ns();
        prog.done();
        writer_stop.store(true, Relaxed);
        written = writer.join().expect("writer panicked");
        // let the receivers drain what is still in the socket buffers, then stop them
        let drain_end = now_ns() + 2 * NS;
        while shared.delivered.load(Relaxed) < written
            && now_ns() < drain_end
            && !shared.stop.load(Relaxed)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        shared.stop.store(true, Relaxed);
        loops
            .into_iter()
            .map(|h| h.join().expect("loop panicked"))
            .collect::<Vec<_>>()
    });
    let (st, _) = merged_stats(&outs);
    let secs = (window.5 - window.4) as f64 / 1e9;
    let frames = window.1 - window.0;
    let cpu = window.3 - window.2;
    let mut r = Report::new("limit");
    r.int("subscribers", n as u64);
    r.int("payload_bytes", payload as u64);
    r.int("frame_bytes", frame.len() as u64);
    r.int("receiver_threads", threads as u64);
    r.int("writer_threads", 1);
    r.num("duration_s", secs, 2, "s");
    r.int("frames_received", frames);
    r.rate("deliveries_per_s", frames as f64, secs, 0, "frames/s");
    r.rate("rx_mb_per_s", frames as f64 * frame.len() as f64 / 1e6, secs, 1, "MB/s");
    r.rate("harness_cpu_cores", cpu, secs, 2, "cores (writer + receivers)");
    per_unit_cpu(&mut r, "harness_cpu_ns_per_delivery", cpu, frames, "ns (writer + receivers)");
    r.int("frames_written_total", written);
    r.int("frames_received_total", st.delivered);
    let unaccounted = written as i64 - st.delivered as i64;
    r.add("frames_unaccounted", unaccounted, unaccounted.to_string());
    if unaccounted != 0 {
        r.note("frames_unaccounted ≠ 0: the receive path miscounted (or did not drain in 2 s)");
    }
    r.note("ceiling = a writer that does nothing but write() pre-built frames, 64 per call; pass deliveries_per_s to `fanout --ceiling`");
    Ok(r)
}

/// Writes the 64-frame batch to every writable socket until told to stop. Returns frames
/// completely written (per socket: bytes / frame size).
fn bare_writer(socks: Vec<TcpStream>, batch: &[u8], stop: &AtomicBool) -> u64 {
    use std::os::fd::AsRawFd;
    let mut ep = Epoll::new(1024).expect("epoll");
    for (i, s) in socks.iter().enumerate() {
        ep.add(s.as_raw_fd(), i as u64, sys::EV_OUT)
            .expect("epoll_ctl");
    }
    let mut off = vec![0usize; socks.len()];
    let mut dead = vec![false; socks.len()];
    let mut bytes = vec![0u64; socks.len()];
    let frame_len = (batch.len() / 64) as u64;
    while !stop.load(Relaxed) {
        let n = ep.wait(20);
        for k in 0..n {
            let (tok, _) = ep.event(k);
            let i = tok as usize;
            if dead[i] {
                continue;
            }
            match (&socks[i]).write(&batch[off[i]..]) {
                Ok(w) => {
                    bytes[i] += w as u64;
                    off[i] = (off[i] + w) % batch.len();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    dead[i] = true;
                    ep.del(socks[i].as_raw_fd());
                }
            }
        }
    }
    bytes.iter().map(|b| b / frame_len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prebuilt_frame_is_countable_and_timed() {
        let f = prebuilt_stream_frame(256);
        struct S(u32, Vec<u8>);
        impl ws::FrameSink for S {
            fn frame_start(&mut self, _: u8, _: bool, _: u64) -> bool {
                true
            }
            fn payload(&mut self, c: &[u8]) {
                self.1.extend_from_slice(c)
            }
            fn frame_end(&mut self) {
                self.0 += 1
            }
        }
        let mut s = S(0, vec![]);
        let mut w = ws::FrameWalker::new();
        w.feed(&f.repeat(3), &mut s);
        assert_eq!(s.0, 3);
        let one = &s.1[..s.1.len() / 3];
        assert_eq!(ws::extract_t(one), Some(1234567890123));
        let v: serde_json::Value = serde_json::from_slice(one).unwrap();
        let data_len = v["event"]["data"].to_string().len();
        assert!((240..=270).contains(&data_len), "{data_len}");
    }

    #[test]
    fn echo_reply_shape() {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        let msg = br#"{"type":"invokefunction","invocation_id":"0f8a3c62-3a3e-4a57-b2b6-8d1a2a0b1f77","function_id":"loadtest::echo","data":{"t":5,"_caller_worker_id":"w"}}"#;
        assert!(caller::echo_reply(
            msg,
            &mut out,
            [0, 0, 0, 0],
            &mut scratch
        ));
        let v: serde_json::Value = serde_json::from_slice(&scratch).unwrap();
        assert_eq!(v["type"], "invocationresult");
        assert_eq!(v["invocation_id"], "0f8a3c62-3a3e-4a57-b2b6-8d1a2a0b1f77");
        assert_eq!(v["function_id"], "loadtest::echo");
        assert_eq!(v["result"]["t"], 5);
        assert!(!caller::echo_reply(
            br#"{"type":"workerregistered","worker_id":"x"}"#,
            &mut out,
            [0; 4],
            &mut scratch
        ));
    }
}
