//! Socket options neither `socket2` nor `nix` wraps. The only `unsafe` here is one
//! `setsockopt` call on a descriptor the caller owns, with a pointer to a local integer.

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;

/// Sets the DF bit on everything the socket sends (path MTU discovery "do"), for TURN's
/// DONT-FRAGMENT (RFC 8656 §14.8).
pub fn set_dont_fragment(sock: &UdpSocket, ipv4: bool) -> io::Result<()> {
    let (level, name, value) = if ipv4 {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    } else {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )
    };
    let value: libc::c_int = value;
    // SAFETY: the descriptor is open for the duration of the call (borrowed from `sock`), the
    // option value points at a live c_int and the length passed is its size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
