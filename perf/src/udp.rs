//! UDP plumbing shared by the scenarios: socket setup and batched I/O with
//! `recvmmsg`/`sendmmsg`.
//!
//! Batching matters here because the generator shares two cores with the server it loads:
//! every syscall it saves is CPU the server gets (FACTS.md: batch-64 mmsg calls move ~20% more
//! loopback packets than one call per packet).
//!
//! A TURN client is a 5-tuple, so a thousand clients would normally need a thousand sockets,
//! each sending one datagram per wakeup: no batching possible. Instead the TURN generator
//! gives every client its own loopback source address (all of 127.0.0.0/8 is local) and
//! sends for all of them from one socket bound to the wildcard address, choosing each
//! datagram's source with `IP_PKTINFO` and learning each reply's destination the same way
//! ([`MsgBatch::new_pktinfo`], [`pktinfo_socket`]).

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Socket buffers asked for; the kernel caps them at `net.core.{r,w}mem_max`. Large buffers
/// keep a burst of a whole send window from being dropped at the receiver's socket.
pub const SOCKET_BUFFER: usize = 4 << 20;

fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    }
}

fn local_addr(s: &Socket) -> io::Result<SocketAddr> {
    s.local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("socket has no IP address"))
}

/// A non-blocking UDP socket connected to `target`, and the local address the kernel chose
/// for it (what a STUN server must report back as the mapped address). Connecting makes the
/// kernel drop datagrams from anyone else and report ICMP errors on the socket.
pub fn connected_socket(target: SocketAddr) -> io::Result<(Socket, SocketAddr)> {
    let s = Socket::new(
        Domain::for_address(target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // Best effort: a smaller buffer still works, it only drops bursts sooner.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&unspecified_like(target).into())?;
    s.connect(&target.into())?;
    s.set_nonblocking(true)?;
    let local = local_addr(&s)?;
    Ok((s, local))
}

/// `count` blocking sockets bound to the same address with `SO_REUSEPORT` (port 0 picks one
/// free port for all of them), each with a receive timeout so its owner can notice a stop
/// request.
pub fn reuseport_sockets(
    listen: SocketAddr,
    count: usize,
    read_timeout: Duration,
) -> io::Result<(Vec<Socket>, SocketAddr)> {
    let mut addr = listen;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_port(true)?;
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
        s.bind(&addr.into())?;
        s.set_read_timeout(Some(read_timeout))?;
        addr = local_addr(&s)?;
        out.push(s);
    }
    Ok((out, addr))
}

/// A non-blocking IPv4 UDP socket on the wildcard address with `IP_PKTINFO` on, restricted to
/// the loopback device where the kernel allows it: it receives datagrams addressed to any
/// 127.x.y.z on its port, and [`MsgBatch::new_pktinfo`] batches choose the source address of
/// each datagram they send. Returns the socket and its port.
pub fn pktinfo_socket() -> io::Result<(Socket, u16)> {
    pktinfo_socket_on(true)
}

/// [`pktinfo_socket`]; with `loopback` false it is not restricted to the loopback device,
/// for source addresses of a network the namespace holds as local (a `local` route) whose
/// replies arrive on another interface.
pub fn pktinfo_socket_on(loopback: bool) -> io::Result<(Socket, u16)> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    // Best effort (unprivileged since Linux 5.7): keeps the wildcard port off the other
    // interfaces. Nothing is ever sent anywhere but loopback either way.
    if loopback {
        let _ = s.bind_device(Some(b"lo"));
    }
    let on: libc::c_int = 1;
    // SAFETY: a valid fd and a pointer to an int of the length given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            (&on as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
    s.set_nonblocking(true)?;
    let port = local_addr(&s)?.port();
    Ok((s, port))
}

/// Room for one `IP_PKTINFO` control message, in `u64`s so the buffer is aligned for
/// `cmsghdr`.
const CTRL_WORDS: usize = 8;

/// Maximum datagrams moved per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 64;

/// Buffers and message headers for one batched syscall; set up once, reused for every call.
///
/// The `mmsghdr`s hold raw pointers into `data`, `iov` and `names`. Those vectors are never
/// resized after construction, so the pointers stay valid when the struct itself moves;
/// the raw pointers also keep the type `!Send`, so a batch lives and dies on one thread.
pub struct MsgBatch {
    slot_size: usize,
    data: Vec<u8>,
    lens: Vec<usize>,
    names: Vec<libc::sockaddr_storage>,
    name_lens: Vec<libc::socklen_t>,
    iov: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    named: bool,
    /// `IP_PKTINFO` batches: one control buffer per datagram, the source address to send
    /// each datagram from, and the destination address each received datagram had.
    pktinfo: bool,
    ctrl: Vec<[u64; CTRL_WORDS]>,
    sources: Vec<Option<Ipv4Addr>>,
    dests: Vec<Option<Ipv4Addr>>,
}

impl MsgBatch {
    /// `named`: whether datagrams carry a peer address (unconnected sockets).
    pub fn new(count: usize, slot_size: usize, named: bool) -> Self {
        Self::build(count, slot_size, named, false)
    }

    /// A named batch that also carries each datagram's local IPv4 address (for a
    /// [`pktinfo_socket`]): set with [`MsgBatch::set_source`] before sending, read with
    /// [`MsgBatch::dest`] after receiving.
    pub fn new_pktinfo(count: usize, slot_size: usize) -> Self {
        Self::build(count, slot_size, true, true)
    }

    fn build(count: usize, slot_size: usize, named: bool, pktinfo: bool) -> Self {
        let count = count.clamp(1, 1024);
        let mut b = MsgBatch {
            slot_size,
            data: vec![0u8; count * slot_size],
            lens: vec![0; count],
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            names: vec![unsafe { mem::zeroed() }; count],
            name_lens: vec![0; count],
            iov: Vec::with_capacity(count),
            hdrs: Vec::with_capacity(count),
            named,
            pktinfo,
            ctrl: vec![[0u64; CTRL_WORDS]; if pktinfo { count } else { 0 }],
            sources: vec![None; count],
            dests: vec![None; count],
        };
        for i in 0..count {
            b.iov.push(libc::iovec {
                iov_base: b.data[i * slot_size..].as_mut_ptr().cast(),
                iov_len: slot_size,
            });
        }
        for i in 0..count {
            // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) header.
            let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
            h.msg_hdr.msg_iov = &mut b.iov[i];
            h.msg_hdr.msg_iovlen = 1;
            if named {
                h.msg_hdr.msg_name = (&mut b.names[i] as *mut libc::sockaddr_storage).cast();
            }
            b.hdrs.push(h);
        }
        b
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Slot `i`'s whole buffer, to build an outgoing datagram in.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        let at = i * self.slot_size;
        self.data
            .get_mut(at..at + self.slot_size)
            .unwrap_or(&mut [])
    }

    /// Sets the length of the datagram in slot `i` (for sending).
    pub fn set_len(&mut self, i: usize, len: usize) {
        if let Some(l) = self.lens.get_mut(i) {
            *l = len.min(self.slot_size);
        }
    }

    /// Datagram `i` as received (or as set for sending).
    pub fn datagram(&self, i: usize) -> &[u8] {
        let at = i * self.slot_size;
        let len = self.lens.get(i).copied().unwrap_or(0);
        self.data.get(at..at + len).unwrap_or(&[])
    }

    /// Sets the address datagram `i` is sent to (named batches only).
    pub fn set_peer(&mut self, i: usize, addr: SocketAddr) {
        if !self.named || i >= self.names.len() {
            return;
        }
        let sa = SockAddr::from(addr);
        let len = (sa.len() as usize).min(mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: both regions are at least `len` bytes and do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                sa.as_ptr().cast::<u8>(),
                (&mut self.names[i] as *mut libc::sockaddr_storage).cast::<u8>(),
                len,
            );
        }
        self.name_lens[i] = len as libc::socklen_t;
    }

    /// Sets the local address datagram `i` leaves from (`IP_PKTINFO` batches only); `None`
    /// lets the kernel choose.
    pub fn set_source(&mut self, i: usize, src: Option<Ipv4Addr>) {
        if let Some(s) = self.sources.get_mut(i) {
            *s = src;
        }
    }

    /// The local address received datagram `i` was sent to (`IP_PKTINFO` batches only).
    pub fn dest(&self, i: usize) -> Option<Ipv4Addr> {
        self.dests.get(i).copied().flatten()
    }

    /// Peer address of received datagram `i` (named batches only).
    pub fn peer(&self, i: usize) -> Option<SocketAddr> {
        if !self.named {
            return None;
        }
        let storage = *self.names.get(i)?;
        let len = *self.name_lens.get(i)?;
        // SAFETY: the kernel filled `storage` with an address of `len` bytes.
        unsafe { SockAddr::new(storage, len) }.as_socket()
    }

    /// One `recvmmsg` of up to `capacity()` datagrams; `flags` e.g. `MSG_DONTWAIT` or
    /// `MSG_WAITFORONE`. Returns how many arrived.
    pub fn recv(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        let n = self.hdrs.len();
        for (i, (iov, h)) in self.iov.iter_mut().zip(self.hdrs.iter_mut()).enumerate() {
            iov.iov_len = self.slot_size;
            if self.named {
                h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as u32;
            }
            if self.pktinfo {
                h.msg_hdr.msg_control = self.ctrl[i].as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = mem::size_of::<[u64; CTRL_WORDS]>();
            }
        }
        // SAFETY: every header points at live buffers of the lengths given (see the type's
        // doc); the kernel writes at most that much.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = r as usize;
        for i in 0..r {
            self.lens[i] = self.hdrs[i].msg_len as usize;
            self.name_lens[i] = self.hdrs[i].msg_hdr.msg_namelen;
            if self.pktinfo {
                self.dests[i] = pktinfo_dest(&self.hdrs[i].msg_hdr);
            }
        }
        Ok(r)
    }

    /// One `sendmmsg` of datagrams `from..to` (lengths from [`MsgBatch::set_len`], peers
    /// from the last receive for named batches). Returns how many the kernel took, which
    /// may be fewer than asked.
    pub fn send(&mut self, fd: RawFd, from: usize, to: usize) -> io::Result<usize> {
        let to = to.min(self.hdrs.len());
        if from >= to {
            return Ok(0);
        }
        for i in from..to {
            self.iov[i].iov_len = self.lens[i];
            if self.named {
                self.hdrs[i].msg_hdr.msg_namelen = self.name_lens[i];
            }
            if self.pktinfo {
                let h = &mut self.hdrs[i].msg_hdr;
                match self.sources[i] {
                    Some(src) => write_pktinfo(h, &mut self.ctrl[i], src),
                    None => {
                        h.msg_control = std::ptr::null_mut();
                        h.msg_controllen = 0;
                    }
                }
            }
        }
        // SAFETY: as in `recv`; the kernel only reads here.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                self.hdrs[from..].as_mut_ptr(),
                (to - from) as libc::c_uint,
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

/// The destination address in a received header's `IP_PKTINFO` control message.
fn pktinfo_dest(h: &libc::msghdr) -> Option<Ipv4Addr> {
    // SAFETY: the kernel filled the control buffer (msg_controllen says how much); the CMSG
    // macros stay inside it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_PKTINFO {
                let info = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>());
                return Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Points `h` at an `IP_PKTINFO` control message in `ctrl` that sends from `src`.
fn write_pktinfo(h: &mut libc::msghdr, ctrl: &mut [u64; CTRL_WORDS], src: Ipv4Addr) {
    let data_len = mem::size_of::<libc::in_pktinfo>() as u32;
    // SAFETY: CMSG_SPACE of a 12-byte payload is 32 bytes, within the 64-byte aligned buffer
    // the header is pointed at before CMSG_FIRSTHDR reads it.
    unsafe {
        let space = libc::CMSG_SPACE(data_len) as usize;
        h.msg_control = ctrl.as_mut_ptr().cast();
        h.msg_controllen = space;
        let c = libc::CMSG_FIRSTHDR(h);
        if c.is_null() {
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            return;
        }
        (*c).cmsg_level = libc::IPPROTO_IP;
        (*c).cmsg_type = libc::IP_PKTINFO;
        (*c).cmsg_len = libc::CMSG_LEN(data_len) as usize;
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(src).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>(), info);
    }
}

/// A port on `ip` that was free for both UDP and TCP a moment ago (servers here bind both).
/// Racy by nature: another process may take it before the caller binds it.
pub fn free_port(ip: std::net::IpAddr) -> io::Result<u16> {
    let mut last = io::Error::other("no free port found");
    for _ in 0..64 {
        let udp = std::net::UdpSocket::bind((ip, 0))?;
        let port = udp.local_addr()?.port();
        match std::net::TcpListener::bind((ip, port)) {
            Ok(_) => return Ok(port),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Like [`free_port`], below the kernel's ephemeral range (`ip_local_port_range`): a port a
/// server binds again and again between runs that open tens of thousands of connections,
/// which the kernel could otherwise hand out meanwhile as a connection's local port (then
/// held in TIME_WAIT, and the next bind fails).
pub fn free_port_outside_ephemeral(ip: std::net::IpAddr) -> io::Result<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const FIRST: u16 = 10_000;
    if low <= FIRST + 64 {
        return Err(io::Error::other(format!(
            "the ephemeral port range starts at {low}: no room below it"
        )));
    }
    // xorshift from the pid and the clock: scripts call this many times in a row.
    let mut x = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut last = io::Error::other("no free port found");
    for _ in 0..256 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = FIRST + (x % u64::from(low - FIRST)) as u16;
        let free = std::net::UdpSocket::bind((ip, port))
            .and_then(|_u| std::net::TcpListener::bind((ip, port)).map(drop));
        match free {
            Ok(()) => return Ok(port),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_outside_the_ephemeral_range() {
        let ip = "127.0.0.1".parse().unwrap();
        let p = free_port_outside_ephemeral(ip).unwrap();
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((10_000..low).contains(&p), "{p}");
        std::net::TcpListener::bind((ip, p)).unwrap();
    }

    #[test]
    fn batch_round_trip_over_loopback() {
        let (servers, addr) =
            reuseport_sockets("127.0.0.1:0".parse().unwrap(), 1, Duration::from_secs(2)).unwrap();
        let (client, local) = connected_socket(addr).unwrap();
        assert_eq!(local.ip(), addr.ip());
        assert_ne!(local.port(), 0);

        let mut tx = MsgBatch::new(8, 64, false);
        for i in 0..5 {
            tx.slot_mut(i)[..3].copy_from_slice(&[i as u8, 0xAB, 0xCD]);
            tx.set_len(i, 3);
        }
        assert_eq!(tx.send(client.as_raw_fd(), 0, 5).unwrap(), 5);

        let mut rx = MsgBatch::new(8, 64, true);
        let mut got = Vec::new();
        while got.len() < 5 {
            let n = rx
                .recv(servers[0].as_raw_fd(), libc::MSG_WAITFORONE)
                .unwrap();
            for i in 0..n {
                assert_eq!(rx.peer(i), Some(local));
                got.push(rx.datagram(i).to_vec());
            }
        }
        let want: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i, 0xAB, 0xCD]).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn pktinfo_batches_choose_and_report_loopback_addresses() {
        let (sock, port) = pktinfo_socket().unwrap();
        let echo = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        echo.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let server = echo.local_addr().unwrap();
        let srcs: [Ipv4Addr; 3] = [
            "127.0.0.1".parse().unwrap(),
            "127.77.1.2".parse().unwrap(),
            "127.200.3.4".parse().unwrap(),
        ];
        let mut tx = MsgBatch::new_pktinfo(4, 64);
        for (i, src) in srcs.iter().enumerate() {
            tx.slot_mut(i)[0] = i as u8;
            tx.set_len(i, 1);
            tx.set_peer(i, server);
            tx.set_source(i, Some(*src));
        }
        assert_eq!(tx.send(sock.as_raw_fd(), 0, 3).unwrap(), 3);
        let mut buf = [0u8; 16];
        for src in srcs.iter() {
            let (n, from) = echo.recv_from(&mut buf).unwrap();
            assert_eq!(n, 1);
            assert_eq!(from, SocketAddr::from((*src, port)), "datagram {}", buf[0]);
            // Answer to the address it came from: the socket must get it and say where to.
            echo.send_to(&[buf[0], 0xEE], from).unwrap();
        }
        let mut rx = MsgBatch::new_pktinfo(4, 64);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while got.len() < 3 && std::time::Instant::now() < deadline {
            match rx.recv(sock.as_raw_fd(), libc::MSG_DONTWAIT) {
                Ok(n) => {
                    for i in 0..n {
                        assert_eq!(rx.peer(i), Some(server));
                        got.push((rx.datagram(i)[0], rx.dest(i)));
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        got.sort();
        let want: Vec<(u8, Option<Ipv4Addr>)> =
            (0..3u8).map(|i| (i, Some(srcs[i as usize]))).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn free_port_is_bindable() {
        let ip = "127.0.0.1".parse().unwrap();
        let port = free_port(ip).unwrap();
        assert_ne!(port, 0);
        std::net::UdpSocket::bind((ip, port)).unwrap();
    }
}
