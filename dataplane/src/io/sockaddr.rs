//! Conversions between `SocketAddr` and the kernel's `sockaddr` bytes, for the io_uring
//! driver, which hands the kernel raw `msghdr`s. Safe code only: the bytes are read and
//! written field by field.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Room for either family; the size the driver asks the kernel to fill.
pub const SOCKADDR_LEN: usize = std::mem::size_of::<libc::sockaddr_in6>();

/// Decodes a `sockaddr_in` / `sockaddr_in6` the kernel wrote.
pub fn decode(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*b.first()?, *b.get(1)?]);
    let port = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]);
    match i32::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 => {
            let flow = u32::from_ne_bytes(b.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(b.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

/// Encodes an address for `msg_name`; returns the length to put in `msg_namelen`.
pub fn encode(a: SocketAddr, out: &mut [u8; SOCKADDR_LEN]) -> u32 {
    *out = [0; SOCKADDR_LEN];
    match a {
        SocketAddr::V4(v4) => {
            out[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            out[2..4].copy_from_slice(&v4.port().to_be_bytes());
            out[4..8].copy_from_slice(&v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>() as u32
        }
        SocketAddr::V6(v6) => {
            out[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            out[2..4].copy_from_slice(&v6.port().to_be_bytes());
            out[4..8].copy_from_slice(&v6.flowinfo().to_ne_bytes());
            out[8..24].copy_from_slice(&v6.ip().octets());
            out[24..28].copy_from_slice(&v6.scope_id().to_ne_bytes());
            SOCKADDR_LEN as u32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for s in [
            "192.0.2.1:3478",
            "[2001:db8::1]:65535",
            "[::ffff:1.2.3.4]:1",
        ] {
            let a: SocketAddr = s.parse().unwrap();
            let mut b = [0u8; SOCKADDR_LEN];
            encode(a, &mut b);
            assert_eq!(decode(&b), Some(a));
        }
        assert_eq!(decode(&[0u8; 3]), None);
        assert_eq!(decode(&[0xffu8; 28]), None);
    }
}
