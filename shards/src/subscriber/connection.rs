//! One subscriber connection on the stream port (spec/stream.md §1), from accept to close: the
//! HTTP upgrade with the optional auth function, then `join`/`leave` messages (with their
//! `stream:join`/`stream:leave` triggers), pings, and the one exit path that frees everything.
//! It talks to its shard only through the shard's methods.
//!
//! Everything here reads client bytes, so it must not panic on any input: no indexing, slicing
//! by offset, unwrap or expect outside tests.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use super::message::ClientMessage;
use super::socket::{set_keepalive, write_loop, Reader};
use super::upgrade::{implicit_join, read_upgrade, respond_error, Upgrade};
use crate::config::SubscriberLimits;
use crate::messages::{ControlRequest, GroupKey, SubscriberConnId};
use crate::outbound::OutQueue;
use crate::shard::Shard;
use crate::wsframe::{self, FrameError};
use bytes::BytesMut;
use futures_channel::oneshot;
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// An upgrade request must arrive within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an ending connection may take to write what is left (its close frame) before its
/// socket is shut.
const CLOSE_FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// The shard side of one subscriber connection while it is served: its id, queue, limits, and
/// the `stream:leave` trigger runs it has in flight (at most `max_pending_triggers`).
struct Session {
    shard: Rc<RefCell<Shard>>,
    conn: SubscriberConnId,
    queue: OutQueue,
    limits: SubscriberLimits,
    leaves: VecDeque<oneshot::Receiver<()>>,
}

/// Serves one accepted connection to the end. Every way it can end (close frame, EOF, reset,
/// read or write error, ping timeout, a close decided by the shard) leaves the read loop, and
/// the one exit path below then frees everything: registration and subscriptions, queue,
/// writer task, socket, and finally the `stream:leave` triggers.
pub async fn serve(shard: Rc<RefCell<Shard>>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    set_keepalive(stream.as_raw_fd());
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut buf = BytesMut::with_capacity(1024);
    let request = match glommio::timer::timeout(HANDSHAKE_TIMEOUT, async { Ok(Box::pin(read_upgrade(&mut stream, &mut buf)).await) }).await {
        Ok(Ok(request)) => request,
        Ok(Err(status)) => {
            let _ = respond_error(&mut stream, status).await;
            return;
        }
        Err(_) => return,
    };
    let implicit_join = match implicit_join(&request.path) {
        Ok(join) => join,
        Err(status) => {
            let _ = respond_error(&mut stream, status).await;
            return;
        }
    };
    if shard.borrow().is_full() {
        tracing::warn!(peer = %peer, "subscriber refused: max_connections_per_shard reached");
        let _ = respond_error(&mut stream, "503 Service Unavailable").await;
        return;
    }
    let Some(context) = Box::pin(authenticate(&shard, &request, &peer)).await else {
        let _ = respond_error(&mut stream, "401 Unauthorized").await;
        return;
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        tungstenite::handshake::derive_accept_key(request.key.as_bytes())
    );
    if request.offers_authorization {
        response.push_str("Sec-WebSocket-Protocol: Authorization\r\n");
    }
    response.push_str("\r\n");
    drop(request);
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    if buf.is_empty() {
        buf = BytesMut::new(); // idle connections keep no read buffer
    }

    let limits = shard.borrow().config().subscriber.clone();
    let queue = shard.borrow().new_queue();
    let fd = stream.as_raw_fd();
    let conn = shard.borrow_mut().add_conn(queue.clone(), fd, context);
    // Reader and writer share the socket; each borrows it only inside a poll, so a pending
    // read never blocks a write (glommio keeps separate read and write readiness).
    let socket = Rc::new(RefCell::new(stream));
    let mut writer = glommio::spawn_local(write_loop(socket.clone(), queue.clone()));
    let mut reader = Reader { socket, buf, max_frame: limits.max_frame_bytes, fragments: Vec::new(), fragment_opcode: None };
    let mut session = Session { shard, conn, queue, limits, leaves: VecDeque::new() };

    if let Some((key, item)) = implicit_join {
        Box::pin(session.join(uuid::Uuid::new_v4().to_string(), key, item)).await;
    }
    Box::pin(session.read_loop(&mut reader)).await;

    // The one exit path. Unregister first: no frame is queued for it from now on.
    let (context, ended) = session.shard.borrow_mut().remove_conn(conn);
    // Wake the writer to stop (after a close frame already queued, if any), but let it take at
    // most CLOSE_FLUSH_LIMIT: a peer that stopped reading cannot hold the socket.
    session.queue.end();
    if within(CLOSE_FLUSH_LIMIT, &mut writer).await.is_none() {
        // SAFETY: shutdown(2) on this connection's socket, still open (`reader` holds it); the
        // writer's pending write then fails and it ends.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        writer.await;
    }
    drop(reader); // the last owner of the socket: it is closed here
    for (subscription, key, item) in ended {
        session.fire_leave(subscription, key, item, context.clone()).await;
    }
    // Leaves fired at the end still run within the per-connection bound; wait for them so that
    // bound holds across the disconnect too.
    while let Some(leave) = session.leaves.pop_front() {
        let _ = leave.await;
    }
}

/// Waits for `future` at most `limit`; `None` when the time ran out (the future is dropped).
async fn within<T>(limit: Duration, future: impl std::future::Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(future.await) }, async {
        glommio::timer::sleep(limit).await;
        None
    })
    .await
}

impl Session {
    /// Reads frames until the connection ends: EOF or error, a close frame, a frame error, a
    /// ping unanswered within `ping_timeout`, or a close the shard decided (slow, limits).
    async fn read_loop(&mut self, reader: &mut Reader) {
        let mut heard = Instant::now();
        let mut pinged: Option<Instant> = None;
        loop {
            if self.queue.is_closing() {
                return;
            }
            let next = match self.limits.ping_interval {
                None => Some(reader.next_frame().await),
                Some(interval) => {
                    let due = match pinged {
                        Some(at) => at + self.limits.ping_timeout,
                        None => heard + interval,
                    };
                    // `next_frame` is cancel-safe: what it read stays in the reader's buffer.
                    within(due.saturating_duration_since(Instant::now()), reader.next_frame()).await
                }
            };
            let Some(next) = next else {
                if pinged.is_some() {
                    tracing::debug!(conn = self.conn, "subscriber did not answer a ping in time; closing");
                    self.shard.borrow_mut().close_conn(self.conn, 1001, "ping timeout");
                    return;
                }
                let _ = self.queue.push(wsframe::server_frame(OpCode::Control(Control::Ping), b""));
                pinged = Some(Instant::now());
                continue;
            };
            // Any frame, a pong included, shows the peer is alive.
            heard = Instant::now();
            pinged = None;
            let frame = match next {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(FrameError::TooBig(size)) => {
                    tracing::debug!(conn = self.conn, size, "subscriber frame over max_frame_bytes; closing");
                    self.shard.borrow_mut().close_conn(self.conn, 1009, "frame too big");
                    return;
                }
                Err(FrameError::Malformed) => {
                    self.shard.borrow_mut().close_conn(self.conn, 1002, "malformed frame");
                    return;
                }
            };
            match frame.opcode {
                OpCode::Data(Data::Text) | OpCode::Data(Data::Binary) => {
                    // Boxed: an idle connection's task then holds only the read loop's state.
                    Box::pin(self.handle_message(&frame.payload)).await;
                    // Time spent waiting for triggers is the engine's, not the peer's silence.
                    heard = Instant::now();
                }
                OpCode::Control(Control::Ping) => {
                    let _ = self.queue.push(wsframe::server_frame(OpCode::Control(Control::Pong), &frame.payload));
                }
                OpCode::Control(Control::Close) => {
                    self.shard.borrow_mut().close_conn(self.conn, 1000, "");
                    return;
                }
                _ => {}
            }
        }
    }
}

/// Calls the auth function, if one is configured. `None` = refuse the upgrade (only with
/// `auth_required`); otherwise the context to stamp on join/leave events.
async fn authenticate(shard: &Rc<RefCell<Shard>>, request: &Upgrade, peer: &str) -> Option<Value> {
    let (auth, control) = {
        let s = shard.borrow();
        (s.config().auth.clone(), s.control())
    };
    let (function_id, required, limit) = (auth.function_id, auth.required, auth.timeout);
    let timeout_ms = limit.as_millis() as u64;
    let Some(function_id) = function_id else { return Some(Value::Null) };
    let input = json!({
        "headers": request.headers, "path": request.path,
        "query_params": request.query, "addr": peer,
    });
    let (tx, rx) = oneshot::channel();
    let _ = control.unbounded_send(ControlRequest::Auth { function_id: function_id.clone(), input, limit, reply: tx });
    // Dropping `rx` on timeout tells the control core to give the call up.
    let outcome = within(limit, rx).await;
    let context = match outcome {
        Some(Ok(Ok(result))) => result.get("context").cloned().unwrap_or(Value::Null),
        Some(Ok(Err(error))) => {
            tracing::warn!(function_id, "auth function failed: {error}");
            Value::Null
        }
        _ => {
            tracing::warn!(function_id, timeout_ms, "auth function gave no answer in time");
            Value::Null
        }
    };
    if required && context.is_null() {
        tracing::info!(peer, "subscriber refused (401): auth_required and no context");
        return None;
    }
    Some(context)
}

impl Session {
    /// Handles one text or binary message: a `join` or a `leave` (anything else is ignored).
    async fn handle_message(&mut self, payload: &[u8]) {
        if payload.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let message: ClientMessage = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(conn = self.conn, "ignored subscriber frame: {e}");
                return;
            }
        };
        match message {
            ClientMessage::Join { data } => {
                let (count, replaces) = self.shard.borrow().subscriptions_of(self.conn, &data.subscription_id);
                if count >= self.limits.max_subscriptions && !replaces {
                    tracing::warn!(conn = self.conn, max_subs = self.limits.max_subscriptions, "subscriber passed max_subscriptions_per_connection; closing");
                    self.shard.borrow_mut().close_conn(self.conn, 1008, "too many subscriptions");
                    return;
                }
                self.join(data.subscription_id, (data.stream_name, data.group_id), data.id).await;
            }
            ClientMessage::Leave { data } => {
                if !self.ids_fit(&data.subscription_id, &data.stream_name, &data.group_id, data.id.as_deref()) {
                    return;
                }
                let context = self.shard.borrow().context_of(self.conn).unwrap_or(Value::Null);
                self.shard.borrow_mut().leave(self.conn, &data.subscription_id);
                self.fire_leave(data.subscription_id, (data.stream_name, data.group_id), data.id, context).await;
            }
        }
    }

    /// Whether every id is within `max_id_bytes`; if not, closes the connection with 1008 (ids
    /// are kept per subscription and sent to triggers, so their size must be bounded).
    fn ids_fit(&self, subscription: &str, stream: &str, group: &str, item: Option<&str>) -> bool {
        let longest = [subscription, stream, group, item.unwrap_or("")].iter().map(|id| id.len()).max().unwrap_or(0);
        if longest <= self.limits.max_id_bytes {
            return true;
        }
        tracing::debug!(conn = self.conn, longest, "subscriber id over max_id_bytes; closing");
        self.shard.borrow_mut().close_conn(self.conn, 1008, "id longer than max_id_bytes");
        false
    }

    /// Waits until fewer than `max_pending_triggers` leaves are in flight, so that with the join
    /// or leave about to start the connection has at most `max_pending_triggers` trigger runs. The
    /// connection reads nothing meanwhile: a client that floods leaves is slowed by TCP.
    async fn trigger_slot(&mut self) {
        self.leaves.retain_mut(|rx| matches!(rx.try_recv(), Ok(None)));
        while self.leaves.len() >= self.limits.max_pending_triggers {
            if let Some(oldest) = self.leaves.pop_front() {
                let _ = oldest.await;
            }
        }
    }

    /// Runs the `stream:join` triggers, then subscribes or answers `unauthorized`.
    async fn join(&mut self, subscription: String, key: GroupKey, item: Option<String>) {
        if !self.ids_fit(&subscription, &key.0, &key.1, item.as_deref()) {
            return;
        }
        self.trigger_slot().await;
        let (control, context) = {
            let s = self.shard.borrow();
            let Some(context) = s.context_of(self.conn) else { return };
            (s.control(), context)
        };
        let payload = json!({
            "subscription_id": subscription, "stream_name": key.0, "group_id": key.1,
            "id": item, "context": context,
        });
        let (tx, rx) = oneshot::channel();
        let _ = control.unbounded_send(ControlRequest::Join { payload, limit: self.limits.trigger_timeout, reply: tx });
        let authorized = rx.await.unwrap_or(true);
        let mut s = self.shard.borrow_mut();
        if !authorized {
            let frame = crate::event_json::unauthorized(&key.0, &key.1, item.as_deref());
            s.push_frame(self.conn, wsframe::text_frame(frame.as_bytes()));
            return;
        }
        s.join(self.conn, subscription, key, item);
    }

    /// Starts the `stream:leave` triggers once a slot is free; they complete in the background,
    /// each within `trigger_timeout_ms`.
    async fn fire_leave(&mut self, subscription: String, key: GroupKey, item: Option<String>, context: Value) {
        self.trigger_slot().await;
        let payload = json!({
            "subscription_id": subscription, "stream_name": key.0, "group_id": key.1,
            "id": item, "context": context,
        });
        let (tx, rx) = oneshot::channel();
        let request = ControlRequest::Leave { payload, limit: self.limits.trigger_timeout, reply: tx };
        if self.shard.borrow().control().unbounded_send(request).is_ok() {
            self.leaves.push_back(rx);
        }
    }
}
