//! The provided-buffer ring of one io_uring worker: the only `unsafe` of the packet buffers.
//!
//! The kernel picks a free buffer from this ring for each received datagram and names it in
//! the completion (buffer id). The worker then owns that buffer until it gives it back with
//! [`BufRing::give_back`]; in between it may rewrite it in place and hand it to a send.
//!
//! # Invariants
//!
//! 1. The ring entries live in an anonymous, page-aligned mapping of `entries * 16` bytes,
//!    `entries` a power of two ≤ 32768, as `IORING_REGISTER_PBUF_RING` requires. The packet
//!    memory is one heap block of `entries * buf_size` bytes that is never reallocated. Both
//!    live until `Drop`, and the owner (the io_uring worker) declares its `IoUring` before the
//!    `BufRing`, so the ring (and with it the registration) is gone before this memory is
//!    freed.
//! 2. A buffer id is in exactly one of three states: offered to the kernel (in the ring
//!    between head and tail), delivered (named by a receive completion, owned by the worker), or
//!    in flight in a send (owned by the kernel until the send completes). Only a delivered or
//!    completed-send buffer is touched by [`BufRing::buf_mut`] or given back, and each id is
//!    given back exactly once per delivery: the worker's loop guarantees this by returning a
//!    buffer either at once (no reply) or on its send's completion.
//! 3. The tail is published with a `Release` store after the entries are written, so the
//!    kernel never reads a half-written entry.

use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;
use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};

pub struct BufRing {
    ring: NonNull<BufRingEntry>,
    ring_bytes: usize,
    entries: u16,
    /// Local tail, published to the kernel by [`BufRing::publish`].
    tail: u16,
    bufs: NonNull<u8>,
    bufs_layout: std::alloc::Layout,
    buf_size: usize,
    bgid: u16,
}

impl BufRing {
    pub fn new(entries: u16, buf_size: usize, bgid: u16) -> io::Result<BufRing> {
        if !entries.is_power_of_two() || entries > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer ring size must be a power of two up to 32768",
            ));
        }
        let ring_bytes = usize::from(entries) * std::mem::size_of::<BufRingEntry>();
        let len = NonZeroUsize::new(ring_bytes)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh private anonymous mapping; it aliases nothing.
        let ring = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_POPULATE,
            )
        }
        .map_err(io::Error::from)?
        .cast::<BufRingEntry>();
        let bufs_layout = std::alloc::Layout::from_size_align(usize::from(entries) * buf_size, 64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size (entries and buf_size are non-zero).
        let bufs = NonNull::new(unsafe { std::alloc::alloc_zeroed(bufs_layout) })
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let mut r = BufRing {
            ring,
            ring_bytes,
            entries,
            tail: 0,
            bufs,
            bufs_layout,
            buf_size,
            bgid,
        };
        for bid in 0..entries {
            r.give_back(bid);
        }
        r.publish();
        Ok(r)
    }

    /// Registers the ring with `uring` under this ring's group id.
    pub fn register(&self, uring: &IoUring) -> io::Result<()> {
        // SAFETY: invariant 1: the ring memory stays valid and registered memory outlives the
        // registration because the io_uring is dropped first.
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                self.ring.as_ptr() as u64,
                self.entries,
                self.bgid,
                0,
            )
        }
    }

    pub fn group(&self) -> u16 {
        self.bgid
    }

    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    pub fn count(&self) -> u16 {
        self.entries
    }

    /// Pointer to a buffer, for a send's iovec.
    pub fn buf_ptr(&self, bid: u16) -> *mut u8 {
        let i = usize::from(bid % self.entries);
        // SAFETY: i < entries, so the offset stays inside the allocation.
        unsafe { self.bufs.as_ptr().add(i * self.buf_size) }
    }

    /// The buffer a completion delivered.
    ///
    /// # Safety
    /// `bid` must be delivered and not yet given back or in flight (invariant 2); the
    /// returned slice must be dropped before the buffer is given back or sent.
    pub unsafe fn buf_mut(&mut self, bid: u16) -> &mut [u8] {
        // SAFETY: `buf_ptr` points at `buf_size` bytes inside the allocation; the caller
        // guarantees the kernel does not own the buffer and no other slice of it is alive.
        unsafe { std::slice::from_raw_parts_mut(self.buf_ptr(bid), self.buf_size) }
    }

    /// Offers a buffer to the kernel again (visible after [`BufRing::publish`]).
    pub fn give_back(&mut self, bid: u16) {
        let bid = bid % self.entries;
        let idx = usize::from(self.tail & (self.entries - 1));
        // SAFETY: idx < entries, inside the ring mapping; the kernel does not read entries at
        // or past the published tail, so this write races with nothing (invariant 3).
        let entry = unsafe { &mut *self.ring.as_ptr().add(idx) };
        entry.set_addr(self.buf_ptr(bid) as u64);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes all given-back buffers visible to the kernel.
    pub fn publish(&mut self) {
        // SAFETY: the tail field lives inside the first ring entry (the kernel ABI overlays
        // it on `resv`), which is valid, aligned for u16, and only ever accessed atomically by
        // us and the kernel.
        let tail =
            unsafe { AtomicU16::from_ptr(BufRingEntry::tail(self.ring.as_ptr()) as *mut u16) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: invariant 1: the io_uring that registered this memory is already dropped,
        // and these are the mapping and allocation made in `new`.
        unsafe {
            let _ = munmap(self.ring.cast(), self.ring_bytes);
            std::alloc::dealloc(self.bufs.as_ptr(), self.bufs_layout);
        }
    }
}
