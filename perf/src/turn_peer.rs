//! The TURN generator's peer: the far end of every relayed stream.
//!
//! Like coturn's `turnutils_peer`, it echoes each datagram back to the address it came from
//! (the client's relayed address), so the relay is exercised in both directions. On the way
//! it measures the client-to-peer direction: one-way latency from the client's send stamp,
//! and per-stream arrival, reordering and duplicates. It stamps its own echo time into the
//! payload, from which the client measures the peer-to-client direction.
//!
//! One thread per socket of an `SO_REUSEPORT` group; batched `recvmmsg`/`sendmmsg`.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use socket2::Socket;

use crate::histogram::Histogram;
use crate::stamp::{self, SeqTrack};
use crate::turn_plan::Control;
use crate::udp::{MsgBatch, BATCH};

/// What one peer thread counted.
#[derive(Default)]
pub struct PeerTally {
    /// Arrivals per stream (indexed by stream id).
    pub streams: Vec<SeqTrack>,
    pub received: u64,
    pub echoed: u64,
    /// Datagrams that were not this run's test packets (echoed anyway, like any echo peer).
    pub foreign: u64,
    pub send_errors: u64,
    pub latency: Histogram,
}

impl PeerTally {
    pub fn merge(&mut self, o: PeerTally) {
        if self.streams.len() < o.streams.len() {
            self.streams.resize(o.streams.len(), SeqTrack::default());
        }
        for (a, b) in self.streams.iter_mut().zip(o.streams.iter()) {
            a.merge_counts(b);
        }
        self.received += o.received;
        self.echoed += o.echoed;
        self.foreign += o.foreign;
        self.send_errors += o.send_errors;
        self.latency.merge(&o.latency);
    }

    /// Per-stream counts summed.
    pub fn totals(&self) -> SeqTrack {
        let mut t = SeqTrack::default();
        for s in &self.streams {
            t.merge_counts(s);
        }
        t
    }
}

/// Echoes until `control.peer_stop` is set. `sock` must be blocking with a short receive
/// timeout (see [`crate::udp::reuseport_sockets`]) so the stop flag is noticed.
pub fn run(
    sock: Socket,
    start: Instant,
    nonce: u32,
    streams: usize,
    control: &Control,
) -> PeerTally {
    let fd = sock.as_raw_fd();
    let mut t = PeerTally {
        streams: vec![SeqTrack::default(); streams],
        ..PeerTally::default()
    };
    let mut batch = MsgBatch::new(BATCH, 2048, true);
    let now_ns = || start.elapsed().as_nanos() as u64;
    while !control.peer_stop.load(Ordering::Relaxed) {
        let n = match batch.recv(fd, libc::MSG_WAITFORONE) {
            Ok(n) => n,
            // Timeout (the stop check), a signal, or an ICMP error from a relay that went
            // away: nothing to echo.
            Err(_) => continue,
        };
        let now = now_ns();
        let mut ours = 0u64;
        let mut is_ours = [false; BATCH];
        for (i, mine) in is_ours.iter_mut().enumerate().take(n) {
            match stamp::read(batch.datagram(i), nonce) {
                Some(s) => {
                    *mine = true;
                    t.received += 1;
                    ours += 1;
                    if let Some(track) = t.streams.get_mut(s.stream as usize) {
                        if track.record(s.seq) {
                            t.latency.record(now.saturating_sub(s.client_ns));
                        }
                    }
                }
                None => t.foreign += 1,
            }
        }
        control.up_received.fetch_add(ours, Ordering::Relaxed);
        let sent_at = now_ns();
        for (i, _) in is_ours.iter().enumerate().take(n).filter(|(_, m)| **m) {
            stamp::set_peer_time(batch.slot_mut(i), sent_at);
        }
        let mut at = 0;
        while at < n {
            match batch.send(fd, at, n) {
                Ok(k) if k > 0 => {
                    t.echoed += k as u64;
                    at += k;
                }
                _ => {
                    t.send_errors += 1;
                    at += 1;
                }
            }
        }
    }
    t
}
