//! The `ringcast-channels` executor: the channel registry, the upgrade of channel sockets, one
//! task per connected end, and reclaiming.
//!
//! Ownership: the registry holds each channel until both ends are gone or the connect timeout
//! reclaims it; each end's task holds its socket and a [`Claim`] on its end, whose drop marks
//! the end free again (upgrade failed) or gone (connection over) on every way out.

use super::pipe::{count, CloseReason, Pipe, Popped, WriterEvent};
use super::request::{self, Direction};
use super::{ChannelMetrics, ChannelSettings, Command, CLOSE_PEER_NEVER_CONNECTED, CLOSE_PEER_WENT_AWAY};
use async_tungstenite::{WebSocketReceiver, WebSocketSender};
use futures_channel::mpsc::UnboundedReceiver;
use futures_util::future::Either;
use futures_util::{SinkExt, StreamExt};
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::StatusCode;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::error::ProtocolError;
use tungstenite::{Error as WsError, Message};

/// Longest the engine tries to write a close frame and waits for the peer's answer.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// A peer whose host vanished with bytes unacknowledged is dropped by the kernel after this
/// (TCP_USER_TIMEOUT); keepalive, set by the worker port, finds idle ones.
const USER_TIMEOUT: Duration = Duration::from_secs(60);
/// Close code for a frame over `max_message_bytes`.
const CLOSE_TOO_BIG: u16 = 1009;
/// Close code for a frame that breaks the WebSocket protocol.
const CLOSE_PROTOCOL: u16 = 1002;
/// Close code for a text frame that is not UTF-8.
const CLOSE_BAD_DATA: u16 = 1007;
/// Close code and reason when the engine stops.
const CLOSE_SHUTDOWN: u16 = 1001;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EndState {
    /// Nobody has connected.
    Free,
    /// A socket asked for it; its upgrade is under way.
    Upgrading,
    Connected,
    /// Its socket came and went; it cannot be taken again.
    Gone,
}

struct Channel {
    id: String,
    key: String,
    created: Instant,
    pipe: Pipe,
    writer: Cell<EndState>,
    reader: Cell<EndState>,
}

impl Channel {
    fn end(&self, dir: Direction) -> &Cell<EndState> {
        match dir {
            Direction::Read => &self.reader,
            Direction::Write => &self.writer,
        }
    }

    /// Both ends have connected at some point.
    fn both_came(&self) -> bool {
        [self.writer.get(), self.reader.get()].iter().all(|s| matches!(s, EndState::Connected | EndState::Gone))
    }

    fn missing_ends(&self) -> &'static str {
        let came = |s: EndState| matches!(s, EndState::Connected | EndState::Gone);
        match (came(self.writer.get()), came(self.reader.get())) {
            (false, false) => "neither end connected",
            (false, true) => "the writer never connected",
            _ => "the reader never connected",
        }
    }
}

struct Relay {
    channels: RefCell<HashMap<String, Rc<Channel>>>,
    settings: ChannelSettings,
    metrics: Arc<ChannelMetrics>,
}

impl Relay {
    fn insert(&self, id: String, key: String, frames: usize, created: Instant) {
        let pipe = Pipe::new(frames, self.settings.max_buffer_bytes, self.metrics.clone());
        let channel = Channel {
            id: id.clone(),
            key,
            created,
            pipe,
            writer: Cell::new(EndState::Free),
            reader: Cell::new(EndState::Free),
        };
        self.channels.borrow_mut().insert(id, Rc::new(channel));
    }

    /// Forgets a channel (its open count goes down once); its ends' tasks finish on their own.
    fn remove(&self, id: &str) -> Option<Rc<Channel>> {
        let removed = self.channels.borrow_mut().remove(id);
        if removed.is_some() {
            self.metrics.open.fetch_sub(1, Relaxed);
        }
        removed
    }

    /// Decides an upgrade request: a claim on the end it asks for, or the HTTP refusal.
    fn admit(self: &Rc<Self>, target: &str, peer: &str) -> Result<Claim, (StatusCode, String)> {
        let ask = request::parse(target).map_err(|e| {
            tracing::debug!(peer, "channel upgrade refused: {e}");
            (StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST), e.to_string())
        })?;
        let channel = self.channels.borrow().get(&ask.channel_id).cloned();
        // The key is compared in constant time; an unknown channel and a wrong key get the same
        // answer, so a refusal tells nothing about which channels exist.
        let channel = channel.filter(|c| bool::from(c.key.as_bytes().ct_eq(ask.key.as_bytes())));
        let Some(channel) = channel else {
            self.metrics.refused_total.fetch_add(1, Relaxed);
            tracing::warn!(peer, channel = %ask.channel_id, dir = ask.dir.as_str(), "channel upgrade refused: unknown channel or wrong access key (404)");
            return Err((StatusCode::NOT_FOUND, "Channel not found".into()));
        };
        let end = channel.end(ask.dir);
        if end.get() != EndState::Free {
            tracing::warn!(peer, channel = %channel.id, dir = ask.dir.as_str(), "channel upgrade refused: that end is already taken (409)");
            return Err((StatusCode::CONFLICT, format!("Channel {} end already taken", ask.dir.as_str())));
        }
        end.set(EndState::Upgrading);
        Ok(Claim { relay: self.clone(), channel, dir: ask.dir })
    }

    /// Reclaims channels an end of which did not connect within the connect timeout; the end
    /// that did is closed with 4001.
    fn sweep(&self, now: Instant) {
        let timeout = self.settings.connect_timeout;
        let expired: Vec<Rc<Channel>> = self
            .channels
            .borrow()
            .values()
            .filter(|c| !c.both_came() && now.saturating_duration_since(c.created) >= timeout)
            .cloned()
            .collect();
        for channel in expired {
            self.remove(&channel.id);
            self.metrics.timeouts_total.fetch_add(1, Relaxed);
            tracing::warn!(
                channel = %channel.id,
                timeout_ms = timeout.as_millis() as u64,
                "channel reclaimed: {} within channel_connect_timeout_ms",
                channel.missing_ends()
            );
            channel.pipe.abort(CloseReason::new(CLOSE_PEER_NEVER_CONNECTED, "channel peer never connected"));
        }
    }

    /// Ends every channel (engine shutdown).
    fn abort_all(&self, reason: CloseReason) {
        let all: Vec<String> = self.channels.borrow().keys().cloned().collect();
        for id in all {
            if let Some(channel) = self.remove(&id) {
                channel.pipe.abort(reason.clone());
            }
        }
    }
}

/// A socket's hold on one end of a channel, from its upgrade request to its end.
struct Claim {
    relay: Rc<Relay>,
    channel: Rc<Channel>,
    dir: Direction,
}

impl Claim {
    fn connected(&self) {
        self.channel.end(self.dir).set(EndState::Connected);
        self.relay.metrics.sockets.fetch_add(1, Relaxed);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let end = self.channel.end(self.dir);
        match end.get() {
            // The upgrade did not complete: another socket may take the end.
            EndState::Upgrading => end.set(EndState::Free),
            EndState::Connected => {
                end.set(EndState::Gone);
                self.relay.metrics.sockets.fetch_sub(1, Relaxed);
                // Whatever way the end's task ended, the other side learns it (the first
                // reason recorded stands).
                let gone = CloseReason::new(CLOSE_PEER_WENT_AWAY, format!("channel {} went away", end_name(self.dir)));
                match self.dir {
                    Direction::Write => self.channel.pipe.finish_writer(gone),
                    Direction::Read => self.channel.pipe.finish_reader(gone),
                }
                let both_gone = self.channel.writer.get() == EndState::Gone && self.channel.reader.get() == EndState::Gone;
                if both_gone && self.relay.remove(&self.channel.id).is_some() {
                    tracing::debug!(channel = %self.channel.id, "channel reclaimed: both ends gone");
                }
            }
            EndState::Free | EndState::Gone => {}
        }
    }
}

fn end_name(dir: Direction) -> &'static str {
    match dir {
        Direction::Read => "reader",
        Direction::Write => "writer",
    }
}

/// The executor's body: serves the control core's commands until shutdown, sweeping expired
/// channels meanwhile.
pub(super) async fn run(
    settings: ChannelSettings,
    metrics: Arc<ChannelMetrics>,
    mut inbox: UnboundedReceiver<Command>,
    shutdown: Arc<AtomicBool>,
) {
    let sweep_every = (settings.connect_timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let relay = Rc::new(Relay { channels: RefCell::new(HashMap::new()), settings, metrics });

    let commands = relay.clone();
    glommio::spawn_local(async move {
        while let Some(command) = inbox.next().await {
            match command {
                Command::Create { id, key, frames, created } => commands.insert(id, key, frames, created),
                Command::Socket(fd) => {
                    glommio::spawn_local(serve(commands.clone(), fd)).detach();
                }
            }
        }
    })
    .detach();

    let sweeper = relay.clone();
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(sweep_every).await;
            sweeper.sweep(Instant::now());
        }
    })
    .detach();

    ringcast_shards::runtime::until_shutdown(&shutdown).await;
    relay.abort_all(CloseReason::new(CLOSE_SHUTDOWN, "engine shutting down"));
    glommio::timer::sleep(ringcast_shards::runtime::SHUTDOWN_GRACE).await;
}

fn refuse(status: StatusCode, body: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body));
    *response.status_mut() = status;
    response
}

fn set_user_timeout(stream: &TcpStream) {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the fd belongs to `stream`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    if let Err(e) = socket2::SockRef::from(&fd).set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        tracing::debug!("could not set TCP_USER_TIMEOUT on a channel socket: {e}");
    }
}

/// One channel connection handed over by the worker port, from its upgrade to its end.
async fn serve(relay: Rc<Relay>, fd: OwnedFd) {
    // SAFETY: a connected TCP socket whose ownership the worker port handed over.
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    set_user_timeout(&stream);
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut ws_config = WebSocketConfig::default();
    ws_config.max_message_size = Some(relay.settings.max_message_bytes);
    ws_config.max_frame_size = Some(relay.settings.max_message_bytes);

    let claim: Rc<RefCell<Option<Claim>>> = Rc::new(RefCell::new(None));
    let slot = claim.clone();
    let admitting = relay.clone();
    let callback_peer = peer.clone();
    // The error type is tungstenite's (an HTTP response); it is built once per refused upgrade.
    #[allow(clippy::result_large_err)]
    let callback = move |request: &Request, response: Response| {
        let target = request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        match admitting.admit(target, &callback_peer) {
            Ok(c) => {
                *slot.borrow_mut() = Some(c);
                Ok(response)
            }
            Err((status, body)) => Err(refuse(status, body)),
        }
    };
    let handshake = async_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config));
    let ws = match glommio::timer::timeout(relay.settings.handshake_timeout, async { Ok(handshake.await) }).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(peer, "channel upgrade refused or failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(peer, "channel upgrade not completed within handshake_timeout_ms; closed");
            return;
        }
    };
    let Some(claim) = claim.borrow_mut().take() else { return };
    claim.connected();
    tracing::debug!(peer, channel = %claim.channel.id, dir = claim.dir.as_str(), "channel end connected");
    let (sink, source) = ws.split();
    match claim.dir {
        Direction::Write => run_writer(&claim.channel.pipe, sink, source).await,
        Direction::Read => run_reader(&claim.channel.pipe, &relay.metrics, sink, source).await,
    }
    // `claim` drops here: the end is gone, and the channel reclaimed if both are.
}

type Sink = WebSocketSender<TcpStream>;
type Source = WebSocketReceiver<TcpStream>;

fn reason_of(frame: Option<CloseFrame>) -> CloseReason {
    match frame {
        Some(f) => CloseReason::new(u16::from(f.code), f.reason.as_str()),
        None => CloseReason::new(1000, ""),
    }
}

/// The writer's end: its frames go into the pipe while there is room; when there is none its
/// socket is not read. Ends with the writer's Close (passed on to the reader), its
/// disappearance, or a stop (the reader left, the engine ends the channel).
async fn run_writer(pipe: &Pipe, sink: Sink, mut source: Source) {
    let close_with = loop {
        if let WriterEvent::Stop(reason) = pipe.writer_event(true).await {
            break Ending::Send(reason);
        }
        let stop = std::pin::pin!(pipe.writer_event(false));
        let next = futures_util::future::select(source.next(), stop).await;
        match next {
            Either::Left((Some(Ok(message)), _)) => match message {
                Message::Text(_) | Message::Binary(_) => pipe.push(message),
                Message::Close(frame) => {
                    pipe.finish_writer(reason_of(frame));
                    break Ending::PeerClosed;
                }
                _ => {} // ping (answered by tungstenite), pong
            },
            Either::Left((Some(Err(WsError::Capacity(e))), _)) => {
                tracing::warn!("channel writer closed: {e}");
                pipe.finish_writer(CloseReason::new(CLOSE_TOO_BIG, "channel writer sent a message over max_message_bytes"));
                break Ending::Send(CloseReason::new(CLOSE_TOO_BIG, "message too big"));
            }
            Either::Left((Some(Err(e)), _)) if broke_protocol(&e) => {
                tracing::warn!("channel writer closed: it broke the WebSocket protocol: {e}");
                pipe.finish_writer(CloseReason::new(CLOSE_PEER_WENT_AWAY, "channel writer failed: invalid frame"));
                let code = if matches!(e, WsError::Utf8(_)) { CLOSE_BAD_DATA } else { CLOSE_PROTOCOL };
                break Ending::Send(CloseReason::new(code, "invalid frame"));
            }
            Either::Left((Some(Err(_)) | None, _)) => {
                pipe.finish_writer(CloseReason::new(CLOSE_PEER_WENT_AWAY, "channel writer went away"));
                break Ending::PeerGone;
            }
            Either::Right((WriterEvent::Stop(reason), _)) => break Ending::Send(reason),
            Either::Right((WriterEvent::Room, _)) => {}
        }
    };
    close_socket(sink, source, close_with).await;
}

/// Whether a read error is the peer's fault (an invalid frame), not its disappearance.
fn broke_protocol(e: &WsError) -> bool {
    match e {
        WsError::Utf8(_) => true,
        WsError::Protocol(p) => !matches!(p, ProtocolError::ResetWithoutClosingHandshake),
        _ => false,
    }
}

/// How a channel socket ends.
enum Ending {
    /// The peer sent a Close frame: tungstenite queued the reply, which is flushed.
    PeerClosed,
    /// The peer vanished: nothing to send.
    PeerGone,
    /// The engine closes it with this code and reason, and waits for the peer's answer.
    Send(CloseReason),
}

/// The reader's end: the pipe's frames go to its socket, coalesced into one flush while more
/// are waiting; meanwhile its socket is read for its Close (anything else it sends is
/// discarded). A reader that does not read makes the sends wait, which stops the writer once
/// the pipe is full.
async fn run_reader(pipe: &Pipe, metrics: &ChannelMetrics, mut sink: Sink, mut source: Source) {
    let end = {
        let forward = std::pin::pin!(forward(pipe, metrics, &mut sink));
        let watch = std::pin::pin!(async {
            loop {
                match source.next().await {
                    Some(Ok(Message::Close(frame))) => return Some(frame),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return None,
                }
            }
        });
        match futures_util::future::select(forward, watch).await {
            Either::Left((Some(reason), _)) => Ending::Send(reason),
            Either::Left((None, _)) | Either::Right((None, _)) => {
                pipe.finish_reader(CloseReason::new(CLOSE_PEER_WENT_AWAY, "channel reader went away"));
                Ending::PeerGone
            }
            Either::Right((Some(frame), _)) => {
                pipe.finish_reader(reason_of(frame));
                Ending::PeerClosed
            }
        }
    };
    close_socket(sink, source, end).await;
}

/// Writes the pipe's frames to the reader until the pipe ends (`Some`: the close to send) or a
/// write fails (`None`).
async fn forward(pipe: &Pipe, metrics: &ChannelMetrics, sink: &mut Sink) -> Option<CloseReason> {
    loop {
        let mut next = Some(pipe.pop().await);
        while let Some(popped) = next.take() {
            let frame = match popped {
                Popped::Frame(frame) => frame,
                Popped::End(reason) => {
                    let _ = until_aborted(pipe, sink.flush()).await;
                    return Some(reason);
                }
            };
            let len = match &frame {
                Message::Text(t) => t.len(),
                Message::Binary(b) => b.len(),
                _ => 0,
            };
            match until_aborted(pipe, sink.feed(frame)).await {
                Ok(()) => {}
                Err(Some(reason)) => return Some(reason),
                Err(None) => return None,
            }
            count(&metrics.bytes_relayed_total, len);
            count(&metrics.frames_relayed_total, 1);
            next = pipe.try_pop();
        }
        match until_aborted(pipe, sink.flush()).await {
            Ok(()) => {}
            Err(Some(reason)) => return Some(reason),
            Err(None) => return None,
        }
    }
}

/// Runs one socket write unless the engine aborts the channel first. `Err(Some)`: aborted with
/// that reason; `Err(None)`: the write failed.
async fn until_aborted<E>(pipe: &Pipe, write: impl std::future::Future<Output = Result<(), E>>) -> Result<(), Option<CloseReason>> {
    match futures_util::future::select(std::pin::pin!(write), std::pin::pin!(pipe.aborted())).await {
        Either::Left((Ok(()), _)) => Ok(()),
        Either::Left((Err(_), _)) => Err(None),
        Either::Right((reason, _)) => Err(Some(reason)),
    }
}

/// Ends a channel socket, at most `CLOSE_GRACE` in all: flushes the close reply to a peer
/// that closed first; or sends the engine's close frame and reads (discarding) until the peer
/// answers or leaves, so the close is not destroyed by an RST. Dropping the halves closes the
/// socket.
async fn close_socket(mut sink: Sink, mut source: Source, ending: Ending) {
    let closing = async {
        match ending {
            Ending::PeerClosed => {
                let _ = sink.flush().await;
            }
            Ending::PeerGone => {}
            Ending::Send(r) => {
                let frame = CloseFrame { code: CloseCode::from(r.code), reason: r.reason.into() };
                let _ = sink.send(Message::Close(Some(frame))).await;
                while let Some(Ok(message)) = source.next().await {
                    if message.is_close() {
                        break;
                    }
                }
            }
        }
        Ok(())
    };
    let _ = glommio::timer::timeout(CLOSE_GRACE, closing).await;
}
