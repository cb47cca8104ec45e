//! RTP media relay sessions and static UDP NAT maps, as a sans-IO core.
//!
//! A media session has two legs; each leg is an RTP/RTCP socket pair on `turn.relay_ip`.
//! A packet an endpoint sends to one leg's socket leaves from the other leg's socket of the
//! same kind (RTP or RTCP) towards that leg's remote: its latched source once it sent
//! something, else the address signalling gave. Latching (NAT detection) learns a leg's
//! source from its first packet and may follow a new source only within `media.learn_window`
//! of that first packet; after that the source is fixed and packets from anyone else are
//! dropped, counted per leg (`foreign_dropped`) and reported as suspicious events. That is
//! the fix to the RTP-bleed class of bugs (CVE-2017-14099): a relay that keeps learning lets
//! a third party who guesses a port take the stream over. A new source must also pass the
//! TURN peer policy before it is learned, and on a leg created with an SRTP key, carry a
//! valid SRTP (SRTCP) authentication tag ([`srtp`]): a third party without the key can then
//! neither take the stream over nor inject into it while the leg is learning. The check runs
//! on the learning path only; a latched source's packets are forwarded unchecked.
//!
//! Like the TURN core, this module never touches a socket or shared memory: sockets are opened
//! and closed through [`RelayIo`] and named by socket index, requests arrive and sessions are
//! published through [`MediaControl`], events leave through [`Events`]. The relay path is a
//! table lookup by socket index and a few integer updates: no lock, no allocation; the
//! forwarded datagram is sent from the buffer it arrived in.

pub mod nat;
pub mod offload;
pub mod srtp;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use portico_shared::config::{Config, PortRange};
use portico_shared::counters::Counter;
use portico_shared::media_config::NatMap;
use portico_shared::shm::{EventKind, LegCounters, MediaFailure, MediaRequest};

use crate::server::{Action, Now, Stats};
use crate::turn::policy::PeerPolicy;
use crate::turn::{Events, RelayIo, TurnSettings};
use offload::{KernelFlow, Offload, Owner, Part};

/// How often idle sessions are looked for and counters published, at most.
const SCAN_EVERY: Duration = Duration::from_millis(100);
/// A session's counters are published at most this often.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// Foreign-source events reported per leg, at most one per this interval (the drops are all
/// counted; the events only tell the fraud engine the source is at it).
const EVENT_EVERY: Duration = Duration::from_secs(1);
/// Port pairs tried for one leg before the request fails.
const PORT_TRIES: usize = 512;

/// The `[media]` and `[nat]` settings of one configuration generation.
#[derive(Clone, Debug, PartialEq)]
pub struct MediaSettings {
    pub ports: Option<PortRange>,
    pub learn_window: Duration,
    pub idle_timeout: Duration,
    pub max_sessions: usize,
    pub nat_maps: Vec<NatMap>,
}

impl MediaSettings {
    pub fn from_config(c: &Config) -> MediaSettings {
        MediaSettings {
            ports: c.media.ports,
            learn_window: c.media.learn_window.get(),
            idle_timeout: c.media.idle_timeout.get(),
            max_sessions: c.media.max_sessions,
            nat_maps: c.nat.maps.clone(),
        }
    }
}

/// A session's legs as published: latched RTP source and counters.
pub type PublishedLegs = [(Option<SocketAddr>, LegCounters); 2];

/// What the control plane asks of this worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Create(MediaRequest),
    /// Delete the session published in record `record`.
    Delete {
        record: usize,
    },
}

/// The core's link to the control plane for media sessions (shared memory in the dataplane,
/// a fake in tests).
pub trait MediaControl {
    /// This worker's index and the number of workers: a NAT map belongs to one worker.
    fn worker(&self) -> (usize, usize);
    /// Appends what the control plane asked of this worker since the last call.
    fn commands(&mut self, out: &mut Vec<Command>);
    fn created(&mut self, record: usize, locals: [SocketAddr; 2]);
    fn failed(&mut self, record: usize, why: MediaFailure);
    fn publish(&mut self, record: usize, legs: PublishedLegs);
    /// The session of `record` ended (deleted or idle); the record is free again.
    fn ended(&mut self, record: usize);
}

/// No control plane: no requests, nothing published, no NAT map owned.
pub struct Detached;

impl MediaControl for Detached {
    fn worker(&self) -> (usize, usize) {
        (0, 0)
    }
    fn commands(&mut self, _: &mut Vec<Command>) {}
    fn created(&mut self, _: usize, _: [SocketAddr; 2]) {}
    fn failed(&mut self, _: usize, _: MediaFailure) {}
    fn publish(&mut self, _: usize, _: PublishedLegs) {}
    fn ended(&mut self, _: usize) {}
}

/// What a socket index is to this core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    None,
    Leg { session: u32, leg: u8, rtcp: bool },
    NatPublic { map: u16, offset: u16 },
    NatBinding { map: u16, binding: u32 },
}

/// One leg of a session.
#[derive(Debug)]
struct Leg {
    rtp: usize,
    rtcp: usize,
    /// RTP socket's local address.
    local: SocketAddr,
    /// Where signalling says the endpoint receives RTP.
    address: Option<SocketAddr>,
    /// Latched source of RTP (0) and RTCP (1).
    latched: [Option<SocketAddr>; 2],
    /// End of the learn window: set by the leg's first packet.
    learn_until: Option<Instant>,
    counters: LegCounters,
    last_event: Option<Instant>,
    /// Authentication keys a new source's packets must verify with (derived at creation).
    srtp: Option<Box<srtp::LegKey>>,
}

impl Leg {
    /// Where this leg's endpoint receives RTP (`rtcp` false) or RTCP.
    fn remote(&self, rtcp: bool) -> Option<SocketAddr> {
        if rtcp {
            self.latched[1].or_else(|| {
                self.latched[0]
                    .or(self.address)
                    .map(|a| SocketAddr::new(a.ip(), a.port().wrapping_add(1)))
            })
        } else {
            self.latched[0].or(self.address)
        }
    }

    fn socket(&self, rtcp: bool) -> usize {
        if rtcp {
            self.rtcp
        } else {
            self.rtp
        }
    }
}

#[derive(Debug)]
struct Session {
    record: usize,
    /// Tells this session from a later one in the same slot ([`Owner`]).
    serial: u64,
    legs: [Leg; 2],
    last_packet: Instant,
    dirty: bool,
    published: Instant,
}

/// Media sessions and NAT maps of one worker.
pub struct Media {
    roles: Vec<Role>,
    sessions: Vec<Option<Session>>,
    free: Vec<u32>,
    active: usize,
    commands: Vec<Command>,
    /// Next port pair to try (an index into the pairs of `media.ports`).
    cursor: usize,
    /// xorshift state for the pair tried after a taken one.
    rng: u64,
    next_scan: Option<Instant>,
    /// The settings changed: NAT maps and latched sources are checked again at the next tick.
    pub recheck: bool,
    pub nat: nat::Nat,
    /// Owners whose kernel paths changed, for a driver with a fast path.
    pub offload: Offload,
    serial: u64,
}

/// Everything a media call needs from the server besides the packet.
pub struct MediaCtx<'a> {
    pub settings: &'a MediaSettings,
    pub turn: &'a TurnSettings,
    pub now: Now,
    pub stats: &'a mut Stats,
    pub io: &'a mut dyn RelayIo,
}

impl Media {
    /// `seed` spreads the workers' first port pairs over the range.
    pub fn new(seed: u64) -> Media {
        Media {
            roles: Vec::new(),
            sessions: Vec::new(),
            free: Vec::new(),
            active: 0,
            commands: Vec::with_capacity(16),
            cursor: seed as usize,
            rng: seed | 1,
            next_scan: None,
            recheck: true,
            nat: nat::Nat::default(),
            offload: Offload::default(),
            serial: 0,
        }
    }

    /// Sessions this worker holds.
    pub fn sessions(&self) -> usize {
        self.active
    }

    /// Whether `socket` is a media leg or NAT map socket of this core.
    #[inline]
    pub fn owns(&self, socket: usize) -> bool {
        self.roles.get(socket).is_some_and(|r| *r != Role::None)
    }

    fn set_role(&mut self, socket: usize, role: Role) {
        if socket >= self.roles.len() {
            self.roles.resize(socket + 1, Role::None);
        }
        self.roles[socket] = role;
    }

    fn close(&mut self, io: &mut dyn RelayIo, socket: usize) {
        if let Some(r) = self.roles.get_mut(socket) {
            *r = Role::None;
        }
        io.close(socket);
    }

    /// A datagram on one of this core's sockets (the caller checked [`Media::owns`], the
    /// blacklist and the buffer bounds). `from` is canonical (IPv4-mapped turned to IPv4).
    /// The datagram is `buf[start..start + len]`.
    #[allow(clippy::too_many_arguments)]
    pub fn handle(
        &mut self,
        cx: &mut MediaCtx<'_>,
        events: &mut dyn Events,
        socket: usize,
        from: SocketAddr,
        buf: &[u8],
        start: usize,
        len: usize,
    ) -> Action {
        match self.roles.get(socket).copied().unwrap_or(Role::None) {
            Role::None => Action::Drop,
            Role::Leg { session, leg, rtcp } => {
                self.on_leg(cx, events, session, leg, rtcp, from, buf, start, len)
            }
            Role::NatPublic { map, offset } => {
                let (nat, roles) = (&mut self.nat, &mut self.roles);
                nat.inbound(cx, roles, &mut self.offload, map, offset, from, start, len)
            }
            Role::NatBinding { map, binding } => {
                self.nat
                    .outbound(cx, &mut self.offload, map, binding, from, start, len)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_leg(
        &mut self,
        cx: &mut MediaCtx<'_>,
        events: &mut dyn Events,
        session: u32,
        leg: u8,
        rtcp: bool,
        from: SocketAddr,
        packet: &[u8],
        start: usize,
        len: usize,
    ) -> Action {
        let now = cx.now;
        let Some(Some(s)) = self.sessions.get_mut(session as usize) else {
            return Action::Drop;
        };
        let l = usize::from(leg & 1);
        let this = &mut s.legs[l];
        let kind = usize::from(rtcp);
        match this.latched[kind] {
            Some(src) if src == from => {}
            current => {
                let learning = this.learn_until.is_none_or(|t| now.mono < t);
                if current.is_some() && !learning {
                    // RTP bleed / hijack: never forwarded, counted, reported.
                    this.counters.foreign_dropped += 1;
                    s.dirty = true;
                    cx.stats.incr(Counter::DropMediaForeignSource);
                    if this
                        .last_event
                        .is_none_or(|t| now.mono.saturating_duration_since(t) >= EVENT_EVERY)
                    {
                        this.last_event = Some(now.mono);
                        events.report(EventKind::MediaForeignSource, from.ip(), now.unix);
                    }
                    return Action::Drop;
                }
                if cx.turn.policy.check(from.ip(), from.port()).is_err() {
                    cx.stats.incr(Counter::DropMediaPeerDenied);
                    return Action::Drop;
                }
                if let Some(key) = &this.srtp {
                    let ok = packet
                        .get(start..start.saturating_add(len))
                        .is_some_and(|p| key.verify(p, rtcp));
                    if !ok {
                        cx.stats.incr(Counter::DropMediaSrtpAuth);
                        return Action::Drop;
                    }
                }
                this.latched[kind] = Some(from);
                self.offload.mark(Owner::Session {
                    index: session,
                    serial: s.serial,
                });
                if this.learn_until.is_none() {
                    this.learn_until = Some(now.mono + cx.settings.learn_window);
                }
                cx.stats.incr(Counter::MediaLatched);
            }
        }
        this.counters.packets_in += 1;
        this.counters.bytes_in += len as u64;
        s.last_packet = now.mono;
        s.dirty = true;
        let other = &mut s.legs[1 - l];
        let Some(to) = other.remote(rtcp) else {
            cx.stats.incr(Counter::DropMediaNoRemote);
            return Action::Drop;
        };
        other.counters.packets_out += 1;
        other.counters.bytes_out += len as u64;
        cx.stats.incr(Counter::MediaPackets);
        cx.stats.add(Counter::MediaBytes, len as u64);
        Action::Send {
            offset: start,
            len,
            socket: other.socket(rtcp),
            to,
        }
    }

    /// Timers and control-plane requests: call once per loop turn.
    pub fn tick(&mut self, cx: &mut MediaCtx<'_>, control: &mut dyn MediaControl) {
        if self.recheck {
            self.recheck = false;
            self.offload.mark_all();
            let (nat, roles) = (&mut self.nat, &mut self.roles);
            nat.reconcile(cx, roles, &mut self.offload, control.worker());
        }
        let mut commands = std::mem::take(&mut self.commands);
        control.commands(&mut commands);
        for c in commands.drain(..) {
            match c {
                Command::Create(req) => match self.create(cx, &req) {
                    Ok(locals) => {
                        control.created(req.index, locals);
                        cx.stats.incr(Counter::MediaSessionsCreated);
                        cx.stats.incr(Counter::MediaSessionsActive);
                    }
                    Err(why) => {
                        control.failed(req.index, why);
                        cx.stats.incr(Counter::MediaSessionsFailed);
                    }
                },
                Command::Delete { record } => {
                    if let Some(i) = self.find(record) {
                        self.end(cx, i);
                        cx.stats.incr(Counter::MediaSessionsEndedDeleted);
                    }
                    control.ended(record);
                }
            }
        }
        self.commands = commands;
        let now = cx.now.mono;
        if self.next_scan.is_some_and(|t| now < t) {
            return;
        }
        self.next_scan = Some(now + SCAN_EVERY);
        for i in 0..self.sessions.len() {
            let Some(s) = &mut self.sessions[i] else {
                continue;
            };
            if now.saturating_duration_since(s.last_packet) >= cx.settings.idle_timeout {
                let record = s.record;
                self.end(cx, i);
                cx.stats.incr(Counter::MediaSessionsEndedIdle);
                control.ended(record);
                continue;
            }
            if s.dirty && now.saturating_duration_since(s.published) >= PUBLISH_EVERY {
                s.dirty = false;
                s.published = now;
                control.publish(
                    s.record,
                    [
                        (s.legs[0].latched[0], s.legs[0].counters),
                        (s.legs[1].latched[0], s.legs[1].counters),
                    ],
                );
            }
        }
        let (nat, roles) = (&mut self.nat, &mut self.roles);
        nat.expire(cx, roles, &mut self.offload);
    }

    /// Closes everything (shutdown); the records are freed.
    pub fn clear(&mut self, cx: &mut MediaCtx<'_>, control: &mut dyn MediaControl) {
        for i in 0..self.sessions.len() {
            if let Some(s) = &self.sessions[i] {
                let record = s.record;
                self.end(cx, i);
                control.ended(record);
            }
        }
        let (nat, roles) = (&mut self.nat, &mut self.roles);
        nat.reconcile(cx, roles, &mut self.offload, (0, 0));
    }

    fn find(&self, record: usize) -> Option<usize> {
        self.sessions
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.record == record))
    }

    fn end(&mut self, cx: &mut MediaCtx<'_>, i: usize) {
        let Some(s) = self.sessions.get_mut(i).and_then(Option::take) else {
            return;
        };
        self.offload.mark(Owner::Session {
            index: i as u32,
            serial: s.serial,
        });
        for leg in &s.legs {
            self.close(cx.io, leg.rtp);
            self.close(cx.io, leg.rtcp);
        }
        self.free.push(i as u32);
        self.active -= 1;
        cx.stats.sub(Counter::MediaSessionsActive, 1);
    }

    fn create(
        &mut self,
        cx: &mut MediaCtx<'_>,
        req: &MediaRequest,
    ) -> Result<[SocketAddr; 2], MediaFailure> {
        let Some(range) = cx.settings.ports else {
            return Err(MediaFailure::NoPorts);
        };
        if self.active >= cx.settings.max_sessions {
            return Err(MediaFailure::Full);
        }
        let mut ips = [IpAddr::from([0, 0, 0, 0]); 2];
        for (i, a) in req.addresses.iter().enumerate() {
            if let Some(a) = a {
                if cx.turn.policy.check(a.ip(), a.port()).is_err() {
                    return Err(if i == 0 {
                        MediaFailure::Leg0Denied
                    } else {
                        MediaFailure::Leg1Denied
                    });
                }
            }
            let v4 = req.addresses[i].is_none_or(|a| a.is_ipv4());
            ips[i] = cx
                .turn
                .relay_ip(v4)
                .or_else(|| {
                    // No signalled address: either family will do.
                    req.addresses[i]
                        .is_none()
                        .then(|| cx.turn.relay_ip(false))
                        .flatten()
                })
                .ok_or(MediaFailure::NoRelayAddress)?;
        }
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.sessions.push(None);
                (self.sessions.len() - 1) as u32
            }
        };
        let mut legs: Vec<Leg> = Vec::with_capacity(2);
        for (l, ip) in ips.iter().enumerate() {
            match self.open_pair(cx.io, *ip, range) {
                Some((rtp, rtcp, port)) => legs.push(Leg {
                    rtp,
                    rtcp,
                    local: SocketAddr::new(*ip, port),
                    address: req.addresses[l],
                    latched: [None, None],
                    learn_until: None,
                    counters: LegCounters::default(),
                    last_event: None,
                    srtp: match &req.srtp[l] {
                        Some(m) => match srtp::LegKey::new(m) {
                            Some(k) => Some(Box::new(k)),
                            None => {
                                // The derivation does not fail on a 30-byte master; if it
                                // did, refusing beats relaying unauthenticated.
                                for leg in &legs {
                                    cx.io.close(leg.rtp);
                                    cx.io.close(leg.rtcp);
                                }
                                cx.io.close(rtp);
                                cx.io.close(rtcp);
                                self.free.push(index);
                                return Err(MediaFailure::NoPorts);
                            }
                        },
                        None => None,
                    },
                }),
                None => {
                    for leg in &legs {
                        cx.io.close(leg.rtp);
                        cx.io.close(leg.rtcp);
                    }
                    self.free.push(index);
                    return Err(MediaFailure::NoPorts);
                }
            }
        }
        let (Some(b), Some(a)) = (legs.pop(), legs.pop()) else {
            self.free.push(index);
            return Err(MediaFailure::NoPorts);
        };
        let locals = [a.local, b.local];
        for (l, leg) in [&a, &b].into_iter().enumerate() {
            let leg_no = l as u8;
            self.set_role(
                leg.rtp,
                Role::Leg {
                    session: index,
                    leg: leg_no,
                    rtcp: false,
                },
            );
            self.set_role(
                leg.rtcp,
                Role::Leg {
                    session: index,
                    leg: leg_no,
                    rtcp: true,
                },
            );
        }
        self.serial += 1;
        self.sessions[index as usize] = Some(Session {
            record: req.index,
            serial: self.serial,
            legs: [a, b],
            last_packet: cx.now.mono,
            dirty: false,
            published: cx.now.mono,
        });
        self.active += 1;
        Ok(locals)
    }

    /// Binds an RTP/RTCP pair (even port, next port) in `range`; returns both socket indices
    /// and the RTP port.
    fn open_pair(
        &mut self,
        io: &mut dyn RelayIo,
        ip: IpAddr,
        range: PortRange,
    ) -> Option<(usize, usize, u16)> {
        let first = range.low() + range.low() % 2;
        if first >= range.high() {
            return None;
        }
        let pairs = usize::from((range.high() - first - 1) / 2 + 1);
        // Sequential from this worker's cursor while pairs are free. In a range larger than
        // the tries, a random pair after a taken one: other workers (and other programs)
        // fill the range in runs of their own, which a sequential probe would have to walk
        // through pair by pair. A small range is walked whole.
        for attempt in 0..pairs.min(PORT_TRIES) {
            if attempt > 0 && pairs > PORT_TRIES {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                self.cursor = self.rng as usize;
            }
            let k = self.cursor % pairs;
            self.cursor = self.cursor.wrapping_add(1);
            let port = first + 2 * k as u16;
            let Ok(rtp) = io.open(SocketAddr::new(ip, port), false) else {
                continue;
            };
            match io.open(SocketAddr::new(ip, port + 1), false) {
                Ok(rtcp) => return Some((rtp, rtcp, port)),
                Err(_) => io.close(rtp),
            }
        }
        None
    }
}

impl Media {
    /// Every session and NAT binding that may have kernel paths (a full check).
    pub fn owners(&self, out: &mut Vec<Owner>) {
        for (i, s) in self.sessions.iter().enumerate() {
            if let Some(s) = s {
                out.push(Owner::Session {
                    index: i as u32,
                    serial: s.serial,
                });
            }
        }
        self.nat.owners(out);
    }

    /// The paths of `owner` the kernel may relay now (none once it is gone); `blocked` says
    /// whether a source is blacklisted.
    pub fn kernel_flows(
        &self,
        owner: Owner,
        blocked: &dyn Fn(IpAddr) -> bool,
        out: &mut Vec<KernelFlow>,
    ) {
        let Owner::Session { index, serial } = owner else {
            self.nat.kernel_flows(owner, blocked, out);
            return;
        };
        let Some(Some(s)) = self.sessions.get(index as usize) else {
            return;
        };
        if s.serial != serial {
            return;
        }
        for l in 0..2 {
            let (this, other) = (&s.legs[l], &s.legs[1 - l]);
            for rtcp in [false, true] {
                let by = u16::from(rtcp);
                let (Some(from), Some(to), Some(at), Some(from_out)) = (
                    this.latched[usize::from(rtcp)],
                    other.remote(rtcp),
                    offload::port_plus(this.local, by),
                    offload::port_plus(other.local, by),
                ) else {
                    continue;
                };
                if blocked(from.ip()) {
                    continue;
                }
                out.push(KernelFlow {
                    owner,
                    part: Part::Leg { leg: l as u8, rtcp },
                    from,
                    at,
                    out: from_out,
                    to,
                });
            }
        }
    }

    /// Credits what the kernel relayed on `flow` since the last call: the core's counters
    /// always, the session's or binding's figures and idle timer if it still exists.
    pub fn credit(
        &mut self,
        flow: &KernelFlow,
        packets: u64,
        bytes: u64,
        now: Instant,
        stats: &mut Stats,
    ) {
        if packets == 0 {
            return;
        }
        match (flow.owner, flow.part) {
            (Owner::Session { index, serial }, Part::Leg { leg, rtcp: _ }) => {
                stats.add(Counter::MediaPackets, packets);
                stats.add(Counter::MediaBytes, bytes);
                let Some(Some(s)) = self.sessions.get_mut(index as usize) else {
                    return;
                };
                if s.serial != serial {
                    return;
                }
                let l = usize::from(leg & 1);
                let this = &mut s.legs[l].counters;
                this.packets_in += packets;
                this.bytes_in += bytes;
                let other = &mut s.legs[1 - l].counters;
                other.packets_out += packets;
                other.bytes_out += bytes;
                s.last_packet = s.last_packet.max(now);
                s.dirty = true;
            }
            (Owner::Binding { .. }, part) => {
                stats.add(
                    if matches!(part, Part::NatIn { .. }) {
                        Counter::NatInboundPackets
                    } else {
                        Counter::NatOutboundPackets
                    },
                    packets,
                );
                self.nat.touch(flow.owner, now);
            }
            _ => {}
        }
    }

    /// How often a driver should credit kernel counts so that no idle timer ends a session
    /// or binding whose packets the kernel relays: a quarter of the shortest idle timeout,
    /// at most a second.
    pub fn credit_every(settings: &MediaSettings) -> Duration {
        let shortest = settings
            .nat_maps
            .iter()
            .map(|m| m.idle_timeout.get())
            .chain(std::iter::once(settings.idle_timeout))
            .min()
            .unwrap_or(Duration::from_secs(60));
        (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// The peer policy's verdict on `a` (a signalled address, a source to learn, a NAT source).
pub fn allowed(policy: &PeerPolicy, a: SocketAddr) -> bool {
    policy.check(a.ip(), a.port()).is_ok()
}

#[cfg(test)]
mod tests;
