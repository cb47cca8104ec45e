//! UDP plumbing shared by the scenarios: socket setup and batched I/O with
//! `recvmmsg`/`sendmmsg`.
//!
//! Batching matters here because the generator shares two cores with the server it loads:
//! every syscall it saves is CPU the server gets (FACTS.md: batch-64 mmsg calls move ~20% more
//! loopback packets than one call per packet).

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
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
}

impl MsgBatch {
    /// `named`: whether datagrams carry a peer address (unconnected sockets).
    pub fn new(count: usize, slot_size: usize, named: bool) -> Self {
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
        for (iov, h) in self.iov.iter_mut().zip(self.hdrs.iter_mut()) {
            iov.iov_len = self.slot_size;
            if self.named {
                h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as u32;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

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
    fn free_port_is_bindable() {
        let ip = "127.0.0.1".parse().unwrap();
        let port = free_port(ip).unwrap();
        assert_ne!(port, 0);
        std::net::UdpSocket::bind((ip, port)).unwrap();
    }
}
