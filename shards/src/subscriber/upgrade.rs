//! The HTTP side of a subscriber connection: reading the upgrade request (bounded in size),
//! what it asks for (key, path, headers, query, the `Authorization` subprotocol), the implicit
//! join in its URL, and the error answers that refuse it.
//!
//! Everything here reads client bytes, so it must not panic on any input: no indexing, slicing
//! by offset, unwrap or expect outside tests.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use crate::messages::GroupKey;
use bytes::BytesMut;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use serde_json::{Map, Value};

/// Largest HTTP upgrade request accepted.
const MAX_REQUEST_BYTES: usize = 16 << 10;

/// What the upgrade request asked for.
pub struct Upgrade {
    pub key: String,
    pub path: String,
    pub headers: Map<String, Value>,
    pub query: Map<String, Value>,
    pub offers_authorization: bool,
}

/// Reads the upgrade request; `Err` is the HTTP status line to answer with.
pub(super) async fn read_upgrade(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Upgrade, &'static str> {
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
pub fn upgrade_of(request: &httparse::Request) -> Result<Upgrade, &'static str> {
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
pub fn query_params(query: &str) -> Map<String, Value> {
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
pub fn percent_decode(segment: &str) -> Option<String> {
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
pub type UrlJoin = (GroupKey, Option<String>);

/// `/` (joins come as frames) or `/stream/{stream}/{group}/[{item}]`, an implicit join. `Err` is
/// the HTTP status to refuse the upgrade with: 404 for other paths, 400 for bad escapes.
pub fn implicit_join(path: &str) -> Result<Option<UrlJoin>, &'static str> {
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

/// Answers `status` (an HTTP status line such as `404 Not Found`) and nothing else.
pub(super) async fn respond_error(stream: &mut TcpStream, status: &str) -> std::io::Result<()> {
    let body = format!("{status}\n");
    let response = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    stream.write_all(response.as_bytes()).await
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

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
