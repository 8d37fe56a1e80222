//! `rpc`: worker B registers an echo function, worker A calls it with N calls in flight;
//! reports calls/s and the call latency.

use crate::caller::{CallKind, Caller, CallerCfg};
use crate::conn::{open_worker, Mode, Role};
use crate::report::{self, Report};
use crate::runloop::{self, Shared};
use crate::sys::{now_ns, Rng, NS};
use crate::Common;

/// The `rpc` subcommand's options, clamped to usable values.
pub struct RpcArgs {
    pub inflight: u64,
    pub payload: usize,
    /// calls per second, 0 = as fast as the in-flight window allows
    pub rate: f64,
    /// the echo function's id
    pub function: String,
}

/// Registers the echo worker, calls it for `--duration`, and reports.
pub fn run(c: &Common, args: RpcArgs) -> Result<Report, String> {
    let RpcArgs {
        inflight,
        payload,
        rate,
        function,
    } = args;
    let wurl = c.parsed_worker_url()?;
    let mut rng = Rng::seeded();
    let function_json = serde_json::to_string(&function).unwrap();

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
    // worker A: the caller
    let calls = open_worker(&wurl, &mut rng, Mode::Full, Role::Caller(Box::new(caller)))?;
    let threads = c.threads.min(2);
    let buckets = if threads >= 2 {
        vec![vec![calls], vec![echo]]
    } else {
        vec![vec![calls, echo]]
    };
    let shared = Shared::default();
    let deadline = now_ns() + (c.duration * 1e9) as u64 + 40 * NS;
    let mut outs = runloop::run_threads(buckets, &shared, deadline, "rpc");
    let cl = runloop::take_caller(&mut outs).ok_or("caller lost")?;
    if let Some(why) = &cl.abort {
        return Err(format!("rpc aborted: {why}"));
    }
    let pub_secs = cl.publish_secs();
    let window = cl.window_secs();
    let mut r = Report::new("rpc");
    r.add("function", function.as_str(), function.as_str());
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
    r.per_unit_cpu("harness_cpu_ns_per_call", cpu, cl.acked, "ns");
    r.server_rows(cl.proc_start, cl.proc_end, window, Some((cl.acked, "call")));
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
