//! Small OS helpers: epoll, a harness-wide monotonic clock, ids, /proc and getrusage.

use std::io;
use std::os::fd::RawFd;
use std::sync::OnceLock;
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// clock

/// Nanoseconds per second: the harness clock's unit.
pub const NS: u64 = 1_000_000_000;

static EPOCH: OnceLock<Instant> = OnceLock::new();

pub fn init_clock() {
    EPOCH.get_or_init(Instant::now);
    from_realtime(0);
}

/// Nanoseconds since the harness-wide monotonic epoch.
#[inline]
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn realtime_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// CLOCK_REALTIME minus the harness clock, read once (a run is seconds long: drift is noise).
static REALTIME_OFFSET: OnceLock<u64> = OnceLock::new();

/// A CLOCK_REALTIME instant (a kernel receive timestamp) on the harness clock.
pub fn from_realtime(ns: u64) -> u64 {
    let offset = *REALTIME_OFFSET.get_or_init(|| realtime_ns().saturating_sub(now_ns()));
    ns.saturating_sub(offset)
}

/// Moves the whole harness (threads started later inherit it) to SCHED_IDLE.
pub fn idle_priority() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on this process with a valid parameter block.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to stamp every packet this socket receives (`SO_TIMESTAMPNS`).
pub fn enable_rx_timestamps(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, (&on as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// `read` that also returns the kernel's receive timestamp of the data (CLOCK_REALTIME ns),
/// when the socket has `SO_TIMESTAMPNS` on. For TCP it is the stamp of the last packet read.
pub fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = [0u64; 8]; // u64s: cmsg alignment
    // SAFETY: msghdr is plain data; the pointers below stay valid for the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` describes `buf` and `control`, both live and writable.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: walking the control messages the kernel wrote into `control`, with libc's macros.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::timespec);
                stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, stamp))
}

// ---------------------------------------------------------------------------------------------
// epoll

pub struct Epoll {
    fd: RawFd,
    pub events: Vec<libc::epoll_event>,
}

pub const EV_IN: u32 = libc::EPOLLIN as u32;
pub const EV_OUT: u32 = libc::EPOLLOUT as u32;
pub const EV_ET: u32 = libc::EPOLLET as u32;
pub const EV_ERR: u32 = (libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLRDHUP) as u32;

impl Epoll {
    pub fn new(capacity: usize) -> io::Result<Epoll> {
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; capacity.max(16)],
        })
    }

    pub fn add(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        if unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn del(&self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }

    /// Waits; returns the number of ready events in `self.events`.
    pub fn wait(&mut self, timeout_ms: i32) -> usize {
        let n = unsafe {
            libc::epoll_wait(
                self.fd,
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            0
        } else {
            n as usize
        }
    }

    #[inline]
    pub fn event(&self, i: usize) -> (u64, u32) {
        let e = self.events[i];
        (e.u64, e.events)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}

// ---------------------------------------------------------------------------------------------
// random ids

pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Rng {
        let mut seed = [0u8; 8];
        let got = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), 8, 0) };
        let mut s = u64::from_ne_bytes(seed);
        if got != 8 {
            s = now_ns() ^ ((std::process::id() as u64) << 32);
        }
        Rng(s ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn bytes16(&mut self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.next_u64().to_ne_bytes());
        b[8..].copy_from_slice(&self.next_u64().to_ne_bytes());
        b
    }
    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }
    pub fn uuid_v4(&mut self) -> String {
        let mut b = self.bytes16();
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Encodes (run prefix 24 bits, seq 40 bits, send time 56 bits) into a v4-shaped UUID, so a
/// reply carries everything needed to account for it without any lookup table.
pub fn encode_id(prefix: u32, seq: u64, t: u64, out: &mut [u8; 36]) {
    let mut d = [0u8; 30];
    let mut put = |from: usize, digits: usize, v: u64| {
        for k in 0..digits {
            d[from + k] = HEX[((v >> (4 * (digits - 1 - k))) & 0xf) as usize];
        }
    };
    put(0, 6, prefix as u64 & 0xff_ffff);
    put(6, 10, seq & 0xff_ffff_ffff);
    put(16, 14, t & 0xff_ffff_ffff_ffff);
    let mut s = [0u8; 32];
    s[..12].copy_from_slice(&d[..12]);
    s[12] = b'4';
    s[13..16].copy_from_slice(&d[12..15]);
    s[16] = b'8';
    s[17..32].copy_from_slice(&d[15..30]);
    let mut o = 0;
    for (i, c) in s.iter().enumerate() {
        if i == 8 || i == 12 || i == 16 || i == 20 {
            out[o] = b'-';
            o += 1;
        }
        out[o] = *c;
        o += 1;
    }
}

pub fn decode_id(id: &[u8]) -> Option<(u32, u64, u64)> {
    if id.len() != 36 {
        return None;
    }
    let mut s = [0u8; 32];
    let mut n = 0;
    for (i, &c) in id.iter().enumerate() {
        if i == 8 || i == 13 || i == 18 || i == 23 {
            if c != b'-' {
                return None;
            }
            continue;
        }
        s[n] = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        n += 1;
    }
    let mut d = [0u8; 30];
    d[..12].copy_from_slice(&s[..12]);
    d[12..15].copy_from_slice(&s[13..16]);
    d[15..30].copy_from_slice(&s[17..32]);
    let get = |from: usize, digits: usize| {
        d[from..from + digits]
            .iter()
            .fold(0u64, |a, &x| (a << 4) | x as u64)
    };
    Some((get(0, 6) as u32, get(6, 10), get(16, 14)))
}

// ---------------------------------------------------------------------------------------------
// process statistics

pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
    let cur = r.rlim_cur as u64;
    cur
}

/// Checks (after raising the soft limit to the hard one) that this process may open about
/// `need` file descriptors plus a margin of 64 for its own files.
pub fn check_fd_limit(need: usize) -> Result<(), String> {
    let lim = raise_nofile();
    if (need as u64) + 64 > lim {
        return Err(format!(
            "need about {} file descriptors but RLIMIT_NOFILE is {lim} (raise it with ulimit -n)",
            need + 64
        ));
    }
    Ok(())
}

/// User + system CPU seconds used by this process so far (all threads).
pub fn self_cpu_secs() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[derive(Clone, Copy, Debug)]
pub struct ProcSnap {
    pub rss_kb: u64,
    pub cpu_secs: f64,
}

pub fn proc_snap(pid: u32) -> Option<ProcSnap> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the last ')' start at field 3 (state); utime = field 14, stime = field 15
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ProcSnap {
        rss_kb,
        cpu_secs: (utime + stime) as f64 / tck,
    })
}

/// Open file descriptors of process `pid` (entries of /proc/<pid>/fd; needs the same user).
pub fn fd_count(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(dir.filter(|e| e.is_ok()).count() as u64)
}

/// Makes the next `close` of `fd` abort the connection with an RST instead of a FIN
/// (`SO_LINGER` on with a zero timeout), as a killed process or a NAT drop looks to the peer.
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt with a pointer to a live linger struct and its size.
    let rc = unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, (&l as *const libc::linger).cast(), std::mem::size_of::<libc::linger>() as libc::socklen_t)
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Shrinks this socket's receive buffer (`SO_RCVBUF`), so a reader that stops reading fills
/// the sender's queue sooner.
pub fn set_rcvbuf(fd: RawFd, bytes: i32) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, (&bytes as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Waits until one of `fds` is readable (or hung up), at most `timeout_ms`.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) {
    let mut p: Vec<libc::pollfd> = fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: `p` is a live array of pollfd of the given length.
    unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_limit_check_names_the_need_and_the_limit() {
        assert_eq!(check_fd_limit(0), Ok(()));
        let lim = raise_nofile();
        let err = check_fd_limit(lim as usize).unwrap_err();
        assert!(err.contains(&format!("need about {} file descriptors", lim + 64)), "{err}");
        assert!(err.contains(&format!("RLIMIT_NOFILE is {lim}")), "{err}");
    }

    #[test]
    fn received_data_carries_the_kernel_receive_time() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sender = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (receiver, _) = listener.accept().unwrap();
        let mut buf = [0u8; 16];

        sender.write_all(b"plain").unwrap();
        let (n, stamp) = recv_stamped(receiver.as_raw_fd(), &mut buf).unwrap();
        assert_eq!((&buf[..n], stamp), (&b"plain"[..], None), "no stamp unless asked for");

        enable_rx_timestamps(receiver.as_raw_fd()).unwrap();
        // The kernel turns receive stamping on for the whole stack from a work queue, so the
        // first packets after the first request in a quiet system may still come unstamped:
        // send until one is stamped (bounded).
        for _ in 0..1000 {
            let before = now_ns();
            sender.write_all(b"stamped").unwrap();
            let (n, stamp) = recv_stamped(receiver.as_raw_fd(), &mut buf).unwrap();
            let after = now_ns();
            assert_eq!(&buf[..n], b"stamped");
            let Some(stamp) = stamp else {
                // Nothing to wait on for the kernel's work queue: retry shortly (at most ~1 s).
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            };
            let at = from_realtime(stamp);
            // The two clocks are read a few microseconds apart when the offset is taken.
            let slack = 1_000_000;
            assert!(at + slack >= before && at <= after + slack, "{before} <= {at} <= {after}");
            return;
        }
        panic!("no receive timestamp after 1000 packets");
    }

    #[test]
    fn linger_zero_close_is_a_reset() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        set_linger_zero(client.as_raw_fd()).unwrap();
        drop(client);
        let mut buf = [0u8; 8];
        let e = server.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn id_roundtrip() {
        let mut out = [0u8; 36];
        for &(p, s, t) in &[
            (0u32, 0u64, 0u64),
            (0xabcdef, 12345, 987_654_321_000),
            (0xffffff, (1 << 40) - 1, (1 << 56) - 1),
        ] {
            encode_id(p, s, t, &mut out);
            let txt = std::str::from_utf8(&out).unwrap();
            assert_eq!(&txt[14..15], "4", "{txt}");
            assert!(matches!(&txt[19..20], "8"), "{txt}");
            assert_eq!(decode_id(&out), Some((p, s, t)));
        }
        assert_eq!(decode_id(b"not-a-uuid"), None);
    }

    #[test]
    fn proc_self() {
        let s = proc_snap(std::process::id()).unwrap();
        assert!(s.rss_kb > 0);
        // stdin/stdout/stderr at least (other tests open and close sockets meanwhile)
        assert!(fd_count(std::process::id()).unwrap() >= 3);
        assert!(self_cpu_secs() >= 0.0);
    }
}
