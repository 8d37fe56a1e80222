//! The control core: serves the iii worker protocol on its own executor and owns the worker,
//! function, invocation and trigger registries. It knows nothing of the stream module: the boot
//! code installs the in-process functions (the engine's own and `stream::*`) when the engine
//! starts.
//!
//! One file per job: `connection.rs` (a socket: upgrade, read loop, writer), `outbox.rs` (a
//! worker's outbound queue), `wire.rs` (the message formats), `engine.rs` (the state and the
//! dispatch of each message), and one file per registry — `workers.rs`, `functions.rs`,
//! `invocations.rs`, `triggers.rs` — with the messages that change it; `builtins.rs` holds the
//! engine's own `engine::*` functions, `ns_map.rs` the `(namespace, id)` table they all use.

pub(crate) mod builtins;
mod connection;
pub mod engine;
pub(crate) mod functions;
pub(crate) mod http_functions;
pub(crate) mod invocations;
pub(crate) mod ns_map;
pub(crate) mod outbox;
pub mod rbac;
pub(crate) mod triggers;
pub mod wire;
pub(crate) mod workers;

#[cfg(test)]
pub(crate) mod test_support;


use engine::Engine;
use ringcast_shards::runtime;
use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::WorkerManagerConfig;


/// Runs the control core until `shutdown` is set: accepts workers on `listener` and on each of
/// `extra_listeners` (further `iii-worker-manager` entries with their own settings), all bound
/// by the boot code so bind errors are reported before any executor starts. `install` runs once on
/// the control executor, before the first worker is accepted, to register the in-process
/// functions and trigger types and start what serves them; it must not hold the engine
/// borrowed while it spawns (glommio may poll a new task at once).
pub async fn run(
    listener: OwnedFd,
    config: WorkerManagerConfig,
    extra_listeners: Vec<(OwnedFd, WorkerManagerConfig)>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: Arc<AtomicBool>,
    install: impl FnOnce(&Rc<RefCell<Engine>>),
) {
    let timeout = config.invocation_timeout_ms;
    let listeners: Vec<(OwnedFd, WorkerManagerConfig)> = std::iter::once((listener, config.clone())).chain(extra_listeners).collect();
    let engine = Engine::new(config, metrics);
    install(&engine);

    let mut listener_fds = Vec::new();
    for (fd, settings) in listeners {
        let (listener, listener_fd) = runtime::listener(fd);
        listener_fds.push(listener_fd);
        let what = format!("worker port {}", settings.port);
        let settings = Rc::new(settings);
        let acceptor = engine.clone();
        runtime::spawn_accept_loop(listener, what, shutdown.clone(), move |stream| {
            connection::serve(acceptor.clone(), stream, settings.clone())
        });
    }

    if let Some(timeout_ms) = timeout {
        let sweeper = engine.clone();
        let period = Duration::from_millis(timeout_ms.clamp(1, 1000));
        glommio::spawn_local(async move {
            loop {
                let wait = sweeper.borrow_mut().expire_invocations(Instant::now());
                glommio::timer::sleep(wait.unwrap_or(period).min(period)).await;
            }
        })
        .detach();
    }

    runtime::until_shutdown(&shutdown).await;
    tracing::info!("shutting down: answering waiting callers and closing worker sockets");
    for listener_fd in listener_fds {
        runtime::stop_listening(listener_fd);
    }
    engine.borrow_mut().shutdown();
    glommio::timer::sleep(runtime::SHUTDOWN_GRACE).await;
}
