//! Reading a relay socket's datagrams several at a time (`recvmmsg`).
//!
//! At 50 packets/s per allocation a relay socket mostly holds one datagram when it wakes
//! the thread: reading it with `recv_from` until `EAGAIN` costs two system calls per
//! datagram. One `recvmmsg` with room for [`BATCH`] takes what is there, and when it returns
//! fewer the socket is empty (the kernel stopped at `EAGAIN`; polling is edge-triggered
//! and reports every later arrival), so one call per wake-up is enough.
//!
//! The only `unsafe` is the `recvmmsg` call on headers that point into this struct's own
//! buffers, set up just before the call.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use crate::io::sockaddr::{self, SOCKADDR_LEN};
use crate::io::uring::PAYLOAD_CAPACITY;

/// Datagrams one call can return.
pub(super) const BATCH: usize = 8;
/// Room per datagram: one byte more than a payload may have, so a longer one shows.
const SLOT: usize = PAYLOAD_CAPACITY + 1;

pub(super) struct RecvBatch {
    bufs: Box<[u8]>,
    names: [[u8; SOCKADDR_LEN]; BATCH],
    iovs: [libc::iovec; BATCH],
    hdrs: [libc::mmsghdr; BATCH],
    got: usize,
}

/// One datagram of a batch.
pub(super) struct Datagram<'a> {
    /// `None` for an address of a family the relay does not speak (not expected).
    pub(super) from: Option<SocketAddr>,
    pub(super) payload: &'a [u8],
    /// Longer than [`PAYLOAD_CAPACITY`]: the kernel cut it.
    pub(super) truncated: bool,
}

impl RecvBatch {
    pub(super) fn new() -> Self {
        // SAFETY: `iovec` and `mmsghdr` are plain C structs for which all-zero bytes are a
        // valid value (null pointers, zero lengths).
        let (iovs, hdrs) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        RecvBatch {
            bufs: vec![0u8; SLOT * BATCH].into_boxed_slice(),
            names: [[0; SOCKADDR_LEN]; BATCH],
            iovs,
            hdrs,
            got: 0,
        }
    }

    /// Receives up to [`BATCH`] datagrams from `fd` without waiting; returns how many
    /// (`WouldBlock` when there was none).
    pub(super) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.got = 0;
        let base = self.bufs.as_mut_ptr();
        for i in 0..BATCH {
            // In bounds: `bufs` holds BATCH slots.
            self.iovs[i] = libc::iovec {
                iov_base: base.wrapping_add(i * SLOT).cast(),
                iov_len: SLOT,
            };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = self.names[i].as_mut_ptr().cast();
            h.msg_hdr.msg_namelen = SOCKADDR_LEN as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points at this struct's own name buffer and iovec, each
        // iovec at a distinct SLOT-byte part of `bufs`; all outlive the call, and nothing
        // else touches them during it. `fd` is only read from; a closed one fails with EBADF.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.got = (n as usize).min(BATCH);
        Ok(self.got)
    }

    /// Datagram `i` of the last [`recv`](Self::recv).
    pub(super) fn get(&self, i: usize) -> Option<Datagram<'_>> {
        if i >= self.got {
            return None;
        }
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(SLOT);
        let namelen = (h.msg_hdr.msg_namelen as usize).min(SOCKADDR_LEN);
        Some(Datagram {
            from: sockaddr::decode(&self.names[i][..namelen]),
            payload: &self.bufs[i * SLOT..i * SLOT + len],
            truncated: len > PAYLOAD_CAPACITY || h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    /// Real datagrams over loopback: all come back in order with their source, a short
    /// batch means the socket is empty, an empty socket is `WouldBlock`, and a datagram
    /// longer than a payload is flagged.
    #[test]
    fn receives_several_per_call_and_reports_an_empty_socket() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut batch = RecvBatch::new();
        let err = batch.recv(rx.as_raw_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        for i in 0..BATCH + 3 {
            tx.send_to(&[i as u8; 172], to).unwrap();
        }
        // Loopback delivers synchronously within send_to.
        let mut seen = Vec::new();
        loop {
            let n = match batch.recv(rx.as_raw_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            };
            for i in 0..n {
                let d = batch.get(i).unwrap();
                assert_eq!(d.from, Some(tx.local_addr().unwrap()));
                assert_eq!(d.payload.len(), 172);
                assert!(!d.truncated);
                seen.push(d.payload[0]);
            }
            assert!(batch.get(n).is_none());
            if n < BATCH {
                break;
            }
        }
        let want: Vec<u8> = (0..(BATCH + 3) as u8).collect();
        assert_eq!(seen, want);
        assert_eq!(
            batch.recv(rx.as_raw_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );

        tx.send_to(&vec![7u8; PAYLOAD_CAPACITY + 100], to).unwrap();
        assert_eq!(batch.recv(rx.as_raw_fd()).unwrap(), 1);
        assert!(batch.get(0).unwrap().truncated);
    }
}
