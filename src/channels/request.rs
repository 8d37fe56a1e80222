//! The channel endpoint's request target, `/ws/channels/{channel_id}?key=<access_key>&dir=read|write`
//! (spec §7.2), and the request-line test the worker port uses to hand such connections over.
//! Everything here reads untrusted bytes: no slicing by offset, no unwrap; fuzzed by
//! `fuzz/fuzz_targets/channel_request.rs`.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use ringcast_shards::subscriber::upgrade::percent_decode;

/// Path prefix of the channel endpoint on the worker port.
pub const PATH_PREFIX: &str = "/ws/channels/";

/// What a channel connection's request line starts with; a connection whose first bytes are
/// this goes to the channels executor before any of it is read.
pub const REQUEST_LINE_PREFIX: &[u8] = b"GET /ws/channels/";

/// Which end of a channel a socket takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `dir=read`: the engine writes the channel's frames to this socket.
    Read,
    /// `dir=write`: the engine reads frames from this socket into the channel.
    Write,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Read => "read",
            Direction::Write => "write",
        }
    }
}

/// A well-formed channel request (whether the channel exists and the key fits is the registry's
/// question).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRequest {
    pub channel_id: String,
    pub key: String,
    pub dir: Direction,
}

/// Why a request target is not a usable channel request; [`RequestError::status`] is the HTTP
/// answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("not a channel endpoint: the path must be /ws/channels/{{channel_id}}")]
    NotFound,
    #[error("bad percent-escape (or not UTF-8) in the {0}")]
    BadEscape(&'static str),
    #[error("the `key` query parameter is missing")]
    MissingKey,
    #[error("the `dir` query parameter is missing or is not `read` or `write`")]
    BadDirection,
}

impl RequestError {
    /// The HTTP status the upgrade is refused with.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::NotFound => 404,
            _ => 400,
        }
    }
}

/// Parses a request target (path and query). Extra query parameters are ignored (as the
/// reference); of a repeated `key` or `dir` the first counts. Query values are
/// form-decoded (`+` is a space, `%XX` escapes), as the reference's query extractor does.
pub fn parse(target: &str) -> Result<ChannelRequest, RequestError> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let id = path.strip_prefix(PATH_PREFIX).ok_or(RequestError::NotFound)?;
    let id = id.strip_suffix('/').unwrap_or(id);
    if id.is_empty() || id.contains('/') {
        return Err(RequestError::NotFound);
    }
    let channel_id = percent_decode(id).ok_or(RequestError::BadEscape("channel id"))?;
    let mut key = None;
    let mut dir = None;
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "key" if key.is_none() => key = Some(form_decode(value).ok_or(RequestError::BadEscape("key"))?),
            "dir" if dir.is_none() => dir = Some(form_decode(value).ok_or(RequestError::BadEscape("dir"))?),
            _ => {}
        }
    }
    let key = key.ok_or(RequestError::MissingKey)?;
    let dir = match dir.as_deref() {
        Some("read") => Direction::Read,
        Some("write") => Direction::Write,
        _ => return Err(RequestError::BadDirection),
    };
    Ok(ChannelRequest { channel_id, key, dir })
}

/// A query value: `+` is a space, then `%XX` escapes.
fn form_decode(value: &str) -> Option<String> {
    if value.contains('+') {
        percent_decode(&value.replace('+', " "))
    } else {
        percent_decode(value)
    }
}

/// How the first bytes of a connection on the worker port compare with a channel request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peeked {
    /// They start with `GET /ws/channels/`.
    Channel,
    /// They are a prefix of it: more bytes are needed to tell.
    Undecided,
    /// Anything else (the worker socket, `/otel`, junk): the worker port serves it.
    Other,
}

/// Classifies the first bytes of a connection (as far as they have arrived).
pub fn classify(first_bytes: &[u8]) -> Peeked {
    if first_bytes.starts_with(REQUEST_LINE_PREFIX) {
        Peeked::Channel
    } else if REQUEST_LINE_PREFIX.starts_with(first_bytes) {
        Peeked::Undecided
    } else {
        Peeked::Other
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_sdks_send() {
        let r = parse("/ws/channels/6f1e-aa?key=0b7c%2Dx&dir=write").unwrap();
        assert_eq!(r, ChannelRequest { channel_id: "6f1e-aa".into(), key: "0b7c-x".into(), dir: Direction::Write });
        // PyPI 0.25 keeps a query already on the engine URL in front of ours.
        let r = parse("/ws/channels/id/?token=t&key=k+1&dir=read&extra").unwrap();
        assert_eq!((r.channel_id.as_str(), r.key.as_str(), r.dir), ("id", "k 1", Direction::Read));
    }

    #[test]
    fn refuses_what_is_not_a_channel_request() {
        assert_eq!(parse("/ws/channels/"), Err(RequestError::NotFound));
        assert_eq!(parse("/ws/channels/a/b?key=k&dir=read"), Err(RequestError::NotFound));
        assert_eq!(parse("/ws/channel/a?key=k&dir=read"), Err(RequestError::NotFound));
        assert_eq!(parse("/ws/channels/a?dir=read"), Err(RequestError::MissingKey));
        assert_eq!(parse("/ws/channels/a?key=k"), Err(RequestError::BadDirection));
        assert_eq!(parse("/ws/channels/a?key=k&dir=both"), Err(RequestError::BadDirection));
        assert_eq!(parse("/ws/channels/a?key=%zz&dir=read"), Err(RequestError::BadEscape("key")));
        assert_eq!(parse("/ws/channels/%ff?key=k&dir=read"), Err(RequestError::BadEscape("channel id")));
        assert_eq!(RequestError::MissingKey.status(), 400);
        assert_eq!(RequestError::NotFound.status(), 404);
    }

    #[test]
    fn classifies_request_lines() {
        assert_eq!(classify(b"GET /ws/channels/abc?key"), Peeked::Channel);
        assert_eq!(classify(b"GET /ws/cha"), Peeked::Undecided);
        assert_eq!(classify(b""), Peeked::Undecided);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Peeked::Other);
        assert_eq!(classify(b"GET /otel HTTP/1.1"), Peeked::Other);
        assert_eq!(classify(b"POST /ws/channels/x"), Peeked::Other);
    }
}
