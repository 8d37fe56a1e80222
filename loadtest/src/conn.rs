//! One WebSocket connection on the lean receive path, how the scenarios open one (subscriber
//! with its join, worker), and per-thread counters.

use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use hdrhistogram::Histogram;

use crate::caller::Caller;
use crate::sys::Rng;
use crate::ws::{self, FrameSink, FrameWalker, WsUrl, HANDSHAKE_TIMEOUT};

/// Largest sampled frame copied for latency extraction; bigger ones are counted but not timed.
const SAMPLE_CAP: usize = 4 << 20;
/// Largest first frame (sync / workerregistered) examined.
const FIRST_CAP: usize = 64 << 20;

pub fn new_hist() -> Histogram<u64> {
    // 1 ns .. 100 s, 3 significant digits
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds")
}

/// The stream subscriber protocol's join message for `group` of `stream`, under a fresh
/// subscription id.
pub fn join_message(rng: &mut Rng, stream: &str, group: &str) -> String {
    serde_json::json!({"type": "join", "data": {
        "subscriptionId": rng.uuid_v4(), "streamName": stream, "groupId": group}})
    .to_string()
}

/// Opens a subscriber socket and sends its join (blocking); the sync frame is awaited later.
/// Delivered frames are counted, one in `sample_every` timed.
pub fn open_subscriber(
    url: &WsUrl,
    rng: &mut Rng,
    stream: &str,
    group: &str,
    sample_every: u32,
) -> Result<Conn, String> {
    let (sock, rest) =
        ws::connect(url, rng.bytes16(), HANDSHAKE_TIMEOUT).map_err(|e| format!("{url}: {e}"))?;
    let mut c = Conn::new(
        sock,
        rest,
        Mode::Count {
            sample_every,
            latency: true,
            first: Some(b"\"sync\""),
        },
        rng.mask(),
        Role::Sub,
    );
    c.send_text(join_message(rng, stream, group).as_bytes());
    c.write_queued_blocking()?;
    Ok(c)
}

/// Opens a worker-protocol socket (nothing sent yet).
pub fn open_worker(url: &WsUrl, rng: &mut Rng, mode: Mode, role: Role) -> Result<Conn, String> {
    let (sock, rest) =
        ws::connect(url, rng.bytes16(), HANDSHAKE_TIMEOUT).map_err(|e| format!("{url}: {e}"))?;
    Ok(Conn::new(sock, rest, mode, rng.mask(), role))
}

/// Counters owned by one loop thread (merged at the end).
pub struct ThreadStats {
    /// data messages counted after the subscriber's first (sync) frame
    pub delivered: u64,
    pub delivered_flushed: u64,
    /// subscribers whose first frame matched the expected pattern
    pub synced: u64,
    pub synced_flushed: u64,
    /// first frames that did not match the expected pattern (e.g. `unauthorized`)
    pub unexpected: u64,
    pub first_unexpected: Option<String>,
    /// sampled frames without a usable "t"
    pub no_t: u64,
    pub bytes_in: u64,
    pub closed: u64,
    /// set → delivery latency of sampled frames (ns)
    pub hist: Histogram<u64>,
    pub last_delivery_ns: u64,
}

impl ThreadStats {
    pub fn new() -> ThreadStats {
        ThreadStats {
            delivered: 0,
            delivered_flushed: 0,
            synced: 0,
            synced_flushed: 0,
            unexpected: 0,
            first_unexpected: None,
            no_t: 0,
            bytes_in: 0,
            closed: 0,
            hist: new_hist(),
            last_delivery_ns: 0,
        }
    }
    pub fn merge(&mut self, o: &ThreadStats) {
        self.delivered += o.delivered;
        self.synced += o.synced;
        self.unexpected += o.unexpected;
        if self.first_unexpected.is_none() {
            self.first_unexpected.clone_from(&o.first_unexpected);
        }
        self.no_t += o.no_t;
        self.bytes_in += o.bytes_in;
        self.closed += o.closed;
        self.hist.add(&o.hist).ok();
        self.last_delivery_ns = self.last_delivery_ns.max(o.last_delivery_ns);
    }
}

#[derive(Clone, Copy)]
pub enum Mode {
    /// Count data messages; the first one must contain `first` (then the connection is
    /// "synced"), later ones are counted and every `sample_every`-th is timed.
    Count {
        sample_every: u32,
        latency: bool,
        first: Option<&'static [u8]>,
    },
    /// Collect every complete data message into the inbox (worker connections).
    Full,
}

pub struct RxState {
    pub mode: Mode,
    pub synced: bool,
    cur_ctl: bool,
    /// false while a fragmented data message is incomplete
    pub cur_fin: bool,
    ctl_op: u8,
    /// payload of the last control frame (a close frame's code and reason after `closed`)
    pub ctl: Vec<u8>,
    capturing: bool,
    msg: Vec<u8>,
    sample_ctr: u32,
    /// Full mode: complete messages, back to back, with their bounds
    pub inbox: Vec<u8>,
    pub bounds: Vec<(usize, usize)>,
    msg_start: usize,
    /// outbound bytes not yet written
    pub out: Vec<u8>,
    pub mask: [u8; 4],
    pub closed: bool,
}

impl RxState {
    pub fn new(mode: Mode, mask: [u8; 4]) -> RxState {
        let synced = matches!(mode, Mode::Count { first: None, .. });
        RxState {
            mode,
            synced,
            cur_ctl: false,
            cur_fin: true,
            ctl_op: 0,
            ctl: Vec::new(),
            capturing: false,
            msg: Vec::new(),
            sample_ctr: 0,
            inbox: Vec::new(),
            bounds: Vec::new(),
            msg_start: 0,
            out: Vec::new(),
            mask,
            closed: false,
        }
    }
}

struct Rx<'a> {
    st: &'a mut RxState,
    ts: &'a mut ThreadStats,
    now: u64,
}

impl FrameSink for Rx<'_> {
    #[inline]
    fn frame_start(&mut self, opcode: u8, fin: bool, _len: u64) -> bool {
        let st = &mut *self.st;
        if opcode >= 8 {
            st.cur_ctl = true;
            st.ctl_op = opcode;
            st.ctl.clear();
            return true;
        }
        st.cur_ctl = false;
        st.cur_fin = fin;
        let new_msg = opcode != ws::OP_CONT;
        match st.mode {
            Mode::Full => {
                if new_msg {
                    st.msg_start = st.inbox.len();
                }
                true
            }
            Mode::Count {
                sample_every,
                latency,
                ..
            } => {
                if new_msg {
                    st.capturing = if !st.synced {
                        true
                    } else if latency {
                        st.sample_ctr += 1;
                        if st.sample_ctr >= sample_every {
                            st.sample_ctr = 0;
                            true
                        } else {
                            false
                        }
                    } else {
                        false
                    };
                    if st.capturing {
                        st.msg.clear();
                    }
                }
                st.capturing
            }
        }
    }

    #[inline]
    fn payload(&mut self, chunk: &[u8]) {
        let st = &mut *self.st;
        if st.cur_ctl {
            if st.ctl.len() < 125 {
                st.ctl
                    .extend_from_slice(&chunk[..chunk.len().min(125 - st.ctl.len())]);
            }
            return;
        }
        match st.mode {
            Mode::Full => st.inbox.extend_from_slice(chunk),
            Mode::Count { .. } => {
                if !st.capturing {
                    return; // dropped earlier in this message (over the cap)
                }
                let cap = if st.synced { SAMPLE_CAP } else { FIRST_CAP };
                if st.msg.len() + chunk.len() <= cap {
                    st.msg.extend_from_slice(chunk);
                } else {
                    st.msg.clear();
                    st.capturing = false; // too big to look at
                }
            }
        }
    }

    #[inline]
    fn frame_end(&mut self) {
        let st = &mut *self.st;
        if st.cur_ctl {
            st.cur_ctl = false;
            match st.ctl_op {
                ws::OP_PING => {
                    let mask = st.mask;
                    ws::encode_client_frame(&mut st.out, ws::OP_PONG, &st.ctl, mask);
                }
                ws::OP_CLOSE => st.closed = true,
                _ => {}
            }
            return;
        }
        if !st.cur_fin {
            return;
        }
        match st.mode {
            Mode::Full => {
                st.bounds.push((st.msg_start, st.inbox.len()));
            }
            Mode::Count { first, latency, .. } => {
                if !st.synced {
                    let pat = first.unwrap_or(b"");
                    if memchr::memmem::find(&st.msg, pat).is_some() {
                        st.synced = true;
                        self.ts.synced += 1;
                    } else {
                        self.ts.unexpected += 1;
                        if self.ts.first_unexpected.is_none() {
                            let n = st.msg.len().min(300);
                            self.ts.first_unexpected =
                                Some(String::from_utf8_lossy(&st.msg[..n]).into_owned());
                        }
                    }
                    st.msg.clear();
                    st.capturing = false;
                    return;
                }
                self.ts.delivered += 1;
                self.ts.last_delivery_ns = self.now;
                if st.capturing && latency {
                    match ws::extract_t(&st.msg) {
                        Some(t) if t <= self.now => {
                            self.ts.hist.saturating_record((self.now - t).max(1))
                        }
                        _ => self.ts.no_t += 1,
                    }
                    st.capturing = false;
                }
            }
        }
    }
}

pub enum Role {
    Sub,
    Caller(Box<Caller>),
    Echo,
    /// A queue's consumer: answers like `Echo` and records enqueue → invoke latency.
    Consumer(Box<hdrhistogram::Histogram<u64>>),
    Idle,
}

pub struct Conn {
    pub sock: TcpStream,
    pub walker: FrameWalker,
    pub rx: RxState,
    pub out_pos: usize,
    pub role: Role,
    pub dead: bool,
    /// bytes that arrived together with the handshake response
    pub initial: Vec<u8>,
}

impl Conn {
    pub fn new(sock: TcpStream, initial: Vec<u8>, mode: Mode, mask: [u8; 4], role: Role) -> Conn {
        if matches!(mode, Mode::Count { latency: true, .. }) {
            // Latency is taken at the subscriber socket: the kernel's receive timestamp, so the
            // time this harness needs to get to the socket is not counted.
            if let Err(e) = crate::sys::enable_rx_timestamps(sock.as_raw_fd()) {
                eprintln!("warning: no kernel receive timestamps ({e}); latency includes the harness's own delay");
            }
        }
        Conn {
            sock,
            walker: FrameWalker::new(),
            rx: RxState::new(mode, mask),
            out_pos: 0,
            role,
            dead: false,
            initial,
        }
    }

    pub fn fd(&self) -> i32 {
        self.sock.as_raw_fd()
    }

    pub fn send_text(&mut self, payload: &[u8]) {
        let mask = self.rx.mask;
        ws::encode_client_frame(&mut self.rx.out, ws::OP_TEXT, payload, mask);
    }

    /// Writes all queued output with blocking writes (the socket is still blocking: right after
    /// the upgrade) and empties the queue.
    pub fn write_queued_blocking(&mut self) -> Result<(), String> {
        (&self.sock)
            .write_all(&self.rx.out)
            .map_err(|e| e.to_string())?;
        self.rx.out.clear();
        Ok(())
    }

    /// Sends a close frame with `code` in one write, not queued and ignoring failure: the
    /// caller drops the socket next.
    pub fn write_close(&self, code: u16) {
        let mut f = Vec::with_capacity(8);
        ws::encode_client_frame(&mut f, ws::OP_CLOSE, &code.to_be_bytes(), self.rx.mask);
        let _ = (&self.sock).write(&f);
    }

    pub fn pending_out(&self) -> usize {
        self.rx.out.len() - self.out_pos
    }

    /// Writes as much queued output as the socket takes.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.out_pos < self.rx.out.len() {
            match (&self.sock).write(&self.rx.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.out_pos == self.rx.out.len() {
            self.rx.out.clear();
            self.out_pos = 0;
        } else if self.out_pos > (1 << 20) {
            self.rx.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(())
    }

    pub fn feed(&mut self, bytes: &[u8], ts: &mut ThreadStats, now: u64) {
        ts.bytes_in += bytes.len() as u64;
        let mut rx = Rx {
            st: &mut self.rx,
            ts,
            now,
        };
        self.walker.feed(bytes, &mut rx);
    }

    /// Reads until the socket is drained (edge-triggered). Returns false when the peer closed.
    pub fn read_ready(&mut self, rbuf: &mut [u8], ts: &mut ThreadStats) -> bool {
        loop {
            match crate::sys::recv_stamped(self.sock.as_raw_fd(), rbuf) {
                Ok((0, _)) => return false,
                Ok((n, stamp)) => {
                    let now = stamp.map_or_else(crate::sys::now_ns, crate::sys::from_realtime);
                    self.feed(&rbuf[..n], ts, now);
                    if self.rx.closed {
                        return false;
                    }
                    if n < rbuf.len() {
                        return true; // short read: the receive queue is empty for now
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    /// A connected client `Conn` and the server end of its socket.
    fn pair() -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mode = Mode::Count {
            sample_every: 1,
            latency: false,
            first: None,
        };
        (
            Conn::new(client, Vec::new(), mode, [1, 2, 3, 4], Role::Idle),
            server,
        )
    }

    /// Decodes one masked client frame: (opcode, unmasked payload).
    fn read_client_frame(server: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        server.read_exact(&mut head).unwrap();
        assert_eq!(head[1] & 0x80, 0x80, "client frames are masked");
        let len = match head[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                server.read_exact(&mut l).unwrap();
                u16::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut mask = [0u8; 4];
        server.read_exact(&mut mask).unwrap();
        let mut payload = vec![0u8; len];
        server.read_exact(&mut payload).unwrap();
        ws::apply_mask(&mut payload, mask);
        (head[0] & 0x0f, payload)
    }

    #[test]
    fn join_message_names_stream_and_group() {
        let mut rng = Rng::seeded();
        let v: serde_json::Value =
            serde_json::from_str(&join_message(&mut rng, "s\"1", "g7")).unwrap();
        assert_eq!(v["type"], "join");
        assert_eq!(v["data"]["streamName"], "s\"1");
        assert_eq!(v["data"]["groupId"], "g7");
        assert_eq!(v["data"]["subscriptionId"].as_str().unwrap().len(), 36);
    }

    #[test]
    fn queued_text_and_close_reach_the_peer() {
        let (mut c, mut server) = pair();
        c.send_text(b"hello");
        c.write_queued_blocking().unwrap();
        assert!(c.rx.out.is_empty());
        assert_eq!(
            read_client_frame(&mut server),
            (ws::OP_TEXT, b"hello".to_vec())
        );
        c.write_close(1000);
        assert_eq!(
            read_client_frame(&mut server),
            (ws::OP_CLOSE, 1000u16.to_be_bytes().to_vec())
        );
    }
}
