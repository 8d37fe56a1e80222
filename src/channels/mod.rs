//! Channels (spec §7): byte streams between workers that bypass the invocation path.
//! `engine::channels::create` makes a channel (a fresh id and access key, returned as a writer
//! and a reader `StreamChannelRef`, spec §2.3); workers then open
//! `/ws/channels/{id}?key=…&dir=write|read` on the worker port and the engine relays the
//! writer's text and binary frames, in order and unmodified, to the reader.
//!
//! Channel traffic never runs on the control core. The control core only looks at the first
//! bytes of each new connection ([`request::classify`], without consuming them) and hands a
//! channel connection's socket, not yet read from, to the `ringcast-channels` executor, a
//! glommio executor thread of its own that does the upgrade and owns every channel socket and
//! buffer. `create` runs on the control core and sends the new channel to that executor over
//! the same queue as the sockets, so a socket never arrives before its channel.
//!
//! Files: `request.rs` (the request target parser), `pipe.rs` (the bounded buffer between the
//! two ends), `relay.rs` (the executor: registry, upgrade, the two ends' tasks, reclaiming).
//!
//! Close codes the engine sends on channel sockets (besides forwarding a peer's own close):
//! 4001 `channel peer never connected` (`channel_connect_timeout_ms` passed), 4002
//! `channel writer went away` / `channel reader went away` (the other end vanished without a
//! Close frame), 1009 (a frame over `max_message_bytes`), 1001 `engine shutting down`.

pub mod request;
mod pipe;
mod relay;

use crate::config::WorkerManagerConfig;
use crate::control::engine::Engine;
use crate::control::functions::{decode_input, reply_now};
use crate::control::wire::ErrorBody;
use futures_channel::mpsc::UnboundedSender;
use serde::Deserialize;
use serde_json::json;
use std::fmt::Write as _;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use pipe::CloseReason;

/// Close code: the other end did not connect within `channel_connect_timeout_ms`.
pub const CLOSE_PEER_NEVER_CONNECTED: u16 = 4001;
/// Close code: the other end vanished (EOF, reset, error) without a Close frame.
pub const CLOSE_PEER_WENT_AWAY: u16 = 4002;

pub fn default_connect_timeout_ms() -> u64 {
    60_000
}
pub fn default_max_channels() -> usize {
    10_000
}
/// The reference's default `buffer_size` (frames).
pub fn default_buffer_size() -> usize {
    64
}
/// The reference's cap on `buffer_size` (frames).
pub fn max_buffer_size() -> usize {
    1024
}
pub fn default_max_buffer_bytes() -> usize {
    16 << 20
}

/// Counters of the channels executor, on `/metrics`.
#[derive(Default)]
pub struct ChannelMetrics {
    /// Channels created and not yet reclaimed.
    pub open: AtomicU64,
    /// Channel sockets connected (upgraded) now.
    pub sockets: AtomicU64,
    /// Payload bytes written to readers.
    pub bytes_relayed_total: AtomicU64,
    /// Frames written to readers.
    pub frames_relayed_total: AtomicU64,
    /// Bytes buffered between writers and readers now.
    pub buffered_bytes: AtomicU64,
    /// Upgrades refused because the channel is unknown or the key is wrong.
    pub refused_total: AtomicU64,
    /// Channels reclaimed because an end never connected.
    pub timeouts_total: AtomicU64,
    /// `engine::channels::create` calls refused by `max_channels`.
    pub limit_refusals_total: AtomicU64,
}

impl ChannelMetrics {
    /// Appends the Prometheus text of every counter.
    pub fn render(&self, out: &mut String) {
        for (name, help, kind, value) in [
            ("ringcast_channels_open", "Channels created and not yet reclaimed", "gauge", &self.open),
            ("ringcast_channel_sockets", "Channel sockets connected", "gauge", &self.sockets),
            ("ringcast_channel_bytes_relayed_total", "Payload bytes relayed from channel writers to readers", "counter", &self.bytes_relayed_total),
            ("ringcast_channel_frames_relayed_total", "Frames relayed from channel writers to readers", "counter", &self.frames_relayed_total),
            ("ringcast_channel_buffered_bytes", "Bytes buffered between channel writers and readers", "gauge", &self.buffered_bytes),
            ("ringcast_channel_refused_total", "Channel upgrades refused: unknown channel or wrong access key", "counter", &self.refused_total),
            ("ringcast_channel_timeouts_total", "Channels reclaimed because an end never connected", "counter", &self.timeouts_total),
            ("ringcast_channel_limit_refusals_total", "engine::channels::create calls refused by max_channels", "counter", &self.limit_refusals_total),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", value.load(Relaxed));
        }
    }
}

/// The channel limits in force, from the `iii-worker-manager` config.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    pub connect_timeout: Duration,
    pub max_channels: usize,
    pub default_buffer: usize,
    pub max_buffer: usize,
    pub max_buffer_bytes: usize,
    pub max_message_bytes: usize,
    pub handshake_timeout: Duration,
}

impl ChannelSettings {
    pub fn from_config(c: &WorkerManagerConfig) -> ChannelSettings {
        ChannelSettings {
            connect_timeout: Duration::from_millis(c.channel_connect_timeout_ms.max(1)),
            max_channels: c.max_channels,
            default_buffer: c.channel_default_buffer_size.max(1),
            max_buffer: c.channel_max_buffer_size.max(1),
            max_buffer_bytes: c.channel_max_buffer_bytes.max(1),
            max_message_bytes: c.max_message_bytes,
            handshake_timeout: Duration::from_millis(c.handshake_timeout_ms.max(1)),
        }
    }

    /// The frames a channel buffers for a create call's `buffer_size`: the default when absent,
    /// at least 1, at most the configured maximum.
    pub fn buffer_frames(&self, requested: Option<i64>) -> usize {
        match requested {
            None => self.default_buffer.min(self.max_buffer),
            Some(n) => usize::try_from(n.max(1)).unwrap_or(usize::MAX).min(self.max_buffer),
        }
    }
}

/// What the control core sends the channels executor, in order.
enum Command {
    /// A channel made by `engine::channels::create`.
    Create { id: String, key: String, frames: usize, created: Instant },
    /// A worker-port connection whose request line is a channel request; nothing was read
    /// from it yet.
    Socket(OwnedFd),
}

/// The control core's handle on the channels executor. Cheap to clone; `Send`.
#[derive(Clone)]
pub struct Channels {
    commands: UnboundedSender<Command>,
    settings: ChannelSettings,
    metrics: Arc<ChannelMetrics>,
}

/// The channels executor could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the ringcast-channels executor: {0} (if this is an out-of-memory or permission error from io_uring, raise the locked memory limit with `ulimit -l`)")]
pub struct StartError(glommio::GlommioError<()>);

/// Starts the `ringcast-channels` executor (unpinned: the kernel places it). It runs until
/// `shutdown` is set, then closes every channel socket with 1001.
pub fn start(
    config: &WorkerManagerConfig,
    metrics: Arc<ChannelMetrics>,
    shutdown: Arc<AtomicBool>,
    io_memory: usize,
    cores_up: Arc<std::sync::Barrier>,
) -> Result<(Channels, glommio::ExecutorJoinHandle<()>), StartError> {
    let settings = ChannelSettings::from_config(config);
    let (commands, inbox) = futures_channel::mpsc::unbounded();
    let executor_settings = settings.clone();
    let executor_metrics = metrics.clone();
    let handle = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("ringcast-channels")
        .io_memory(io_memory)
        .spawn(move || {
            cores_up.wait();
            relay::run(executor_settings, executor_metrics, inbox, shutdown)
        })
        .map_err(StartError)?;
    Ok((Channels { commands, settings, metrics }, handle))
}

#[derive(Deserialize)]
struct CreateInput {
    buffer_size: Option<i64>,
}

impl Channels {
    /// `engine::channels::create`: a fresh id and key (UUID v4 each, from the OS's random
    /// source), returned as the writer and reader refs.
    pub fn create(&self, data: serde_json::Value) -> Result<serde_json::Value, ErrorBody> {
        const ID: &str = "engine::channels::create";
        let input: CreateInput = decode_input(ID, data)?;
        let max = self.settings.max_channels as u64;
        if self.metrics.open.fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1)).is_err() {
            self.metrics.limit_refusals_total.fetch_add(1, Relaxed);
            tracing::warn!(max_channels = max, "engine::channels::create refused: max_channels reached");
            return Err(ErrorBody::new("CHANNEL_LIMIT", format!("too many open channels (max_channels = {max})")));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let key = uuid::Uuid::new_v4().to_string();
        let frames = self.settings.buffer_frames(input.buffer_size);
        let command = Command::Create { id: id.clone(), key: key.clone(), frames, created: Instant::now() };
        if self.commands.unbounded_send(command).is_err() {
            self.metrics.open.fetch_sub(1, Relaxed);
            return Err(ErrorBody::new("engine_shutdown", "the channels executor has stopped"));
        }
        tracing::debug!(channel = %id, buffer_frames = frames, "channel created");
        let end = |direction: &str| json!({ "channel_id": id, "access_key": key, "direction": direction });
        Ok(json!({ "writer": end("write"), "reader": end("read") }))
    }

    /// Hands a worker-port connection whose request line is a channel request to the channels
    /// executor. The fd is duplicated, so the control core's stream can be dropped at once.
    pub fn hand_over(&self, stream: glommio::net::TcpStream) {
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the fd belongs to `stream`, alive for this borrow; the clone is a new fd.
        let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
        match fd.try_clone_to_owned() {
            Ok(fd) => {
                let _ = self.commands.unbounded_send(Command::Socket(fd));
            }
            Err(e) => tracing::warn!("channel connection dropped: cannot duplicate its socket: {e}"),
        }
    }
}

/// The worker port's routing hook: whether the connection's request line is a channel request,
/// looked at with `MSG_PEEK` (nothing is consumed). `None`: the peer went away or sent nothing
/// that decides within `limit`.
pub async fn peek_is_channel(stream: &glommio::net::TcpStream, limit: Duration) -> Option<bool> {
    let deadline = Instant::now() + limit;
    let mut first = [0u8; request::REQUEST_LINE_PREFIX.len()];
    let mut pause = Duration::from_millis(1);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let peeked = glommio::timer::timeout(left, async { Ok(stream.peek(&mut first).await) }).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        match request::classify(first.get(..n).unwrap_or_default()) {
            request::Peeked::Channel => return Some(true),
            request::Peeked::Other => return Some(false),
            // A request line that trickles in: look again after a pause that doubles up to
            // 64 ms (a peek returns at once while bytes are waiting, so this must not spin, and
            // a client that stalls mid-line costs the control core a few peeks a second).
            request::Peeked::Undecided => {
                glommio::timer::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(64));
            }
        }
    }
}

/// Installs `engine::channels::create` and gives the engine the handle its worker port uses to
/// hand channel connections over.
pub fn install(engine: &mut Engine, channels: Channels) {
    let handle = channels.clone();
    engine.register_builtin(
        "engine::channels::create",
        "Creates a streaming channel: a writer and a reader ref for /ws/channels/{id}",
        Rc::new(move |_engine: &mut Engine, data| reply_now(handle.create(data))),
    );
    engine.channels = Some(channels);
}
