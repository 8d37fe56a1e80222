//! `queue`: a consumer worker registers a function, a producer enqueues calls of it
//! (`TriggerAction.Enqueue`) with N in flight; reports enqueues/s (receipts), deliveries/s and
//! the enqueue → receipt and enqueue → invoke latencies. The queue's concurrency, retries and
//! durability are the engine's config (see `loadtest/queue.sh`).

use crate::caller::{CallKind, Caller, CallerCfg};
use crate::conn::{new_hist, open_worker, Mode, Role};
use crate::report::{self, Report};
use crate::runloop::{self, Shared};
use crate::sys::{now_ns, Rng, NS};
use crate::Common;

/// The `queue` subcommand's options, clamped to usable values.
pub struct QueueArgs {
    pub inflight: u64,
    pub payload: usize,
    /// enqueues per second, 0 = as fast as the in-flight window allows
    pub rate: f64,
    pub function: String,
    pub queue: String,
}

pub fn run(c: &Common, args: QueueArgs) -> Result<Report, String> {
    let QueueArgs { inflight, payload, rate, function, queue } = args;
    let wurl = c.parsed_worker_url()?;
    let mut rng = Rng::seeded();
    let function_json = serde_json::to_string(&function).unwrap();
    let queue_json = serde_json::to_string(&queue).unwrap();

    let mut consumer = open_worker(&wurl, &mut rng, Mode::Full, Role::Consumer(Box::new(new_hist())))?;
    consumer.send_text(format!(r#"{{"type":"registerfunction","id":{function_json},"description":"ringcast-loadtest queue consumer"}}"#).as_bytes());

    let prefix = (rng.next_u64() & 0xff_ffff) as u32;
    let caller = Caller::new(
        CallKind::Enqueue { function_json, queue_json },
        CallerCfg { inflight, rate, duration_ns: (c.duration * 1e9) as u64, payload, server_pid: c.server_pid, prefix },
        now_ns(),
    );
    let producer = open_worker(&wurl, &mut rng, Mode::Full, Role::Caller(Box::new(caller)))?;
    let threads = c.threads.min(2);
    let buckets = if threads >= 2 { vec![vec![producer], vec![consumer]] } else { vec![vec![producer, consumer]] };
    let shared = Shared::default();
    let deadline = now_ns() + (c.duration * 1e9) as u64 + 40 * NS;
    let mut outs = runloop::run_threads(buckets, &shared, deadline, "queue");
    let cl = runloop::take_caller(&mut outs).ok_or("producer lost")?;
    if let Some(why) = &cl.abort {
        return Err(format!("queue run aborted: {why}"));
    }
    let invoke_hist = outs
        .iter_mut()
        .flat_map(|o| o.conns.iter_mut())
        .find_map(|c| match std::mem::replace(&mut c.role, Role::Idle) {
            Role::Consumer(h) => Some(h),
            other => {
                c.role = other;
                None
            }
        })
        .ok_or("consumer lost")?;
    let pub_secs = cl.publish_secs();
    let window = cl.window_secs();
    let delivered = invoke_hist.len();
    let mut r = Report::new("queue");
    r.add("queue", queue.as_str(), queue.as_str());
    r.int("threads", threads as u64);
    r.int("inflight", inflight);
    r.int("payload_bytes", payload as u64);
    r.num("duration_s", pub_secs, 2, "s");
    r.int("enqueued", cl.acked);
    r.int("enqueue_errors", cl.errors);
    r.int("delivered", delivered);
    r.rate("enqueues_per_s", cl.acked as f64, pub_secs, 0, "msgs/s");
    r.rate("deliveries_per_s", delivered as f64, window, 0, "msgs/s");
    r.latency("enqueue_receipt_latency", &cl.ack_hist);
    r.latency("enqueue_invoke_latency", &invoke_hist);
    r.server_rows(cl.proc_start, cl.proc_end, window, Some((delivered, "message")));
    if let Some(e) = &cl.first_error {
        r.add("first_enqueue_error", e.clone(), e.clone());
    }
    r.note("deliveries/s is taken over the whole window, drain included: the engine delivers what was acknowledged before the window ends");
    if let Some(p) = &c.plot {
        report::plot_svg(p, &format!("queue enqueue → invoke latency ({inflight} in flight)"), &invoke_hist)
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(r)
}
