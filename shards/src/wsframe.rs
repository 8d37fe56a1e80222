//! WebSocket framing for subscriber sockets: server frames are built once (header and payload in
//! one shared buffer); client frames are parsed from a read buffer.
//!
//! Client bytes are hostile: no indexing, slicing by offset, unwrap or expect outside tests.
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]

use bytes::{BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// A complete server-to-client frame (unmasked), ready to be written to any number of sockets.
pub fn server_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let header = FrameHeader { opcode, ..FrameHeader::default() };
    let mut out = BytesMut::with_capacity(header.len(payload.len() as u64) + payload.len());
    {
        let mut writer = (&mut out).writer();
        // Writing to memory cannot fail.
        let _ = header.format(payload.len() as u64, &mut writer);
    }
    out.extend_from_slice(payload);
    out.freeze()
}

/// A text frame carrying `text`.
pub fn text_frame(text: &[u8]) -> Bytes {
    server_frame(OpCode::Data(Data::Text), text)
}

/// The payload of a frame built by `server_frame` (the header skipped).
pub fn payload_of(frame: &Bytes) -> Bytes {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.slice(header.min(frame.len())..)
}

/// A close frame with `code` and `reason`.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    server_frame(OpCode::Control(Control::Close), &payload)
}

/// One frame read from a client.
#[derive(Debug, PartialEq)]
pub struct ClientFrame {
    pub opcode: OpCode,
    pub is_final: bool,
    pub payload: Vec<u8>,
}

/// Why the client's bytes cannot be read as frames.
#[derive(Debug, PartialEq)]
pub enum FrameError {
    /// A frame larger than the configured limit.
    TooBig(u64),
    /// Not a valid frame header.
    Malformed,
}

/// Takes one complete frame off the front of `buf`, unmasking its payload. `Ok(None)` = more
/// bytes are needed.
pub fn parse_client_frame(buf: &mut BytesMut, max_payload: usize) -> Result<Option<ClientFrame>, FrameError> {
    let mut cursor = std::io::Cursor::new(buf.as_ref());
    let (header, length) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return Ok(None),
        Err(_) => return Err(FrameError::Malformed),
    };
    if length > max_payload as u64 {
        return Err(FrameError::TooBig(length));
    }
    // Both fit in usize: the header is at most 14 bytes and `length` is within `max_payload`.
    let header_len = usize::try_from(cursor.position()).map_err(|_| FrameError::Malformed)?;
    let total = usize::try_from(length).ok().and_then(|l| l.checked_add(header_len)).ok_or(FrameError::TooBig(length))?;
    if buf.len() < total {
        return Ok(None);
    }
    let frame = buf.split_to(total);
    let mut payload = frame.get(header_len..).unwrap_or_default().to_vec();
    if let Some(mask) = header.mask {
        for (byte, key) in payload.iter_mut().zip(mask.iter().cycle()) {
            *byte ^= key;
        }
    }
    Ok(Some(ClientFrame { opcode: header.opcode, is_final: header.is_final, payload }))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn masked(opcode: u8, payload: &[u8], fin: bool) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    #[test]
    fn server_frames_have_minimal_headers() {
        assert_eq!(&text_frame(b"hi")[..], &[0x81, 2, b'h', b'i']);
        let big = text_frame(&[b'x'; 300]);
        assert_eq!(&big[..4], &[0x81, 126, 1, 44]);
        assert_eq!(big.len(), 304);
        assert_eq!(payload_of(&big).len(), 300);
        assert_eq!(&payload_of(&text_frame(b"hi"))[..], b"hi");
        assert_eq!(&close_frame(4008, "slow")[..4], &[0x88, 6, 0x0f, 0xa8]);
    }

    #[test]
    fn client_frames_are_unmasked_and_may_arrive_in_pieces() {
        let bytes = masked(0x1, b"{\"type\":\"join\"}", true);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&bytes[..3]);
        assert_eq!(parse_client_frame(&mut buf, 1024), Ok(None));
        buf.extend_from_slice(&bytes[3..]);
        buf.extend_from_slice(&masked(0x9, b"p", true));
        let frame = parse_client_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(frame.payload, b"{\"type\":\"join\"}");
        assert_eq!(frame.opcode, OpCode::Data(Data::Text));
        let ping = parse_client_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(ping.opcode, OpCode::Control(Control::Ping));
        assert!(buf.is_empty());
    }

    #[test]
    fn hostile_headers_never_panic() {
        // 64-bit length near the top of the range, with no limit: needs more bytes, no overflow.
        let mut huge = BytesMut::from(&[0x82u8, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4][..]);
        assert_eq!(parse_client_frame(&mut huge, usize::MAX), Ok(None));
        for seed in 0u8..=255 {
            let mut buf = BytesMut::from(&[seed, seed.wrapping_mul(31), seed ^ 0x5a, 0xff, seed, 0, 1][..]);
            let _ = parse_client_frame(&mut buf, 64);
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering() {
        let mut buf = BytesMut::from(&masked(0x1, &[b'a'; 300], true)[..8]);
        assert_eq!(parse_client_frame(&mut buf, 100), Err(FrameError::TooBig(300)));
    }
}
