//! Socket helpers: a request and its answer over UDP and TCP, and "nothing arrives".

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::server::{LOCAL4, LOCAL6};
use super::stun::Msg;

/// How long a test waits for an answer on loopback before calling it lost.
pub const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// A UDP socket on an ephemeral port of `ip`.
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

/// Reads exactly one framed STUN message (RFC 8489 §6.2.2: the header's length field frames
/// it) from the stream.
pub fn tcp_read_msg(s: &mut TcpStream) -> Msg {
    let mut head = [0u8; 20];
    s.read_exact(&mut head)
        .unwrap_or_else(|e| panic!("reading a STUN header over TCP: {e}"));
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let mut all = head.to_vec();
    all.resize(20 + len, 0);
    s.read_exact(&mut all[20..])
        .unwrap_or_else(|e| panic!("reading a {len}-byte STUN body over TCP: {e}"));
    Msg::parse(&all).unwrap_or_else(|e| panic!("TCP answer is not STUN: {e}"))
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
