//! Sockets on loopback, from a source address of the test's choosing; STUN requests and their
//! answers over UDP and TCP; "nothing arrives" and "the connection is closed" checks.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::stun::{Builder, Class, Msg};
use crate::{ANSWER_WAIT, LOCAL4, LOCAL6};

/// A UDP socket on an ephemeral port of `ip` (any of 127.0.0.0/8, or ::1).
pub fn udp_on(ip: IpAddr) -> UdpSocket {
    let s = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    s.set_read_timeout(Some(ANSWER_WAIT))
        .unwrap_or_else(|e| panic!("SO_RCVTIMEO: {e}"));
    s
}

/// A UDP client socket on the loopback address of `server`'s family.
pub fn udp_client(server: SocketAddr) -> UdpSocket {
    udp_on(if server.is_ipv4() { LOCAL4 } else { LOCAL6 })
}

/// Receives one datagram within `wait`: `(bytes, source)`, or `None` on timeout.
pub fn recv_within(s: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let old = s.read_timeout().ok().flatten();
    s.set_read_timeout(Some(wait.max(Duration::from_millis(1))))
        .unwrap_or_else(|e| panic!("SO_RCVTIMEO: {e}"));
    let mut buf = vec![0u8; 65536];
    let r = match s.recv_from(&mut buf) {
        Ok((n, from)) => Some((buf[..n].to_vec(), from)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("recv_from: {e}"),
    };
    let _ = s.set_read_timeout(old);
    r
}

/// Receives the datagram from `from` whose transaction id is `tid` within `wait`, skipping
/// others (late answers to earlier requests, relayed data).
pub fn recv_answer(
    s: &UdpSocket,
    from: SocketAddr,
    tid: &[u8; 12],
    wait: Duration,
) -> Option<Vec<u8>> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let (bytes, src) = recv_within(s, left)?;
        if src == from && bytes.len() >= 20 && bytes[0] & 0xC0 == 0 && &bytes[8..20] == tid {
            return Some(bytes);
        }
    }
}

/// Sends `req` to `to` and returns the answer and where it came from. The answer must be the
/// very next datagram on the socket and carry the request's transaction id (all 16 bytes
/// after the type and length, so RFC 3489 ids are covered too).
pub fn transact(s: &UdpSocket, to: SocketAddr, req: &[u8]) -> (Msg, SocketAddr) {
    s.send_to(req, to)
        .unwrap_or_else(|e| panic!("send_to {to}: {e}"));
    let (bytes, from) = recv_within(s, ANSWER_WAIT)
        .unwrap_or_else(|| panic!("no answer from {to} within {ANSWER_WAIT:?}"));
    let m = Msg::parse(&bytes)
        .unwrap_or_else(|e| panic!("answer from {from} is not a STUN message: {e}: {bytes:02x?}"));
    assert_eq!(
        m.raw[4..20],
        req[4..20],
        "answer carries another transaction id (cookie + id)"
    );
    (m, from)
}

/// Asserts that nothing arrives on `s` for `wait`.
pub fn expect_silence(s: &UdpSocket, wait: Duration, what: &str) {
    if let Some((bytes, from)) = recv_within(s, wait) {
        panic!(
            "{what}: expected no answer, got {} bytes from {from}: {:02x?}",
            bytes.len(),
            bytes
        );
    }
}

/// One Binding request from `s` to `server`: its success answer within `wait`, or `None`
/// (no answer, or an error answer).
pub fn binding(s: &UdpSocket, server: SocketAddr, wait: Duration) -> Option<Msg> {
    let req = Builder::binding();
    let tid = req.tid();
    s.send_to(&req.build(), server).ok()?;
    let bytes = recv_answer(s, server, &tid, wait)?;
    Msg::parse(&bytes)
        .ok()
        .filter(|m| m.class() == Class::Success)
}

/// Whether a Binding request from `src` is answered: up to three tries of `wait` each, so a
/// datagram lost under load does not pass for a block.
pub fn answered_from(src: IpAddr, server: SocketAddr, wait: Duration) -> bool {
    let s = udp_on(src);
    (0..3).any(|_| binding(&s, server, wait).is_some())
}

/// `count` Binding requests from 127.0.0.1 in lockstep (each waits up to 1 s); how many were
/// answered.
pub fn bindings(server: SocketAddr, count: u64) -> u64 {
    let s = udp_on(LOCAL4);
    (0..count)
        .filter(|_| binding(&s, server, Duration::from_secs(1)).is_some())
        .count() as u64
}

/// Waits (bounded) until `port` on `ip` can be bound again: a relay socket is closed.
pub fn port_becomes_free(ip: IpAddr, port: u16, limit: Duration) -> bool {
    crate::wait_until(limit, || UdpSocket::bind(SocketAddr::new(ip, port)).is_ok())
}

// ---------------------------------------------------------------------------------------------
// TCP

/// A TCP connection to `to` from the local address `src` (port chosen by the kernel), so a
/// test can be several sources.
pub fn tcp_from(src: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    let family = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(src, 0)),
    )?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
    Ok(TcpStream::from(fd))
}

/// A TCP connection with a read timeout, so a missing answer fails instead of hanging.
pub fn tcp_connect(to: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&to, ANSWER_WAIT)
        .unwrap_or_else(|e| panic!("connect {to}: {e}"));
    s.set_read_timeout(Some(ANSWER_WAIT))
        .unwrap_or_else(|e| panic!("SO_RCVTIMEO: {e}"));
    s.set_nodelay(true)
        .unwrap_or_else(|e| panic!("TCP_NODELAY: {e}"));
    s
}

/// Reads one framed STUN message (RFC 8489 §6.2.2: the header's length field frames it).
pub fn tcp_try_read_msg(s: &mut TcpStream) -> std::io::Result<Msg> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head)?;
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let mut all = head.to_vec();
    all.resize(20 + len, 0);
    s.read_exact(&mut all[20..])?;
    Msg::parse(&all).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))
}

/// [`tcp_try_read_msg`], failing the test when no message comes.
pub fn tcp_read_msg(s: &mut TcpStream) -> Msg {
    tcp_try_read_msg(s).unwrap_or_else(|e| panic!("reading a STUN message over TCP: {e}"))
}

pub fn tcp_write(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes)
        .unwrap_or_else(|e| panic!("TCP write: {e}"));
    s.flush().unwrap_or_else(|e| panic!("TCP flush: {e}"));
}

/// Waits (bounded) for the server to close the connection: EOF or a reset. Any data read
/// instead is a failure, and so is the connection staying open past `limit`.
pub fn expect_closed(s: &mut TcpStream, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap_or_else(|e| panic!("SO_RCVTIMEO: {e}"));
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => panic!("{what}: expected the connection closed, read {n} bytes"),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if Instant::now() > deadline {
                    panic!("{what}: the connection is still open after {limit:?}");
                }
            }
            Err(e) => panic!("{what}: read: {e}"),
        }
    }
}

/// STUN Binding requests over one TCP connection from a chosen source address.
pub struct TcpStun {
    stream: TcpStream,
}

impl TcpStun {
    pub fn connect(src: IpAddr, server: SocketAddr) -> std::io::Result<TcpStun> {
        let stream = tcp_from(src, server)?;
        stream.set_nodelay(true)?;
        Ok(TcpStun { stream })
    }

    /// The connection itself (to watch the server close it).
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// One Binding request: true when its success answer arrives within `wait`, false when
    /// nothing does or the connection is closed.
    pub fn binding(&mut self, wait: Duration) -> bool {
        let req = Builder::binding();
        let tid = req.tid();
        if self.stream.write_all(&req.build()).is_err()
            || self.stream.set_read_timeout(Some(wait)).is_err()
        {
            return false;
        }
        tcp_try_read_msg(&mut self.stream)
            .is_ok_and(|m| m.class() == Class::Success && m.tid() == tid)
    }
}
