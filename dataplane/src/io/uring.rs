//! The io_uring driver: one ring per worker thread.
//!
//! Each socket has one multishot `recvmsg` armed; the kernel writes each datagram, with its
//! source address in front, into a buffer it takes from the worker's provided-buffer ring.
//! The server rewrites the buffer in place, and the reply goes out with a `sendmsg` that
//! points into the same buffer; the buffer returns to the ring when that send completes. All
//! submissions of one loop turn go to the kernel in the single `io_uring_enter` that also
//! waits for the next completions. Nothing on this path allocates or locks: the `msghdr`s the
//! kernel reads live in per-buffer slots allocated once at start.

use std::io;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use portico_shared::counters::Counter;
use portico_shared::shm::WorkerCounters;

use super::bufring::BufRing;
use super::sockaddr::{self, SOCKADDR_LEN};
use super::{SettingsWatch, Shared, BUF_SIZE, TICK};
use crate::server::{Action, Server, Transport};

/// Buffers per worker: enough to absorb a burst of a few thousand datagrams while replies
/// are in flight.
const BUFFERS: u16 = 4096;
const BUFFER_GROUP: u16 = 0;
const SQ_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 8192;
/// Completions handled per batch before their sends are queued.
const CQ_BATCH: usize = 256;

/// Layout the kernel writes at the start of each multishot `recvmsg` buffer
/// (`struct io_uring_recvmsg_out`), then the name, then the payload.
const RECVMSG_OUT_LEN: usize = 16;
/// Where the datagram starts in a buffer: fixed, because the kernel reserves the full
/// `msg_namelen` whatever the real address length.
pub const PAYLOAD_OFFSET: usize = RECVMSG_OUT_LEN + SOCKADDR_LEN;
/// Room for a datagram (and for the reply written over it).
pub const PAYLOAD_CAPACITY: usize = BUF_SIZE - PAYLOAD_OFFSET;

const KIND_RECV: u64 = 1 << 56;
const KIND_SEND: u64 = 2 << 56;
const KIND_MASK: u64 = 0xff << 56;

/// A send's kernel-visible arguments; one per buffer id, so a send never needs memory of its
/// own.
struct SendSlot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    name: [u8; SOCKADDR_LEN],
}

struct Worker {
    // Field order is drop order: the ring (and its registration of `bufs`) goes first.
    ring: IoUring,
    bufs: BufRing,
    sockets: Vec<UdpSocket>,
    recv_hdrs: Box<[libc::msghdr]>,
    send_slots: Box<[SendSlot]>,
    rearm: Vec<bool>,
}

fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is a plain C struct of integers and pointers; all-zero is its documented
    // empty value.
    unsafe { std::mem::zeroed() }
}

/// Checks that this kernel and process allow what the driver needs.
pub fn probe() -> io::Result<()> {
    // `bufs` is declared first so that it is dropped after `ring`.
    let bufs = BufRing::new(8, 64, BUFFER_GROUP)?;
    let ring = IoUring::new(8)?;
    bufs.register(&ring)?;
    let mut p = io_uring::Probe::new();
    ring.submitter().register_probe(&mut p)?;
    for code in [opcode::RecvMsg::CODE, opcode::SendMsg::CODE] {
        if !p.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "kernel lacks recvmsg/sendmsg for io_uring",
            ));
        }
    }
    Ok(())
}

fn build_ring() -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(CQ_ENTRIES)
        .setup_single_issuer()
        .setup_defer_taskrun();
    match b.build(SQ_ENTRIES) {
        Ok(r) => Ok(r),
        // Older kernels: plain ring.
        Err(_) => IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES),
    }
}

impl Worker {
    fn new(sockets: Vec<UdpSocket>) -> io::Result<Worker> {
        let ring = build_ring()?;
        let bufs = BufRing::new(BUFFERS, BUF_SIZE, BUFFER_GROUP)?;
        bufs.register(&ring)?;
        let recv_hdrs = sockets
            .iter()
            .map(|_| {
                let mut h = zeroed_msghdr();
                h.msg_namelen = SOCKADDR_LEN as u32;
                h
            })
            .collect();
        let send_slots = (0..BUFFERS)
            .map(|_| SendSlot {
                hdr: zeroed_msghdr(),
                iov: libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
                name: [0; SOCKADDR_LEN],
            })
            .collect();
        let rearm = vec![true; sockets.len()];
        Ok(Worker {
            ring,
            bufs,
            sockets,
            recv_hdrs,
            send_slots,
            rearm,
        })
    }

    /// Queues an entry, flushing the submission queue once if it is full.
    ///
    /// # Safety
    /// The memory the entry points at must stay valid until its completion.
    unsafe fn push(&mut self, e: &squeue::Entry) -> io::Result<()> {
        if self.ring.submission().push(e).is_ok() {
            return Ok(());
        }
        self.ring.submit()?;
        self.ring
            .submission()
            .push(e)
            .map_err(|_| io::Error::new(io::ErrorKind::WouldBlock, "submission queue full"))
    }

    fn arm_receives(&mut self) -> io::Result<()> {
        for i in 0..self.sockets.len() {
            if !self.rearm[i] {
                continue;
            }
            let fd = types::Fd(self.sockets[i].as_raw_fd());
            let e = opcode::RecvMsgMulti::new(fd, &self.recv_hdrs[i], self.bufs.group())
                .build()
                .user_data(KIND_RECV | i as u64);
            // SAFETY: recv_hdrs is a boxed slice that lives as long as the ring (field order),
            // and the buffer group is registered.
            unsafe { self.push(&e)? };
            self.rearm[i] = false;
        }
        Ok(())
    }

    fn on_recv(
        &mut self,
        cqe: &cqueue::Entry,
        server: &mut Server,
        now: Instant,
        stats: &WorkerCounters,
    ) {
        let socket = (cqe.user_data() & 0xffff) as usize;
        let flags = cqe.flags();
        if !cqueue::more(flags) && socket < self.rearm.len() {
            self.rearm[socket] = true;
        }
        let res = cqe.result();
        if res < 0 {
            if -res == libc::ENOBUFS {
                stats.incr(Counter::DropNoBuffer);
            }
            return;
        }
        let Some(bid) = cqueue::buffer_select(flags) else {
            return;
        };
        let filled = res as usize;
        // SAFETY: the completion delivered `bid` to us (invariant 2 of bufring); the slice is
        // dropped before the buffer is given back or sent.
        let buf = unsafe { self.bufs.buf_mut(bid) };
        let field = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let payload_len = field(8) as usize;
        let msg_flags = field(12) as i32;
        stats.incr(Counter::RxPackets);
        stats.add(Counter::RxBytes, payload_len as u64);
        if msg_flags & libc::MSG_TRUNC != 0 || filled < PAYLOAD_OFFSET {
            stats.incr(Counter::DropTruncated);
            self.bufs.give_back(bid);
            return;
        }
        let Some(from) = sockaddr::decode(&buf[RECVMSG_OUT_LEN..PAYLOAD_OFFSET]) else {
            stats.incr(Counter::DropBadSource);
            self.bufs.give_back(bid);
            return;
        };
        let len = (filled - PAYLOAD_OFFSET).min(payload_len);
        let action = server.handle(
            now,
            Transport::Udp,
            socket,
            from,
            &mut buf[PAYLOAD_OFFSET..],
            len,
            stats,
        );
        match action {
            Action::Drop => self.bufs.give_back(bid),
            Action::Reply { len, socket, to } => {
                if self.send(bid, len, socket, to).is_err() {
                    stats.incr(Counter::SendErrors);
                    self.bufs.give_back(bid);
                }
            }
        }
    }

    fn send(
        &mut self,
        bid: u16,
        len: usize,
        socket: usize,
        to: std::net::SocketAddr,
    ) -> io::Result<()> {
        let fd = self
            .sockets
            .get(socket)
            .map(|s| s.as_raw_fd())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let base = self.bufs.buf_ptr(bid);
        let slot = &mut self.send_slots[usize::from(bid)];
        let namelen = sockaddr::encode(to, &mut slot.name);
        // SAFETY: PAYLOAD_OFFSET + len <= BUF_SIZE because the server writes replies inside
        // the slice it was given.
        slot.iov.iov_base = unsafe { base.add(PAYLOAD_OFFSET) }.cast();
        slot.iov.iov_len = len.min(PAYLOAD_CAPACITY);
        slot.hdr.msg_name = slot.name.as_mut_ptr().cast();
        slot.hdr.msg_namelen = namelen;
        slot.hdr.msg_iov = &mut slot.iov;
        slot.hdr.msg_iovlen = 1;
        let e = opcode::SendMsg::new(types::Fd(fd), &slot.hdr)
            .build()
            .user_data(KIND_SEND | u64::from(bid));
        // SAFETY: the slot and the buffer belong to `bid`, which stays in flight (untouched by
        // us) until this send completes; both live as long as the ring.
        unsafe { self.push(&e) }
    }

    fn on_send(&mut self, cqe: &cqueue::Entry, stats: &WorkerCounters) {
        let bid = (cqe.user_data() & 0xffff) as u16;
        let res = cqe.result();
        if res < 0 {
            stats.incr(Counter::SendErrors);
        } else {
            stats.incr(Counter::TxPackets);
            stats.add(Counter::TxBytes, res as u64);
        }
        self.bufs.give_back(bid);
    }
}

/// Runs one worker until the dataplane stops.
pub fn run(index: usize, shared: Arc<Shared>, sockets: Vec<UdpSocket>) -> io::Result<()> {
    let mut w = Worker::new(sockets)?;
    let mut server = Server::new(shared.current_settings());
    let mut watch = SettingsWatch::new(&shared);
    let stats = shared.shm.segment().counters(index);
    let ts = types::Timespec::from(TICK);
    let args = types::SubmitArgs::new().timespec(&ts);
    let mut batch: Vec<cqueue::Entry> = Vec::with_capacity(CQ_BATCH);
    w.arm_receives()?;
    while !shared.stopping() {
        match w.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        stats.incr(Counter::LoopTurns);
        watch.refresh(&shared, &mut server);
        let now = Instant::now();
        loop {
            batch.clear();
            batch.extend(w.ring.completion().take(CQ_BATCH));
            if batch.is_empty() {
                break;
            }
            for cqe in &batch {
                match cqe.user_data() & KIND_MASK {
                    KIND_RECV => w.on_recv(cqe, &mut server, now, stats),
                    KIND_SEND => w.on_send(cqe, stats),
                    _ => {}
                }
            }
            w.bufs.publish();
        }
        w.bufs.publish();
        w.arm_receives()?;
    }
    Ok(())
}
