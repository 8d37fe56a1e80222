//! Starting a shard core: opens its store, creates the shard, spawns its tasks (compactor,
//! flusher, stall reaper, inbox, accept loop) and runs until shutdown.

use crate::config::StoreLocation;
use crate::delivery::stall_check_interval;
use crate::messages::ShardMsg;
use crate::runtime;
use crate::shard::{Shard, ShardContext};
use crate::subscriber;
use futures_util::StreamExt;
use std::sync::atomic::AtomicBool;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// How often the file store compacts a slice in the background.
const COMPACTION_PAUSE: Duration = Duration::from_millis(50);

/// Test-only fault trigger: `RINGCAST_TEST_PANIC_SHARD=<index>` makes that shard panic on the
/// first message of its inbox, to show that a dying core takes the process down (exit 70)
/// instead of leaving it half alive. Not a setting; read once at shard start.
fn induced_panic(index: usize) -> bool {
    std::env::var("RINGCAST_TEST_PANIC_SHARD").is_ok_and(|v| v == index.to_string())
}

/// Runs shard `ctx.index` until `shutdown` is set; fails (before serving) when its store cannot
/// be opened.
pub async fn run(
    ctx: ShardContext,
    inbox: futures_channel::mpsc::UnboundedReceiver<ShardMsg>,
    listener_fd: std::os::fd::OwnedFd,
    shutdown: Arc<AtomicBool>,
) -> Result<(), crate::store::StoreStartError> {
    let index = ctx.index;
    let store = crate::store::open_for_shard(&ctx.config.store, index)?;
    let stall_timeout = ctx.config.slow_subscriber_timeout;
    let file_store = matches!(ctx.config.store.location, StoreLocation::File { .. });
    let shard = Shard::new(ctx, store);
    // The `redis` adapter: operations wait in the inbox until the connections are up.
    crate::redis::backend::RedisBackend::wait_connected(&shard, crate::redis::client::CONNECT_TIMEOUT).await;
    if file_store {
        let compactor = Rc::downgrade(&shard);
        glommio::spawn_local(async move {
            while let Some(shard) = compactor.upgrade() {
                shard.borrow_mut().compact_step();
                drop(shard);
                glommio::timer::sleep(COMPACTION_PAUSE).await;
            }
        })
        .detach();
    }

    // Writes what fan-out queued, once the burst that queued it is over (the inbox task yields
    // only when its inbox is empty or its time slice ends), so frames still coalesce under load.
    let flusher = Rc::downgrade(&shard);
    glommio::spawn_local(async move {
        let mut scratch = Vec::new();
        let mut batch = Vec::new();
        loop {
            let ready = std::future::poll_fn(|cx| match flusher.upgrade() {
                None => std::task::Poll::Ready(false),
                Some(shard) => shard.borrow_mut().poll_unflushed(cx, &mut batch).map(|()| true),
            })
            .await;
            let Some(shard) = flusher.upgrade().filter(|_| ready) else { return };
            shard.borrow().flush(&mut batch, &mut scratch);
        }
    })
    .detach();

    // Stalled subscribers: closed once they have held bytes without progress for the timeout,
    // so their bytes are freed even when no new event comes to overflow their queue.
    if let Some(stall_timeout) = stall_timeout {
        let reaper = Rc::downgrade(&shard);
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(stall_check_interval(stall_timeout)).await;
                let Some(shard) = reaper.upgrade() else { return };
                shard.borrow_mut().close_stalled(stall_timeout);
            }
        })
        .detach();
    }

    // The inbox never waits on subscribers: a slow one is closed, not waited for.
    let inbox_shard = shard.clone();
    let panic_on_first_message = induced_panic(index);
    glommio::spawn_local(async move {
        let mut inbox = inbox;
        while let Some(msg) = inbox.next().await {
            if panic_on_first_message {
                panic!("shard {index}: induced failure (RINGCAST_TEST_PANIC_SHARD)");
            }
            if matches!(msg, ShardMsg::GroupOp { .. }) {
                // A waiting join goes first, so writes cannot starve it.
                Shard::joins_served(&inbox_shard).await;
            }
            inbox_shard.borrow_mut().handle(msg);
        }
    })
    .detach();

    let (listener, listener_fd) = runtime::listener(listener_fd);
    let accept_shard = shard.clone();
    runtime::spawn_accept_loop(listener, format!("stream port of shard {index}"), shutdown.clone(), move |stream| {
        subscriber::serve(accept_shard.clone(), stream)
    });

    runtime::until_shutdown(&shutdown).await;
    runtime::stop_listening(listener_fd);
    shard.borrow_mut().shutdown();
    glommio::timer::sleep(runtime::SHUTDOWN_GRACE).await;
    Ok(())
}


