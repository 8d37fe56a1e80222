//! `connect`: opens S idle connections one after another, waits for each one's first frame,
//! holds them, closes them; reports connections/s and the engine's RSS per connection.

use std::time::Duration;

use clap::ValueEnum;

use crate::conn::{open_subscriber, Conn, Mode, Role};
use crate::report::{Progress, Report};
use crate::runloop::{self, LoopCfg, Shared};
use crate::sys::{self, now_ns, Rng, NS};
use crate::ws::{self, HANDSHAKE_TIMEOUT};
use crate::Common;

/// When `connect` reads the engine's RSS after closing its connections.
const AFTER_CLOSE: Duration = Duration::from_secs(5);

/// Which kind of connection `connect` opens.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Target {
    Stream,
    Worker,
}

impl Target {
    /// The `target` row's value.
    fn name(self) -> &'static str {
        match self {
            Target::Stream => "stream",
            Target::Worker => "worker",
        }
    }

    /// The `target` row's table cell: what makes a connection ready.
    fn ready_when(self) -> &'static str {
        match self {
            Target::Stream => "subscriber (join + sync)",
            Target::Worker => "worker (workerregistered)",
        }
    }
}

/// The `connect` subcommand's options, clamped to usable values.
pub struct ConnectArgs {
    /// connections to open
    pub subs: usize,
    pub target: Target,
    /// subscribers join groups g0 .. g<groups-1> in turn
    pub groups: u32,
    pub stream: String,
    /// seconds to hold the connections open before measuring RSS and closing
    pub hold: f64,
}

/// Opens, holds and closes the connections, and reports.
pub fn run(c: &Common, a: ConnectArgs) -> Result<Report, String> {
    let ConnectArgs {
        subs: n,
        target,
        groups,
        stream,
        hold,
    } = a;
    let url = match target {
        Target::Stream => c.parsed_stream_url()?,
        Target::Worker => c.parsed_worker_url()?,
    };
    if n == 0 {
        return Err("--subscribers must be ≥ 1".into());
    }
    sys::check_fd_limit(n)?;
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
                &stream,
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
    for cn in &out.conns {
        cn.write_close(1000);
    }
    drop(out.conns);
    let t4 = now_ns();
    // Read the engine's RSS once it has let the connections go: closing ones keep their state
    // for up to 2 s (the engine's close-flush limit) and freed memory goes back after that.
    let after_close = c.server_pid.and_then(|p| {
        std::thread::sleep(AFTER_CLOSE);
        sys::proc_snap(p)
    });

    let mut r = Report::new("connect");
    r.add("target", target.name(), target.ready_when());
    r.int("connections", n as u64);
    r.int("ready", ready);
    r.num("upgrade_s", (t1 - t0) as f64 / 1e9, 3, "s");
    r.num("ready_s", (t2 - t0) as f64 / 1e9, 3, "s");
    r.rate(
        "connections_per_s",
        ready as f64,
        (t2 - t0) as f64 / 1e9,
        0,
        "conn/s (sequential upgrades)",
    );
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
            r.num(
                "server_rss_after_close_mb",
                ac.rss_kb as f64 / 1024.0,
                1,
                "MiB",
            );
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
