//! Free ports picked at run time: other engineers and other test binaries run Portico on
//! this machine at the same moment, so no test may use a fixed port.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::Mutex;

/// Ports handed out by this process, so two tests running in parallel never get the same
/// one in the window between our probe and the server's bind.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

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
pub fn free_port(ips: &[IpAddr]) -> u16 {
    for _ in 0..200 {
        let candidate = match UdpSocket::bind(SocketAddr::new(ips[0], 0)) {
            Ok(s) => s.local_addr().map(|a| a.port()).unwrap_or(0),
            Err(e) => panic!("cannot bind a UDP socket on {}: {e}", ips[0]),
        };
        if candidate == 0 || !free_on(candidate, ips) {
            continue;
        }
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        let set = guard.get_or_insert_with(HashSet::new);
        if set.insert(candidate) {
            return candidate;
        }
    }
    panic!("no free port found on {ips:?} after 200 tries");
}

/// `n` distinct free ports on `ips`.
pub fn free_ports(n: usize, ips: &[IpAddr]) -> Vec<u16> {
    (0..n).map(|_| free_port(ips)).collect()
}

/// A UDP port `p` such that `p` and `p + 1` are both free on 0.0.0.0 (the Vovida `stun`
/// client opens its source port and the next one).
pub fn free_udp_pair() -> u16 {
    let any: IpAddr = "0.0.0.0".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
    for _ in 0..200 {
        let Ok(a) = UdpSocket::bind(SocketAddr::new(any, 0)) else {
            continue;
        };
        let Ok(p) = a.local_addr().map(|x| x.port()) else {
            continue;
        };
        if p >= 65534 {
            continue;
        }
        if UdpSocket::bind(SocketAddr::new(any, p + 1)).is_ok() {
            let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
            let set = guard.get_or_insert_with(HashSet::new);
            if !set.contains(&p) && !set.contains(&(p + 1)) {
                set.insert(p);
                set.insert(p + 1);
                return p;
            }
        }
    }
    panic!("no free UDP port pair found after 200 tries");
}
