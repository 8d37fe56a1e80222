//! One socket on the worker port: the HTTP upgrade and its route (`/`, `/otel`,
//! `/ws/channels/{id}`), then a read loop that decodes frames into the engine and a writer task
//! that drains the connection's outbox, coalescing queued frames into one flush.

use super::engine::{Engine, OutFrame};
use super::wire::{self, DecodeError};
use async_tungstenite::{WebSocketReceiver, WebSocketSender};
use futures_channel::mpsc::{unbounded, UnboundedReceiver};
use futures_util::{SinkExt, StreamExt};
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;
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

fn refuse(status: StatusCode, body: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(body.to_string()));
    *response.status_mut() = status;
    response
}

/// Serves one accepted TCP connection to the end.
pub async fn serve(engine: Rc<RefCell<Engine>>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let (max_message, handshake_ms) = {
        let e = engine.borrow();
        (e.config.max_message_bytes, e.config.handshake_timeout_ms)
    };
    let mut ws_config = WebSocketConfig::default();
    ws_config.max_message_size = Some(max_message);
    ws_config.max_frame_size = Some(max_message);

    let route = Rc::new(Cell::new(None));
    let chosen = route.clone();
    let callback = move |request: &Request, response: Response| {
        let path = request.uri().path();
        match path {
            "/" => chosen.set(Some(Route::Worker)),
            "/otel" => chosen.set(Some(Route::Otel)),
            _ if path.starts_with("/ws/channels/") => {
                return Err(refuse(
                    StatusCode::NOT_FOUND,
                    "Channel not found: channels are not supported by this ringcast version",
                ))
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
    match route.get() {
        Some(Route::Worker) => serve_worker(engine, sink, source, peer).await,
        Some(Route::Otel) => serve_otel(source).await,
        None => {}
    }
}

async fn serve_worker(
    engine: Rc<RefCell<Engine>>,
    sink: WebSocketSender<TcpStream>,
    mut source: WebSocketReceiver<TcpStream>,
    peer: String,
) {
    let (tx, rx) = unbounded();
    let conn = engine.borrow_mut().connect(tx.clone(), peer);
    let writer = glommio::spawn_local(write_loop(sink, rx));
    let max_depth = engine.borrow().config.max_json_depth;
    while let Some(item) = source.next().await {
        let payload = match item {
            Ok(Message::Text(text)) => text.into(),
            Ok(Message::Binary(bytes)) => {
                if [b"OTLP", b"MTRC", b"LOGS"].iter().any(|p| bytes.starts_with(*p)) {
                    continue; // telemetry on the main socket: accepted and discarded
                }
                bytes
            }
            Ok(Message::Close(_)) => break,
            Ok(_) => continue, // ping (answered by tungstenite), pong, raw frames
            Err(WsError::Capacity(e)) => {
                tracing::warn!(conn, "closing worker connection: {e}");
                let _ = tx.unbounded_send(OutFrame::Close(CLOSE_TOO_BIG, "message too big".into()));
                break;
            }
            Err(e) => {
                tracing::debug!(conn, "worker socket ended: {e}");
                break;
            }
        };
        if payload.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match wire::decode(&payload, max_depth) {
            Ok(message) => engine.borrow_mut().handle(conn, message),
            Err(error) => reject_frame(&engine, conn, &payload, error, max_depth),
        }
    }
    engine.borrow_mut().disconnect(conn);
    drop(tx);
    writer.await;
}

/// A frame that did not decode: logged; a waiting caller gets an error answer.
fn reject_frame(engine: &Rc<RefCell<Engine>>, conn: u64, original: &[u8], error: DecodeError, max_depth: usize) {
    tracing::warn!(conn, "dropped an undecodable worker frame: {error}");
    if let Some(salvaged) = wire::salvage_invocation(original, max_depth) {
        let engine = engine.borrow();
        if let Some(c) = engine.conns.get(&conn) {
            let error = wire::ErrorBody::new("invalid_message", format!("invokefunction could not be decoded: {error}"));
            c.send(&wire::Outbound::InvocationResult {
                invocation_id: &salvaged.invocation_id,
                function_id: &salvaged.function_id,
                result: None,
                error: Some(&error),
                traceparent: None,
                baggage: None,
            });
        }
    }
}

/// Writes the outbox to the socket; everything queued when it wakes goes out in one flush.
async fn write_loop(mut sink: WebSocketSender<TcpStream>, mut rx: UnboundedReceiver<OutFrame>) {
    while let Some(first) = rx.next().await {
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            match frame {
                OutFrame::Text(text) => {
                    if sink.feed(Message::text(text)).await.is_err() {
                        return;
                    }
                }
                OutFrame::Close(code, reason) => {
                    let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

/// `/otel`: telemetry frames are accepted and discarded.
async fn serve_otel(mut source: WebSocketReceiver<TcpStream>) {
    let mut frames = 0u64;
    while let Some(Ok(message)) = source.next().await {
        if message.is_close() {
            break;
        }
        frames += 1;
    }
    tracing::debug!(frames, "telemetry socket closed; frames discarded");
}
