//! Minimal WebSocket client pieces: URL parsing, the HTTP upgrade, frame encoding and an
//! incremental frame-header walker that counts frames without parsing their JSON.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub const OP_CONT: u8 = 0;
pub const OP_TEXT: u8 = 1;
#[allow(dead_code)] // used by the tests
pub const OP_BINARY: u8 = 2;
pub const OP_CLOSE: u8 = 8;
pub const OP_PING: u8 = 9;
pub const OP_PONG: u8 = 10;

/// How long one connect + HTTP upgrade may take before it fails.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// URL

#[derive(Clone, Debug)]
pub struct WsUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
    pub addr: SocketAddr,
}

impl WsUrl {
    pub fn parse(s: &str, allow_remote: bool) -> Result<WsUrl, String> {
        let rest = s
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{s}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            // [v6]:port
            let end = h.find(']').ok_or_else(|| format!("{s}: bad IPv6 host"))?;
            let port = h[end + 1..].strip_prefix(':').unwrap_or("80");
            (h[..end].to_string(), port)
        } else {
            match authority.rfind(':') {
                Some(i) => (authority[..i].to_string(), &authority[i + 1..]),
                None => (authority.to_string(), "80"),
            }
        };
        let port: u16 = port.parse().map_err(|_| format!("{s}: bad port"))?;
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("{s}: cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{s}: {host} resolves to nothing"))?;
        if !allow_remote && !is_loopback(&addr.ip()) {
            return Err(format!(
                "{s}: {} is not a loopback address; pass --allow-remote to load a remote host",
                addr.ip()
            ));
        }
        Ok(WsUrl {
            host,
            port,
            path,
            addr,
        })
    }
}

/// The URL as error texts name it: `ws://host:port/path`.
impl fmt::Display for WsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ws://{}:{}{}", self.host, self.port, self.path)
    }
}

fn is_loopback(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => v.is_loopback(),
        IpAddr::V6(v) => v.is_loopback() || v.to_ipv4_mapped().is_some_and(|m| m.is_loopback()),
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
        out.push(B64[(n >> 18) as usize & 63] as char);
        out.push(B64[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            B64[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            B64[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// Connects, performs the HTTP/1.1 upgrade (blocking, with a timeout) and returns the socket
/// plus any bytes that arrived after the 101 response (already the first frames).
/// The socket is left in blocking mode with TCP_NODELAY set.
pub fn connect(url: &WsUrl, key: [u8; 16], timeout: Duration) -> io::Result<(TcpStream, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let sock = TcpStream::connect_timeout(&url.addr, timeout)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(timeout))?;
    let host = if url.port == 80 {
        url.host.clone()
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: ringcast-loadtest\r\n\r\n",
        url.path,
        host,
        base64(&key)
    );
    (&sock).write_all(req.as_bytes())?;
    let mut buf = Vec::with_capacity(1024);
    let mut tmp = [0u8; 4096];
    loop {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake timed out",
            ));
        }
        let n = match (&sock).read(&mut tmp) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connected, but no HTTP upgrade response within {} s",
                        timeout.as_secs_f64()
                    ),
                ));
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during handshake",
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            let status = buf.split(|&c| c == b'\n').next().unwrap_or(b"");
            if !status.starts_with(b"HTTP/1.1 101") {
                let line = String::from_utf8_lossy(status).trim().to_string();
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("upgrade refused: {line}"),
                ));
            }
            let rest = buf[end + 4..].to_vec();
            sock.set_read_timeout(None)?;
            return Ok((sock, rest));
        }
        if buf.len() > 16384 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "oversized handshake response",
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

fn push_header(out: &mut Vec<u8>, opcode: u8, len: usize, masked: bool) {
    out.push(0x80 | opcode);
    let m = if masked { 0x80 } else { 0 };
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= 0xffff {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Appends one masked (client → server) frame.
pub fn encode_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    push_header(out, opcode, payload.len(), true);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// Appends one unmasked (server → client) frame.
pub fn encode_server_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    push_header(out, opcode, payload.len(), false);
    out.extend_from_slice(payload);
}

pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let m = u32::from_ne_bytes(mask);
    let mut chunks = buf.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ m;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

// ---------------------------------------------------------------------------------------------
// Frame-header walker

/// Receives what the walker finds. Payload bytes are only handed over for frames whose
/// `frame_start` returned true.
pub trait FrameSink {
    fn frame_start(&mut self, opcode: u8, fin: bool, len: u64) -> bool;
    fn payload(&mut self, chunk: &[u8]);
    fn frame_end(&mut self);
}

/// Incremental WebSocket frame parser over a byte stream: it reads headers (split anywhere
/// across reads), skips payloads it is not asked for and never copies them.
#[derive(Default)]
pub struct FrameWalker {
    hdr: [u8; 14],
    hdr_len: usize,
    remaining: u64,
    in_payload: bool,
    want: bool,
    /// frames that arrived masked (a server must not mask; payloads are passed on as is)
    pub masked_frames: u64,
}

#[inline]
fn header_len(b0_b1: [u8; 2]) -> usize {
    let l7 = b0_b1[1] & 0x7f;
    let ext = match l7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b0_b1[1] & 0x80 != 0 { 4 } else { 0 }
}

impl FrameWalker {
    pub fn new() -> Self {
        Self::default()
    }

    /// True when the stream is at a frame boundary (nothing partial buffered).
    pub fn at_boundary(&self) -> bool {
        !self.in_payload && self.hdr_len == 0
    }

    #[inline]
    fn begin<S: FrameSink>(&mut self, h: &[u8], sink: &mut S) {
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        let masked = h[1] & 0x80 != 0;
        let len = match h[1] & 0x7f {
            126 => u16::from_be_bytes([h[2], h[3]]) as u64,
            127 => {
                u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]])
                    & (u64::MAX >> 1)
            }
            n => n as u64,
        };
        if masked {
            self.masked_frames += 1;
        }
        self.want = sink.frame_start(opcode, fin, len);
        if len == 0 {
            sink.frame_end();
        } else {
            self.in_payload = true;
            self.remaining = len;
        }
    }

    pub fn feed<S: FrameSink>(&mut self, mut buf: &[u8], sink: &mut S) {
        loop {
            if self.in_payload {
                if buf.is_empty() {
                    return;
                }
                let take = self.remaining.min(buf.len() as u64) as usize;
                if self.want {
                    sink.payload(&buf[..take]);
                }
                self.remaining -= take as u64;
                buf = &buf[take..];
                if self.remaining == 0 {
                    self.in_payload = false;
                    sink.frame_end();
                }
                continue;
            }
            // header state
            if self.hdr_len == 0 {
                if buf.len() >= 2 {
                    let need = header_len([buf[0], buf[1]]);
                    if buf.len() >= need {
                        // fast path: whole header in this buffer
                        let (h, rest) = buf.split_at(need);
                        self.begin(h, sink);
                        buf = rest;
                        continue;
                    }
                }
                if buf.is_empty() {
                    return;
                }
            }
            // slow path: accumulate the header across reads
            if self.hdr_len < 2 {
                let take = (2 - self.hdr_len).min(buf.len());
                self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&buf[..take]);
                self.hdr_len += take;
                buf = &buf[take..];
                if self.hdr_len < 2 {
                    return; // buf exhausted
                }
            }
            let need = header_len([self.hdr[0], self.hdr[1]]);
            let take = (need - self.hdr_len).min(buf.len());
            self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&buf[..take]);
            self.hdr_len += take;
            buf = &buf[take..];
            if self.hdr_len < need {
                return; // buf exhausted
            }
            let h = self.hdr;
            let n = need;
            self.hdr_len = 0;
            self.begin(&h[..n], sink);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// "t" extraction

/// Finds `"t":` in a frame's text and parses the unsigned integer after it.
pub fn extract_t(text: &[u8]) -> Option<u64> {
    static FINDER: std::sync::OnceLock<memchr::memmem::Finder<'static>> =
        std::sync::OnceLock::new();
    let f = FINDER.get_or_init(|| memchr::memmem::Finder::new(b"\"t\""));
    let mut from = 0;
    while let Some(p) = f.find(&text[from..]) {
        let mut i = from + p + 3;
        while i < text.len() && matches!(text[i], b' ' | b'\t' | b'\r' | b'\n') {
            i += 1;
        }
        if i < text.len() && text[i] == b':' {
            i += 1;
            while i < text.len() && matches!(text[i], b' ' | b'\t' | b'\r' | b'\n') {
                i += 1;
            }
            let start = i;
            let mut v: u64 = 0;
            while i < text.len() && text[i].is_ascii_digit() {
                v = v.checked_mul(10)?.checked_add((text[i] - b'0') as u64)?;
                i += 1;
            }
            return if i > start { Some(v) } else { None };
        }
        from = from + p + 3;
    }
    None
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_displays_with_port_and_path() {
        let u = WsUrl::parse("ws://127.0.0.1:3112", false).unwrap();
        assert_eq!(u.to_string(), "ws://127.0.0.1:3112/");
        let u = WsUrl::parse("ws://localhost/x/y", false).unwrap();
        assert_eq!(u.to_string(), "ws://localhost:80/x/y");
    }

    #[derive(Default)]
    struct Rec {
        frames: Vec<(u8, bool, u64, Vec<u8>)>,
        cur: Option<(u8, bool, u64, Vec<u8>)>,
        capture: bool,
    }
    impl FrameSink for Rec {
        fn frame_start(&mut self, opcode: u8, fin: bool, len: u64) -> bool {
            self.cur = Some((opcode, fin, len, Vec::new()));
            self.capture
        }
        fn payload(&mut self, chunk: &[u8]) {
            self.cur.as_mut().unwrap().3.extend_from_slice(chunk);
        }
        fn frame_end(&mut self) {
            self.frames.push(self.cur.take().unwrap());
        }
    }

    fn sample_stream() -> (Vec<u8>, Vec<Vec<u8>>) {
        let payloads: Vec<Vec<u8>> = vec![
            b"hello".to_vec(),
            vec![],
            vec![b'a'; 125],
            vec![b'b'; 126],
            vec![b'c'; 300],
            vec![b'd'; 65535],
            vec![b'e'; 65536],
            vec![b'f'; 200_000],
            b"{\"t\":42}".to_vec(),
        ];
        let mut s = Vec::new();
        for p in &payloads {
            encode_server_frame(&mut s, OP_TEXT, p);
        }
        (s, payloads)
    }

    fn check(rec: &Rec, payloads: &[Vec<u8>], captured: bool) {
        assert_eq!(rec.frames.len(), payloads.len());
        for (f, p) in rec.frames.iter().zip(payloads) {
            assert_eq!(f.0, OP_TEXT);
            assert!(f.1);
            assert_eq!(f.2, p.len() as u64);
            if captured {
                assert_eq!(&f.3, p);
            } else {
                assert!(f.3.is_empty());
            }
        }
    }

    #[test]
    fn walker_whole_buffer() {
        let (s, payloads) = sample_stream();
        for capture in [false, true] {
            let mut w = FrameWalker::new();
            let mut rec = Rec {
                capture,
                ..Default::default()
            };
            w.feed(&s, &mut rec);
            check(&rec, &payloads, capture);
            assert!(w.at_boundary());
        }
    }

    #[test]
    fn walker_every_split_point_and_bytewise() {
        let (s, payloads) = sample_stream();
        // byte by byte: every header is split at every position
        let mut w = FrameWalker::new();
        let mut rec = Rec {
            capture: true,
            ..Default::default()
        };
        for b in &s {
            w.feed(std::slice::from_ref(b), &mut rec);
        }
        check(&rec, &payloads, true);
        // two-way splits around the headers of the 16-bit and 64-bit frames
        let hdr16 = 7 + 2 + 125 + 2; // "hello", empty, 125 → start of 126-byte frame
        let mut pos = 0;
        let mut starts = vec![];
        for p in &payloads {
            starts.push(pos);
            let hl = if p.len() < 126 {
                2
            } else if p.len() <= 0xffff {
                4
            } else {
                10
            };
            pos += hl + p.len();
        }
        assert_eq!(starts[3], hdr16);
        for &st in &starts {
            for k in 0..=11 {
                let cut = (st + k).min(s.len());
                let mut w = FrameWalker::new();
                let mut rec = Rec {
                    capture: true,
                    ..Default::default()
                };
                w.feed(&s[..cut], &mut rec);
                w.feed(&s[cut..], &mut rec);
                check(&rec, &payloads, true);
            }
        }
    }

    #[test]
    fn walker_irregular_chunks() {
        let (s, payloads) = sample_stream();
        let mut w = FrameWalker::new();
        let mut rec = Rec {
            capture: false,
            ..Default::default()
        };
        let sizes = [1usize, 3, 9, 2, 13, 4096, 7, 65536, 5];
        let mut i = 0;
        let mut k = 0;
        while i < s.len() {
            let n = sizes[k % sizes.len()].min(s.len() - i);
            w.feed(&s[i..i + n], &mut rec);
            i += n;
            k += 1;
        }
        check(&rec, &payloads, false);
    }

    #[test]
    fn walker_lengths_and_mask_and_control() {
        // 64-bit length header, masked client frame, ping, continuation
        let mut s = Vec::new();
        let big = vec![7u8; 70_000];
        encode_server_frame(&mut s, OP_BINARY, &big);
        assert_eq!(s[1], 127);
        assert_eq!(u64::from_be_bytes(s[2..10].try_into().unwrap()), 70_000);
        encode_client_frame(&mut s, OP_TEXT, b"masked!", [1, 2, 3, 4]);
        encode_server_frame(&mut s, OP_PING, b"p");
        // fragmented message: text(fin=0) + cont(fin=1)
        s.extend_from_slice(&[0x01, 3, b'a', b'b', b'c', 0x80, 2, b'd', b'e']);
        let mut w = FrameWalker::new();
        let mut rec = Rec {
            capture: true,
            ..Default::default()
        };
        for part in s.chunks(5) {
            w.feed(part, &mut rec);
        }
        assert_eq!(rec.frames.len(), 5);
        assert_eq!((rec.frames[0].0, rec.frames[0].2), (OP_BINARY, 70_000));
        assert_eq!(rec.frames[1].2, 7);
        let mut unmasked = rec.frames[1].3.clone();
        apply_mask(&mut unmasked, [1, 2, 3, 4]);
        assert_eq!(unmasked, b"masked!");
        assert_eq!(w.masked_frames, 1);
        assert_eq!(
            (rec.frames[2].0, &rec.frames[2].3[..]),
            (OP_PING, &b"p"[..])
        );
        assert_eq!((rec.frames[3].0, rec.frames[3].1), (OP_TEXT, false));
        assert_eq!(
            (rec.frames[4].0, rec.frames[4].1, &rec.frames[4].3[..]),
            (OP_CONT, true, &b"de"[..])
        );
    }

    #[test]
    fn t_extractor() {
        let f = br#"{"type":"stream","timestamp":1718000000123,"streamName":"loadtest","groupId":"g0","id":"i1","event":{"type":"create","data":{"t":123456789,"seq":4,"pad":"xx"}}}"#;
        assert_eq!(extract_t(f), Some(123456789));
        // sorted keys: pad, seq, t after the envelope
        assert_eq!(
            extract_t(
                br#"{"event":{"data":{"pad":"xxxx","seq":1,"t":5},"type":"update"},"timestamp":1}"#
            ),
            Some(5)
        );
        assert_eq!(extract_t(br#"{"t" : 77 ,"x":1}"#), Some(77));
        assert_eq!(extract_t(b"{\"t\":\n 9}"), Some(9));
        assert_eq!(extract_t(br#"{"type":"sync","timestamp":5,"tt":3}"#), None);
        assert_eq!(extract_t(br#"{"t":"abc"}"#), None);
        assert_eq!(extract_t(br#"{"t":-1}"#), None);
        assert_eq!(extract_t(br#"{"t":99999999999999999999999}"#), None);
        assert_eq!(extract_t(br#"{"a":"\"t\"","t":8}"#), Some(8));
        assert_eq!(extract_t(b""), None);
    }

    #[test]
    fn base64_and_urls() {
        assert_eq!(base64(b"the sample nonce"), "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        let u = WsUrl::parse("ws://127.0.0.1:49134/", false).unwrap();
        assert_eq!((u.port, u.path.as_str()), (49134, "/"));
        let u = WsUrl::parse("ws://localhost:3112", false).unwrap();
        assert_eq!(u.path, "/");
        assert!(WsUrl::parse("ws://[::1]:3112/x", false).is_ok());
        assert!(WsUrl::parse("ws://10.1.2.3:3112/", false)
            .unwrap_err()
            .contains("--allow-remote"));
        assert!(WsUrl::parse("ws://10.1.2.3:3112/", true).is_ok());
        assert!(WsUrl::parse("http://127.0.0.1:1/", true).is_err());
    }
}
