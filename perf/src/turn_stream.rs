//! Stream transports of the TURN generator (`portico-perf turn --transport tcp|tls`): TURN
//! over TCP and over TLS (RFC 8656 §3.1), the same clients and state machine as over UDP
//! ([`crate::turn_client`]), each client on its own connection from its own loopback source
//! address. Messages are framed by their headers; ChannelData is padded to 4 bytes both ways.
//! Requests are not retransmitted on a stream (a lost answer is a timeout).
//!
//! One mio poll per client thread; what a loop pass queues for a connection leaves in one
//! write (TCP) or one TLS record flush at the end of the pass.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
use socket2::{Domain, Protocol, Socket, Type};

/// How the clients reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// A frame larger than this is a broken stream.
const MAX_FRAME: usize = 4096;

struct Conn {
    sock: TcpStream,
    tls: Option<Box<ClientConnection>>,
    out: Vec<u8>,
    input: Vec<u8>,
    dirty: bool,
}

/// The connections of one client thread, by local client index.
pub struct Streams {
    poll: Poll,
    events: Events,
    conns: Vec<Option<Conn>>,
    tls: Option<Arc<ClientConfig>>,
    dirty: Vec<usize>,
    read_buf: Vec<u8>,
    /// Connections that failed (reset, TLS error, broken framing).
    pub broken: u64,
}

impl Streams {
    /// `alpn`: offer ALPN `stun.turn` (RFC 7443) over TLS.
    pub fn new(transport: Transport, alpn: bool, clients: usize) -> io::Result<Streams> {
        let tls = (transport == Transport::Tls).then(|| {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut c = ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .map(|b| {
                    b.dangerous()
                        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
                        .with_no_client_auth()
                });
            if let Ok(c) = c.as_mut() {
                if alpn {
                    c.alpn_protocols = vec![b"stun.turn".to_vec()];
                }
            }
            c.map(Arc::new)
        });
        let tls = match tls {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => return Err(io::Error::other(e.to_string())),
            None => None,
        };
        Ok(Streams {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            conns: (0..clients).map(|_| None).collect(),
            tls,
            dirty: Vec::new(),
            read_buf: vec![0u8; 64 * 1024],
            broken: 0,
        })
    }

    /// Connects client `i` from `src` (bound before connecting, so every client is its own
    /// source address); the connection completes in the background.
    pub fn open(&mut self, i: usize, src: Ipv4Addr, server: SocketAddr) -> io::Result<()> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.set_nonblocking(true)?;
        s.set_nodelay(true)?;
        s.bind(&SocketAddr::new(src.into(), 0).into())?;
        match s.connect(&server.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut sock = TcpStream::from_std(s.into());
        self.poll.registry().register(
            &mut sock,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let tls = match &self.tls {
            Some(c) => {
                let name = ServerName::try_from("portico.bench").map_err(io::Error::other)?;
                Some(Box::new(
                    ClientConnection::new(Arc::clone(c), name).map_err(io::Error::other)?,
                ))
            }
            None => None,
        };
        let Some(slot) = self.conns.get_mut(i) else {
            return Err(io::Error::other("client index out of range"));
        };
        *slot = Some(Conn {
            sock,
            tls,
            out: Vec::new(),
            input: Vec::new(),
            dirty: false,
        });
        self.mark(i);
        Ok(())
    }

    fn mark(&mut self, i: usize) {
        if let Some(Some(c)) = self.conns.get_mut(i) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(i);
            }
        }
    }

    /// Queues one message for client `i` (padded when it is ChannelData). False when the
    /// client has no working connection.
    pub fn queue(&mut self, i: usize, msg: &[u8]) -> bool {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return false;
        };
        let pad = if msg.first().is_some_and(|b| b & 0xC0 == 0x40) {
            (4 - msg.len() % 4) % 4
        } else {
            0
        };
        let ok = match c.tls.as_mut() {
            Some(t) => {
                let mut w = t.writer();
                w.write_all(msg).is_ok() && w.write_all(&[0u8; 3][..pad]).is_ok()
            }
            None => {
                c.out.extend_from_slice(msg);
                c.out.extend_from_slice(&[0u8; 3][..pad]);
                true
            }
        };
        self.mark(i);
        ok
    }

    /// Writes what every connection has queued, as far as the sockets take it.
    pub fn flush(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for i in dirty {
            let Some(Some(c)) = self.conns.get_mut(i) else {
                continue;
            };
            c.dirty = false;
            // Ok(false): the socket is full or still connecting; its WRITABLE event
            // brings it back.
            if write_out(c).is_err() {
                self.close(i);
                self.broken += 1;
            }
        }
    }

    pub fn close(&mut self, i: usize) {
        if let Some(slot) = self.conns.get_mut(i) {
            if let Some(mut c) = slot.take() {
                let _ = self.poll.registry().deregister(&mut c.sock);
            }
        }
    }

    /// Waits up to `wait_ns` and reads what arrived; every complete frame is appended to
    /// `data` and named in `frames` with its client index.
    pub fn receive(
        &mut self,
        wait_ns: u64,
        frames: &mut Vec<(usize, Range<usize>)>,
        data: &mut Vec<u8>,
    ) -> io::Result<()> {
        match self
            .poll
            .poll(&mut self.events, Some(Duration::from_nanos(wait_ns)))
        {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let ready: Vec<(usize, bool, bool)> = self
            .events
            .iter()
            .map(|e| (e.token().0, e.is_readable(), e.is_writable()))
            .collect();
        for (i, readable, writable) in ready {
            if writable {
                self.mark(i);
            }
            if !readable {
                continue;
            }
            let Some(Some(c)) = self.conns.get_mut(i) else {
                continue;
            };
            let ok = read_in(c, &mut self.read_buf) && cut_frames(c, i, frames, data);
            let wants = c.tls.as_ref().is_some_and(|t| t.wants_write());
            if !ok {
                self.close(i);
                self.broken += 1;
            } else if wants {
                self.mark(i);
            }
        }
        self.flush();
        Ok(())
    }
}

/// Writes out; `Ok(true)` when everything left.
fn write_out(c: &mut Conn) -> io::Result<bool> {
    loop {
        let r = match c.tls.as_mut() {
            Some(t) => {
                if !t.wants_write() {
                    return Ok(true);
                }
                t.write_tls(&mut c.sock)
            }
            None => {
                if c.out.is_empty() {
                    return Ok(true);
                }
                c.sock.write(&c.out).inspect(|n| {
                    c.out.drain(..*n);
                })
            }
        };
        match r {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::NotConnected =>
            {
                return Ok(false)
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads everything the socket has into the connection's input. False on EOF or error.
fn read_in(c: &mut Conn, buf: &mut [u8]) -> bool {
    loop {
        match c.tls.as_mut() {
            Some(t) => {
                match t.read_tls(&mut c.sock) {
                    Ok(0) => return false,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                }
                if t.process_new_packets().is_err() {
                    return false;
                }
                loop {
                    match t.reader().read(buf) {
                        Ok(0) => return false,
                        Ok(n) => c.input.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => return false,
                    }
                }
            }
            None => match c.sock.read(buf) {
                Ok(0) => return false,
                Ok(n) => c.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            },
        }
    }
}

/// Moves the complete frames of `c`'s input to `data`. False on a frame no server sends.
fn cut_frames(
    c: &mut Conn,
    i: usize,
    frames: &mut Vec<(usize, Range<usize>)>,
    data: &mut Vec<u8>,
) -> bool {
    let mut at = 0;
    while c.input.len() - at >= 4 {
        let h = &c.input[at..];
        let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
        let (msg, total) = if h[0] & 0xC0 == 0x40 {
            (4 + len, 4 + len.div_ceil(4) * 4)
        } else {
            (20 + len, 20 + len)
        };
        if total > MAX_FRAME {
            return false;
        }
        if h.len() < total {
            break;
        }
        let start = data.len();
        data.extend_from_slice(&h[..msg]);
        frames.push((i, start..data.len()));
        at += total;
    }
    c.input.drain(..at);
    true
}

/// Benchmarks trust whatever certificate the server shows (the handshake signature still
/// has to verify).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_with_channel_data_padding() {
        // Framing only: a connection object around a throwaway socket.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mut c = Conn {
            sock: TcpStream::from_std(s),
            tls: None,
            out: Vec::new(),
            input: Vec::new(),
            dirty: false,
        };
        // ChannelData of 5 bytes (padded to 8), then a 20-byte STUN header with 4 bytes.
        c.input
            .extend_from_slice(&[0x40, 0x01, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0]);
        let mut stun = vec![0x01, 0x01, 0, 4, 0x21, 0x12, 0xA4, 0x42];
        stun.extend_from_slice(&[7; 12]);
        stun.extend_from_slice(&[9; 4]);
        c.input.extend_from_slice(&stun);
        c.input.extend_from_slice(&[0x40, 0x02, 0]); // incomplete
        let (mut frames, mut data) = (Vec::new(), Vec::new());
        assert!(cut_frames(&mut c, 3, &mut frames, &mut data));
        assert_eq!(frames.len(), 2);
        assert_eq!(
            &data[frames[0].1.clone()],
            &[0x40, 0x01, 0, 5, 1, 2, 3, 4, 5]
        );
        assert_eq!(&data[frames[1].1.clone()], &stun[..]);
        assert_eq!(c.input, [0x40, 0x02, 0]);
        c.input = vec![0x40, 0x01, 0xFF, 0xFF];
        assert!(
            !cut_frames(&mut c, 3, &mut frames, &mut data),
            "over the limit"
        );
    }
}
