//! The probe's connections to the server: a UDP socket, a TCP stream or a TLS stream, each
//! carrying STUN messages and ChannelData frames (RFC 8656 §12.5: padded to 4 bytes on
//! streams). Blocking std sockets with deadlines; every read is bounded in time and size.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, StreamOwned};

use portico_dataplane::stun::HEADER_LEN;

/// Largest frame accepted from the server (a STUN message or ChannelData is at most
/// 4 + 65535 bytes); a longer one ends the connection as garbage.
const MAX_FRAME: usize = 4 + 65_535 + 3;

/// What went wrong on the wire, sorted the way the report explains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Nothing arrived before the deadline.
    Timeout,
    /// The server closed the connection (or never accepted it).
    Closed(String),
    /// Any other socket or TLS error, as text.
    Io(String),
    /// The server sent bytes that are neither STUN nor ChannelData.
    Garbage(String),
    /// The TLS handshake failed (certificate, protocol).
    Tls(String),
}

impl WireError {
    fn from_io(e: &io::Error) -> WireError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => WireError::Timeout,
            ErrorKind::ConnectionRefused => WireError::Closed("connection refused".into()),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                WireError::Closed("connection reset by the server".into())
            }
            ErrorKind::UnexpectedEof => WireError::Closed("connection closed by the server".into()),
            _ => WireError::Io(e.to_string()),
        }
    }
}

/// The local address the system would use to reach `server`: a UDP socket connected to it
/// (no packet is sent) tells.
pub fn local_ip_towards(server: SocketAddr) -> io::Result<IpAddr> {
    let any: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any)?;
    s.connect(server)?;
    Ok(s.local_addr()?.ip())
}

/// Remaining time to `deadline`, at least a millisecond (a zero read timeout is an error).
pub fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.checked_duration_since(Instant::now())?;
    if left.is_zero() {
        None
    } else {
        Some(left.max(Duration::from_millis(1)))
    }
}

/// Receives one datagram before `deadline`: `Ok(None)` when the time is up.
pub fn recv_udp(
    sock: &UdpSocket,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<Option<(usize, SocketAddr)>, WireError> {
    loop {
        let Some(left) = remaining(deadline) else {
            return Ok(None);
        };
        sock.set_read_timeout(Some(left))
            .map_err(|e| WireError::Io(e.to_string()))?;
        match sock.recv_from(buf) {
            Ok(got) => return Ok(Some(got)),
            Err(e) => match WireError::from_io(&e) {
                WireError::Timeout => continue,
                // ICMP port unreachable from an earlier send shows as a refused recv.
                WireError::Closed(_) => continue,
                other => return Err(other),
            },
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

/// One transport to the server.
pub struct Conn {
    kind: Kind,
    /// The local address (the host candidate).
    pub local: SocketAddr,
    /// The server's address.
    pub server: SocketAddr,
}

enum Kind {
    Udp(UdpSocket),
    Stream { stream: Stream, buf: Vec<u8> },
}

impl Conn {
    /// A UDP socket on the local address that routes to `server` (unconnected, so that the
    /// RFC 5780 tests can hear answers from the server's other address).
    pub fn udp(server: SocketAddr) -> Result<Conn, WireError> {
        let ip = local_ip_towards(server).map_err(|e| WireError::Io(e.to_string()))?;
        let sock = UdpSocket::bind((ip, 0)).map_err(|e| WireError::Io(e.to_string()))?;
        let local = sock
            .local_addr()
            .map_err(|e| WireError::Io(e.to_string()))?;
        Ok(Conn {
            kind: Kind::Udp(sock),
            local,
            server,
        })
    }

    /// A TCP connection to `server`, made before `deadline`.
    pub fn tcp(server: SocketAddr, deadline: Instant) -> Result<Conn, WireError> {
        let s = connect(server, deadline)?;
        let local = s.local_addr().map_err(|e| WireError::Io(e.to_string()))?;
        Ok(Conn {
            kind: Kind::Stream {
                stream: Stream::Tcp(s),
                buf: Vec::new(),
            },
            local,
            server,
        })
    }

    /// A TLS connection to `server` whose handshake completes before `deadline`.
    pub fn tls(
        server: SocketAddr,
        name: rustls::pki_types::ServerName<'static>,
        config: Arc<ClientConfig>,
        deadline: Instant,
    ) -> Result<Conn, WireError> {
        let s = connect(server, deadline)?;
        let local = s.local_addr().map_err(|e| WireError::Io(e.to_string()))?;
        let conn = ClientConnection::new(config, name)
            .map_err(|e| WireError::Io(format!("TLS setup: {e}")))?;
        let mut tls = StreamOwned::new(conn, s);
        while tls.conn.is_handshaking() {
            let Some(left) = remaining(deadline) else {
                return Err(WireError::Timeout);
            };
            tls.sock
                .set_read_timeout(Some(left))
                .map_err(|e| WireError::Io(e.to_string()))?;
            tls.sock
                .set_write_timeout(Some(left))
                .map_err(|e| WireError::Io(e.to_string()))?;
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                return Err(match WireError::from_io(&e) {
                    WireError::Io(_) => {
                        let hint = if e.to_string().contains("certificate") {
                            " (trust its CA with --ca FILE, name it with --tls-name, or --insecure)"
                        } else {
                            ""
                        };
                        WireError::Tls(format!("TLS handshake: {e}{hint}"))
                    }
                    other => other,
                });
            }
        }
        Ok(Conn {
            kind: Kind::Stream {
                stream: Stream::Tls(Box::new(tls)),
                buf: Vec::new(),
            },
            local,
            server,
        })
    }

    pub fn is_udp(&self) -> bool {
        matches!(self.kind, Kind::Udp(_))
    }

    /// Sends one STUN message or ChannelData frame (padded to 4 bytes on a stream).
    pub fn send(&mut self, frame: &[u8]) -> Result<(), WireError> {
        match &mut self.kind {
            Kind::Udp(sock) => sock
                .send_to(frame, self.server)
                .map(|_| ())
                .map_err(|e| WireError::from_io(&e)),
            Kind::Stream { stream, .. } => {
                let pad = (4 - frame.len() % 4) % 4;
                let mut out = Vec::with_capacity(frame.len() + pad);
                out.extend_from_slice(frame);
                out.resize(frame.len() + pad, 0);
                let r = match stream {
                    Stream::Tcp(s) => s.write_all(&out).and_then(|_| s.flush()),
                    Stream::Tls(s) => s.write_all(&out).and_then(|_| s.flush()),
                };
                r.map_err(|e| WireError::from_io(&e))
            }
        }
    }

    /// Sends `frame` to `to` (UDP only; a stream ignores `to`).
    pub fn send_to(&mut self, frame: &[u8], to: SocketAddr) -> Result<(), WireError> {
        match &mut self.kind {
            Kind::Udp(sock) => sock
                .send_to(frame, to)
                .map(|_| ())
                .map_err(|e| WireError::from_io(&e)),
            Kind::Stream { .. } => self.send(frame),
        }
    }

    /// The next frame from the server (any source over UDP, with the source) before
    /// `deadline`; `Ok(None)` when the time is up.
    pub fn recv(&mut self, deadline: Instant) -> Result<Option<(Vec<u8>, SocketAddr)>, WireError> {
        let server = self.server;
        match &mut self.kind {
            Kind::Udp(sock) => {
                let mut buf = vec![0u8; 65_536];
                Ok(recv_udp(sock, &mut buf, deadline)?.map(|(n, from)| {
                    buf.truncate(n);
                    (buf, from)
                }))
            }
            Kind::Stream { stream, buf } => loop {
                if let Some(len) = frame_len(buf)? {
                    if buf.len() >= len {
                        let rest = buf.split_off(len);
                        let mut frame = std::mem::replace(buf, rest);
                        // ChannelData is padded on streams; hand out the frame without it.
                        if frame.first().is_some_and(|b| b & 0xC0 == 0x40) {
                            if let Some(&[l0, l1]) = frame.get(2..4) {
                                frame.truncate(4 + usize::from(u16::from_be_bytes([l0, l1])));
                            }
                        }
                        return Ok(Some((frame, server)));
                    }
                }
                let Some(left) = remaining(deadline) else {
                    return Ok(None);
                };
                stream
                    .tcp()
                    .set_read_timeout(Some(left))
                    .map_err(|e| WireError::Io(e.to_string()))?;
                let mut chunk = [0u8; 16_384];
                let r = match stream {
                    Stream::Tcp(s) => s.read(&mut chunk),
                    Stream::Tls(s) => s.read(&mut chunk),
                };
                match r {
                    Ok(0) => {
                        return Err(WireError::Closed("connection closed by the server".into()))
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) => match WireError::from_io(&e) {
                        WireError::Timeout => return Ok(None),
                        other => return Err(other),
                    },
                }
            },
        }
    }

    /// Ends a stream politely (TLS close_notify, then FIN); nothing for UDP.
    pub fn close(&mut self) {
        if let Kind::Stream { stream, .. } = &mut self.kind {
            if let Stream::Tls(s) = stream {
                // Write the alert out; reading the peer's is not waited for.
                s.conn.send_close_notify();
                while s.conn.wants_write() {
                    if s.conn.write_tls(&mut s.sock).is_err() {
                        break;
                    }
                }
            }
            let _ = stream.tcp().shutdown(Shutdown::Both);
        }
    }
}

fn connect(server: SocketAddr, deadline: Instant) -> Result<TcpStream, WireError> {
    let left = remaining(deadline).ok_or(WireError::Timeout)?;
    let s = TcpStream::connect_timeout(&server, left).map_err(|e| WireError::from_io(&e))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Length of the frame at the start of a stream buffer (with ChannelData padding), once its
/// 4-byte header is there.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    let Some(&[b0, _, l0, l1]) = buf.get(..4) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([l0, l1]));
    let total = match b0 >> 6 {
        0 => HEADER_LEN + len,
        1 => 4 + len + (4 - len % 4) % 4,
        _ => {
            return Err(WireError::Garbage(format!(
            "the server sent a frame that is neither STUN nor ChannelData (first byte 0x{b0:02x})"
        )))
        }
    };
    if total > MAX_FRAME {
        return Err(WireError::Garbage(format!("frame of {total} bytes")));
    }
    Ok(Some(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_frame_lengths() {
        assert_eq!(frame_len(&[0, 1]).unwrap(), None);
        assert_eq!(frame_len(&[0, 1, 0, 8]).unwrap(), Some(28));
        assert_eq!(frame_len(&[0x40, 0, 0, 5]).unwrap(), Some(12));
        assert_eq!(frame_len(&[0x40, 0, 0, 8]).unwrap(), Some(12));
        assert!(frame_len(&[0x80, 0, 0, 0]).is_err());
    }
}
