//! The control core: serves the iii worker protocol on its own executor and owns the function,
//! worker and trigger registries.

pub(crate) mod builtins;
mod connection;
pub mod engine;
pub(crate) mod invocation;
pub(crate) mod registry;
pub(crate) mod triggers;
pub mod wire;

use engine::Engine;
use glommio::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::WorkerManagerConfig;

/// Requests from the shards (auth, join/leave triggers).
pub type ShardRequests = futures_channel::mpsc::UnboundedReceiver<crate::stream::messages::ControlRequest>;

/// How often the control core looks at the shutdown flag set by the signal handler.
const SHUTDOWN_POLL: Duration = Duration::from_millis(25);
/// Time given to writers to flush close frames and error answers before the executor stops.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

/// Runs the control core until `shutdown` is set: accepts workers on `listener` (bound by the
/// boot code so bind errors are reported before any executor starts).
pub async fn run(
    listener: OwnedFd,
    config: WorkerManagerConfig,
    streams: Option<(crate::stream::StreamService, ShardRequests)>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: Arc<AtomicBool>,
) {
    let listener_fd = listener.as_raw_fd();
    // SAFETY: the fd is a bound, listening TCP socket whose ownership we take here.
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
    let timeout = config.invocation_timeout_ms;
    let (service, requests) = match streams {
        Some((service, requests)) => (Some(service), Some(requests)),
        None => (None, None),
    };
    let engine = Engine::new(config, service, metrics);
    if let Some(requests) = requests {
        glommio::spawn_local(crate::stream::functions::serve_shard_requests(engine.clone(), requests)).detach();
    }

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
