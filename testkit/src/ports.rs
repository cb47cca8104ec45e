//! Free ports picked at run time from one allocator: other engineers and other test binaries
//! run Portico on this machine at the same moment, so no test may use a fixed port, and two
//! tests of one binary must never get the same port in the window between the probe and the
//! server's bind.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::Mutex;

use crate::LOCAL4;

/// Ports handed out by this process.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Records `ports` as handed out; false when one of them already was.
fn claim(ports: &[u16]) -> bool {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let set = guard.get_or_insert_with(HashSet::new);
    if ports.iter().any(|p| set.contains(p)) {
        return false;
    }
    set.extend(ports.iter().copied());
    true
}

/// True when `port` is free for both UDP and TCP on every address in `ips`.
fn free_on(port: u16, ips: &[IpAddr]) -> bool {
    // Hold every probe socket until all are bound, then release them together.
    let mut held_udp = Vec::new();
    let mut held_tcp = Vec::new();
    for ip in ips {
        let a = SocketAddr::new(*ip, port);
        match (UdpSocket::bind(a), TcpListener::bind(a)) {
            (Ok(u), Ok(t)) => {
                held_udp.push(u);
                held_tcp.push(t);
            }
            _ => return false,
        }
    }
    true
}

/// A port free for UDP and TCP on all of `ips` and not given to another test of this
/// process. The kernel picks the candidate (bind to port 0), which keeps it inside the
/// ephemeral range and away from well-known services.
pub fn free_port_on(ips: &[IpAddr]) -> u16 {
    for _ in 0..200 {
        let candidate = match UdpSocket::bind(SocketAddr::new(ips[0], 0)) {
            Ok(s) => s.local_addr().map(|a| a.port()).unwrap_or(0),
            Err(e) => panic!("cannot bind a UDP socket on {}: {e}", ips[0]),
        };
        if candidate != 0 && free_on(candidate, ips) && claim(&[candidate]) {
            return candidate;
        }
    }
    panic!("no free port found on {ips:?} after 200 tries");
}

/// A port free for UDP and TCP on 127.0.0.1.
pub fn free_port() -> u16 {
    free_port_on(&[LOCAL4])
}

/// A UDP port `p` such that `p` and `p + 1` are both free on 0.0.0.0 (the Vovida `stun`
/// client opens its source port and the next one).
pub fn free_udp_pair() -> u16 {
    let any = SocketAddr::from(([0, 0, 0, 0], 0));
    for _ in 0..200 {
        let Ok(a) = UdpSocket::bind(any) else {
            continue;
        };
        let Ok(p) = a.local_addr().map(|x| x.port()) else {
            continue;
        };
        if p < 65534
            && UdpSocket::bind(SocketAddr::new(any.ip(), p + 1)).is_ok()
            && claim(&[p, p + 1])
        {
            return p;
        }
    }
    panic!("no free UDP port pair found after 200 tries");
}
