//! Start-up and shutdown: read the config, place executors on cores, bind listeners (so that
//! every start-up failure is one clear line and exit code 2), run until SIGINT/SIGTERM.

use crate::cli::Cli;
use crate::config::{self, ConfigError, EngineConfig};
use ringcast_shards::shard::ShardContext;
use crate::stream::StreamService;
use crate::{control, stream, EXIT_START_FAILED};
use ringcast_shards::runtime::{self, CorePlan};
use ringcast_shards::store::StoreStartError;
use std::cell::RefCell;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
}

/// A start-up failure: logged as one line, then exit code 2.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Placement(#[from] runtime::PlacementError),
    #[error(transparent)]
    LockedMemory(#[from] runtime::MemlockError),
    #[error(transparent)]
    Executor(#[from] runtime::SpawnError),
    #[error(transparent)]
    Store(#[from] StoreStartError),
    /// A listening socket (`what`: the worker or stream port) that cannot be set up.
    #[error("{what}: {problem}")]
    Listen { what: &'static str, problem: String },
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("cannot start a watcher thread: {0}")]
    Watcher(std::io::Error),
    #[error(transparent)]
    Channels(#[from] crate::channels::StartError),
    /// The `redis` adapter's server does not answer at start-up.
    #[error("iii-stream: adapter redis: cannot reach redis at {address} ({why}); start Redis or fix redis_url")]
    Redis { address: String, why: String },
}

/// `ringcast check-config PATH`.
pub fn check_config(path: &Path) -> i32 {
    match config::load(path) {
        Ok(config) => {
            for worker in &config.unsupported_workers {
                eprintln!("warning: worker {worker} is not supported by ringcast and will not start");
            }
            print!("{}", serde_yaml::to_string(&config).unwrap_or_default());
            eprintln!("{}: config OK", path.display());
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_START_FAILED
        }
    }
}

/// `ringcast repair DIR`.
pub fn repair(dir: &Path) -> i32 {
    match ringcast_storage::file::repair(dir) {
        Ok(report) => {
            println!(
                "{}: {} segment(s) scanned, {} intact record(s) salvaged, {} damaged range(s) ({} bytes) skipped, {} item(s) kept; damaged segments moved to {}",
                dir.display(),
                report.segments_scanned,
                report.records_salvaged,
                report.corrupt_ranges,
                report.corrupt_bytes,
                report.items_kept,
                report.damaged_dir.display()
            );
            0
        }
        Err(e) => {
            eprintln!("error: cannot repair {}: {e}", dir.display());
            EXIT_START_FAILED
        }
    }
}

/// The config in force: `--config`, else `./config.yaml`, else the embedded default.
fn load_config(cli: &Cli) -> Result<EngineConfig, StartError> {
    if let Some(path) = &cli.config {
        return Ok(config::load(path)?);
    }
    let local = Path::new("config.yaml");
    if local.exists() {
        tracing::info!("using ./config.yaml");
        return Ok(config::load(local)?);
    }
    tracing::info!("no config file given and no ./config.yaml: using the embedded default");
    Ok(config::parse(config::EMBEDDED_DEFAULT, "embedded default config")?)
}

/// Exit code when a core (an executor thread: control or shard) dies — a panic, or an end before
/// shutdown was asked. The process never stays half alive: it exits so a supervisor restarts
/// it. 70 is `EX_SOFTWARE` of sysexits.h.
pub const EXIT_CORE_DIED: i32 = 70;

/// How an executor thread ended.
enum CoreEnd {
    /// Returned normally.
    Done,
    /// Returned a start-up failure (a shard that could not open its store).
    StartFailed(StoreStartError),
    /// Panicked (the panic message itself was printed by the panic hook).
    Died(String),
}

/// Joins `handle` on a small thread of its own and reports how the core ended on `ends`, so
/// the main thread learns of the first core to end, whichever it is.
fn watch<T: Send + 'static>(
    name: String,
    handle: glommio::ExecutorJoinHandle<T>,
    ends: std::sync::mpsc::Sender<(String, CoreEnd)>,
    outcome: fn(T) -> CoreEnd,
) -> Result<(), StartError> {
    std::thread::Builder::new()
        .name(format!("watch-{name}"))
        .stack_size(64 << 10)
        .spawn(move || {
            let end = match handle.join() {
                Ok(value) => outcome(value),
                Err(e) => CoreEnd::Died(e.to_string()),
            };
            let _ = ends.send((name, end));
        })
        .map(|_| ())
        .map_err(StartError::Watcher)
}

/// Executors besides the control core and the shards: `ringcast-channels`.
const CHANNEL_EXECUTORS: usize = 1;

const BIND_RETRIES: u32 = 25;
const BIND_RETRY_PAUSE: Duration = Duration::from_millis(40);

/// Binds a listening TCP socket now, so a port in use is reported before anything starts.
fn bind(host: &str, port: u16, what: &'static str, reuse_port: bool) -> Result<(OwnedFd, SocketAddr), StartError> {
    let failed = |problem: String| StartError::Listen { what, problem };
    let addr = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| failed(format!("cannot resolve host {host:?}")))?;
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)
        .map_err(|e| failed(format!("cannot create socket: {e}")))?;
    let _ = socket.set_reuse_address(true);
    if reuse_port {
        let _ = socket.set_reuse_port(true);
    }
    // A listener of a process that just exited can linger for some milliseconds while the kernel
    // tears down its io_uring; give a restart on the same port a moment before giving up.
    let mut attempts = 0;
    let bound = loop {
        match socket.bind(&addr.into()) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts < BIND_RETRIES => {
                attempts += 1;
                std::thread::sleep(BIND_RETRY_PAUSE);
            }
            other => break other,
        }
    };
    bound.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            failed(format!("port {port} on {host} is already in use; stop the other process or choose another port in the config"))
        } else {
            failed(format!("cannot bind {addr}: {e}"))
        }
    })?;
    socket.listen(4096).map_err(|e| failed(format!("cannot listen on {addr}: {e}")))?;
    let local = socket.local_addr().ok().and_then(|a| a.as_socket()).unwrap_or(addr);
    Ok((socket.into(), local))
}

/// `ringcast [--config PATH]`: runs the engine until SIGINT/SIGTERM.
pub fn run(cli: &Cli) -> i32 {
    match start(cli) {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!("{error}");
            EXIT_START_FAILED
        }
    }
}

fn start(cli: &Cli) -> Result<(), StartError> {
    let config = load_config(cli)?;
    for worker in &config.unsupported_workers {
        tracing::warn!("worker {worker} is not supported by ringcast; it will not start");
    }
    let plan = CorePlan::new(&runtime::allowed_cpus(), cli.shards, cli.control_core)?;
    let io_memory = runtime::io_memory_per_executor(plan.executor_count() + CHANNEL_EXECUTORS, runtime::memlock_limit())?;

    // Metrics first: once the worker port answers, /metrics does too.
    let metrics = crate::metrics::Metrics::new(plan.shard_cpus.len());
    if let Some(addr) = &config.metrics {
        match std::net::TcpListener::bind(addr) {
            Ok(listener) => {
                tracing::info!("metrics on http://{addr}/metrics");
                crate::metrics::serve(listener, metrics.clone());
            }
            Err(e) => tracing::warn!("metrics endpoint {addr} not available ({e}); running without it (set `metrics:` in the config)"),
        }
    }

    // Before any port is bound: an unreachable Redis is a start-up failure, not a running
    // engine whose every stream call fails.
    if let Some(redis) = config.stream.as_ref().and_then(|s| s.redis()) {
        if let Ok(url) = ringcast_shards::redis::RedisUrl::parse(&redis.redis_url) {
            ringcast_shards::redis::client::check_reachable(&url, ringcast_shards::redis::client::CONNECT_TIMEOUT)
                .map_err(|why| StartError::Redis { address: url.address(), why })?;
            tracing::info!("iii-stream: adapter redis at {}", url.address());
        }
    }

    let wm = &config.worker_manager;
    // Started here, on an unpinned thread, so that its threads are not pinned to the control core.
    let telemetry = crate::telemetry::Telemetry::start(&wm.telemetry, metrics.clone());
    let (worker_fd, worker_addr) = bind(&wm.host, wm.port, "iii-worker-manager", false)?;
    let mut extra_listeners = Vec::new();
    for extra in &config.extra_worker_managers {
        let (fd, addr) = bind(&extra.host, extra.port, "iii-worker-manager", false)?;
        let access = if extra.rbac.is_some() { "with rbac" } else { "without rbac" };
        tracing::info!("extra worker listener on ws://{addr}/ ({access})");
        extra_listeners.push((fd, extra.clone()));
    }
    // One SO_REUSEPORT listener per shard on the stream port: the kernel spreads subscribers.
    let mut stream_fds = Vec::new();
    let mut stream_addr = None;
    let mut shard_config = None;
    if let Some(stream) = &config.stream {
        let shards = crate::shard_config::shard_config(stream);
        ringcast_shards::store::prepare(&shards.store, plan.shard_cpus.len())?;
        shard_config = Some(shards);
        for _ in &plan.shard_cpus {
            let (fd, addr) = bind(&stream.host, stream.port, "iii-stream", true)?;
            stream_fds.push(fd);
            stream_addr = Some(addr);
        }
    }

    // The built-in queue: on every shard, durable beside a file-based stream store.
    let queue_settings = Arc::new(crate::queue::config::module_settings(&config.queue, config.stream.as_ref()));
    ringcast_shards::queue::prepare(&queue_settings, plan.shard_cpus.len())?;
    if queue_settings.store.is_none() {
        tracing::debug!("built-in queue: messages are kept in memory (lost on restart); a file_based iii-stream store makes them durable");
    }

    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, shutdown.clone())
            .map_err(StartError::Signal)?;
    }

    let shard_count = plan.shard_cpus.len();
    // The control core accepts its first connection only once every executor runs (its rings
    // made), so a client that got in sees the whole engine: no core still starting behind it.
    let cores_up = Arc::new(std::sync::Barrier::new(1 + CHANNEL_EXECUTORS + shard_count));

    // The channels executor: channel sockets and buffers, off the control core.
    let (channels, channels_core) =
        crate::channels::start(wm, metrics.channels.clone(), shutdown.clone(), io_memory, cores_up.clone())?;

    let (shard_senders, shard_inboxes): (Vec<_>, Vec<_>) =
        (0..shard_count).map(|_| futures_channel::mpsc::unbounded()).unzip();
    let (control_requests_tx, control_requests_rx) = futures_channel::mpsc::unbounded();
    let (queue_senders, queue_inboxes): (Vec<_>, Vec<_>) = (0..shard_count).map(|_| futures_channel::mpsc::unbounded()).unzip();
    let (queue_calls_tx, queue_calls_rx) = futures_channel::mpsc::unbounded();
    let control_config = wm.clone();
    let control_flag = shutdown.clone();
    let control_metrics = metrics.clone();
    let streams = config.stream.as_ref().map(|_| (StreamService::new(shard_senders.clone()), control_requests_rx));
    // The control core starts empty: the engine's own functions always, the stream functions
    // when `iii-stream` is configured, with the task that serves the shards' requests.
    // The shards' requests are served only once the borrow is released: glommio may poll a new
    // task at once, and a join can already be waiting (the stream port is bound before the
    // control core starts).
    // The HTTP function threads start here, not on the control core, so that they are not
    // pinned to its CPU.
    let http_functions = crate::http_functions::HttpService::start(&config.http_functions, metrics.http_functions.clone());
    let install = move |engine: &Rc<RefCell<control::engine::Engine>>| {
        engine.borrow_mut().set_telemetry(telemetry);
        control::builtins::install(&mut engine.borrow_mut());
        if let Some(service) = http_functions {
            engine.borrow_mut().install_http_functions(service);
        }
        crate::channels::install(&mut engine.borrow_mut(), channels);
        crate::queue::install(&mut engine.borrow_mut(), crate::queue::QueueService::new(queue_senders));
        glommio::spawn_local(crate::queue::serve_calls(engine.clone(), queue_calls_rx)).detach();
        if let Some((service, requests)) = streams {
            stream::functions::install(&mut engine.borrow_mut(), service);
            glommio::spawn_local(stream::functions::serve_shard_requests(engine.clone(), requests)).detach();
        }
    };
    let spin_on = |cpu: usize| {
        let micros = if plan.is_shared(cpu) { 0 } else { cli.spin_us };
        std::time::Duration::from_micros(micros)
    };
    let control_up = cores_up.clone();
    let control = runtime::spawn_pinned("ringcast-control", plan.control_cpu, io_memory, spin_on(plan.control_cpu), move || {
        control_up.wait();
        control::run(worker_fd, control_config, extra_listeners, control_metrics, control_flag, install)
    })?;

    let mut shards = Vec::new();
    let mut stream_fds = stream_fds.into_iter();
    for (((index, cpu), inbox), queue_inbox) in plan.shard_cpus.iter().enumerate().zip(shard_inboxes).zip(queue_inboxes) {
        let queue_ctx = ringcast_shards::queue::QueueContext {
            index,
            settings: queue_settings.clone(),
            control: queue_calls_tx.clone(),
            metrics: metrics.queues.clone(),
        };
        let flag = shutdown.clone();
        let stream_config = shard_config.clone();
        let listener = stream_fds.next();
        let ctx_peers = shard_senders.clone();
        let control_tx = control_requests_tx.clone();
        let metrics = metrics.clone();
        let up = cores_up.clone();
        let handle = runtime::spawn_pinned(&format!("ringcast-shard-{index}"), *cpu, io_memory, spin_on(*cpu), move || {
            up.wait();
            async move {
                ringcast_shards::queue::start(queue_ctx, queue_inbox)?;
                match (stream_config, listener) {
                    (Some(config), Some(listener)) => {
                        let ctx = ShardContext { index, peers: ctx_peers, control: control_tx, config, metrics: metrics.shards.clone() };
                        ringcast_shards::start::run(ctx, inbox, listener, flag).await
                    }
                    _ => {
                        runtime::until_shutdown(&flag).await;
                        Ok(())
                    }
                }
            }
        });
        match handle {
            Ok(h) => shards.push((format!("ringcast-shard-{index}"), h)),
            Err(e) => {
                shutdown.store(true, Ordering::Relaxed);
                return Err(e.into());
            }
        }
    }
    if let Some(addr) = stream_addr {
        tracing::info!("streams: subscribers on ws://{addr}/ served by {shard_count} shard(s)");
    }
    tracing::info!(
        control_cpu = plan.control_cpu,
        shard_cpus = ?plan.shard_cpus,
        io_memory_kib = io_memory / 1024,
        spin_us = cli.spin_us,
        "ringcast ready: workers on ws://{worker_addr}/"
    );
    if plan.is_shared(plan.control_cpu) {
        tracing::info!("the control core's CPU also runs a shard: both sleep as soon as they are idle instead of polling (--spin-us)");
    }

    // Every core is watched: the first to end before shutdown (a panic, a store that cannot be
    // opened, an unexpected return) ends the process, instead of leaving the other cores
    // serving while every call for the dead one hangs.
    let (ends_tx, ends) = std::sync::mpsc::channel();
    let cores = 1 + CHANNEL_EXECUTORS + shards.len();
    let watched = std::iter::once(watch("ringcast-control".into(), control, ends_tx.clone(), |()| CoreEnd::Done))
        .chain(std::iter::once(watch("ringcast-channels".into(), channels_core, ends_tx.clone(), |()| CoreEnd::Done)))
        .chain(shards.into_iter().map(|(name, h)| {
            watch(name, h, ends_tx.clone(), |r: Result<(), StoreStartError>| r.map_or_else(CoreEnd::StartFailed, |()| CoreEnd::Done))
        }))
        .collect::<Result<Vec<()>, StartError>>();
    drop(ends_tx);
    if let Err(e) = watched {
        shutdown.store(true, Ordering::Relaxed);
        return Err(e);
    }
    for (name, end) in ends.iter().take(cores) {
        match end {
            CoreEnd::Done if shutdown.load(Ordering::Relaxed) => {}
            CoreEnd::Done => {
                tracing::error!("{name} ended unexpectedly; exiting ({EXIT_CORE_DIED}) so a supervisor can restart ringcast");
                std::process::exit(EXIT_CORE_DIED);
            }
            CoreEnd::StartFailed(error) => {
                shutdown.store(true, Ordering::Relaxed);
                return Err(error.into());
            }
            CoreEnd::Died(why) => {
                tracing::error!("{name} died ({why}); exiting ({EXIT_CORE_DIED}) so a supervisor can restart ringcast");
                std::process::exit(EXIT_CORE_DIED);
            }
        }
    }
    tracing::info!("ringcast stopped");
    Ok(())
}
