//! One subscriber connection on the stream port (spec/stream.md §1): the HTTP upgrade with the
//! optional auth function, `join`/`leave` frames, and a writer that sends every queued frame in
//! one write.
//!
//! Everything here reads client bytes, so it must not panic on any input: no indexing, slicing
//! by offset, unwrap or expect outside tests.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use super::messages::{ConnId, ControlRequest, GroupKey};
use super::shard::Shard;
use bytes::BytesMut;
use futures_channel::oneshot;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::pin::Pin;
use glommio::net::TcpStream;
use ringcast_shards::outbound::{Batch, OutQueue};
use ringcast_shards::wsframe::{self, ClientFrame, FrameError};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// Largest HTTP upgrade request accepted.
const MAX_REQUEST_BYTES: usize = 16 << 10;
/// An upgrade request must arrive within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an ending connection may take to write what is left (its close frame) before its
/// socket is shut.
const CLOSE_FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// What the upgrade request asked for.
pub(crate) struct Upgrade {
    pub(crate) key: String,
    pub(crate) path: String,
    pub(crate) headers: Map<String, Value>,
    pub(crate) query: Map<String, Value>,
    pub(crate) offers_authorization: bool,
}

/// Per-connection settings, read once from the config.
struct Limits {
    max_frame: usize,
    max_subs: usize,
    max_id: usize,
    /// `None`: no pings.
    ping_interval: Option<Duration>,
    ping_timeout: Duration,
    max_pending_triggers: usize,
    trigger_timeout: Duration,
}

/// The shard side of one subscriber connection while it is served: its id, queue, limits, and
/// the `stream:leave` trigger runs it has in flight (at most `max_pending_triggers`).
struct Session {
    shard: Rc<RefCell<Shard>>,
    conn: ConnId,
    queue: OutQueue,
    limits: Limits,
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
    if shard.borrow().conns.len() >= shard.borrow().ctx.config.max_connections_per_shard {
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

    let limits = {
        let s = shard.borrow();
        let c = &s.ctx.config;
        Limits {
            max_frame: c.max_frame_bytes,
            max_subs: c.max_subscriptions_per_connection,
            max_id: c.max_id_bytes,
            ping_interval: (c.ping_interval_ms > 0).then(|| Duration::from_millis(c.ping_interval_ms)),
            ping_timeout: Duration::from_millis(c.ping_timeout_ms),
            max_pending_triggers: c.max_pending_triggers_per_connection.max(1),
            trigger_timeout: Duration::from_millis(c.trigger_timeout_ms),
        }
    };
    let queue = OutQueue::new(shard.borrow().ctx.config.max_queue_bytes, shard.borrow().load());
    let fd = stream.as_raw_fd();
    let conn = shard.borrow_mut().add_conn(queue.clone(), fd, context);
    // Reader and writer share the socket; each borrows it only inside a poll, so a pending
    // read never blocks a write (glommio keeps separate read and write readiness).
    let socket = Rc::new(RefCell::new(stream));
    let mut writer = glommio::spawn_local(write_loop(socket.clone(), queue.clone()));
    let mut reader = Reader { socket, buf, max_frame: limits.max_frame, fragments: Vec::new(), fragment_opcode: None };
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
    let flushed = futures_lite::future::or(
        async {
            (&mut writer).await;
            true
        },
        async {
            glommio::timer::sleep(CLOSE_FLUSH_LIMIT).await;
            false
        },
    )
    .await;
    if !flushed {
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

/// TCP keepalive on an accepted socket: finds peers that vanished without FIN or RST even when
/// pings are off (30 s idle, then 3 probes 10 s apart).
fn set_keepalive(fd: std::os::fd::RawFd) {
    let options = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ];
    for (level, name, value) in options {
        let value: libc::c_int = value;
        // SAFETY: setsockopt(2) on a socket this task owns, with an int-sized option value.
        unsafe {
            libc::setsockopt(fd, level, name, (&value as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t);
        }
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

/// Reads the upgrade request; `Err` is the HTTP status line to answer with.
async fn read_upgrade(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Upgrade, &'static str> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let upgrade = upgrade_of(&request)?;
                let _ = buf.split_to(len);
                return Ok(upgrade);
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => return Err("400 Bad Request"),
        }
        if buf.len() >= MAX_REQUEST_BYTES {
            return Err("431 Request Header Fields Too Large");
        }
        let mut chunk = [0u8; 1024];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err("400 Bad Request"),
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
        }
    }
}

/// What an upgrade request asks for, or the HTTP status to refuse it with.
pub(crate) fn upgrade_of(request: &httparse::Request) -> Result<Upgrade, &'static str> {
    if request.method != Some("GET") {
        return Err("405 Method Not Allowed");
    }
    let target = request.path.unwrap_or("/");
    let (path, query_text) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Map::new();
    let mut key = None;
    let mut upgrade = false;
    let mut offers_authorization = false;
    for header in request.headers.iter() {
        let name = header.name.to_ascii_lowercase();
        let Ok(value) = std::str::from_utf8(header.value) else { continue };
        match name.as_str() {
            "sec-websocket-key" => key = Some(value.trim().to_string()),
            "upgrade" => upgrade = value.eq_ignore_ascii_case("websocket"),
            "sec-websocket-protocol" => {
                offers_authorization = value.split(',').next().map(str::trim) == Some("Authorization");
            }
            _ => {}
        }
        if value.bytes().all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic()) {
            headers.insert(name, Value::String(value.to_string()));
        }
    }
    let key = key.filter(|_| upgrade).ok_or("426 Upgrade Required")?;
    Ok(Upgrade { key, path: path.to_string(), headers, query: query_params(query_text), offers_authorization })
}

/// The query string as the reference passes it to the auth function: split on `&` and the first
/// `=`, not percent-decoded, repeated keys accumulated in order, empty keys skipped.
pub(crate) fn query_params(query: &str) -> Map<String, Value> {
    let mut params = Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name.is_empty() {
            continue;
        }
        let entry = params.entry(name.to_string()).or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(values) = entry {
            values.push(Value::String(value.to_string()));
        }
    }
    params
}

/// Decodes `%XX` escapes of one path segment. `None` when an escape is not `%` and two hex
/// digits, or the decoded bytes are not UTF-8: such URLs are refused with 400.
pub(crate) fn percent_decode(segment: &str) -> Option<String> {
    fn hex(byte: u8) -> Option<u8> {
        char::from(byte).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }
    let mut out = Vec::with_capacity(segment.len());
    let mut bytes = segment.bytes();
    while let Some(byte) = bytes.next() {
        if byte == b'%' {
            let high = bytes.next().and_then(hex)?;
            let low = bytes.next().and_then(hex)?;
            out.push(high << 4 | low);
        } else {
            out.push(byte);
        }
    }
    String::from_utf8(out).ok()
}

/// A join read from the upgrade URL: the group and, optionally, the item.
pub(crate) type UrlJoin = (GroupKey, Option<String>);

/// `/` (joins come as frames) or `/stream/{stream}/{group}/[{item}]`, an implicit join. `Err` is
/// the HTTP status to refuse the upgrade with: 404 for other paths, 400 for bad escapes.
pub(crate) fn implicit_join(path: &str) -> Result<Option<UrlJoin>, &'static str> {
    const NOT_FOUND: &str = "404 Not Found";
    const BAD: &str = "400 Bad Request";
    if path == "/" {
        return Ok(None);
    }
    let rest = path.strip_prefix("/stream/").ok_or(NOT_FOUND)?;
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let decode = |segment: &str| percent_decode(segment).ok_or(BAD);
    match parts.as_slice() {
        [stream, group] if !stream.is_empty() && !group.is_empty() => Ok(Some(((decode(stream)?, decode(group)?), None))),
        [stream, group, item] if !stream.is_empty() && !group.is_empty() && !item.is_empty() => {
            Ok(Some(((decode(stream)?, decode(group)?), Some(decode(item)?))))
        }
        _ => Err(NOT_FOUND),
    }
}

/// Calls the auth function, if one is configured. `None` = refuse the upgrade (only with
/// `auth_required`); otherwise the context to stamp on join/leave events.
async fn authenticate(shard: &Rc<RefCell<Shard>>, request: &Upgrade, peer: &str) -> Option<Value> {
    let (function_id, required, timeout_ms, control) = {
        let s = shard.borrow();
        let config = &s.ctx.config;
        (config.auth_function.clone(), config.auth_required, config.auth_timeout_ms, s.ctx.control.clone())
    };
    let Some(function_id) = function_id else { return Some(Value::Null) };
    let input = json!({
        "headers": request.headers, "path": request.path,
        "query_params": request.query, "addr": peer,
    });
    let (tx, rx) = oneshot::channel();
    let limit = Duration::from_millis(timeout_ms);
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

async fn respond_error(stream: &mut TcpStream, status: &str) -> std::io::Result<()> {
    let body = format!("{status}\n");
    let response = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    stream.write_all(response.as_bytes()).await
}

/// A socket shared by a connection's reader and writer.
type Socket = Rc<RefCell<TcpStream>>;

/// Bytes a subscriber read asks for at a time: clients send only small join/leave frames, and
/// idle connections should cost little memory.
const READ_CHUNK: usize = 512;

/// Reads once and appends to `buf`; returns how many bytes arrived (0 = end of stream).
/// Cancel-safe: `buf` changes only when the read completes, in the same poll.
async fn read_some(socket: &Socket, buf: &mut BytesMut) -> std::io::Result<usize> {
    let mut chunk = [0u8; READ_CHUNK];
    let n = std::future::poll_fn(|cx| Pin::new(&mut *socket.borrow_mut()).poll_read(cx, &mut chunk)).await?;
    buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    Ok(n)
}

/// Writes all of `data`.
async fn write_all(socket: &Socket, queue: &OutQueue, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = std::future::poll_fn(|cx| Pin::new(&mut *socket.borrow_mut()).poll_write(cx, data)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        // Progress for the slow-subscriber policy (a partly read batch is not a stall).
        queue.written(n);
        data = data.get(n..).unwrap_or_default();
    }
    Ok(())
}

/// Reads client frames, reassembling fragmented messages.
struct Reader {
    socket: Socket,
    buf: BytesMut,
    max_frame: usize,
    fragments: Vec<u8>,
    fragment_opcode: Option<OpCode>,
}

impl Reader {
    /// The next complete message or control frame; `Ok(None)` at end of stream.
    async fn next_frame(&mut self) -> Result<Option<ClientFrame>, FrameError> {
        loop {
            while let Some(frame) = wsframe::parse_client_frame(&mut self.buf, self.max_frame)? {
                match frame.opcode {
                    OpCode::Data(Data::Continue) => {
                        self.fragments.extend_from_slice(&frame.payload);
                        if self.fragments.len() > self.max_frame {
                            return Err(FrameError::TooBig(self.fragments.len() as u64));
                        }
                        if frame.is_final {
                            let opcode = self.fragment_opcode.take().ok_or(FrameError::Malformed)?;
                            let payload = std::mem::take(&mut self.fragments);
                            return Ok(Some(ClientFrame { opcode, is_final: true, payload }));
                        }
                    }
                    OpCode::Data(_) if !frame.is_final => {
                        self.fragment_opcode = Some(frame.opcode);
                        self.fragments = frame.payload;
                    }
                    _ => return Ok(Some(frame)),
                }
            }
            match read_some(&self.socket, &mut self.buf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }
}

/// Writes the queue to the socket: one frame as is, several copied into one buffer and written
/// with one call (glommio 0.9 has no vectored send).
async fn write_loop(socket: Socket, queue: OutQueue) {
    let mut scratch: Vec<u8> = Vec::new();
    loop {
        let (written, last) = match queue.next_batch().await {
            Batch::Frames(frames) if frames.len() == 1 => match frames.first() {
                Some(frame) => (write_all(&socket, &queue, frame).await, false),
                None => (Ok(()), false),
            },
            Batch::Frames(frames) => {
                scratch.clear();
                for frame in &frames {
                    scratch.extend_from_slice(frame);
                }
                (write_all(&socket, &queue, &scratch).await, false)
            }
            Batch::Close(frame) => (write_all(&socket, &queue, &frame).await, true),
        };
        if written.is_err() || last {
            // SAFETY: shutdown(2) on this connection's socket, still open; the reader then ends.
            unsafe { libc::shutdown(socket.borrow().as_raw_fd(), libc::SHUT_RDWR) };
            return;
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum ClientMessage {
    Join { data: JoinData },
    Leave { data: JoinData },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JoinData {
    subscription_id: String,
    stream_name: String,
    group_id: String,
    #[serde(default)]
    id: Option<String>,
}

impl Session {
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
                let (count, replaces) = {
                    let s = self.shard.borrow();
                    let c = s.conns.get(&self.conn);
                    (c.map_or(0, |c| c.subs.len()), c.is_some_and(|c| c.subs.contains_key(&data.subscription_id)))
                };
                if count >= self.limits.max_subs && !replaces {
                    tracing::warn!(conn = self.conn, max_subs = self.limits.max_subs, "subscriber passed max_subscriptions_per_connection; closing");
                    self.shard.borrow_mut().close_conn(self.conn, 1008, "too many subscriptions");
                    return;
                }
                self.join(data.subscription_id, (data.stream_name, data.group_id), data.id).await;
            }
            ClientMessage::Leave { data } => {
                if !self.ids_fit(&data.subscription_id, &data.stream_name, &data.group_id, data.id.as_deref()) {
                    return;
                }
                let context = self.shard.borrow().conns.get(&self.conn).map(|c| c.context.clone()).unwrap_or(Value::Null);
                self.shard.borrow_mut().leave(self.conn, &data.subscription_id);
                self.fire_leave(data.subscription_id, (data.stream_name, data.group_id), data.id, context).await;
            }
        }
    }

    /// Whether every id is within `max_id_bytes`; if not, closes the connection with 1008 (ids
    /// are kept per subscription and sent to triggers, so their size must be bounded).
    fn ids_fit(&self, subscription: &str, stream: &str, group: &str, item: Option<&str>) -> bool {
        let longest = [subscription, stream, group, item.unwrap_or("")].iter().map(|id| id.len()).max().unwrap_or(0);
        if longest <= self.limits.max_id {
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
            let Some(c) = s.conns.get(&self.conn) else { return };
            (s.ctx.control.clone(), c.context.clone())
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
            let frame = super::frames::unauthorized(&key.0, &key.1, item.as_deref());
            if let Some(c) = s.conns.get(&self.conn) {
                let _ = c.queue.push(wsframe::text_frame(frame.as_bytes()));
            }
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
        if self.shard.borrow().ctx.control.unbounded_send(request).is_ok() {
            self.leaves.push_back(rx);
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_raw_and_accumulate() {
        let params = query_params("token=abc&a=1&a=2&empty&=skip&p=%20x+y");
        assert_eq!(Value::Object(params), json!({"token":["abc"],"a":["1","2"],"empty":[""],"p":["%20x+y"]}));
    }

    #[test]
    fn documented_url_form_is_an_implicit_join() {
        assert_eq!(implicit_join("/"), Ok(None));
        assert_eq!(implicit_join("/stream/chat/room-1/"), Ok(Some((("chat".into(), "room-1".into()), None))));
        assert_eq!(implicit_join("/stream/chat/room%201/m1"), Ok(Some((("chat".into(), "room 1".into()), Some("m1".into())))));
        assert_eq!(implicit_join("/other"), Err("404 Not Found"));
        assert_eq!(implicit_join("/stream/only"), Err("404 Not Found"));
    }

    #[test]
    fn percent_decode_is_strict_and_never_slices_inside_a_char() {
        assert_eq!(percent_decode("room%201").as_deref(), Some("room 1"));
        assert_eq!(percent_decode("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(percent_decode("%41%62").as_deref(), Some("Ab"));
        assert_eq!(percent_decode("€plain").as_deref(), Some("€plain"));
        assert_eq!(percent_decode("").as_deref(), Some(""));
        for bad in ["%a€", "%", "ab%", "%4", "%zz", "%€%", "%C3%28", "%FF", "%%41"] {
            assert_eq!(percent_decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn implicit_join_edge_cases() {
        assert_eq!(implicit_join("/stream/%a€/g"), Err("400 Bad Request"));
        assert_eq!(implicit_join("/stream/%/g"), Err("400 Bad Request"));
        assert_eq!(implicit_join("/stream/s/g/%"), Err("400 Bad Request"));
        assert_eq!(implicit_join("/stream/s/%C3%28"), Err("400 Bad Request"));
        assert_eq!(implicit_join("/stream//g"), Err("404 Not Found"));
        assert_eq!(implicit_join("/stream/s/g/i/extra"), Err("404 Not Found"));
        assert_eq!(implicit_join("/stream/"), Err("404 Not Found"));
        assert_eq!(implicit_join("/stream/s/g///"), Ok(Some((("s".into(), "g".into()), None))));
        // An escaped slash stays inside its segment.
        assert_eq!(implicit_join("/stream/a%2Fb/g"), Ok(Some((("a/b".into(), "g".into()), None))));
    }
}
