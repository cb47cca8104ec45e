//! A loop turn's writes through io_uring: the UDP datagrams to peers and the end-of-turn
//! writes to clients leave in one `io_uring_enter` instead of a system call each.
//!
//! Every byte the kernel reads belongs to this struct: a datagram is copied into one of
//! [`UDP_SLOTS`] slots, a connection's output (for TLS, its records) into the arena. Sends
//! carry `MSG_DONTWAIT`, which io_uring honours by completing with `EAGAIN` instead of
//! waiting for room, so every send completes inside the `io_uring_enter` that submits it;
//! [`Sends::submit`] still waits for each completion before it returns, and a slot or the
//! arena is written again only after that. A short write to a client leaves the rest
//! queued on the connection, ahead of anything later (see `conn::finish_batched`).
//!
//! The descriptors named in the queued sends must stay open until they are submitted: a
//! relay socket the core closes in the meantime is kept in `StreamRelays::closing` until the
//! end of the turn, after the last submission, so its number cannot be reused under a send.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};
use portico_shared::counters::Counter;

use crate::io::sockaddr::{self, SOCKADDR_LEN};
use crate::io::BUF_SIZE;
use crate::server::Stats;

/// Datagrams queued before they are submitted mid-turn.
pub(super) const UDP_SLOTS: usize = 64;
/// Client writes per submission.
pub(super) const TCP_BATCH: usize = 128;
/// Room for the client writes of one submission. A connection whose output does not fit
/// an empty arena is written directly.
const ARENA: usize = 256 * 1024;
const SQ_ENTRIES: u32 = 256;
const _: () = assert!(UDP_SLOTS + TCP_BATCH <= SQ_ENTRIES as usize);

const KIND_TCP: u64 = 1 << 63;

/// A datagram's kernel-visible arguments.
struct UdpSlot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    name: [u8; SOCKADDR_LEN],
    len: usize,
}

/// A client write of the current submission: `len` bytes at `start` of the arena.
pub(super) struct TcpSend {
    /// The connection's slot.
    pub(super) idx: usize,
    start: usize,
    pub(super) len: usize,
    /// The completion: bytes written, or a negative errno.
    pub(super) result: i32,
}

impl TcpSend {
    /// Bytes the socket took (0 for a full socket); `None` for an error that closes the
    /// connection.
    pub(super) fn written(&self) -> Option<usize> {
        match self.result {
            n if n >= 0 => Some((n as usize).min(self.len)),
            e if e == -libc::EAGAIN || e == -libc::EINTR => Some(0),
            _ => None,
        }
    }
}

pub(super) struct Sends {
    // Field order is drop order: the ring goes before the memory its sends point at.
    ring: IoUring,
    slots: Box<[UdpSlot]>,
    bufs: Box<[u8]>,
    udp: usize,
    tcp: Vec<TcpSend>,
    arena: Vec<u8>,
    /// An `io_uring_enter` failed with sends possibly still queued: nothing of ours is
    /// handed to the ring again (the thread writes directly from then on).
    broken: bool,
}

impl Sends {
    pub(super) fn new() -> io::Result<Sends> {
        let mut b = IoUring::builder();
        b.setup_single_issuer().setup_defer_taskrun();
        let ring = match b.build(SQ_ENTRIES) {
            Ok(r) => r,
            Err(_) => IoUring::new(SQ_ENTRIES)?,
        };
        let mut p = io_uring::Probe::new();
        ring.submitter().register_probe(&mut p)?;
        if !p.is_supported(opcode::SendMsg::CODE) || !p.is_supported(opcode::Send::CODE) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "kernel lacks send/sendmsg for io_uring",
            ));
        }
        let slots = (0..UDP_SLOTS)
            .map(|_| UdpSlot {
                // SAFETY: msghdr is a plain C struct; all-zero is its empty value.
                hdr: unsafe { std::mem::zeroed() },
                iov: libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
                name: [0; SOCKADDR_LEN],
                len: 0,
            })
            .collect();
        Ok(Sends {
            ring,
            slots,
            bufs: vec![0u8; UDP_SLOTS * BUF_SIZE].into_boxed_slice(),
            udp: 0,
            tcp: Vec::with_capacity(TCP_BATCH),
            arena: Vec::with_capacity(ARENA),
            broken: false,
        })
    }

    pub(super) fn usable(&self) -> bool {
        !self.broken
    }

    /// Sends waiting for [`submit`](Self::submit).
    pub(super) fn queued(&self) -> bool {
        self.udp > 0 || !self.tcp.is_empty()
    }

    /// Queues a datagram from `fd` to `to`. False when it must be sent directly (the ring
    /// is unusable, or the datagram is larger than a slot); the caller submits first when
    /// [`udp_full`](Self::udp_full).
    pub(super) fn queue_udp(&mut self, fd: RawFd, payload: &[u8], to: SocketAddr) -> bool {
        if self.broken || self.udp >= UDP_SLOTS || payload.len() > BUF_SIZE {
            return false;
        }
        let i = self.udp;
        let buf = &mut self.bufs[i * BUF_SIZE..i * BUF_SIZE + payload.len()];
        buf.copy_from_slice(payload);
        let slot = &mut self.slots[i];
        let namelen = sockaddr::encode(to, &mut slot.name);
        slot.iov.iov_base = buf.as_mut_ptr().cast();
        slot.iov.iov_len = payload.len();
        slot.hdr.msg_name = slot.name.as_mut_ptr().cast();
        slot.hdr.msg_namelen = namelen;
        slot.hdr.msg_iov = &mut slot.iov;
        slot.hdr.msg_iovlen = 1;
        slot.len = payload.len();
        let e = opcode::SendMsg::new(types::Fd(fd), &slot.hdr)
            .flags((libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32)
            .build()
            .user_data(i as u64);
        // SAFETY: the slot's header, name and buffer are this struct's, not written again
        // until the send's completion is reaped in `submit`, and outlive the ring.
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            return false;
        }
        self.udp += 1;
        true
    }

    pub(super) fn udp_full(&self) -> bool {
        self.udp >= UDP_SLOTS
    }

    /// Whether another client write fits this submission.
    pub(super) fn tcp_room(&self) -> bool {
        !self.broken && self.tcp.len() < TCP_BATCH
    }

    /// Room left in the arena for a client write.
    pub(super) fn arena_room(&self) -> usize {
        ARENA - self.arena.len()
    }

    /// Stages a write to client connection `idx` on `fd`: `fill` appends its bytes to the
    /// arena (at most `arena_room` of them). False, with nothing staged, when there is no
    /// room or `fill` added nothing.
    pub(super) fn queue_tcp(
        &mut self,
        idx: usize,
        fd: RawFd,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> bool {
        // Room in the submission queue is checked before `fill` takes anything out of rustls.
        if !self.tcp_room() || self.ring.submission().is_full() {
            return false;
        }
        let start = self.arena.len();
        fill(&mut self.arena);
        if self.arena.len() > ARENA {
            // `fill` must stay within the room it was given; never let the arena move.
            self.arena.truncate(start);
            return false;
        }
        let len = self.arena.len() - start;
        if len == 0 {
            return false;
        }
        let i = self.tcp.len();
        // In bounds: start + len <= arena.len(); the arena never reallocates (capacity ARENA).
        let ptr = self.arena[start..].as_ptr();
        let e = opcode::Send::new(types::Fd(fd), ptr, len as u32)
            .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            .build()
            .user_data(KIND_TCP | i as u64);
        // SAFETY: the bytes are in the arena, which is not written again (nor moved) until
        // this send's completion is reaped in `submit`, and outlives the ring.
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            self.arena.truncate(start);
            return false;
        }
        self.tcp.push(TcpSend {
            idx,
            start,
            len,
            result: 0,
        });
        true
    }

    /// The bytes of a staged client write from `offset` on (what a short write left).
    pub(super) fn rest(&self, send: &TcpSend, offset: usize) -> &[u8] {
        let end = send.start + send.len;
        self.arena.get(send.start + offset..end).unwrap_or(&[])
    }

    /// Submits everything queued in one `io_uring_enter` and waits for every completion.
    /// Datagrams are counted in `stats`; the client writes' results are in the returned
    /// list, to be finished by the caller, then handed back with [`done`](Self::done).
    pub(super) fn submit(&mut self, stats: &mut Stats) -> Vec<TcpSend> {
        let want = self.udp + self.tcp.len();
        let mut tcp = std::mem::take(&mut self.tcp);
        if want == 0 {
            return tcp;
        }
        let mut got = 0;
        let mut failures = 0;
        // Every send completes inside the submission (`MSG_DONTWAIT`); the timeout only
        // guards against a kernel that would wait on a full socket instead.
        let ts = types::Timespec::new().sec(1);
        let args = types::SubmitArgs::new().timespec(&ts);
        while got < want {
            match self.ring.submitter().submit_with_args(want - got, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) && failures < 100 =>
                {
                    failures += 1;
                }
                Err(e) => {
                    let why = if e.raw_os_error() == Some(libc::ETIME) {
                        "a send did not complete at once".to_string()
                    } else {
                        e.to_string()
                    };
                    tracing::error!(
                        "TCP thread: io_uring submission failed ({why}); writing directly from now on"
                    );
                    self.broken = true;
                    break;
                }
            }
            for cqe in self.ring.completion() {
                got += 1;
                let data = cqe.user_data();
                let res = cqe.result();
                if data & KIND_TCP != 0 {
                    if let Some(t) = tcp.get_mut((data & !KIND_TCP) as usize) {
                        t.result = res;
                    }
                } else if res < 0 {
                    stats.incr(Counter::SendErrors);
                } else {
                    stats.incr(Counter::TxPackets);
                    stats.add(Counter::TxBytes, res as u64);
                }
            }
        }
        if self.broken {
            // Completions may still come for what was queued: leave the memory alone.
            for t in &mut tcp {
                if t.result == 0 {
                    t.result = -libc::EIO;
                }
            }
            self.udp = UDP_SLOTS;
        } else {
            self.udp = 0;
        }
        tcp
    }

    /// Takes back the list [`submit`](Self::submit) returned, once the caller is done with
    /// the arena's bytes.
    pub(super) fn done(&mut self, mut tcp: Vec<TcpSend>) {
        tcp.clear();
        if self.tcp.capacity() == 0 {
            self.tcp = tcp;
        }
        if !self.broken {
            self.arena.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsRawFd;

    /// Real sockets on loopback: queued datagrams leave in order in one submission and are
    /// counted; writes to a connection whose peer does not read come back short or refused
    /// (`EAGAIN`) instead of waiting, and the bytes the peer then reads are exactly those the
    /// completions said were written, in order.
    #[test]
    fn one_submission_sends_datagrams_and_never_waits_on_a_full_socket() {
        let Ok(mut sends) = Sends::new() else {
            eprintln!("LOUD SKIP: io_uring is not available here");
            return;
        };
        let mut stats = Stats::default();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        for i in 0..5u8 {
            assert!(sends.queue_udp(tx.as_raw_fd(), &[i; 100], to));
        }
        let none = sends.submit(&mut stats);
        assert!(none.is_empty());
        sends.done(none);
        assert_eq!(stats.get(Counter::TxPackets), 5);
        let mut buf = [0u8; 200];
        for i in 0..5u8 {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!((n, from, buf[0]), (100, tx.local_addr().unwrap(), i));
        }

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server_side, _) = l.accept().unwrap();
        let mut expect = Vec::new();
        let mut refused = false;
        for round in 0..1000u32 {
            let chunk: Vec<u8> = (0..60_000u32)
                .map(|i| ((round * 7 + i) % 251) as u8)
                .collect();
            assert!(sends.queue_tcp(3, client.as_raw_fd(), |a| a.extend_from_slice(&chunk)));
            let done = sends.submit(&mut stats);
            assert_eq!((done.len(), done[0].idx, done[0].len), (1, 3, chunk.len()));
            let w = done[0].written().expect("a full socket is not an error");
            assert_eq!(sends.rest(&done[0], w), &chunk[w..]);
            sends.done(done);
            expect.extend_from_slice(&chunk[..w]);
            if w < chunk.len() {
                refused = true;
                break;
            }
        }
        assert!(refused, "the socket never filled");
        drop(client);
        let mut got = Vec::new();
        server_side.read_to_end(&mut got).unwrap();
        assert!(
            got == expect,
            "{} bytes read, {} written",
            got.len(),
            expect.len()
        );
    }
}
