//! What of the media relay a kernel fast path may take over, decided from the core's tables
//! alone (sans-IO): the datagram paths of latched media legs and of static NAT map
//! bindings, each a plain "from X to socket A, leaves from socket B to Y" with no change to
//! the payload. A driver with a fast path ([`crate::fastpath`]) enables [`Offload`],
//! drains the owners whose paths changed once per loop turn, asks [`super::Media::kernel_flows`]
//! what each may relay now, and credits what the kernel relayed back with
//! [`super::Media::credit`], so counters, published records and idle timers are the same
//! with or without it.
//!
//! A path is offered only where user space would forward the same packet unconditionally:
//!
//! * a media leg's latched source (RTP or RTCP) to the other leg's remote, once the other
//!   leg has one; a source that is blacklisted is not offered. Packets from anyone else keep
//!   reaching user space, which learns (within the learn window, after the SRTP and policy
//!   checks) or drops and reports them, so a re-latch replaces the path at the next turn;
//! * a NAT binding's source to the internal host, and the internal host's replies back, on
//!   each port offset the binding has carried in user space (at most [`MAX_OFFSETS`] per
//!   binding), while the binding lives.

use std::net::{IpAddr, SocketAddr};

/// Port offsets of one NAT binding offered to the kernel, at most.
pub const MAX_OFFSETS: usize = 16;

/// Who a kernel path belongs to. The serial tells a session or binding from a later one in
/// the same slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    Session { index: u32, serial: u64 },
    Binding { map: u16, binding: u32, serial: u64 },
}

/// Which of the owner's directions a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// Into leg `leg` (its RTP or RTCP socket), out of the other leg's.
    Leg { leg: u8, rtcp: bool },
    /// External source to the internal host, on public port `low + offset`.
    NatIn { offset: u16 },
    /// The internal host's reply, leaving from public port `low + offset`.
    NatOut { offset: u16 },
}

/// One direction the kernel may relay: a datagram from `from` to the local socket address
/// `at` leaves from local address `out` to `to`. A local address with an unspecified IP is a
/// wildcard socket (a NAT binding's): the driver puts in the address the kernel's routing
/// uses towards the other side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelFlow {
    pub owner: Owner,
    pub part: Part,
    pub from: SocketAddr,
    pub at: SocketAddr,
    pub out: SocketAddr,
    pub to: SocketAddr,
}

/// The sessions and NAT bindings whose kernel paths may have changed.
pub type Offload = crate::turn::Changes<Owner>;

/// `a` with its port moved by `by` (an RTCP socket is the RTP port + 1), if it stays valid.
pub(super) fn port_plus(a: SocketAddr, by: u16) -> Option<SocketAddr> {
    a.port().checked_add(by).map(|p| SocketAddr::new(a.ip(), p))
}

/// The unspecified address of `ip`'s family.
pub(super) fn any_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}
