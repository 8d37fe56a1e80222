//! Which local process holds the far end of a TCP connection, from Linux's `/proc`: the
//! socket whose local address is the peer's and whose remote address is ours gives an inode
//! (`/proc/net/tcp`, `/proc/net/tcp6`), and a process holds that socket when one of its
//! `/proc/<pid>/fd` links reads `socket:[<inode>]`. This only works for peers on this host, in
//! the same PID namespace, whose `/proc/<pid>/fd` the engine may read (same user or root); every
//! failure is simply "not known".

use std::net::{IpAddr, SocketAddr};

/// Most fd entries looked at in one process (a bound on the work of one lookup).
const MAX_FDS: usize = 65_536;

/// Whether `peer` may be a process on this host (loopback, or our own address).
pub(super) fn is_local(peer: SocketAddr, local: SocketAddr) -> bool {
    peer.ip().is_loopback() || peer.ip() == local.ip()
}

/// The inode of the peer's socket of the connection `peer` → `local`.
pub(super) fn socket_inode(peer: SocketAddr, local: SocketAddr) -> Option<u64> {
    let want = (encode(peer), encode(local));
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        text.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (from, to, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
            let matches = [&want.0, &want.1]
                .iter()
                .zip([from, to])
                .all(|(forms, field)| forms.iter().any(|f| f.eq_ignore_ascii_case(field)));
            matches.then(|| inode.parse().ok()).flatten().filter(|&inode| inode != 0)
        })
    })
}

/// Whether process `pid` holds socket `inode`.
pub(super) fn process_holds(pid: u32, inode: u64) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    let want = format!("socket:[{inode}]");
    fds.take(MAX_FDS)
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == want.as_str()))
}

/// The forms `addr` takes in `/proc/net/tcp{,6}`: each 32-bit word of the address in host byte
/// order as 8 hex digits, then `:` and the port as 4 hex digits. An IPv4 address also appears
/// IPv4-mapped in the IPv6 table.
fn encode(addr: SocketAddr) -> Vec<String> {
    let words = |bytes: &[u8]| -> String {
        bytes
            .chunks_exact(4)
            .map(|w| format!("{:08X}", <[u8; 4]>::try_from(w).map(u32::from_ne_bytes).unwrap_or(0)))
            .collect()
    };
    let port = addr.port();
    match addr.ip() {
        IpAddr::V4(ip) => vec![
            format!("{}:{port:04X}", words(&ip.octets())),
            format!("{}:{port:04X}", words(&ip.to_ipv6_mapped().octets())),
        ],
        IpAddr::V6(ip) => {
            let mut forms = vec![format!("{}:{port:04X}", words(&ip.octets()))];
            if let Some(v4) = ip.to_ipv4_mapped() {
                forms.push(format!("{}:{port:04X}", words(&v4.octets())));
            }
            forms
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn loopback_addresses_encode_as_the_kernel_prints_them() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        #[cfg(target_endian = "little")]
        assert_eq!(encode(addr)[0], "0100007F:1F90");
        assert_eq!(encode(addr).len(), 2);
    }

    #[test]
    fn this_process_holds_the_client_end_of_its_own_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(is_local(peer, local));
        let Some(inode) = socket_inode(peer, local) else {
            eprintln!("no /proc/net/tcp here; nothing to check");
            return;
        };
        assert!(process_holds(std::process::id(), inode));
        assert!(!process_holds(u32::MAX, inode), "no such process");
    }
}
