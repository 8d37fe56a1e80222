//! `fanout`: S subscribers over G groups and one `stream::set` publisher; reports delivered
//! frames, loss and the set → delivery latency taken at the subscriber sockets.

use std::sync::atomic::Ordering::Relaxed;

use crate::caller::{CallKind, Caller, CallerCfg, Phase};
use crate::conn::{open_subscriber, open_worker, Conn, Mode, Role};
use crate::report::{self, Progress, Report};
use crate::runloop::{self, Shared};
use crate::sys::{self, now_ns, Rng, NS};
use crate::Common;

/// The `fanout` subcommand's options, clamped to usable values.
pub struct FanoutArgs {
    pub subs: usize,
    pub groups: u32,
    /// sets per second, 0 = as fast as the in-flight window allows
    pub rate: f64,
    pub inflight: u64,
    pub payload: usize,
    pub sample_every: u32,
    pub stream: String,
    pub items: u32,
    /// deliveries/s measured by `limit`
    pub ceiling: Option<f64>,
}

/// Connects the subscribers, publishes for `--duration`, drains, and reports.
pub fn run(c: &Common, a: FanoutArgs) -> Result<Report, String> {
    let wurl = c.parsed_worker_url()?;
    let surls = c.parsed_stream_urls()?;
    let nodes = surls.len();
    if a.subs == 0 {
        return Err("--subscribers must be ≥ 1".into());
    }
    sys::check_fd_limit(a.subs + 2)?;
    let mut rng = Rng::seeded();
    // Each node's subscribers get threads of their own, so each node's latency is measured apart.
    let threads_per_node = (c.threads.min(a.subs).max(1) / nodes).max(1);
    let threads = threads_per_node * nodes;
    let mut prog = Progress::new();

    let mut subs_per_group = vec![0u64; a.groups as usize];
    let mut buckets: Vec<Vec<Conn>> = (0..threads).map(|_| Vec::new()).collect();
    let t_conn = now_ns();
    let mut last = t_conn;
    for j in 0..a.subs {
        let g = (j % a.groups as usize) as u32;
        subs_per_group[g as usize] += 1;
        let node = j % nodes;
        let conn = open_subscriber(&surls[node], &mut rng, &a.stream, &format!("g{g}"), a.sample_every)?;
        buckets[node * threads_per_node + (j / nodes) % threads_per_node].push(conn);
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
    let mut outs = runloop::run_threads(buckets, &shared, deadline, "fanout");
    let cl = runloop::take_caller(&mut outs).ok_or("publisher lost")?;
    let (st, masked) = runloop::merged_stats(&outs);

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
    let pub_secs = cl.publish_secs();
    let window = cl.window_secs();
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
    if nodes > 1 {
        // Subscribers of node k are in threads k·threads_per_node.. (see the buckets above).
        for (k, outs) in outs.chunks(threads_per_node).enumerate() {
            let (node_st, _) = runloop::merged_stats(outs);
            r.int(&format!("node{k}_received_deliveries"), node_st.delivered);
            r.latency(&format!("node{k}_delivery_latency"), &node_st.hist);
        }
    }
    r.latency("set_ack_latency", &cl.ack_hist);
    let cpu = cl.cpu_end - cl.cpu_start;
    r.num("harness_cpu_s", cpu, 2, "s");
    r.rate("harness_cpu_cores", cpu, window, 2, "cores");
    r.per_unit_cpu("harness_cpu_ns_per_delivery", cpu, st.delivered, "ns");
    r.server_rows(
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
