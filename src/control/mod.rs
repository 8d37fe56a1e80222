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
pub(crate) mod invocations;
pub(crate) mod ns_map;
pub(crate) mod outbox;
pub(crate) mod triggers;
pub mod wire;
pub(crate) mod workers;

#[cfg(test)]
pub(crate) mod test_support;


use engine::Engine;
use glommio::net::TcpListener;
use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::WorkerManagerConfig;

/// How often the control core looks at the shutdown flag set by the signal handler.
const SHUTDOWN_POLL: Duration = Duration::from_millis(25);
/// Time given to writers to flush close frames and error answers before the executor stops.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

/// Runs the control core until `shutdown` is set: accepts workers on `listener` (bound by the
/// boot code so bind errors are reported before any executor starts). `install` runs once on
/// the control executor, before the first worker is accepted, to register the in-process
/// functions and trigger types and start what serves them; it must not hold the engine
/// borrowed while it spawns (glommio may poll a new task at once).
pub async fn run(
    listener: OwnedFd,
    config: WorkerManagerConfig,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: Arc<AtomicBool>,
    install: impl FnOnce(&Rc<RefCell<Engine>>),
) {
    let listener_fd = listener.as_raw_fd();
    // SAFETY: the fd is a bound, listening TCP socket whose ownership we take here.
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
    let timeout = config.invocation_timeout_ms;
    let engine = Engine::new(config, metrics);
    install(&engine);

    let acceptor = engine.clone();
    let stopping = shutdown.clone();
    glommio::spawn_local(async move {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    glommio::spawn_local(connection::serve(acceptor.clone(), stream)).detach();
                }
                Err(_) if stopping.load(Ordering::Relaxed) => return,
                Err(e) => {
                    tracing::warn!("worker port accept failed: {e}");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
    .detach();

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

    while !shutdown.load(Ordering::Relaxed) {
        glommio::timer::sleep(SHUTDOWN_POLL).await;
    }
    tracing::info!("shutting down: answering waiting callers and closing worker sockets");
    stop_listening(listener_fd);
    engine.borrow_mut().shutdown();
    glommio::timer::sleep(SHUTDOWN_GRACE).await;
}

/// Ends the pending accept on a listening socket, so the port is free the moment the process
/// exits (an accept still queued in io_uring would keep it bound a little longer).
pub fn stop_listening(fd: RawFd) {
    // SAFETY: shutdown(2) on a listening socket we own; it only wakes its pending accept.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}
