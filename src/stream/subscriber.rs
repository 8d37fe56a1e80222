//! One subscriber connection on the stream port (spec/stream.md §1): the HTTP upgrade with the
//! optional auth function, `join`/`leave` frames, and a writer that sends every queued frame in
//! one write.

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
use std::rc::Rc;
use std::time::Duration;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// Largest HTTP upgrade request accepted.
const MAX_REQUEST_BYTES: usize = 16 << 10;
/// An upgrade request must arrive within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the upgrade request asked for.
pub(crate) struct Upgrade {
    key: String,
    pub(crate) path: String,
    headers: Map<String, Value>,
    pub(crate) query: Map<String, Value>,
    offers_authorization: bool,
}

/// Serves one accepted connection to the end.
pub async fn serve(shard: Rc<RefCell<Shard>>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
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
        Err(()) => {
            let _ = respond_error(&mut stream, "404 Not Found").await;
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

    let (queue_limit, max_frame, max_subs) = {
        let s = shard.borrow();
        (s.ctx.config.max_queue_bytes, s.ctx.config.max_frame_bytes, s.ctx.config.max_subscriptions_per_connection)
    };
    let queue = OutQueue::new(queue_limit, shard.borrow().load());
    let conn = shard.borrow_mut().add_conn(queue.clone(), stream.as_raw_fd(), context);
    // Reader and writer share the socket; each borrows it only inside a poll, so a pending
    // read never blocks a write (glommio keeps separate read and write readiness).
    let socket = Rc::new(RefCell::new(stream));
    let writer = glommio::spawn_local(write_loop(socket.clone(), queue.clone()));
    let mut reader = Reader { socket, buf, max_frame, fragments: Vec::new(), fragment_opcode: None };

    if let Some((key, item)) = implicit_join {
        Box::pin(join(&shard, conn, uuid::Uuid::new_v4().to_string(), key, item)).await;
    }
    loop {
        let frame = match reader.next_frame().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(FrameError::TooBig(size)) => {
                tracing::debug!(conn, size, "subscriber frame over max_frame_bytes; closing");
                shard.borrow_mut().close_conn(conn, 1009, "frame too big");
                break;
            }
            Err(FrameError::Malformed) => {
                shard.borrow_mut().close_conn(conn, 1002, "malformed frame");
                break;
            }
        };
        match frame.opcode {
            OpCode::Data(Data::Text) | OpCode::Data(Data::Binary) => {
                // Boxed: an idle connection's task then holds only the read loop's state.
                Box::pin(handle_message(&shard, conn, &frame.payload, max_subs)).await;
            }
            OpCode::Control(Control::Ping) => {
                let _ = queue.push(wsframe::server_frame(OpCode::Control(Control::Pong), &frame.payload));
            }
            OpCode::Control(Control::Close) => {
                shard.borrow_mut().close_conn(conn, 1000, "");
                break;
            }
            _ => {}
        }
    }
    let (context, ended) = shard.borrow_mut().remove_conn(conn);
    for (subscription, key, item) in ended {
        fire_leave(&shard, subscription, key, item, context.clone());
    }
    let _ = writer.await;
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
        let start = buf.len();
        buf.resize(start + 1024, 0);
        let read = stream.read(&mut buf[start..]).await;
        buf.truncate(start + *read.as_ref().unwrap_or(&0));
        match read {
            Ok(0) | Err(_) => return Err("400 Bad Request"),
            Ok(_) => {}
        }
    }
}

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

pub(crate) fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(byte) = u8::from_str_radix(&segment[i + 1..i + 3], 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/` (joins come as frames) or `/stream/{stream}/{group}/[{item}]`, an implicit join.
pub(crate) fn implicit_join(path: &str) -> Result<Option<(GroupKey, Option<String>)>, ()> {
    if path == "/" {
        return Ok(None);
    }
    let rest = path.strip_prefix("/stream/").ok_or(())?;
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    match parts[..] {
        [stream, group] if !stream.is_empty() && !group.is_empty() => {
            Ok(Some(((percent_decode(stream), percent_decode(group)), None)))
        }
        [stream, group, item] if !stream.is_empty() && !group.is_empty() && !item.is_empty() => {
            Ok(Some(((percent_decode(stream), percent_decode(group)), Some(percent_decode(item)))))
        }
        _ => Err(()),
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
    let _ = control.unbounded_send(ControlRequest::Auth { function_id: function_id.clone(), input, reply: tx });
    let outcome = glommio::timer::timeout(Duration::from_millis(timeout_ms), async { Ok(rx.await) }).await;
    let context = match outcome {
        Ok(Ok(Ok(result))) => result.get("context").cloned().unwrap_or(Value::Null),
        Ok(Ok(Err(error))) => {
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

/// Reads once into the spare end of `buf`; returns how many bytes arrived (0 = end of stream).
async fn read_some(socket: &Socket, buf: &mut BytesMut) -> std::io::Result<usize> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let result = std::future::poll_fn(|cx| Pin::new(&mut *socket.borrow_mut()).poll_read(cx, &mut buf[start..])).await;
    buf.truncate(start + *result.as_ref().unwrap_or(&0));
    result
}

/// Writes all of `data`.
async fn write_all(socket: &Socket, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = std::future::poll_fn(|cx| Pin::new(&mut *socket.borrow_mut()).poll_write(cx, data)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
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
            Batch::Frames(frames) if frames.len() == 1 => (write_all(&socket, &frames[0]).await, false),
            Batch::Frames(frames) => {
                scratch.clear();
                for frame in &frames {
                    scratch.extend_from_slice(frame);
                }
                (write_all(&socket, &scratch).await, false)
            }
            Batch::Close(frame) => (write_all(&socket, &frame).await, true),
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

async fn handle_message(shard: &Rc<RefCell<Shard>>, conn: ConnId, payload: &[u8], max_subs: usize) {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return;
    }
    let message: ClientMessage = match serde_json::from_slice(payload) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(conn, "ignored subscriber frame: {e}");
            return;
        }
    };
    match message {
        ClientMessage::Join { data } => {
            let count = shard.borrow().conns.get(&conn).map(|c| c.subs.len()).unwrap_or(0);
            let replaces = shard.borrow().conns.get(&conn).is_some_and(|c| c.subs.contains_key(&data.subscription_id));
            if count >= max_subs && !replaces {
                tracing::warn!(conn, max_subs, "subscriber passed max_subscriptions_per_connection; closing");
                shard.borrow_mut().close_conn(conn, 1008, "too many subscriptions");
                return;
            }
            join(shard, conn, data.subscription_id, (data.stream_name, data.group_id), data.id).await;
        }
        ClientMessage::Leave { data } => {
            let context = shard.borrow().conns.get(&conn).map(|c| c.context.clone()).unwrap_or(Value::Null);
            shard.borrow_mut().leave(conn, &data.subscription_id);
            fire_leave(shard, data.subscription_id, (data.stream_name, data.group_id), data.id, context);
        }
    }
}

/// Runs the `stream:join` triggers, then subscribes or answers `unauthorized`.
async fn join(shard: &Rc<RefCell<Shard>>, conn: ConnId, subscription: String, key: GroupKey, item: Option<String>) {
    let (control, context) = {
        let s = shard.borrow();
        let Some(c) = s.conns.get(&conn) else { return };
        (s.ctx.control.clone(), c.context.clone())
    };
    let payload = json!({
        "subscription_id": subscription, "stream_name": key.0, "group_id": key.1,
        "id": item, "context": context,
    });
    let (tx, rx) = oneshot::channel();
    let _ = control.unbounded_send(ControlRequest::Join { payload, reply: tx });
    let authorized = rx.await.unwrap_or(true);
    let mut s = shard.borrow_mut();
    if !authorized {
        let frame = super::frames::unauthorized(&key.0, &key.1, item.as_deref());
        if let Some(c) = s.conns.get(&conn) {
            let _ = c.queue.push(wsframe::text_frame(frame.as_bytes()));
        }
        return;
    }
    s.join(conn, subscription, key, item);
}

fn fire_leave(shard: &Rc<RefCell<Shard>>, subscription: String, key: GroupKey, item: Option<String>, context: Value) {
    let payload = json!({
        "subscription_id": subscription, "stream_name": key.0, "group_id": key.1,
        "id": item, "context": context,
    });
    let _ = shard.borrow().ctx.control.unbounded_send(ControlRequest::Leave { payload });
}

#[cfg(test)]
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
        assert_eq!(implicit_join("/other"), Err(()));
        assert_eq!(implicit_join("/stream/only"), Err(()));
    }
}
