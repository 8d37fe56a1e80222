//! One socket on the worker port: the HTTP upgrade and its route (`/`, `/otel`,
//! `/ws/channels/{id}`), then a read loop that decodes frames into the engine and a writer task
//! that drains the connection's outbox, coalescing queued frames into one flush.

use super::engine::Engine;
use super::rbac;
use crate::config::WorkerManagerConfig;
use super::outbox::{OutFrame, Outbox, CLOSE_GOING_AWAY, CLOSE_OUTBOX_FULL};
use super::wire::{self, DecodeError};
use super::workers::WorkerConnId;
use async_tungstenite::{WebSocketReceiver, WebSocketSender};
use futures_channel::mpsc::{unbounded, UnboundedReceiver};
use futures_util::future::Either;
use futures_util::{SinkExt, StreamExt};
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::StatusCode;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Error as WsError, Message};

/// Which endpoint an upgrade asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Route {
    Worker,
    Otel,
}

/// Close code for a message over the configured size limit.
const CLOSE_TOO_BIG: u16 = 1009;
/// Close code for a worker silent past the ping timeout (it is taken to be gone).
const CLOSE_PING_TIMEOUT: u16 = CLOSE_GOING_AWAY;
/// Longest the engine tries to write a close frame once a connection has ended; a peer that
/// does not read gets its socket closed without one.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// TCP keepalive on worker sockets: a peer whose host vanished (no FIN, no RST) is dropped by
/// the kernel even when the connection is idle and pings are off.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

fn set_keepalive(stream: &TcpStream) {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the fd belongs to `stream`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = socket2::SockRef::from(&fd).set_tcp_keepalive(&keepalive) {
        tracing::debug!("could not set TCP keepalive on a worker socket: {e}");
    }
}

fn refuse(status: StatusCode, body: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body.to_string()));
    *response.status_mut() = status;
    response
}

/// Serves one accepted TCP connection of `listener` (its `iii-worker-manager` entry) to the end.
pub async fn serve(engine: Rc<RefCell<Engine>>, stream: TcpStream, listener: Rc<WorkerManagerConfig>) {
    let _ = stream.set_nodelay(true);
    set_keepalive(&stream);
    let peer = stream.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let addrs = stream.peer_addr().ok().zip(stream.local_addr().ok());
    let (max_message, handshake_ms) = (listener.max_message_bytes, listener.handshake_timeout_ms);
    // Channel connections go to the channels executor before any byte of them is read.
    let channels = engine.borrow().channels.clone();
    if let Some(channels) = channels {
        match crate::channels::peek_is_channel(&stream, Duration::from_millis(handshake_ms)).await {
            Some(true) => return channels.hand_over(stream),
            Some(false) => {}
            None => {
                tracing::debug!(peer = %peer, "worker-port connection closed before its request line (or sent none in {handshake_ms} ms)");
                return;
            }
        }
    }
    let mut ws_config = WebSocketConfig::default();
    ws_config.max_message_size = Some(max_message);
    ws_config.max_frame_size = Some(max_message);

    let route = Rc::new(Cell::new(None));
    let chosen = route.clone();
    // What an RBAC listener's auth function is told of the request.
    let upgrade = Rc::new(RefCell::new(None));
    let captured = upgrade.clone();
    let authenticates = listener.rbac.is_some();
    // The error type is tungstenite's (an HTTP response); it is built once per refused upgrade.
    #[allow(clippy::result_large_err)]
    let callback = move |request: &Request, response: Response| {
        if authenticates {
            *captured.borrow_mut() = Some(rbac::UpgradeRequest::of(request));
        }
        let path = request.uri().path();
        match path {
            "/" => chosen.set(Some(Route::Worker)),
            "/otel" => chosen.set(Some(Route::Otel)),
            _ if path.starts_with("/ws/channels/") => {
                return Err(refuse(StatusCode::NOT_FOUND, "Channel not found"))
            }
            _ => return Err(refuse(StatusCode::NOT_FOUND, "Not found: the worker protocol is served on /")),
        }
        Ok(response)
    };
    let handshake = async_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config));
    let ws = match glommio::timer::timeout(Duration::from_millis(handshake_ms), async {
        Ok(handshake.await)
    })
    .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, "worker-port upgrade refused or failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "worker-port upgrade not completed in {handshake_ms} ms; closed");
            return;
        }
    };
    let (sink, source) = ws.split();
    // On an RBAC listener the worker and telemetry sockets are authenticated first.
    let session = match route.get() {
        Some(Route::Worker | Route::Otel) => {
            let upgrade = upgrade.borrow_mut().take();
            match rbac::admit(&engine, listener.port, listener.rbac.as_ref(), upgrade, &peer).await {
                Ok(session) => session,
                Err(denied) => return rbac::refuse(sink, source, denied).await,
            }
        }
        None => None,
    };
    match route.get() {
        Some(Route::Worker) => serve_worker(engine, sink, source, peer, &listener, session).await,
        Some(Route::Otel) => serve_otel(&engine, source, &peer, addrs).await,
        None => {}
    }
}

async fn serve_worker(
    engine: Rc<RefCell<Engine>>,
    sink: WebSocketSender<TcpStream>,
    mut source: WebSocketReceiver<TcpStream>,
    peer: String,
    listener: &WorkerManagerConfig,
    session: Option<Rc<rbac::Session>>,
) {
    let (limit, ping_interval, ping_timeout) = (listener.max_outbox_bytes, listener.ping_interval_ms, listener.ping_timeout_ms);
    let (tx, rx) = unbounded();
    let outbox = Rc::new(Outbox::new(tx, limit));
    let conn = engine.borrow_mut().connect(outbox.clone(), peer);
    rbac::attach(&engine, conn, session);
    let writer = glommio::spawn_local(write_loop(sink, rx, outbox.clone()));
    let last_inbound = Cell::new(Instant::now());
    {
        let reading = std::pin::pin!(read_loop(&engine, conn, &mut source, &outbox, &last_inbound));
        let pinging = std::pin::pin!(ping_loop(&outbox, &last_inbound, ping_interval, ping_timeout));
        // Either ends the connection; the other is dropped with it.
        futures_util::future::select(reading, pinging).await;
    }
    // The one cleanup path, however the connection ended: the registry entry, its functions,
    // trigger types and bindings, and its pending invocations (`invocation_stopped`) go now.
    match outbox.close_frame() {
        Some((CLOSE_OUTBOX_FULL, _)) => {
            tracing::warn!(conn, limit, "worker closed: its outbox passed max_outbox_bytes (it is not reading)");
            engine.borrow().metrics().control.worker_outbox_closes_total.fetch_add(1, Relaxed);
        }
        Some((CLOSE_PING_TIMEOUT, _)) => {
            tracing::warn!(conn, ping_timeout, "worker closed: no frame or pong within the ping timeout");
            engine.borrow().metrics().control.worker_ping_timeouts_total.fetch_add(1, Relaxed);
        }
        _ => {}
    }
    engine.borrow_mut().disconnect(conn);
    outbox.end(None);
    // The writer stops within CLOSE_GRACE of `end`; the socket closes when both halves drop.
    writer.await;
    // Lingering close: what the peer still sends is read and discarded until it closes or
    // CLOSE_GRACE passes, because closing a socket with unread input sends an RST, and the peer
    // would then lose the frames (the close frame among them) still in its receive buffer.
    let _ = glommio::timer::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = source.next().await {}
        Ok(())
    })
    .await;
}

/// Reads frames into the engine until the peer goes away or the connection is ended.
async fn read_loop(
    engine: &Rc<RefCell<Engine>>,
    conn: WorkerConnId,
    source: &mut WebSocketReceiver<TcpStream>,
    outbox: &Outbox,
    last_inbound: &Cell<Instant>,
) {
    let max_depth = engine.borrow().config().max_json_depth;
    let telemetry = engine.borrow().telemetry.clone();
    let session = rbac::session_of(engine, conn);
    loop {
        let item = match futures_util::future::select(source.next(), std::pin::pin!(outbox.ended())).await {
            Either::Left((Some(item), _)) => item,
            Either::Left((None, _)) | Either::Right(_) => return,
        };
        last_inbound.set(Instant::now());
        let payload = match item {
            Ok(Message::Text(text)) => text.into(),
            Ok(Message::Binary(bytes)) => {
                if crate::telemetry::otlp::split_prefix(&bytes).is_some() {
                    // Telemetry on the worker socket: to the telemetry thread, as this worker's.
                    if let Some(telemetry) = &telemetry {
                        telemetry.submit(bytes, crate::telemetry::Source::Worker(conn));
                    }
                    continue;
                }
                bytes
            }
            Ok(Message::Close(_)) => return,
            Ok(_) => continue, // ping (answered by tungstenite), pong, raw frames
            Err(WsError::Capacity(e)) => {
                tracing::warn!(conn, "closing worker connection: {e}");
                outbox.end(Some((CLOSE_TOO_BIG, "message too big".into())));
                return;
            }
            Err(e) => {
                tracing::debug!(conn, "worker socket ended: {e}");
                return;
            }
        };
        if payload.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match wire::decode(&payload, max_depth) {
            Ok(message) => match &session {
                None => engine.borrow_mut().handle(conn, message),
                Some(session) => rbac::dispatch(engine, conn, session, message).await,
            },
            Err(error) => reject_frame(engine, conn, &payload, error, max_depth),
        }
    }
}

/// Pings the worker every `interval_ms`; a worker from which nothing arrives within
/// `timeout_ms` of a ping is ended (a vanished peer, a half-open socket). Returns only after
/// ending the connection; 0 for either setting turns pings off.
async fn ping_loop(outbox: &Outbox, last_inbound: &Cell<Instant>, interval_ms: u64, timeout_ms: u64) {
    if interval_ms == 0 || timeout_ms == 0 {
        return std::future::pending().await;
    }
    loop {
        glommio::timer::sleep(Duration::from_millis(interval_ms)).await;
        let sent = Instant::now();
        outbox.push_control(OutFrame::Ping);
        glommio::timer::sleep(Duration::from_millis(timeout_ms)).await;
        if last_inbound.get() < sent {
            outbox.end(Some((CLOSE_PING_TIMEOUT, "ping timeout".into())));
            return;
        }
    }
}

/// A frame that did not decode: logged; a waiting caller gets an error answer.
fn reject_frame(engine: &Rc<RefCell<Engine>>, conn: WorkerConnId, original: &[u8], error: DecodeError, max_depth: usize) {
    tracing::warn!(conn, "dropped an undecodable worker frame: {error}");
    if let Some(salvaged) = wire::salvage_invocation(original, max_depth) {
        let error = wire::ErrorBody::new("invalid_message", format!("invokefunction could not be decoded: {error}"));
        engine.borrow().send_to(
            conn,
            &wire::Outbound::InvocationResult {
                invocation_id: &salvaged.invocation_id,
                function_id: &salvaged.function_id,
                result: None,
                error: Some(&error),
                traceparent: None,
                baggage: None,
            },
        );
    }
}

/// Writes the outbox to the socket; everything queued when it wakes goes out in one flush.
/// Every wait races the connection's end, so a peer that stopped reading cannot park it; once
/// ended, what is still queued is dropped and the close frame gets at most `CLOSE_GRACE`.
async fn write_loop(mut sink: WebSocketSender<TcpStream>, mut rx: UnboundedReceiver<OutFrame>, outbox: Rc<Outbox>) {
    'frames: loop {
        let first = match futures_util::future::select(rx.next(), std::pin::pin!(outbox.ended())).await {
            Either::Left((Some(frame), _)) => frame,
            Either::Left((None, _)) | Either::Right(_) => break 'frames,
        };
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            let message = match frame {
                OutFrame::Text(text) => {
                    outbox.taken(text.len());
                    Message::text(text)
                }
                OutFrame::Ping => Message::Ping(Default::default()),
                OutFrame::Close(code, reason) => {
                    outbox.end(Some((code, reason)));
                    break 'frames;
                }
            };
            if !until_ended(&outbox, sink.feed(message)).await {
                break 'frames;
            }
            next = rx.try_recv().ok();
        }
        if !until_ended(&outbox, sink.flush()).await {
            break 'frames;
        }
    }
    // A write error or the peer's end leave no close frame to send.
    outbox.end(None);
    let closing = async {
        match outbox.close_frame() {
            Some((code, reason)) => {
                let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
                let _ = sink.send(Message::Close(Some(frame))).await;
            }
            None => {
                let _ = sink.close(None).await;
            }
        }
        Ok(())
    };
    let _ = glommio::timer::timeout(CLOSE_GRACE, closing).await;
}

/// Runs one socket write unless the connection ends first; false when the connection is over
/// (ended, or the write failed, which ends it).
async fn until_ended<E>(outbox: &Outbox, write: impl std::future::Future<Output = Result<(), E>>) -> bool {
    match futures_util::future::select(std::pin::pin!(write), std::pin::pin!(outbox.ended())).await {
        Either::Left((Ok(()), _)) => true,
        Either::Left((Err(_), _)) => {
            outbox.end(None);
            false
        }
        Either::Right(_) => false,
    }
}

/// `/otel`: telemetry frames go to the telemetry thread (which decodes, logs, counts and
/// forwards them off this core); anything else is counted and ignored; nothing is sent back.
async fn serve_otel(
    engine: &Rc<RefCell<Engine>>,
    mut source: WebSocketReceiver<TcpStream>,
    peer: &str,
    addrs: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
) {
    let telemetry = engine.borrow().telemetry.clone();
    let from = telemetry.as_ref().map(|t| t.otel_connection(peer, addrs));
    let mut frames = 0u64;
    while let Some(Ok(message)) = source.next().await {
        let Some(telemetry) = &telemetry else {
            if message.is_close() {
                break;
            }
            continue;
        };
        match message {
            Message::Binary(bytes) => {
                frames += 1;
                let source = from.clone().map(crate::telemetry::Source::Otel);
                if !source.is_some_and(|source| telemetry.submit(bytes, source)) {
                    telemetry.unknown_frame();
                }
            }
            Message::Text(_) => telemetry.unknown_frame(),
            Message::Close(_) => break,
            _ => {} // ping (answered by tungstenite), pong
        }
    }
    if let (Some(telemetry), Some(from)) = (&telemetry, &from) {
        telemetry.otel_closed(from);
    }
    tracing::debug!(peer, frames, "telemetry socket closed");
}
