//! The client side of the TURN generator: one thread drives many TURN clients through
//! allocation, media and deletion over one socket.
//!
//! Every client is its own 5-tuple because it has its own loopback source address (see
//! [`crate::udp`]), so the server sees N independent clients while the generator moves their
//! datagrams in batches. Each client runs a small state machine: Allocate (first without
//! credentials, to get the 401 challenge with REALM and NONCE, as a real client does), then
//! CreatePermission and, in channel mode, ChannelBind towards the peer; then it sends
//! stamped packets at its rate (or keeps a window of them in flight, flat out); the
//! allocation, permission and channel are refreshed before they expire; at the end a Refresh
//! with lifetime 0 deletes the allocation. Requests are retransmitted on a doubling timer and
//! a 438 (stale nonce) is retried with the new nonce.
//!
//! In churn mode a client instead loops Allocate → Refresh → delete as fast as the server
//! answers, each cycle from a fresh source address (a new client each time).
//!
//! The thread follows the phases the orchestrator ([`crate::turn_load`]) sets in [`Control`]
//! ([`crate::turn_plan`]) and reports reaching each one, so server CPU can be sampled exactly
//! around the data phase.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use portico_dataplane::stun::{Class, Message};
use socket2::Socket;

use crate::histogram::Histogram;
use crate::stamp::{self, SeqTrack, STAMP_LEN};
use crate::turn_msg::{self, Auth, Reply, Request};
pub use crate::turn_plan::{
    Control, Mode, Plan, PHASE_DATA, PHASE_SETUP, PHASE_TEARDOWN, REACHED_DATA, REACHED_EXIT,
    REACHED_SETUP,
};
use crate::turn_stream::{Streams, Transport};
use crate::udp::{MsgBatch, BATCH};

/// Granted lifetime when a success response carries none (RFC 8656 default).
const DEFAULT_LIFETIME_S: u64 = 600;
/// Refresh permissions (300 s) and channels (600 s) this long after installing them.
const PERMISSION_REFRESH_NS: u64 = 240_000_000_000;
const CHANNEL_REFRESH_NS: u64 = 480_000_000_000;
/// Times a 438 may be retried in a row before the client gives up.
const MAX_STALE: u8 = 3;
/// Timers (retransmissions, refreshes) are looked at this often.
const HOUSEKEEPING_NS: u64 = 5_000_000;
/// Shortest sleep between paced sends.
const PACE_NS: u64 = 100_000;
/// Longest sleep in ppoll: bounds how late a phase change is noticed.
const MAX_WAIT_NS: u64 = 2_000_000;
/// How long teardown and the end of churn wait for outstanding requests.
const WIND_DOWN_NS: u64 = 10_000_000_000;
const RX_SLOT: usize = 2048;
const TX_SLOT: usize = 1536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Idle,
    Allocating,
    Permitting,
    Binding,
    Ready,
    /// Churn: the Refresh between Allocate and delete.
    Refreshing,
    Deleting,
    Done,
    Failed,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    req: Request,
    tid: [u8; 12],
    /// Whether it carried credentials (then a success must verify with our key).
    authed: bool,
    sent_ns: u64,
    tries: u32,
}

struct Client {
    /// Global stream id (also the payload's stream field).
    id: u32,
    src: Ipv4Addr,
    step: Step,
    nonce: Option<Vec<u8>>,
    stale: u8,
    pending: Option<Pending>,
    counter: u32,
    /// Allocated and not yet deleted (teardown deletes it even if a later step failed).
    has_allocation: bool,
    channel: u16,
    started_ns: u64,
    refresh_alloc_ns: u64,
    refresh_perm_ns: u64,
    refresh_chan_ns: u64,
    // Data.
    tx_seq: u32,
    sent: u64,
    rx: SeqTrack,
    last_progress_ns: u64,
    stall_base: u32,
}

/// What one client thread counted.
#[derive(Default)]
pub struct ClientTally {
    pub clients: u64,
    pub allocated: u64,
    pub ready: u64,
    pub failed: u64,
    pub failures: std::collections::BTreeMap<String, u64>,
    pub challenges: u64,
    pub stale_nonces: u64,
    pub retransmits: u64,
    pub unmatched: u64,
    pub bad: u64,
    pub misrouted: u64,
    pub refreshes: u64,
    pub deleted: u64,
    pub delete_failed: u64,
    /// Nanoseconds (from `start`) of the first Allocate and the last client ready.
    pub setup_first_ns: u64,
    pub setup_last_ns: u64,
    /// Allocate sent to ready, per client.
    pub setup_time: Histogram,
    /// Round trip of requests answered at the first try.
    pub request_rtt: Histogram,
    // Data.
    pub up_sent: u64,
    pub send_errors: u64,
    pub behind: u64,
    pub down: SeqTrack,
    pub down_latency: Histogram,
    pub send_end_ns: u64,
    // Churn.
    pub cycles: u64,
    pub cycle_time: Histogram,
}

impl ClientTally {
    fn fail(&mut self, why: impl Into<String>) {
        self.failed += 1;
        *self.failures.entry(why.into()).or_default() += 1;
    }

    pub fn merge(&mut self, o: ClientTally) {
        self.clients += o.clients;
        self.allocated += o.allocated;
        self.ready += o.ready;
        self.failed += o.failed;
        for (k, v) in o.failures {
            *self.failures.entry(k).or_default() += v;
        }
        self.challenges += o.challenges;
        self.stale_nonces += o.stale_nonces;
        self.retransmits += o.retransmits;
        self.unmatched += o.unmatched;
        self.bad += o.bad;
        self.misrouted += o.misrouted;
        self.refreshes += o.refreshes;
        self.deleted += o.deleted;
        self.delete_failed += o.delete_failed;
        if self.setup_first_ns == 0
            || (o.setup_first_ns > 0 && o.setup_first_ns < self.setup_first_ns)
        {
            self.setup_first_ns = o.setup_first_ns;
        }
        self.setup_last_ns = self.setup_last_ns.max(o.setup_last_ns);
        self.setup_time.merge(&o.setup_time);
        self.request_rtt.merge(&o.request_rtt);
        self.up_sent += o.up_sent;
        self.send_errors += o.send_errors;
        self.behind += o.behind;
        self.down.merge_counts(&o.down);
        self.down_latency.merge(&o.down_latency);
        self.send_end_ns = self.send_end_ns.max(o.send_end_ns);
        self.cycles += o.cycles;
        self.cycle_time.merge(&o.cycle_time);
    }
}

/// Outgoing datagrams of one loop pass, sent together.
struct Tx {
    batch: MsgBatch,
    /// Per slot: the local client index of a data packet (counted as sent once it leaves).
    data_of: Vec<Option<u32>>,
    n: usize,
}

/// The thread's state.
struct Gen<'a> {
    plan: &'a Plan,
    control: &'a Control,
    thread: usize,
    fd: RawFd,
    clients: Vec<Client>,
    tx: Tx,
    rx: MsgBatch,
    realm: Option<Vec<u8>>,
    key: [u8; 16],
    t: ClientTally,
    payload: Vec<u8>,
    /// Churn: how many fresh addresses this thread has used.
    fresh: u32,
    /// Clients between their first Allocate and ready (or failed).
    in_setup: usize,
    /// Running totals for the progress line.
    live_sent: u64,
    live_down: u64,
    /// TCP or TLS: a connection per client ([`crate::turn_stream`]); `None` over UDP.
    streams: Option<Streams>,
    /// Frames read off the streams in one pass, and a copy of the datagram being handled.
    frames: Vec<(usize, std::ops::Range<usize>)>,
    frame_data: Vec<u8>,
}

/// Runs one client thread over `sock`; ids `thread`, `thread + threads`, ... up to
/// `plan.clients`.
pub fn run(
    sock: Socket,
    thread: usize,
    plan: &Plan,
    control: &Control,
) -> Result<ClientTally, String> {
    let ids: Vec<u32> = (thread..plan.clients)
        .step_by(plan.threads.max(1))
        .map(|i| i as u32)
        .collect();
    let clients = ids
        .iter()
        .map(|&id| Client {
            id,
            src: plan.client_net.addr(id),
            step: Step::Idle,
            nonce: None,
            stale: 0,
            pending: None,
            counter: 0,
            has_allocation: false,
            channel: 0x4000 + (id % 0x1000) as u16,
            started_ns: 0,
            refresh_alloc_ns: u64::MAX,
            refresh_perm_ns: u64::MAX,
            refresh_chan_ns: u64::MAX,
            tx_seq: 0,
            sent: 0,
            rx: SeqTrack::default(),
            last_progress_ns: 0,
            stall_base: 0,
        })
        .collect();
    let mut payload = vec![0u8; plan.size.max(STAMP_LEN)];
    for (i, b) in payload.iter_mut().enumerate().skip(STAMP_LEN) {
        *b = i as u8;
    }
    let mut g = Gen {
        plan,
        control,
        thread,
        fd: sock.as_raw_fd(),
        clients,
        tx: Tx {
            batch: MsgBatch::new_pktinfo(BATCH, TX_SLOT),
            data_of: vec![None; BATCH],
            n: 0,
        },
        rx: MsgBatch::new_pktinfo(BATCH, RX_SLOT),
        realm: None,
        key: [0; 16],
        t: ClientTally::default(),
        payload,
        fresh: 0,
        in_setup: 0,
        live_sent: 0,
        live_down: 0,
        streams: match plan.transport {
            Transport::Udp => None,
            t => Some(Streams::new(t, plan.alpn, ids.len()).map_err(|e| e.to_string())?),
        },
        frames: Vec::new(),
        frame_data: Vec::new(),
    };
    g.t.clients = g.clients.len() as u64;
    let r = g.drive();
    for c in &g.clients {
        g.t.up_sent += c.sent;
        g.t.down.merge_counts(&c.rx);
    }
    control.reached[thread].store(REACHED_EXIT, Ordering::Release);
    drop(sock);
    r.map(|()| g.t)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Setup,
    WaitData,
    Data,
    Drain,
    WaitTeardown,
    Teardown,
}

impl Gen<'_> {
    fn reach(&self, stage: u8) {
        self.control.reached[self.thread].store(stage, Ordering::Release);
    }

    fn drive(&mut self) -> Result<(), String> {
        let plan = self.plan;
        let churn = plan.mode == Mode::Churn;
        let mut stage = Stage::Setup;
        let mut next_idle = 0usize;
        let mut setup_deadline = 0u64;
        let mut data_start = 0u64;
        let mut data_end = 0u64;
        let mut drain_end = 0u64;
        let mut teardown_end = 0u64;
        let mut ready: Vec<u32> = Vec::new();
        let mut scheduled = 0u64;
        let mut next_housekeeping = 0u64;
        let mut published = (0u64, 0u64, 0u64, 0u64, 0u64);

        loop {
            let now = plan.now_ns();
            let phase = self.control.phase.load(Ordering::Acquire);
            match stage {
                Stage::Setup => {
                    if setup_deadline == 0 {
                        setup_deadline = now + plan.setup_timeout_ns;
                    }
                    if churn {
                        self.reach(REACHED_SETUP);
                        stage = Stage::WaitData;
                        continue;
                    }
                    while self.in_setup < plan.setup_window && next_idle < self.clients.len() {
                        let i = next_idle;
                        next_idle += 1;
                        self.in_setup += 1;
                        self.clients[i].started_ns = now;
                        if self.t.setup_first_ns == 0 {
                            self.t.setup_first_ns = now.max(1);
                        }
                        self.clients[i].step = Step::Allocating;
                        if let Some(st) = self.streams.as_mut() {
                            let src = self.clients[i].src;
                            if let Err(e) = st.open(i, src, plan.server) {
                                self.fail(i, format!("connect: {e}"));
                                continue;
                            }
                        }
                        self.request(
                            i,
                            Request::Allocate {
                                lifetime: plan.lifetime,
                            },
                            now,
                        )?;
                    }
                    if now >= setup_deadline {
                        for i in 0..self.clients.len() {
                            if matches!(
                                self.clients[i].step,
                                Step::Idle | Step::Allocating | Step::Permitting | Step::Binding
                            ) {
                                self.fail(i, "setup timeout");
                            }
                        }
                        self.in_setup = 0;
                        next_idle = self.clients.len();
                    }
                    if next_idle == self.clients.len() && self.in_setup == 0 {
                        self.reach(REACHED_SETUP);
                        stage = Stage::WaitData;
                    }
                }
                Stage::WaitData => {
                    if phase >= PHASE_TEARDOWN {
                        // The orchestrator gave up before the data phase: just clean up.
                        self.reach(REACHED_DATA);
                        teardown_end = now + WIND_DOWN_NS;
                        stage = Stage::Teardown;
                    } else if phase >= PHASE_DATA {
                        data_start = self.control.data_start_ns.load(Ordering::Acquire);
                        data_end = data_start + plan.duration_ns;
                        ready = (0..self.clients.len() as u32)
                            .filter(|&i| self.clients[i as usize].step == Step::Ready)
                            .collect();
                        for &i in &ready {
                            self.clients[i as usize].last_progress_ns = now;
                        }
                        stage = Stage::Data;
                    }
                }
                Stage::Data => {
                    if now >= data_end {
                        self.flush();
                        self.t.send_end_ns = now;
                        drain_end = now + plan.drain_ns;
                        stage = Stage::Drain;
                    } else if churn {
                        for i in 0..self.clients.len() {
                            if matches!(
                                self.clients[i].step,
                                Step::Idle | Step::Done | Step::Failed
                            ) {
                                self.start_cycle(i, now)?;
                            }
                        }
                    } else if let Some(rate) = plan.rate {
                        self.paced_sends(&ready, rate, data_start, now, &mut scheduled)?;
                    } else {
                        self.window_sends(&ready, now)?;
                    }
                }
                Stage::Drain => {
                    let outstanding = churn
                        && self.clients.iter().any(|c| {
                            matches!(c.step, Step::Allocating | Step::Refreshing | Step::Deleting)
                        });
                    let limit = if churn {
                        drain_end.max(data_end + WIND_DOWN_NS)
                    } else {
                        drain_end
                    };
                    if (now >= drain_end && !outstanding) || now >= limit {
                        if churn {
                            for i in 0..self.clients.len() {
                                if matches!(
                                    self.clients[i].step,
                                    Step::Allocating | Step::Refreshing | Step::Deleting
                                ) {
                                    self.fail(i, "churn cycle unfinished at the end");
                                }
                            }
                        }
                        self.reach(REACHED_DATA);
                        stage = Stage::WaitTeardown;
                    }
                }
                Stage::WaitTeardown => {
                    if phase >= PHASE_TEARDOWN {
                        teardown_end = now + WIND_DOWN_NS;
                        stage = Stage::Teardown;
                    }
                }
                Stage::Teardown => {
                    let mut deleting = self
                        .clients
                        .iter()
                        .filter(|c| c.step == Step::Deleting)
                        .count();
                    for i in 0..self.clients.len() {
                        if deleting >= plan.setup_window {
                            break;
                        }
                        let c = &self.clients[i];
                        if c.has_allocation && !matches!(c.step, Step::Deleting | Step::Done) {
                            self.clients[i].step = Step::Deleting;
                            self.clients[i].pending = None;
                            self.request(i, Request::Refresh { lifetime: 0 }, now)?;
                            deleting += 1;
                        }
                    }
                    let left = self
                        .clients
                        .iter()
                        .any(|c| c.has_allocation && !matches!(c.step, Step::Done));
                    if !left || now >= teardown_end {
                        for c in &self.clients {
                            if c.has_allocation && c.step != Step::Done {
                                self.t.delete_failed += 1;
                            }
                        }
                        self.flush();
                        return Ok(());
                    }
                }
            }

            if now >= next_housekeeping {
                next_housekeeping = now + HOUSEKEEPING_NS;
                let maintain = matches!(
                    stage,
                    Stage::WaitData | Stage::Data | Stage::Drain | Stage::WaitTeardown
                ) && !churn;
                self.housekeeping(now, maintain)?;
                let p = (
                    self.t.allocated,
                    self.t.failed,
                    self.live_sent,
                    self.live_down,
                    self.t.cycles,
                );
                let c = self.control;
                c.allocated.fetch_add(p.0 - published.0, Ordering::Relaxed);
                c.failed.fetch_add(p.1 - published.1, Ordering::Relaxed);
                c.up_sent.fetch_add(p.2 - published.2, Ordering::Relaxed);
                c.down_received
                    .fetch_add(p.3 - published.3, Ordering::Relaxed);
                c.cycles.fetch_add(p.4 - published.4, Ordering::Relaxed);
                published = p;
            }
            self.flush();

            // Sleep until a datagram arrives, the next paced send is due, or housekeeping.
            let now = plan.now_ns();
            let mut wait = MAX_WAIT_NS.min(next_housekeeping.saturating_sub(now));
            if stage == Stage::Data && !churn {
                if let Some(rate) = plan.rate {
                    let total = rate * ready.len() as f64;
                    if total > 0.0 {
                        let next_due = data_start + ((scheduled + 1) as f64 * 1e9 / total) as u64;
                        wait = wait.min(next_due.saturating_sub(now).max(PACE_NS));
                    }
                } else {
                    wait = wait.min(PACE_NS);
                }
            }
            self.wait_and_receive(wait)?;
        }
    }

    /// Rate mode: sends what the clock says is due, round robin over the ready streams, so
    /// each stream sends at `rate` with the streams' phases spread evenly.
    fn paced_sends(
        &mut self,
        ready: &[u32],
        rate: f64,
        data_start: u64,
        now: u64,
        scheduled: &mut u64,
    ) -> Result<(), String> {
        if ready.is_empty() {
            return Ok(());
        }
        let total = rate * ready.len() as f64;
        let due = ((now - data_start) as f64 * total / 1e9) as u64;
        // A generator that fell behind skips the excess (reported) instead of bursting.
        let cap = (ready.len() as u64).max(4 * BATCH as u64);
        if due > *scheduled + cap {
            self.t.behind += due - *scheduled - cap;
            *scheduled = due - cap;
        }
        while *scheduled < due {
            let i = ready[(*scheduled % ready.len() as u64) as usize] as usize;
            *scheduled += 1;
            if self.clients[i].step == Step::Ready {
                self.send_data(i, now)?;
            }
        }
        Ok(())
    }

    /// Flat out: keeps `window` packets in flight per stream. A stream that hears nothing
    /// for a drain period forgets what it had in flight (lost), so loss cannot stall it.
    fn window_sends(&mut self, ready: &[u32], now: u64) -> Result<(), String> {
        let window = self.plan.window as u32;
        for &i in ready {
            let i = i as usize;
            let c = &mut self.clients[i];
            if c.step != Step::Ready {
                continue;
            }
            if now.saturating_sub(c.last_progress_ns) > self.plan.drain_ns {
                c.stall_base = c.tx_seq;
                c.last_progress_ns = now;
            }
            let base = c.rx.next_expected().max(c.stall_base);
            let room = window.saturating_sub(c.tx_seq.wrapping_sub(base));
            for _ in 0..room {
                self.send_data(i, now)?;
            }
        }
        Ok(())
    }

    /// Index of a free transmit slot (flushing a full batch first).
    fn slot(&mut self) -> usize {
        if self.tx.n == self.tx.batch.capacity() {
            self.flush();
        }
        self.tx.n
    }

    /// Sends slot `i` (`len` bytes) for client `client`: into the batch over UDP, onto the
    /// client's connection over a stream.
    fn commit(&mut self, i: usize, len: usize, client: usize, data_of: Option<u32>) {
        let src = self.clients[client].src;
        if let Some(st) = self.streams.as_mut() {
            let queued = st.queue(client, &self.tx.batch.slot_mut(i)[..len]);
            match (queued, data_of) {
                (true, Some(d)) => {
                    self.clients[d as usize].sent += 1;
                    self.live_sent += 1;
                }
                (false, _) => self.t.send_errors += 1,
                _ => {}
            }
            return;
        }
        self.tx.batch.set_len(i, len);
        self.tx.batch.set_peer(i, self.plan.server);
        self.tx.batch.set_source(i, Some(src));
        self.tx.data_of[i] = data_of;
        self.tx.n += 1;
    }

    fn send_data(&mut self, i: usize, now: u64) -> Result<(), String> {
        let plan = self.plan;
        let c = &mut self.clients[i];
        let (id, seq, channel) = (c.id, c.tx_seq, c.channel);
        c.tx_seq = c.tx_seq.wrapping_add(1);
        stamp::write(&mut self.payload, plan.nonce, id, seq, now);
        let s = self.slot();
        let len = {
            let buf = self.tx.batch.slot_mut(s);
            match plan.mode {
                Mode::Channel => {
                    let end = 4 + plan.size;
                    if buf.len() < end || !turn_msg::write_channel_header(buf, channel, plan.size) {
                        return Err("packet size too large".into());
                    }
                    buf[4..end].copy_from_slice(&self.payload[..plan.size]);
                    end
                }
                _ => {
                    let mut tid = [0u8; 12];
                    tid[..4].copy_from_slice(&plan.nonce.to_be_bytes());
                    tid[4..8].copy_from_slice(&id.to_be_bytes());
                    tid[8..].copy_from_slice(&seq.to_be_bytes());
                    turn_msg::write_send(buf, &tid, plan.peer, &self.payload[..plan.size])?
                }
            }
        };
        self.commit(s, len, i, Some(i as u32));
        Ok(())
    }

    fn flush(&mut self) {
        if let Some(st) = self.streams.as_mut() {
            st.flush();
            return;
        }
        let n = self.tx.n;
        let mut at = 0;
        while at < n {
            match self.tx.batch.send(self.fd, at, n) {
                Ok(k) if k > 0 => {
                    for j in at..at + k {
                        if let Some(i) = self.tx.data_of[j] {
                            self.clients[i as usize].sent += 1;
                            self.live_sent += 1;
                        }
                    }
                    at += k;
                }
                // EAGAIN or an error for the first datagram: drop that one and go on. A
                // dropped data packet is a gap in its stream's sequence numbers, not a loss
                // (only what left is counted as sent); a request is retransmitted.
                _ => {
                    self.t.send_errors += 1;
                    at += 1;
                }
            }
        }
        self.tx.n = 0;
    }

    fn next_tid(&mut self, i: usize) -> [u8; 12] {
        let c = &mut self.clients[i];
        c.counter = c.counter.wrapping_add(1);
        let mut tid = [0u8; 12];
        tid[..4].copy_from_slice(&self.plan.nonce.to_be_bytes());
        tid[4..8].copy_from_slice(&(i as u32).to_be_bytes());
        tid[8..].copy_from_slice(&c.counter.to_be_bytes());
        tid
    }

    /// Sends request `req` for client `i` as a new transaction.
    fn request(&mut self, i: usize, req: Request, now: u64) -> Result<(), String> {
        let tid = self.next_tid(i);
        // The first Allocate goes without credentials, to be challenged.
        let authed = self.clients[i].nonce.is_some() && self.realm.is_some();
        self.clients[i].pending = Some(Pending {
            req,
            tid,
            authed,
            sent_ns: now,
            tries: 1,
        });
        self.transmit(i)
    }

    /// (Re)sends client `i`'s pending request.
    fn transmit(&mut self, i: usize) -> Result<(), String> {
        let Some(p) = self.clients[i].pending else {
            return Ok(());
        };
        let s = self.slot();
        let len = {
            let c = &self.clients[i];
            let buf = self.tx.batch.slot_mut(s);
            match (p.authed, &self.realm, &c.nonce) {
                (true, Some(realm), Some(nonce)) => {
                    let auth = Auth {
                        username: &self.plan.credentials.username,
                        realm,
                        nonce,
                        key: &self.key,
                    };
                    turn_msg::write_request(buf, &p.tid, p.req, Some(&auth))?
                }
                _ => turn_msg::write_request(buf, &p.tid, p.req, None)?,
            }
        };
        self.commit(s, len, i, None);
        Ok(())
    }

    fn fail(&mut self, i: usize, why: impl Into<String>) {
        let c = &mut self.clients[i];
        if matches!(c.step, Step::Failed) {
            return;
        }
        if matches!(c.step, Step::Allocating | Step::Permitting | Step::Binding) {
            self.in_setup = self.in_setup.saturating_sub(1);
        }
        c.step = Step::Failed;
        c.pending = None;
        self.t.fail(why);
    }

    /// Churn: a new client (fresh source address) starts an allocation cycle.
    fn start_cycle(&mut self, i: usize, now: u64) -> Result<(), String> {
        let n =
            self.plan.clients as u32 + self.fresh * self.plan.threads as u32 + self.thread as u32;
        self.fresh += 1;
        let c = &mut self.clients[i];
        c.src = self.plan.client_net.addr(n);
        c.nonce = None;
        c.stale = 0;
        c.started_ns = now;
        c.step = Step::Allocating;
        if self.t.setup_first_ns == 0 {
            self.t.setup_first_ns = now.max(1);
        }
        self.request(
            i,
            Request::Allocate {
                lifetime: self.plan.lifetime,
            },
            now,
        )
    }

    /// Retransmissions, and refreshes of allocations, permissions and channels that are due.
    fn housekeeping(&mut self, now: u64, maintain: bool) -> Result<(), String> {
        let plan = self.plan;
        for i in 0..self.clients.len() {
            if let Some(p) = self.clients[i].pending {
                let rto = plan.rto_ns << (p.tries - 1).min(6);
                if now.saturating_sub(p.sent_ns) >= rto {
                    if p.tries >= plan.max_tries {
                        let what = format!("{} timeout", kind(p.req));
                        if self.clients[i].step == Step::Deleting {
                            self.t.delete_failed += 1;
                            self.clients[i].step = Step::Done;
                            self.clients[i].pending = None;
                        } else {
                            self.fail(i, what);
                        }
                        continue;
                    }
                    if let Some(pp) = self.clients[i].pending.as_mut() {
                        pp.tries += 1;
                        pp.sent_ns = now;
                    }
                    // A stream does not lose a request: only the timeout applies.
                    if self.streams.is_none() {
                        self.t.retransmits += 1;
                        self.transmit(i)?;
                    }
                }
                continue;
            }
            if !maintain || self.clients[i].step != Step::Ready {
                continue;
            }
            let c = &self.clients[i];
            let req = if now >= c.refresh_alloc_ns {
                Request::Refresh {
                    lifetime: plan.lifetime.unwrap_or(DEFAULT_LIFETIME_S as u32),
                }
            } else if now >= c.refresh_perm_ns {
                Request::CreatePermission { peer: plan.peer }
            } else if plan.mode == Mode::Channel && now >= c.refresh_chan_ns {
                Request::ChannelBind {
                    number: c.channel,
                    peer: plan.peer,
                }
            } else {
                continue;
            };
            self.t.refreshes += 1;
            self.request(i, req, now)?;
        }
        Ok(())
    }

    fn wait_and_receive(&mut self, wait_ns: u64) -> Result<(), String> {
        if let Some(mut st) = self.streams.take() {
            let (mut frames, mut data) = (
                std::mem::take(&mut self.frames),
                std::mem::take(&mut self.frame_data),
            );
            frames.clear();
            data.clear();
            let r = st.receive(wait_ns, &mut frames, &mut data);
            self.streams = Some(st);
            r.map_err(|e| format!("poll: {e}"))?;
            let now = self.plan.now_ns();
            for (i, range) in frames.drain(..) {
                let src = self.clients.get(i).map(|c| c.src);
                self.on_message(&data[range], src, now)?;
            }
            self.frames = frames;
            self.frame_data = data;
            return Ok(());
        }
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: (wait_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (wait_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: one valid pollfd; the timespec lives across the call.
        let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if r <= 0 {
            return Ok(());
        }
        loop {
            let n = match self.rx.recv(self.fd, libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // An ICMP error queued on the socket (a server that went away): not fatal.
                Err(_) => return Ok(()),
            };
            let now = self.plan.now_ns();
            for k in 0..n {
                self.on_datagram(k, now)?;
            }
            if n < self.rx.capacity() {
                return Ok(());
            }
        }
    }

    fn on_datagram(&mut self, k: usize, now: u64) -> Result<(), String> {
        let dest = self.rx.dest(k);
        let mut dg = std::mem::take(&mut self.frame_data);
        dg.clear();
        dg.extend_from_slice(self.rx.datagram(k));
        let r = self.on_message(&dg, dest, now);
        self.frame_data = dg;
        r
    }

    /// One message from the server, to client `dest` (its source address).
    fn on_message(&mut self, dg: &[u8], dest: Option<Ipv4Addr>, now: u64) -> Result<(), String> {
        let plan = self.plan;
        if turn_msg::is_channel_data(dg) {
            let Some(number) = dg.get(..2).map(|h| u16::from_be_bytes([h[0], h[1]])) else {
                self.t.bad += 1;
                return Ok(());
            };
            let data = turn_msg::channel_data(dg, number).and_then(|d| stamp::read(d, plan.nonce));
            match data {
                Some(s) => self.on_data(s, Some(number), dest, now),
                None => self.t.bad += 1,
            }
            return Ok(());
        }
        let Ok(m) = Message::parse(dg) else {
            self.t.bad += 1;
            return Ok(());
        };
        if m.class() == Class::Indication {
            match turn_msg::data_indication(&m)
                .filter(|(peer, _)| *peer == plan.peer)
                .and_then(|(_, d)| stamp::read(d, plan.nonce))
            {
                Some(s) => self.on_data(s, None, dest, now),
                None => self.t.bad += 1,
            }
            return Ok(());
        }
        let tid = m.transaction_id();
        if tid[..4] != plan.nonce.to_be_bytes() {
            self.t.bad += 1;
            return Ok(());
        }
        let i = u32::from_be_bytes([tid[4], tid[5], tid[6], tid[7]]) as usize;
        let Some(p) = self.clients.get(i).and_then(|c| c.pending) else {
            self.t.unmatched += 1;
            return Ok(());
        };
        if p.tid != tid {
            self.t.unmatched += 1;
            return Ok(());
        }
        let key = p.authed.then_some(&self.key);
        let reply = turn_msg::read_reply(&m, p.req.method(), key);
        if p.tries == 1 {
            self.t.request_rtt.record(now.saturating_sub(p.sent_ns));
        }
        self.clients[i].pending = None;
        self.on_reply(i, p, reply, now)
    }

    fn on_data(&mut self, s: stamp::Stamp, channel: Option<u16>, dest: Option<Ipv4Addr>, now: u64) {
        let id = s.stream as usize;
        let threads = self.plan.threads.max(1);
        if id % threads != self.thread {
            self.t.misrouted += 1;
            return;
        }
        let Some(c) = self.clients.get_mut(id / threads) else {
            self.t.misrouted += 1;
            return;
        };
        if dest != Some(c.src) || channel.is_some_and(|n| n != c.channel) {
            self.t.misrouted += 1;
            return;
        }
        if c.rx.record(s.seq) {
            self.live_down += 1;
            c.last_progress_ns = now;
            self.t.down_latency.record(now.saturating_sub(s.peer_ns));
        }
    }

    fn on_reply(&mut self, i: usize, p: Pending, reply: Reply, now: u64) -> Result<(), String> {
        let plan = self.plan;
        let step = self.clients[i].step;
        match reply {
            Reply::Success { relayed, lifetime } => {
                self.clients[i].stale = 0;
                let granted_ns =
                    u64::from(lifetime.unwrap_or(DEFAULT_LIFETIME_S as u32)) * 1_000_000_000;
                match (p.req, step) {
                    (Request::Allocate { .. }, Step::Allocating) => {
                        if relayed.is_none() {
                            self.t.bad += 1;
                            self.fail(i, "Allocate success without XOR-RELAYED-ADDRESS");
                            return Ok(());
                        }
                        self.t.allocated += 1;
                        self.clients[i].has_allocation = true;
                        self.clients[i].refresh_alloc_ns = now + granted_ns / 2;
                        if plan.mode == Mode::Churn {
                            self.clients[i].step = Step::Refreshing;
                            let lifetime = plan.lifetime.unwrap_or(DEFAULT_LIFETIME_S as u32);
                            self.request(i, Request::Refresh { lifetime }, now)?;
                        } else {
                            self.clients[i].step = Step::Permitting;
                            self.request(i, Request::CreatePermission { peer: plan.peer }, now)?;
                        }
                    }
                    (Request::CreatePermission { .. }, Step::Permitting) => {
                        self.clients[i].refresh_perm_ns = now + PERMISSION_REFRESH_NS;
                        if plan.mode == Mode::Channel {
                            self.clients[i].step = Step::Binding;
                            let number = self.clients[i].channel;
                            self.request(
                                i,
                                Request::ChannelBind {
                                    number,
                                    peer: plan.peer,
                                },
                                now,
                            )?;
                        } else {
                            self.ready(i, now);
                        }
                    }
                    (Request::ChannelBind { .. }, Step::Binding) => {
                        self.clients[i].refresh_chan_ns = now + CHANNEL_REFRESH_NS;
                        self.ready(i, now);
                    }
                    (Request::Refresh { lifetime: 0 }, Step::Deleting) => self.deleted(i, now),
                    (Request::Refresh { .. }, Step::Refreshing) => {
                        self.clients[i].step = Step::Deleting;
                        self.request(i, Request::Refresh { lifetime: 0 }, now)?;
                    }
                    (Request::Refresh { .. }, Step::Ready) => {
                        self.clients[i].refresh_alloc_ns = now + granted_ns / 2;
                    }
                    (Request::CreatePermission { .. }, Step::Ready) => {
                        self.clients[i].refresh_perm_ns = now + PERMISSION_REFRESH_NS;
                    }
                    (Request::ChannelBind { .. }, Step::Ready) => {
                        self.clients[i].refresh_chan_ns = now + CHANNEL_REFRESH_NS;
                    }
                    _ => self.t.unmatched += 1,
                }
            }
            Reply::Challenge { code, realm, nonce } => {
                if code == 401 {
                    if p.authed {
                        return self.reply_error(i, p, 401);
                    }
                    self.t.challenges += 1;
                } else {
                    self.t.stale_nonces += 1;
                    let c = &mut self.clients[i];
                    c.stale += 1;
                    if c.stale > MAX_STALE {
                        self.fail(i, "438 Stale Nonce repeatedly");
                        return Ok(());
                    }
                }
                if self.realm.as_deref() != Some(&realm[..]) {
                    self.key = plan.credentials.key(&realm);
                    self.realm = Some(realm);
                }
                self.clients[i].nonce = Some(nonce);
                self.request(i, p.req, now)?;
            }
            Reply::Error { code } => self.reply_error(i, p, code)?,
            Reply::Invalid => {
                self.t.bad += 1;
                self.fail(i, format!("{}: invalid response", kind(p.req)));
            }
        }
        Ok(())
    }

    fn reply_error(&mut self, i: usize, p: Pending, code: u16) -> Result<(), String> {
        if let (Request::Refresh { lifetime: 0 }, Step::Deleting) = (p.req, self.clients[i].step) {
            // 437: the allocation is already gone, which is what we wanted.
            if code == 437 {
                self.deleted(i, self.plan.now_ns());
                return Ok(());
            }
            self.t.delete_failed += 1;
            self.clients[i].step = Step::Done;
            return Ok(());
        }
        self.fail(i, format!("{}: error {code}", kind(p.req)));
        Ok(())
    }

    fn ready(&mut self, i: usize, now: u64) {
        let c = &mut self.clients[i];
        c.step = Step::Ready;
        self.in_setup = self.in_setup.saturating_sub(1);
        self.t.ready += 1;
        self.t.setup_last_ns = self.t.setup_last_ns.max(now);
        self.t.setup_time.record(now.saturating_sub(c.started_ns));
    }

    fn deleted(&mut self, i: usize, now: u64) {
        self.t.deleted += 1;
        let c = &mut self.clients[i];
        c.step = Step::Done;
        c.has_allocation = false;
        if self.plan.mode == Mode::Churn {
            self.t.cycles += 1;
            self.t.cycle_time.record(now.saturating_sub(c.started_ns));
        }
    }
}

/// A request's name for failure reasons.
fn kind(r: Request) -> &'static str {
    match r {
        Request::Allocate { .. } => "Allocate",
        Request::Refresh { lifetime: 0 } => "Refresh(0)",
        Request::Refresh { .. } => "Refresh",
        Request::CreatePermission { .. } => "CreatePermission",
        Request::ChannelBind { .. } => "ChannelBind",
    }
}
