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
use ringcast_shards::runtime;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::WorkerManagerConfig;

/// Requests from the shards (auth, join/leave triggers).
pub type ShardRequests = futures_channel::mpsc::UnboundedReceiver<ringcast_shards::messages::ControlRequest>;

/// Runs the control core until `shutdown` is set: accepts workers on `listener` (bound by the
/// boot code so bind errors are reported before any executor starts).
pub async fn run(
    listener: OwnedFd,
    config: WorkerManagerConfig,
    streams: Option<(crate::stream::StreamService, ShardRequests)>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: Arc<AtomicBool>,
) {
    let (listener, listener_fd) = runtime::listener(listener);
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
    runtime::spawn_accept_loop(listener, "worker port".to_string(), shutdown.clone(), move |stream| {
        connection::serve(acceptor.clone(), stream)
    });

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
    runtime::stop_listening(listener_fd);
    engine.borrow_mut().shutdown();
    glommio::timer::sleep(runtime::SHUTDOWN_GRACE).await;
}
