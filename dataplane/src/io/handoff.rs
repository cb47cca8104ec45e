//! TURN connections handed over by the control plane's reverse proxy (`proxy.turn_on_https`:
//! one public port 443 for HTTPS and TURN over TLS).
//!
//! The TCP thread binds a unix datagram socket, `<state_dir>/turn-handoff.sock` (mode 0600,
//! in the owner-only state dir). Each hand-off is one datagram: a 24-byte header and one
//! descriptor (`SCM_RIGHTS`). A datagram is atomic, so the thread keeps no state per sender
//! and a half-sent hand-off cannot exist.
//!
//! ```text
//! 0      4     5        6      8                    24
//! +------+-----+--------+------+--------------------+
//! | PTH1 | kind| family | port | client IP (4 or 16)|
//! +------+-----+--------+------+--------------------+
//! ```
//!
//! * kind 1, [`KIND_TLS`]: the descriptor is the client's TCP socket itself, not a byte of it
//!   read yet (the proxy only peeked at the ClientHello, which offered ALPN `stun.turn`);
//!   the TCP thread terminates TLS as on `turn.listen_tls`. The client address is the
//!   socket's peer.
//! * kind 2, [`KIND_PLAIN`]: the proxy terminated TLS itself (the first decrypted bytes were
//!   STUN or ChannelData) and relays the plaintext over a unix stream socket, the
//!   descriptor; the client address in the header is the real client's, and is what the
//!   core sees (nonces, per-source limits, blacklist, fraud events).
//!
//! A hand-off that is malformed, carries no or the wrong kind of descriptor, or whose
//! client is blacklisted or over a limit is refused by closing the descriptor, and counted
//! as for a connection accepted directly.

use std::io::{self, IoSliceMut, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mio::event::Source;
use mio::net::{TcpStream, UnixDatagram, UnixStream};
use mio::{Interest, Registry, Token};
use nix::sys::socket::{
    getpeername, getsockopt, recvmsg, sockopt, AddressFamily, ControlMessageOwned, MsgFlags,
    SockType, SockaddrLike, SockaddrStorage,
};
use portico_shared::handoff::{parse_header, KIND_PLAIN, KIND_TLS};
use rustls::ServerConfig;

/// The ALPN protocol of TURN over TLS (RFC 7443).
pub const ALPN_TURN: &[u8] = b"stun.turn";

/// A connection's byte stream: accepted TCP, or a hand-off's unix stream.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn set_nodelay(&self) {
        if let Stream::Tcp(s) = self {
            let _ = s.set_nodelay(true);
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.register(r, t, i),
            Stream::Unix(s) => s.register(r, t, i),
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.reregister(r, t, i),
            Stream::Unix(s) => s.reregister(r, t, i),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.deregister(r),
            Stream::Unix(s) => s.deregister(r),
        }
    }
}

/// A connection handed over, ready to be served like an accepted one.
pub struct Incoming {
    pub stream: Stream,
    /// The real client.
    pub peer: SocketAddr,
    /// The TLS is still to be terminated (kind 1).
    pub tls: bool,
}

/// A hand-off that was refused (malformed, or not the descriptor it should carry); its
/// descriptor is closed.
#[derive(Debug)]
pub struct Refused;

/// The hand-off socket of the TCP thread.
pub struct Handoff {
    socket: UnixDatagram,
    path: PathBuf,
    /// The TLS configuration for kind 1 (the thread's, plus ALPN `stun.turn`), and the one
    /// it was made from.
    tls: Option<(Arc<ServerConfig>, Arc<ServerConfig>)>,
}

/// Binds `<state_dir>/turn-handoff.sock`, replacing a stale socket a dead dataplane left.
pub fn bind(state_dir: &Path) -> Result<Handoff, String> {
    let path = portico_shared::handoff::socket_path(state_dir);
    let what = || format!("TURN hand-off socket {}", path.display());
    if let Ok(m) = std::fs::symlink_metadata(&path) {
        if !m.file_type().is_socket() {
            return Err(format!("{}: exists and is not a socket", what()));
        }
        std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", what()))?;
    }
    let socket =
        std::os::unix::net::UnixDatagram::bind(&path).map_err(|e| format!("{}: {e}", what()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", what()))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("{}: {e}", what()))?;
    Ok(Handoff {
        socket: UnixDatagram::from_std(socket),
        path,
        tls: None,
    })
}

impl Handoff {
    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut self.socket, token, Interest::READABLE)
    }

    /// The configuration for handed-over TLS: `base` with ALPN `stun.turn`, so the client
    /// that asked for it gets it confirmed.
    pub fn tls_config(&mut self, base: &Arc<ServerConfig>) -> Arc<ServerConfig> {
        match &self.tls {
            Some((from, made)) if Arc::ptr_eq(from, base) => Arc::clone(made),
            _ => {
                let mut c = ServerConfig::clone(base);
                c.alpn_protocols = vec![ALPN_TURN.to_vec()];
                let made = Arc::new(c);
                self.tls = Some((Arc::clone(base), Arc::clone(&made)));
                made
            }
        }
    }

    /// Takes the next hand-off. `Ok(None)`: nothing queued. `Err(Refused)`: one was refused
    /// (its descriptor is closed); the caller counts it and asks again.
    pub fn receive(&mut self) -> Result<Option<Incoming>, Refused> {
        let mut buf = [0u8; 64];
        let (len, fds, truncated) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([RawFd; 4]);
            let msg = match recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => return Ok(None),
                Err(nix::errno::Errno::EINTR) => return Err(Refused),
                Err(e) => {
                    tracing::warn!("TURN hand-off socket {}: {e}", self.path.display());
                    return Ok(None);
                }
            };
            let mut fds: Vec<OwnedFd> = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel installed `fd` in this process for this
                            // message (SCM_RIGHTS); nothing else knows it, so this is its
                            // only owner and it is closed when dropped.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
            }
            let truncated = msg
                .flags
                .intersects(MsgFlags::MSG_CTRUNC | MsgFlags::MSG_TRUNC);
            (msg.bytes, fds, truncated)
        };
        // Every path below that does not return a connection drops (closes) the descriptors.
        if truncated || fds.len() != 1 {
            return Err(Refused);
        }
        let Some((kind, claimed)) = parse_header(&buf[..len]) else {
            return Err(Refused);
        };
        let Some(fd) = fds.into_iter().next() else {
            return Err(Refused);
        };
        if getsockopt(&fd, sockopt::SockType) != Ok(SockType::Stream) {
            return Err(Refused);
        }
        match kind {
            KIND_TLS => {
                // The client address is the socket's own peer.
                let peer = getpeername::<SockaddrStorage>(fd.as_fd().as_raw_fd())
                    .ok()
                    .and_then(|a| inet(&a))
                    .ok_or(Refused)?;
                let s = std::net::TcpStream::from(fd);
                s.set_nonblocking(true).map_err(|_| Refused)?;
                Ok(Some(Incoming {
                    stream: Stream::Tcp(TcpStream::from_std(s)),
                    peer,
                    tls: true,
                }))
            }
            KIND_PLAIN => {
                let local = nix::sys::socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
                    .map_err(|_| Refused)?;
                if local.family() != Some(AddressFamily::Unix) {
                    return Err(Refused);
                }
                let s = std::os::unix::net::UnixStream::from(fd);
                s.set_nonblocking(true).map_err(|_| Refused)?;
                Ok(Some(Incoming {
                    stream: Stream::Unix(UnixStream::from_std(s)),
                    peer: claimed,
                    tls: false,
                }))
            }
            _ => Err(Refused),
        }
    }
}

fn inet(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::new(IpAddr::V4(v4.ip()), v4.port()));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::new(IpAddr::V6(v6.ip()), v6.port()))
}
