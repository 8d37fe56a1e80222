//! ringcast-loadtest: load harness for ringcast (and any iii engine) over the public worker
//! (49134) and stream subscriber (3112) WebSocket protocols.
//!
//! This file is the command line and its dispatch; each scenario lives in its own module
//! (`fanout`, `rpc`, `connect`, `soak` with `chaos`, `limit`), on the shared connection, loop,
//! report and OS pieces (`conn`, `ws`, `caller`, `runloop`, `report`, `sys`).

mod caller;
mod channel;
mod chaos;
mod conn;
mod connect;
mod fanout;
mod limit;
mod queue;
mod report;
mod rpc;
mod runloop;
mod soak;
mod sys;
mod ws;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use connect::Target;
use sys::Rng;
use ws::WsUrl;

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
    /// Stream subscriber URL; `fanout` takes several, comma-separated (one per node), spreads
    /// the subscribers over them and reports each node's deliveries and latency
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
        /// subscriber connections, spread over the groups in turn
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        /// groups g0 .. g<G-1> of the stream
        #[arg(long, default_value_t = 1)]
        groups: u32,
        /// sets per second, 0 = as fast as the in-flight window allows
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// sets sent and not yet acknowledged, at most
        #[arg(long, default_value_t = 64)]
        inflight: u64,
        /// approximate size of each set's data object in bytes
        #[arg(long, default_value_t = 256)]
        payload: usize,
        /// time one delivered frame in this many
        #[arg(long, default_value_t = 16)]
        sample_every: u32,
        /// stream name
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
        /// calls sent and not yet answered, at most
        #[arg(long, default_value_t = 16)]
        inflight: u64,
        /// approximate size of each call's data object in bytes
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// calls per second, 0 = as fast as the in-flight window allows
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// id the echo function is registered and called under
        #[arg(long, default_value = "loadtest::echo")]
        function: String,
    },
    /// Channel throughput (one channel, against a plain loopback TCP copy measured in the same
    /// run) and RPC latency alone and during back-to-back channel transfers
    Channel {
        /// bytes per channel transfer
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// binary frame size (the SDKs send 64 KiB frames)
        #[arg(long, default_value_t = 65536)]
        frame: usize,
        /// the channel's buffer_size (frames)
        #[arg(long, default_value_t = 64)]
        buffer_size: u64,
        /// RPC calls in flight during the two RPC runs
        #[arg(long, default_value_t = 1)]
        rpc_inflight: u64,
    },
    /// Built-in queue: a producer enqueues calls (TriggerAction.Enqueue) with N in flight, a
    /// consumer worker answers them; enqueues/s, deliveries/s, enqueue → invoke latency
    Queue {
        /// enqueues sent and not yet acknowledged, at most
        #[arg(long, default_value_t = 64)]
        inflight: u64,
        /// approximate size of each message's data object in bytes
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// enqueues per second, 0 = as fast as the in-flight window allows
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// id the consumer function is registered under
        #[arg(long, default_value = "loadtest::consume")]
        function: String,
        /// queue name (its concurrency and retries come from the engine's iii-queue config)
        #[arg(long, default_value = "loadtest")]
        queue: String,
    },
    /// Open S idle connections, report connections/s and server RSS per connection, close them
    Connect {
        /// connections to open (one after another)
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// stream: subscriber sockets that join a group; worker: worker-protocol sockets
        #[arg(long, value_enum, default_value_t = Target::Stream)]
        target: Target,
        /// groups the stream subscribers join in turn (g0 .. g<G-1>)
        #[arg(long, default_value_t = 1)]
        groups: u32,
        /// stream name the subscribers join
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
        /// groups g0 .. g<G-1> of the stream, each with its own sequence
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
        /// loopback receiver sockets
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        /// approximate size of each frame's data object in bytes
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

impl Common {
    /// `--worker-url`, parsed (loopback unless `--allow-remote`).
    pub fn parsed_worker_url(&self) -> Result<WsUrl, String> {
        WsUrl::parse(&self.worker_url, self.allow_remote)
    }

    /// `--stream-url`, parsed (loopback unless `--allow-remote`).
    pub fn parsed_stream_url(&self) -> Result<WsUrl, String> {
        WsUrl::parse(&self.stream_url, self.allow_remote)
    }

    /// `--stream-url` as a comma-separated list of nodes, each parsed.
    pub fn parsed_stream_urls(&self) -> Result<Vec<WsUrl>, String> {
        self.stream_url.split(',').map(|u| WsUrl::parse(u.trim(), self.allow_remote)).collect()
    }
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
        } => fanout::run(
            c,
            fanout::FanoutArgs {
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
        } => rpc::run(
            c,
            rpc::RpcArgs {
                inflight: (*inflight).max(1),
                payload: *payload,
                rate: *rate,
                function: function.clone(),
            },
        )
        .map(|r| (r, true)),
        Cmd::Channel {
            bytes,
            frame,
            buffer_size,
            rpc_inflight,
        } => channel::run(
            c,
            channel::ChannelArgs {
                bytes: (*bytes).max(1),
                frame: (*frame).clamp(1, 16 << 20),
                buffer_size: (*buffer_size).max(1),
                rpc_inflight: (*rpc_inflight).max(1),
            },
        )
        .map(|r| (r, true)),
        Cmd::Queue { inflight, payload, rate, function, queue } => queue::run(
            c,
            queue::QueueArgs {
                inflight: (*inflight).max(1),
                payload: *payload,
                rate: *rate,
                function: function.clone(),
                queue: queue.clone(),
            },
        )
        .map(|r| (r, true)),
        Cmd::Connect {
            subscribers,
            target,
            groups,
            stream,
            hold,
        } => connect::run(
            c,
            connect::ConnectArgs {
                subs: *subscribers,
                target: *target,
                groups: (*groups).max(1),
                stream: stream.clone(),
                hold: *hold,
            },
        )
        .map(|r| (r, true)),
        Cmd::Limit {
            subscribers,
            payload,
        } => limit::run(c, (*subscribers).max(1), *payload).map(|r| (r, true)),
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
        } => soak::run(
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn urls_parse_in_order_and_stay_on_loopback() {
        let cli = Cli::try_parse_from([
            "ringcast-loadtest",
            "rpc",
            "--worker-url",
            "ws://127.0.0.1:1/",
            "--stream-url",
            "ws://10.0.0.1:2/",
        ])
        .unwrap();
        assert_eq!(cli.common.parsed_worker_url().unwrap().port, 1);
        let err = cli.common.parsed_stream_url().unwrap_err();
        assert!(err.contains("--allow-remote"), "{err}");
    }
}
