//! The hand-off of a TURN connection from the control plane's reverse proxy to the
//! dataplane (`proxy.turn_on_https`): one datagram on a unix socket in `state_dir`, this
//! 24-byte header plus one descriptor (`SCM_RIGHTS`). The kinds and what the descriptor is
//! are described in the dataplane's `io/handoff.rs`.
//!
//! ```text
//! 0      4      5        6      8                     24
//! +------+------+--------+------+---------------------+
//! | PTH1 | kind | family | port | client IP (4 or 16) |
//! +------+------+--------+------+---------------------+
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 4] = b"PTH1";
/// The descriptor is the client's TCP socket; TLS is still to be terminated.
pub const KIND_TLS: u8 = 1;
/// The descriptor is a unix stream carrying the client's decrypted bytes.
pub const KIND_PLAIN: u8 = 2;
pub const HEADER_LEN: usize = 24;

/// `<state_dir>/turn-handoff.sock`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(crate::proxy_config::TURN_HANDOFF_SOCKET)
}

/// Builds a hand-off header (the control plane's side, and tests).
pub fn header(kind: u8, client: SocketAddr) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = kind;
    h[6..8].copy_from_slice(&client.port().to_be_bytes());
    match client.ip() {
        IpAddr::V4(v4) => {
            h[5] = 4;
            h[8..12].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            h[5] = 6;
            h[8..24].copy_from_slice(&v6.octets());
        }
    }
    h
}

/// Reads a hand-off header: (kind, client address).
pub fn parse_header(b: &[u8]) -> Option<(u8, SocketAddr)> {
    if b.len() != HEADER_LEN || &b[..4] != MAGIC {
        return None;
    }
    let port = u16::from_be_bytes([b[6], b[7]]);
    let ip = match b[5] {
        4 => IpAddr::V4(Ipv4Addr::new(b[8], b[9], b[10], b[11])),
        6 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[8..24]);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    if port == 0 || ip.is_unspecified() {
        return None;
    }
    Some((b[4], SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_garbage() {
        for a in ["192.0.2.7:3478", "[2001:db8::9]:443"] {
            let a: SocketAddr = a.parse().unwrap();
            let h = header(KIND_PLAIN, a);
            assert_eq!(parse_header(&h), Some((KIND_PLAIN, a)));
        }
        let good = header(KIND_TLS, "127.0.0.1:5".parse().unwrap());
        for n in 0..HEADER_LEN {
            assert_eq!(parse_header(&good[..n]), None, "{n} bytes");
        }
        let mut bad = good;
        bad[0] = b'X';
        assert_eq!(parse_header(&bad), None);
        let mut bad = good;
        bad[5] = 5;
        assert_eq!(parse_header(&bad), None);
        let mut bad = good;
        bad[6..8].copy_from_slice(&[0, 0]);
        assert_eq!(parse_header(&bad), None);
    }
}
