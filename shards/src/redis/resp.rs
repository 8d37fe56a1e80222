//! RESP2, the Redis wire protocol: commands out (arrays of bulk strings) and replies in.
//!
//! The parser reads bytes from the network, so it must not panic on any input: no indexing,
//! slicing by offset, unwrap or expect. Announced lengths are checked against limits and never
//! used to reserve memory ahead of the bytes themselves.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;

/// The longest bulk string accepted (Redis' own `proto-max-bulk-len` default).
pub const MAX_BULK: usize = 512 << 20;
/// The most elements one array may announce.
pub const MAX_ARRAY: usize = 1 << 24;
/// Deepest nesting of arrays accepted (replies of ringcast's scripts nest two levels).
pub const MAX_DEPTH: usize = 8;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    /// `+OK`.
    Simple(String),
    /// `-ERR …`: the server refused the command.
    Error(String),
    Int(i64),
    /// `$n` bulk string; `None` for the null bulk `$-1`.
    Bulk(Option<Bytes>),
    /// `*n` array; `None` for the null array `*-1`.
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The bytes of a bulk or simple string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Resp::Bulk(Some(b)) => Some(b),
            Resp::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    /// A bulk string as UTF-8 text.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(self.as_bytes()?).ok()
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Resp::Int(n) => Some(*n),
            // Lua numbers returned inside tables arrive as integers; strings holding digits too.
            Resp::Bulk(Some(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }

    pub fn into_array(self) -> Option<Vec<Resp>> {
        match self {
            Resp::Array(Some(items)) => Some(items),
            _ => None,
        }
    }
}

/// Why bytes from the server are not RESP2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown reply type byte 0x{0:02x}")]
    UnknownType(u8),
    #[error("malformed length or integer")]
    BadNumber,
    #[error("length {0} past the limit")]
    TooLong(i64),
    #[error("bulk string not followed by CRLF")]
    MissingCrlf,
    #[error("arrays nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("status line is not UTF-8")]
    NotUtf8,
}

/// Appends a command (an array of bulk strings) to `out`.
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    push_header(out, b'*', args.len());
    for arg in args {
        push_header(out, b'$', arg.len());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

fn push_header(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The outcome of parsing the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole reply and the bytes it took.
    Reply(Resp, usize),
    /// More bytes are needed: at least this many in total (a hint; 0 when unknown).
    Incomplete(usize),
}

/// Parses one reply from the front of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProtocolError> {
    let mut pos = 0;
    match parse_at(buf, &mut pos, 0)? {
        Some(resp) => Ok(Parsed::Reply(resp, pos)),
        None => Ok(Parsed::Incomplete(pos)),
    }
}

/// The line starting at `*pos` (without CRLF); advances past it. `None`: incomplete.
fn line<'a>(buf: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let rest = buf.get(*pos..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    let text = rest.get(..end)?;
    *pos += end + 2;
    Some(text)
}

fn number(text: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(text).ok().and_then(|s| s.parse().ok()).ok_or(ProtocolError::BadNumber)
}

/// Parses at `*pos`. `Ok(None)`: incomplete, with `*pos` set to the total length known to be
/// needed (or left where it was).
fn parse_at(buf: &[u8], pos: &mut usize, depth: usize) -> Result<Option<Resp>, ProtocolError> {
    let start = *pos;
    let Some(&kind) = buf.get(start) else { return Ok(None) };
    let mut cursor = start + 1;
    let Some(text) = line(buf, &mut cursor) else {
        *pos = start;
        return Ok(None);
    };
    let resp = match kind {
        b'+' => Resp::Simple(String::from_utf8(text.to_vec()).map_err(|_| ProtocolError::NotUtf8)?),
        b'-' => Resp::Error(String::from_utf8_lossy(text).into_owned()),
        b':' => Resp::Int(number(text)?),
        b'$' => {
            let n = number(text)?;
            if n == -1 {
                Resp::Bulk(None)
            } else {
                let len = usize::try_from(n).ok().filter(|&l| l <= MAX_BULK).ok_or(ProtocolError::TooLong(n))?;
                let end = cursor + len;
                let Some(body) = buf.get(cursor..end) else {
                    *pos = end + 2;
                    return Ok(None);
                };
                match buf.get(end..end + 2) {
                    None => {
                        *pos = end + 2;
                        return Ok(None);
                    }
                    Some(b"\r\n") => {}
                    Some(_) => return Err(ProtocolError::MissingCrlf),
                }
                cursor = end + 2;
                Resp::Bulk(Some(Bytes::copy_from_slice(body)))
            }
        }
        b'*' => {
            let n = number(text)?;
            if n == -1 {
                Resp::Array(None)
            } else {
                if depth >= MAX_DEPTH {
                    return Err(ProtocolError::TooDeep);
                }
                let len = usize::try_from(n).ok().filter(|&l| l <= MAX_ARRAY).ok_or(ProtocolError::TooLong(n))?;
                let mut items = Vec::with_capacity(len.min(1024));
                for _ in 0..len {
                    match parse_at(buf, &mut cursor, depth + 1)? {
                        Some(item) => items.push(item),
                        None => {
                            *pos = cursor;
                            return Ok(None);
                        }
                    }
                }
                Resp::Array(Some(items))
            }
        }
        other => return Err(ProtocolError::UnknownType(other)),
    };
    *pos = cursor;
    Ok(Some(resp))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Resp {
        Resp::Bulk(Some(Bytes::copy_from_slice(s.as_bytes())))
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"SET", b"k", b"a\r\nb"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n");
    }

    #[test]
    fn every_reply_type_parses_and_reports_its_length() {
        let cases: Vec<(&[u8], Resp)> = vec![
            (b"+OK\r\n", Resp::Simple("OK".into())),
            (b"-ERR no\r\n", Resp::Error("ERR no".into())),
            (b":-42\r\n", Resp::Int(-42)),
            (b"$-1\r\n", Resp::Bulk(None)),
            (b"$0\r\n\r\n", bulk("")),
            (b"$5\r\nhe\r\no\r\n", bulk("he\r\no")),
            (b"*-1\r\n", Resp::Array(None)),
            (b"*2\r\n:1\r\n*1\r\n$1\r\nx\r\n", Resp::Array(Some(vec![Resp::Int(1), Resp::Array(Some(vec![bulk("x")]))]))),
        ];
        for (bytes, expected) in cases {
            assert_eq!(parse(bytes), Ok(Parsed::Reply(expected, bytes.len())), "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn every_prefix_of_a_reply_is_incomplete_not_an_error() {
        let whole = b"*3\r\n$3\r\nabc\r\n:7\r\n*1\r\n+OK\r\n";
        for cut in 0..whole.len() {
            assert!(matches!(parse(&whole[..cut]), Ok(Parsed::Incomplete(_))), "cut at {cut}");
        }
        assert!(matches!(parse(whole), Ok(Parsed::Reply(_, n)) if n == whole.len()));
    }

    #[test]
    fn a_bulk_announces_how_many_bytes_it_needs() {
        assert_eq!(parse(b"$10\r\nabc"), Ok(Parsed::Incomplete(17)));
    }

    #[test]
    fn junk_is_an_error() {
        assert_eq!(parse(b"?x\r\n"), Err(ProtocolError::UnknownType(b'?')));
        assert_eq!(parse(b":1x\r\n"), Err(ProtocolError::BadNumber));
        assert_eq!(parse(b"$1\r\nabc"), Err(ProtocolError::MissingCrlf));
        assert_eq!(parse(b"$-5\r\n"), Err(ProtocolError::TooLong(-5)));
        assert_eq!(parse(b"*99999999999\r\n"), Err(ProtocolError::TooLong(99999999999)));
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert_eq!(parse(deep.as_bytes()), Err(ProtocolError::TooDeep));
    }
}
