//! TURN on the HTTPS port (`proxy.turn_on_https`): handing a TURN client's connection to the
//! dataplane, which owns the TURN engine, its relays and allocation tables.
//!
//! Two ways, decided by [`super::sniff::turn`]:
//! * the ClientHello offers ALPN `stun.turn`: before any byte is read, the TCP socket itself
//!   goes to the dataplane (`SCM_RIGHTS`), which terminates TLS; the proxy is then out of
//!   the path;
//! * the first decrypted bytes are STUN or ChannelData (a client that sends no ALPN, such as
//!   `turnutils_uclient`): TLS is already terminated here, so the plaintext is relayed over a
//!   unix stream pair whose other end goes to the dataplane, with the real client address
//!   in the hand-off header.
//!
//! The wire format of a hand-off (one datagram to `<state_dir>/turn-handoff.sock`) is
//! described in the dataplane's `io/handoff.rs`.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use portico_shared::handoff::{header, KIND_PLAIN, KIND_TLS};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::forward::BoxStream;
use super::metrics::ProxyMetrics;
use super::sniff::turn::{client_hello, Verdict, HELLO_PEEK};
use super::{until_blocked, Blocked};

/// How long a hand-off may wait for room in the dataplane's socket queue: a unix datagram
/// queue holds only `net.unix.max_dgram_qlen` (10 by default) messages, and a burst of new
/// connections (hundreds of TLS clients at once) outruns the TCP thread taking them, which
/// is busy with their handshakes; the benchmark lost 4-14% of 1000 clients at 200 ms on a
/// loaded 2-core box. The client's own first-message deadline still bounds the wait.
const SEND_PATIENCE: Duration = Duration::from_secs(5);
/// Backoff between attempts while the queue is full.
const RETRY_FIRST: Duration = Duration::from_millis(1);
const RETRY_MAX: Duration = Duration::from_millis(20);

/// Sends one hand-off: the header and `fd`.
async fn send(
    socket: &Path,
    kind: u8,
    client: SocketAddr,
    fd: BorrowedFd<'_>,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    let to = UnixAddr::new(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    let sock = std::os::unix::net::UnixDatagram::unbound().map_err(|e| e.to_string())?;
    let h = header(kind, client);
    let fds = [fd.as_raw_fd()];
    let deadline = deadline.min(tokio::time::Instant::now() + SEND_PATIENCE);
    let mut pause = RETRY_FIRST;
    loop {
        let r = sendmsg(
            sock.as_raw_fd(),
            &[IoSlice::new(&h)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            Some(&to),
        );
        match r {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR)
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_MAX);
            }
            Err(e) => return Err(format!("{}: {e}", socket.display())),
        }
    }
}

/// Peeks at the ClientHello without consuming it (bounded by `deadline`): `Turn` when it
/// offers ALPN `stun.turn`.
pub async fn peek_hello(tcp: &TcpStream, deadline: tokio::time::Instant) -> Verdict {
    // Most ClientHellos fit in 2 KiB; the buffer grows to a whole record only when needed.
    let mut buf = vec![0u8; 2048];
    let mut last = 0;
    let peeked = tokio::time::timeout_at(deadline, async {
        loop {
            let n = match tcp.peek(&mut buf).await {
                Ok(0) | Err(_) => return Verdict::NotTurn,
                Ok(n) => n,
            };
            match client_hello(&buf[..n]) {
                Verdict::NeedMore if n == buf.len() && buf.len() < HELLO_PEEK => {
                    buf.resize(HELLO_PEEK, 0);
                }
                Verdict::NeedMore if n < buf.len() => {
                    // A ClientHello split over segments: peek again once more has come.
                    if n == last {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    last = n;
                }
                Verdict::NeedMore => return Verdict::NotTurn,
                v => return v,
            }
        }
    })
    .await;
    peeked.unwrap_or(Verdict::NotTurn)
}

/// Hands the client's socket to the dataplane before any TLS byte is read.
pub async fn hand_over_socket(
    tcp: TcpStream,
    peer: SocketAddr,
    socket: &Path,
    metrics: &ProxyMetrics,
    deadline: tokio::time::Instant,
) {
    let std = match tcp.into_std() {
        Ok(s) => s,
        Err(_) => return,
    };
    match send(socket, KIND_TLS, peer, std.as_fd(), deadline).await {
        Ok(()) => metrics.turn_handoff("alpn"),
        Err(e) => {
            tracing::warn!(client = %peer, "TURN hand-off failed: {e}");
            metrics.turn_handoff("failed");
        }
    }
    // Our copy closes here; the dataplane holds its own.
}

/// Relays a TLS-terminated TURN client to the dataplane: `prefix` is what was read to
/// recognise it. Returns when either side closes or the source is blacklisted.
pub async fn relay_plaintext(
    mut client: BoxStream,
    prefix: &[u8],
    peer: SocketAddr,
    socket: &Path,
    metrics: &ProxyMetrics,
    blocked: &Blocked,
    deadline: tokio::time::Instant,
) {
    let pair = std::os::unix::net::UnixStream::pair().and_then(|(mine, theirs)| {
        mine.set_nonblocking(true)?;
        Ok((mine, theirs))
    });
    let (mine, theirs) = match pair {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(client = %peer, "TURN hand-off: socketpair: {e}");
            metrics.turn_handoff("failed");
            return;
        }
    };
    if let Err(e) = send(socket, KIND_PLAIN, peer, theirs.as_fd(), deadline).await {
        tracing::warn!(client = %peer, "TURN hand-off failed: {e}");
        metrics.turn_handoff("failed");
        return;
    }
    drop(theirs);
    metrics.turn_handoff("plaintext");
    let Ok(mut dataplane) = tokio::net::UnixStream::from_std(mine) else {
        return;
    };
    if dataplane.write_all(prefix).await.is_err() {
        return;
    }
    let source = super::access::canonical_ip(peer.ip());
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut dataplane) => {}
        _ = until_blocked(blocked, source) => {
            metrics.refused_blocked.inc();
        }
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed {
    pub prefix: Vec<u8>,
    pub at: usize,
    pub inner: BoxStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
