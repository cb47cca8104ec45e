//! The io_uring driver: one ring per worker thread.
//!
//! Each socket (listen and relay) has one multishot `recvmsg` armed; the kernel writes each
//! datagram, with its source address in front, into a buffer it takes from the worker's
//! provided-buffer ring. The server rewrites the buffer in place, and the reply or relayed
//! packet goes out with a `sendmsg` that points into the same buffer; the buffer returns to
//! the ring when that send completes. All submissions of one loop turn go to the kernel in the
//! single `io_uring_enter` that also waits for the next completions. Nothing on this path
//! allocates or locks: the `msghdr`s the kernel reads live in per-buffer slots allocated once.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use portico_shared::counters::Counter;

use super::bufring::BufRing;
use super::relay::{self, Reservations, Slots};
use super::sockaddr::{self, SOCKADDR_LEN};
use super::steer::{self, Steering, WorkerSockets};
use super::{fold, SettingsWatch, Shared, BUF_SIZE, MEDIA_TICK, TICK};
use crate::server::{Action, Now, Received, Server, Stats, Transport, HEADROOM};
use crate::turn::{RelayIo, Reserved};

/// Buffers per worker: enough to absorb a burst of a few thousand datagrams while replies
/// are in flight.
const BUFFERS: u16 = 4096;
const BUFFER_GROUP: u16 = 0;
const SQ_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 8192;
/// Completions handled per batch before their sends are queued.
const CQ_BATCH: usize = 256;

/// Layout the kernel writes at the start of each multishot `recvmsg` buffer
/// (`struct io_uring_recvmsg_out`), then the name area, then the payload.
const RECVMSG_OUT_LEN: usize = 16;
/// The name area the kernel reserves (whatever the real address length): sized so the
/// payload starts at [`HEADROOM`].
const NAME_AREA: usize = HEADROOM - RECVMSG_OUT_LEN;
/// Where the datagram starts in a buffer.
pub const PAYLOAD_OFFSET: usize = HEADROOM;
/// Room for a datagram; what is left after it is tailroom for padding.
pub const PAYLOAD_CAPACITY: usize = BUF_SIZE - PAYLOAD_OFFSET;

const KIND_RECV: u64 = 1 << 56;
const KIND_SEND: u64 = 2 << 56;
const KIND_CANCEL: u64 = 3 << 56;
const KIND_MASK: u64 = 0xff << 56;

/// The socket index of a worker's steered socket (`turn.relay_mode = "shared"`), past any
/// real one.
const STEERED_INDEX: usize = u32::MAX as usize;

// A steered receive splits the name area between the peer's address and the control
// message carrying the original destination; the payload stays at HEADROOM.
const _: () = assert!(steer::NAME_LEN + steer::CONTROL_LEN == NAME_AREA);

fn recv_data(index: usize, generation: u16) -> u64 {
    KIND_RECV | u64::from(generation) << 32 | index as u64
}

/// A send's kernel-visible arguments; one per buffer id, so a send never needs memory of its
/// own.
struct SendSlot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    name: [u8; SOCKADDR_LEN],
    /// Header bytes written in front of the payload (a steered relay's IPv4 + UDP), not
    /// counted as sent bytes.
    extra: usize,
}

/// A relay: a bound socket, or a steered port with no descriptor of its own.
enum RelaySock {
    Bound(UdpSocket),
    Steered {
        addr: SocketAddrV4,
        dont_fragment: bool,
    },
}

/// This worker's part of the steering: its sockets and its steered relays by address.
struct Steered {
    steering: Arc<Steering>,
    worker: usize,
    sockets: WorkerSockets,
    by_addr: HashMap<SocketAddrV4, usize>,
}

/// Relay sockets plus the ring work their opening and closing needs, queued by the core
/// (through [`RelayIo`]) and submitted by the loop.
struct Relays {
    slots: Slots<RelaySock>,
    reservations: Arc<Reservations>,
    steered: Option<Steered>,
    to_arm: Vec<usize>,
    to_cancel: Vec<u64>,
}

impl Relays {
    /// Stores a bound relay socket and queues its first receive.
    fn start(&mut self, socket: UdpSocket, dont_fragment: bool) -> io::Result<usize> {
        relay::prepare(&socket, dont_fragment)?;
        let (index, _) = self.slots.insert(RelaySock::Bound(socket));
        self.to_arm.push(index);
        Ok(index)
    }
}

impl RelayIo for Relays {
    fn open(&mut self, addr: SocketAddr, dont_fragment: bool) -> io::Result<usize> {
        // Only a specific address and port can be steered: a wildcard socket (a NAT map
        // binding's, port 0) is bound.
        if let (Some(st), SocketAddr::V4(a)) = (self.steered.as_mut(), addr) {
            if a.ip().is_unspecified() || a.port() == 0 {
                let s = self.reservations.bind(addr)?;
                return self.start(s, dont_fragment);
            }
            st.steering.open(a, st.worker)?;
            let (index, _) = self.slots.insert(RelaySock::Steered {
                addr: a,
                dont_fragment,
            });
            st.by_addr.insert(a, index);
            return Ok(index);
        }
        let s = self.reservations.bind(addr)?;
        self.start(s, dont_fragment)
    }

    fn reserve(&mut self, addr: SocketAddr) -> io::Result<Reserved> {
        self.reservations.reserve(addr)
    }

    fn adopt(&mut self, reserved: Reserved, dont_fragment: bool) -> io::Result<usize> {
        let s = self
            .reservations
            .take(reserved)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        self.start(s, dont_fragment)
    }

    fn release(&mut self, reserved: Reserved) {
        self.reservations.release(reserved);
    }

    fn close(&mut self, index: usize) {
        match self.slots.remove(index) {
            Some((RelaySock::Bound(sock), generation)) => {
                // The pending multishot receive holds its own reference to the socket; cancel
                // it so the kernel lets go. Its last completion carries the old generation and
                // is ignored.
                self.to_cancel.push(recv_data(index, generation));
                drop(sock);
            }
            Some((RelaySock::Steered { addr, .. }, _)) => {
                if let Some(st) = self.steered.as_mut() {
                    st.by_addr.remove(&addr);
                    st.steering.close(addr);
                }
            }
            None => {}
        }
    }

    fn local_addr(&self, index: usize) -> Option<SocketAddr> {
        match self.slots.get(index)? {
            RelaySock::Bound(sock) => sock.local_addr().ok(),
            RelaySock::Steered { addr, .. } => Some(SocketAddr::V4(*addr)),
        }
    }
}

struct Worker {
    // Field order is drop order: the ring (and its registration of `bufs`) goes first.
    ring: IoUring,
    bufs: BufRing,
    listen: Vec<UdpSocket>,
    relays: Relays,
    /// One `msghdr` for every receive: the kernel only reads its name and control lengths.
    recv_hdr: Box<libc::msghdr>,
    /// The same for the steered socket: a shorter name area, then the control message.
    steered_hdr: Box<libc::msghdr>,
    send_slots: Box<[SendSlot]>,
    rearm_listen: Vec<bool>,
    rearm_steered: bool,
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
    fn new(
        index: usize,
        listen: Vec<UdpSocket>,
        reservations: Arc<Reservations>,
    ) -> io::Result<Worker> {
        let ring = build_ring()?;
        let bufs = BufRing::new(BUFFERS, BUF_SIZE, BUFFER_GROUP)?;
        bufs.register(&ring)?;
        let mut recv_hdr = Box::new(zeroed_msghdr());
        recv_hdr.msg_namelen = NAME_AREA as u32;
        let mut steered_hdr = Box::new(zeroed_msghdr());
        steered_hdr.msg_namelen = steer::NAME_LEN as u32;
        steered_hdr.msg_controllen = steer::CONTROL_LEN;
        let steered = reservations.steering().and_then(|s| {
            s.take_worker(index).map(|sockets| Steered {
                steering: Arc::clone(s),
                worker: index,
                sockets,
                by_addr: HashMap::new(),
            })
        });
        let send_slots = (0..BUFFERS)
            .map(|_| SendSlot {
                hdr: zeroed_msghdr(),
                iov: libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
                name: [0; SOCKADDR_LEN],
                extra: 0,
            })
            .collect();
        let rearm_listen = vec![true; listen.len()];
        let first = listen.len();
        Ok(Worker {
            ring,
            bufs,
            listen,
            rearm_steered: steered.is_some(),
            relays: Relays {
                slots: Slots::new(first),
                reservations,
                steered,
                to_arm: Vec::with_capacity(64),
                to_cancel: Vec::with_capacity(64),
            },
            recv_hdr,
            steered_hdr,
            send_slots,
            rearm_listen,
        })
    }

    /// The descriptor a receive on socket `index` is armed on.
    fn fd(&self, index: usize) -> Option<i32> {
        match self.listen.get(index) {
            Some(s) => Some(s.as_raw_fd()),
            None => match self.relays.slots.get(index) {
                Some(RelaySock::Bound(s)) => Some(s.as_raw_fd()),
                _ => None,
            },
        }
    }

    /// Queues an entry, flushing the submission queue once if it is full.
    ///
    /// # Safety
    /// The memory the entry points at must stay valid until its completion.
    unsafe fn push(&mut self, e: &squeue::Entry) -> io::Result<()> {
        // SAFETY: the caller guarantees the memory the entry points at outlives its completion,
        // which is what `SubmissionQueue::push` requires.
        if unsafe { self.ring.submission().push(e) }.is_ok() {
            return Ok(());
        }
        self.ring.submit()?;
        // SAFETY: as above.
        unsafe { self.ring.submission().push(e) }
            .map_err(|_| io::Error::new(io::ErrorKind::WouldBlock, "submission queue full"))
    }

    fn arm(&mut self, index: usize, generation: u16) -> io::Result<()> {
        let Some(fd) = self.fd(index) else {
            return Ok(());
        };
        let e = opcode::RecvMsgMulti::new(types::Fd(fd), &*self.recv_hdr, self.bufs.group())
            .build()
            .user_data(recv_data(index, generation));
        // SAFETY: `recv_hdr` is boxed and lives as long as the ring (field order); the buffer
        // group is registered.
        unsafe { self.push(&e) }
    }

    /// Submits the ring work queued this turn: receives to (re-)arm, receives to cancel.
    fn queue_ring_work(&mut self) -> io::Result<()> {
        if self.rearm_steered {
            if let Some(st) = &self.relays.steered {
                let fd = st.sockets.recv.as_raw_fd();
                let e =
                    opcode::RecvMsgMulti::new(types::Fd(fd), &*self.steered_hdr, self.bufs.group())
                        .build()
                        .user_data(recv_data(STEERED_INDEX, 0));
                // SAFETY: `steered_hdr` is boxed and lives as long as the ring (field order);
                // the buffer group is registered.
                unsafe { self.push(&e)? };
            }
            self.rearm_steered = false;
        }
        for i in 0..self.listen.len() {
            if self.rearm_listen[i] {
                self.arm(i, 0)?;
                self.rearm_listen[i] = false;
            }
        }
        while let Some(index) = self.relays.to_arm.pop() {
            if let Some(g) = self.relays.slots.generation(index) {
                if self.relays.slots.get(index).is_some() {
                    self.arm(index, g)?;
                }
            }
        }
        while let Some(data) = self.relays.to_cancel.pop() {
            let e = opcode::AsyncCancel::new(data)
                .build()
                .user_data(KIND_CANCEL);
            // SAFETY: a cancel refers to no memory of ours.
            unsafe { self.push(&e)? };
        }
        Ok(())
    }

    fn on_recv(&mut self, cqe: &cqueue::Entry, server: &mut Server, now: Now) {
        let data = cqe.user_data();
        let index = (data & 0xffff_ffff) as usize;
        let generation = ((data >> 32) & 0xffff) as u16;
        let flags = cqe.flags();
        let is_listen = index < self.listen.len();
        let is_steered = index == STEERED_INDEX;
        let current = is_listen || is_steered || self.relays.slots.is_current(index, generation);
        if !cqueue::more(flags) && current {
            if is_listen {
                self.rearm_listen[index] = true;
            } else if is_steered {
                self.rearm_steered = true;
            } else {
                self.relays.to_arm.push(index);
            }
        }
        let res = cqe.result();
        let bid = cqueue::buffer_select(flags);
        let stats = server.stats_mut();
        if res < 0 {
            if -res == libc::ENOBUFS {
                stats.incr(Counter::DropNoBuffer);
            }
            if let Some(bid) = bid {
                self.bufs.give_back(bid);
            }
            return;
        }
        let Some(bid) = bid else {
            return;
        };
        if !current {
            // A datagram for a relay socket closed since: nobody to give it to.
            self.bufs.give_back(bid);
            return;
        }
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
        let name_end = if is_steered {
            RECVMSG_OUT_LEN + steer::NAME_LEN
        } else {
            PAYLOAD_OFFSET
        };
        let Some(from) = sockaddr::decode(&buf[RECVMSG_OUT_LEN..name_end]) else {
            stats.incr(Counter::DropBadSource);
            self.bufs.give_back(bid);
            return;
        };
        let mut socket = index;
        if is_steered {
            // Which relay the peer sent to: the original destination, then this worker's
            // relay at that address.
            let relay = self.relays.steered.as_ref().and_then(|st| {
                let control_len = (field(4) as usize).min(steer::CONTROL_LEN);
                let dst = steer::orig_dst(&buf[name_end..name_end + control_len])?;
                st.by_addr.get(&dst).copied()
            });
            match relay {
                Some(r) => socket = r,
                None => {
                    stats.incr(Counter::DropNoAllocation);
                    self.bufs.give_back(bid);
                    return;
                }
            }
        }
        let len = (filled - PAYLOAD_OFFSET).min(payload_len);
        let rx = Received {
            transport: Transport::Udp,
            socket,
            from,
            buf,
            start: PAYLOAD_OFFSET,
            len,
        };
        let action = server.handle(now, &mut self.relays, rx);
        match action {
            Action::Drop => self.bufs.give_back(bid),
            Action::Send {
                offset,
                len,
                socket,
                to,
            } => {
                if self.send(bid, offset, len, socket, to).is_err() {
                    server.stats_mut().incr(Counter::SendErrors);
                    self.bufs.give_back(bid);
                }
            }
        }
    }

    fn send(
        &mut self,
        bid: u16,
        offset: usize,
        len: usize,
        socket: usize,
        to: SocketAddr,
    ) -> io::Result<()> {
        if offset + len > BUF_SIZE {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let (fd, offset, len, extra) = match self.relays.slots.get(socket) {
            Some(RelaySock::Steered {
                addr,
                dont_fragment,
            }) => {
                // From a port with no socket: the headers go in front of the payload, and
                // the raw socket sends the whole datagram.
                let (SocketAddr::V4(dst), Some(st)) = (to, self.relays.steered.as_ref()) else {
                    return Err(io::Error::from(io::ErrorKind::InvalidInput));
                };
                let start = offset
                    .checked_sub(steer::HEADERS)
                    .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
                // SAFETY: `bid` is ours until the send completes; the slice is dropped before
                // the send is queued.
                let buf = unsafe { self.bufs.buf_mut(bid) };
                let (head, payload) = buf[start..offset + len].split_at_mut(steer::HEADERS);
                steer::write_headers(head, *addr, dst, payload, *dont_fragment);
                (
                    st.sockets.raw.as_raw_fd(),
                    start,
                    len + steer::HEADERS,
                    steer::HEADERS,
                )
            }
            _ => {
                let fd = self
                    .fd(socket)
                    .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
                (fd, offset, len, 0)
            }
        };
        let base = self.bufs.buf_ptr(bid);
        let slot = &mut self.send_slots[usize::from(bid)];
        slot.extra = extra;
        let namelen = sockaddr::encode(to, &mut slot.name);
        // SAFETY: offset + len <= BUF_SIZE (checked above), inside buffer `bid`.
        slot.iov.iov_base = unsafe { base.add(offset) }.cast();
        slot.iov.iov_len = len;
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

    fn on_send(&mut self, cqe: &cqueue::Entry, stats: &mut Stats) {
        let bid = (cqe.user_data() & 0xffff) as u16;
        let res = cqe.result();
        if res < 0 {
            stats.incr(Counter::SendErrors);
        } else {
            let extra = self.send_slots[usize::from(bid)].extra;
            stats.incr(Counter::TxPackets);
            stats.add(Counter::TxBytes, (res as u64).saturating_sub(extra as u64));
        }
        self.bufs.give_back(bid);
    }
}

/// Runs one worker until the dataplane stops.
pub fn run(index: usize, shared: Arc<Shared>, sockets: Vec<UdpSocket>) -> io::Result<()> {
    let mut w = Worker::new(index, sockets, Arc::clone(&shared.reservations))?;
    let mut server = shared.new_server(index)?;
    let mut watch = SettingsWatch::new(&shared);
    let block = shared.shm.segment().counters(index);
    let ts = types::Timespec::from(TICK);
    let args = types::SubmitArgs::new().timespec(&ts);
    let media_ts = types::Timespec::from(MEDIA_TICK);
    let media_args = types::SubmitArgs::new().timespec(&media_ts);
    let mut batch: Vec<cqueue::Entry> = Vec::with_capacity(CQ_BATCH);
    let mut fast = (shared.fast_path.clone()).map(|f| crate::fastpath::Worker::new(f, &mut server));
    w.queue_ring_work()?;
    while !shared.stopping() {
        let wait = if server.settings().media.ports.is_some() {
            &media_args
        } else {
            &args
        };
        match w.ring.submitter().submit_with_args(1, wait) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        server.stats_mut().incr(Counter::LoopTurns);
        watch.refresh(&shared, &mut server);
        let now = super::now();
        loop {
            batch.clear();
            batch.extend(w.ring.completion().take(CQ_BATCH));
            if batch.is_empty() {
                break;
            }
            for cqe in &batch {
                match cqe.user_data() & KIND_MASK {
                    KIND_RECV => w.on_recv(cqe, &mut server, now),
                    KIND_SEND => w.on_send(cqe, server.stats_mut()),
                    _ => {}
                }
            }
            w.bufs.publish();
        }
        server.tick(now, &mut w.relays);
        if let Some(f) = fast.as_mut() {
            f.sync(&mut server, now);
        }
        fold(server.stats_mut(), block);
        w.bufs.publish();
        w.queue_ring_work()?;
    }
    if let Some(f) = fast.as_mut() {
        f.shutdown(&mut server);
    }
    server.shutdown(super::now(), &mut w.relays);
    fold(server.stats_mut(), block);
    Ok(())
}
