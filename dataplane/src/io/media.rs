//! The media core's control-plane role ([`MediaControl`]) on the shared-memory segment: a
//! worker takes up the session requests addressed to it, publishes its sessions with their
//! counters, and frees their records when they end.

use std::net::SocketAddr;
use std::sync::Arc;

use portico_shared::shm::{
    LegCounters, MediaFailure, MEDIA_ACTIVE, MEDIA_DELETING, MEDIA_REQUESTED, MEDIA_TAKEN,
};

use super::Shared;
use crate::media::{Command, MediaControl};

pub struct ShmMedia {
    pub shared: Arc<Shared>,
    /// This thread's index (the TCP thread's is past the workers': it takes nothing).
    pub index: usize,
    /// The last [`portico_shared::shm::Segment::media_pending`] value scanned for.
    pub seen: u64,
}

impl ShmMedia {
    pub fn new(shared: Arc<Shared>, index: usize) -> ShmMedia {
        ShmMedia {
            shared,
            index,
            seen: 0,
        }
    }

    /// Whether a record addressed to `worker` is this thread's (a request addressed to a
    /// worker of an earlier dataplane with more workers goes to `worker % workers`).
    fn mine(&self, worker: u64) -> bool {
        let n = self.shared.workers as u64;
        n > 0 && (self.index as u64) < n && worker % n == self.index as u64
    }
}

impl MediaControl for ShmMedia {
    fn worker(&self) -> (usize, usize) {
        (self.index, self.shared.workers)
    }

    fn commands(&mut self, out: &mut Vec<Command>) {
        let seg = self.shared.shm.segment();
        let pending = seg.media_pending();
        if pending == self.seen {
            return;
        }
        self.seen = pending;
        for (i, r) in seg.media_records() {
            let state = r.state();
            if state != MEDIA_REQUESTED && state != MEDIA_DELETING {
                continue;
            }
            if !self.mine(r.worker()) {
                continue;
            }
            if state == MEDIA_DELETING {
                out.push(Command::Delete { record: i });
            } else if let Some(req) = r.take(i) {
                out.push(Command::Create(req));
            }
        }
    }

    fn created(&mut self, record: usize, locals: [SocketAddr; 2]) {
        if let Some(r) = self.shared.shm.segment().media_record(record) {
            r.activate(locals);
        }
    }

    fn failed(&mut self, record: usize, why: MediaFailure) {
        if let Some(r) = self.shared.shm.segment().media_record(record) {
            r.fail(why);
        }
    }

    fn publish(&mut self, record: usize, legs: [(Option<SocketAddr>, LegCounters); 2]) {
        if let Some(r) = self.shared.shm.segment().media_record(record) {
            r.publish(legs);
        }
    }

    fn ended(&mut self, record: usize) {
        if let Some(r) = self.shared.shm.segment().media_record(record) {
            r.free();
        }
    }
}

/// Frees the records of sessions a previous dataplane process held: their sockets died with
/// it. Requests not yet taken up stay for the new workers.
pub fn forget_dead_sessions(shared: &Shared) {
    for (_, r) in shared.shm.segment().media_records() {
        let s = r.state();
        if s == MEDIA_ACTIVE || s == MEDIA_DELETING || s == MEDIA_TAKEN {
            r.free();
        }
    }
}
