//! TURN requests: Allocate, Refresh, CreatePermission, ChannelBind (RFC 8656 §7–§12).
//!
//! A request is read into a [`Req`] on the stack first, because the response is written
//! over it in the same buffer.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use portico_shared::counters::Counter;
use portico_shared::shm::EventKind;

use super::allocation::{
    Allocation, Bucket, Channel, Permission, Relay, Traffic, CHANNEL_LIFETIME, PERMISSION_LIFETIME,
};
use super::auth::{AuthError, Authed, Integrity, NONCE_BYTES};
use super::policy::{self, Denied};
use super::tcp_relay::Refusal;
use super::{Ctx, Datagram, Reservation, Turn, TurnSettings};
use crate::server::{Action, Now, Stats};
use crate::stun::{attr, method, Class, Message, MessageWriter};

const MAX_PEERS: usize = 8;
const UDP: u8 = 17;
const TCP: u8 = 6;
const FAMILY_V4: u8 = 0x01;
const FAMILY_V6: u8 = 0x02;
/// How long an EVEN-PORT reservation is held (RFC 8656 §7.2 suggests about 30 s).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// Random probes for a free relay port; then the range is walked in order from a random
/// place, at most [`PORT_SCAN`] ports, before the Allocate gets 508. Random probes alone
/// can miss the last free ports of a nearly full range (40 probes of a 16-port range with
/// one free port miss it 8% of the time).
const PORT_TRIES: u32 = 40;
const PORT_SCAN: u32 = 4096;

struct Req {
    method: u16,
    tid: [u8; 12],
    unknown: attr::UnknownList,
    malformed: bool,
    transport: Option<u8>,
    lifetime: Option<u32>,
    dont_fragment: bool,
    even_port: Option<bool>,
    token: Option<[u8; 8]>,
    family: Option<u8>,
    additional_family: Option<u8>,
    channel: Option<u16>,
    connection_id: Option<u32>,
    peers: [Option<SocketAddr>; MAX_PEERS],
    n_peers: usize,
}

impl Req {
    fn read(msg: &Message<'_>) -> Req {
        let tid = msg.transaction_id();
        let mut r = Req {
            method: msg.method(),
            tid,
            unknown: attr::UnknownList::default(),
            malformed: false,
            transport: None,
            lifetime: None,
            dont_fragment: false,
            even_port: None,
            token: None,
            family: None,
            additional_family: None,
            channel: None,
            connection_id: None,
            peers: [None; MAX_PEERS],
            n_peers: 0,
        };
        for a in msg.attributes() {
            match a.typ {
                attr::REQUESTED_TRANSPORT => match attr::decode_requested_transport(a.value) {
                    Ok(t) => r.transport = Some(t),
                    Err(_) => r.malformed = true,
                },
                attr::LIFETIME => match attr::decode_u32(a.value) {
                    Ok(l) => r.lifetime = Some(l),
                    Err(_) => r.malformed = true,
                },
                attr::DONT_FRAGMENT => r.dont_fragment = true,
                attr::EVEN_PORT => match attr::decode_even_port(a.value) {
                    Ok(reserve) => r.even_port = Some(reserve),
                    Err(_) => r.malformed = true,
                },
                attr::RESERVATION_TOKEN => match <[u8; 8]>::try_from(a.value) {
                    Ok(t) => r.token = Some(t),
                    Err(_) => r.malformed = true,
                },
                attr::REQUESTED_ADDRESS_FAMILY => match attr::decode_address_family(a.value) {
                    Ok(f) => r.family = Some(f),
                    // A well-formed attribute naming a family we do not know: 440, not 400.
                    Err(attr::AttrError::BadFamily) => r.family = Some(0),
                    Err(_) => r.malformed = true,
                },
                attr::ADDITIONAL_ADDRESS_FAMILY => match attr::decode_address_family(a.value) {
                    Ok(f) => r.additional_family = Some(f),
                    Err(_) => r.malformed = true,
                },
                attr::CHANNEL_NUMBER => match attr::decode_channel_number(a.value) {
                    Ok(c) => r.channel = Some(c),
                    Err(_) => r.malformed = true,
                },
                attr::CONNECTION_ID => match attr::decode_u32(a.value) {
                    Ok(c) => r.connection_id = Some(c),
                    Err(_) => r.malformed = true,
                },
                attr::XOR_PEER_ADDRESS => match attr::decode_xor_address(a.value, &tid) {
                    Ok(p) if r.n_peers < MAX_PEERS => {
                        r.peers[r.n_peers] = Some(p);
                        r.n_peers += 1;
                    }
                    Ok(_) => r.malformed = true,
                    Err(_) => r.malformed = true,
                },
                attr::USERNAME
                | attr::USERHASH
                | attr::PASSWORD_ALGORITHM
                | attr::REALM
                | attr::NONCE
                | attr::MESSAGE_INTEGRITY
                | attr::MESSAGE_INTEGRITY_SHA256
                | attr::DATA => {}
                t if attr::is_comprehension_required(t) => r.unknown.note(t),
                _ => {}
            }
        }
        r
    }

    fn peers(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.peers[..self.n_peers].iter().flatten().copied()
    }
}

/// What a successful request adds to its response.
enum Success {
    Allocate {
        relayed: SocketAddr,
        /// The IPv6 relayed address of a dual allocation.
        second: Option<SocketAddr>,
        lifetime: u32,
        token: Option<[u8; 8]>,
        /// Why the additional family was not allocated (ADDRESS-ERROR-CODE).
        family_error: Option<Failure>,
    },
    Refresh {
        lifetime: u32,
    },
    Empty,
    /// Answered later (a Connect waits for the peer's TCP handshake).
    Deferred,
}

/// An error response: code and reason phrase.
#[derive(Clone, Copy)]
struct Failure(u16, &'static str);

const BAD_REQUEST: Failure = Failure(400, "Bad Request");
const FORBIDDEN: Failure = Failure(403, "Forbidden");
const MISMATCH: Failure = Failure(437, "Allocation Mismatch");
const WRONG_CREDENTIALS: Failure = Failure(441, "Wrong Credentials");
const UNSUPPORTED_TRANSPORT: Failure = Failure(442, "Unsupported Transport Protocol");
const FAMILY_NOT_SUPPORTED: Failure = Failure(440, "Address Family not Supported");
const FAMILY_MISMATCH: Failure = Failure(443, "Peer Address Family Mismatch");
const CONNECTION_EXISTS: Failure = Failure(446, "Connection Already Exists");
const CONNECTION_FAILURE: Failure = Failure(447, "Connection Timeout or Failure");
const QUOTA: Failure = Failure(486, "Allocation Quota Reached");
const CAPACITY: Failure = Failure(508, "Insufficient Capacity");
/// The box is full and `turn.alternate_servers` names another (RFC 8656 §7.2, RFC 8489 §10).
const TRY_ALTERNATE: Failure = Failure(300, "Try Alternate");

/// The answer when the box itself is full: another box of the fleet when one of the
/// client's address family is configured, else 508.
fn box_full(s: &TurnSettings, client: SocketAddr) -> Failure {
    if s.redirects(client) {
        TRY_ALTERNATE
    } else {
        CAPACITY
    }
}

/// The failure an ADDRESS-ERROR-CODE code stands for.
fn family_failure(code: u16) -> Failure {
    if code == CAPACITY.0 {
        CAPACITY
    } else {
        FAMILY_NOT_SUPPORTED
    }
}

impl Turn {
    /// Handles a TURN request in `buf[d.start..d.start + d.len]`; the response is written at
    /// the start of `buf`.
    pub fn on_request(&mut self, cx: &mut Ctx<'_>, d: Datagram, buf: &mut [u8]) -> Action {
        let (s, now) = (cx.settings, cx.now);
        let parsed = match Message::parse(&buf[d.start..d.start + d.len]) {
            Ok(m) => {
                let auth = s.credentials.authenticate(&m, d.from, now.unix);
                Some((Req::read(&m), auth))
            }
            Err(_) => None,
        };
        let Some((req, auth)) = parsed else {
            cx.stats.incr(Counter::DropBadAttribute);
            return Action::Drop;
        };
        let authed = match auth {
            Ok(a) => a,
            Err(e) => {
                cx.stats.incr(match e {
                    AuthError::Challenge => Counter::TurnChallenges,
                    AuthError::StaleNonce => Counter::TurnAuthStaleNonce,
                    AuthError::UnknownUser => Counter::TurnAuthUnknownUser,
                    AuthError::Expired => Counter::TurnAuthExpired,
                    AuthError::BadIntegrity => Counter::TurnAuthBadIntegrity,
                    AuthError::BadRequest => Counter::TurnRequestsError,
                });
                if matches!(
                    e,
                    AuthError::UnknownUser | AuthError::Expired | AuthError::BadIntegrity
                ) {
                    self.control
                        .events
                        .report(EventKind::AuthFailure, d.from.ip(), now.unix);
                }
                if e != AuthError::Challenge {
                    tracing::debug!(source = %d.from, method = req.method, reason = ?e, "TURN authentication failed");
                }
                if !self.limiter.allow(d.from.ip(), now.mono, s.error_rate) {
                    cx.stats.incr(Counter::DropRateLimited);
                    return Action::Drop;
                }
                let f = Failure(e.code(), e.reason());
                return write_error(cx, &req, d, buf, f, None);
            }
        };
        if !req.unknown.is_empty() {
            cx.stats.incr(Counter::TurnRequestsError);
            let f = Failure(420, "Unknown Attribute");
            return write_error(cx, &req, d, buf, f, Some(&authed));
        }
        let result = if req.malformed {
            Err(BAD_REQUEST)
        } else {
            match req.method {
                method::ALLOCATE => self.allocate(cx, &req, &authed, d),
                method::REFRESH => self.refresh(cx, &req, &authed, d),
                method::CREATE_PERMISSION => self.create_permission(cx, &req, &authed, d),
                method::CHANNEL_BIND => self.channel_bind(cx, &req, &authed, d),
                method::CONNECT => self.connect(cx, &req, &authed, d),
                method::CONNECTION_BIND => self.connection_bind(cx, &req, &authed, d),
                _ => Err(BAD_REQUEST),
            }
        };
        match result {
            // Counted when it is answered.
            Ok(Success::Deferred) => Action::Drop,
            Ok(success) => {
                cx.stats.incr(Counter::TurnRequestsOk);
                write_success(cx.software, &req, d, buf, &success, &authed)
            }
            Err(f) => {
                cx.stats.incr(Counter::TurnRequestsError);
                if f.0 == 403 {
                    self.control
                        .events
                        .report(EventKind::PeerDenied, d.from.ip(), now.unix);
                }
                if f.0 == 441 {
                    // Valid credentials, but of another user than the allocation's.
                    cx.stats.incr(Counter::TurnAuthWrongUser);
                    self.control
                        .events
                        .report(EventKind::AuthFailure, d.from.ip(), now.unix);
                }
                tracing::debug!(client = %d.from, method = req.method, code = f.0, "TURN request refused");
                write_error(cx, &req, d, buf, f, Some(&authed))
            }
        }
    }

    /// The allocation of this client 5-tuple, checked to belong to the same user (441).
    fn own_allocation(&self, d: Datagram, authed: &Authed) -> Result<usize, Failure> {
        let slot = self.table.by_client(d.from, d.socket).ok_or(MISMATCH)?;
        match self.table.get(slot) {
            Some(a) if *a.username == *authed.username => Ok(slot),
            Some(_) => Err(WRONG_CREDENTIALS),
            None => Err(MISMATCH),
        }
    }

    fn lifetime(s: &TurnSettings, requested: Option<u32>) -> Duration {
        match requested {
            Some(l) => Duration::from_secs(u64::from(l))
                .max(s.default_lifetime)
                .min(s.max_lifetime),
            None => s.default_lifetime,
        }
    }

    fn allocate(
        &mut self,
        cx: &mut Ctx<'_>,
        req: &Req,
        authed: &Authed,
        d: Datagram,
    ) -> Result<Success, Failure> {
        let (s, now) = (cx.settings, cx.now);
        if let Some(slot) = self.table.by_client(d.from, d.socket) {
            // A retransmission of the Allocate that made it gets the same answer (RFC 8656
            // §7.2 rule 2); anything else is a mismatch.
            return match self.table.get(slot) {
                Some(a) if a.tid == req.tid && *a.username == *authed.username => {
                    Ok(Success::Allocate {
                        relayed: a.relay.public,
                        second: a.second.map(|r| r.public),
                        lifetime: a.expires.saturating_duration_since(now.mono).as_secs() as u32,
                        token: a.reservation_token,
                        family_error: a.family_error.map(family_failure),
                    })
                }
                _ => Err(MISMATCH),
            };
        }
        let tcp = match req.transport {
            None => return Err(BAD_REQUEST),
            Some(UDP) => false,
            // RFC 6062 §5.1: only over a TCP or TLS connection, and without the attributes
            // that only mean something for UDP relays (a dual allocation too: one listener).
            Some(TCP) => {
                if !d.stream
                    || req.dont_fragment
                    || req.even_port.is_some()
                    || req.token.is_some()
                    || req.additional_family.is_some()
                {
                    return Err(BAD_REQUEST);
                }
                true
            }
            Some(_) => return Err(UNSUPPORTED_TRANSPORT),
        };
        // RFC 8656 §7.2: a reservation is one socket of one family, so RESERVATION-TOKEN
        // goes with neither EVEN-PORT nor a family attribute; ADDITIONAL-ADDRESS-FAMILY may
        // only name IPv6 (the IPv4 relay being the default) and never comes with
        // REQUESTED-ADDRESS-FAMILY.
        if req.token.is_some()
            && (req.even_port.is_some() || req.family.is_some() || req.additional_family.is_some())
        {
            return Err(BAD_REQUEST);
        }
        if req.family.is_some() && req.additional_family.is_some() {
            return Err(BAD_REQUEST);
        }
        let dual = match req.additional_family {
            None => false,
            Some(FAMILY_V6) => true,
            Some(_) => return Err(BAD_REQUEST),
        };
        let v4 = match req.family {
            None | Some(FAMILY_V4) => true,
            Some(FAMILY_V6) => false,
            Some(_) => return Err(FAMILY_NOT_SUPPORTED),
        };
        // A family the server has no relay address for: 440 before any quota is taken.
        if req.token.is_none() && s.relay_ip(v4).is_none() {
            return Err(FAMILY_NOT_SUPPORTED);
        }

        // Quotas: server-wide, then per user.
        let total = self.shared.allocations.fetch_add(1, Ordering::Relaxed);
        if total >= s.max_allocations {
            self.shared.allocations.fetch_sub(1, Ordering::Relaxed);
            cx.stats.incr(Counter::TurnQuotaRejected);
            return Err(box_full(s, d.from));
        }
        let user_ok = match self.shared.per_user.lock() {
            Ok(mut m) => {
                let n = m.entry(authed.username.clone()).or_insert(0);
                if *n >= s.max_allocations_per_user {
                    false
                } else {
                    *n += 1;
                    true
                }
            }
            Err(_) => false,
        };
        if !user_ok {
            self.shared.allocations.fetch_sub(1, Ordering::Relaxed);
            cx.stats.incr(Counter::TurnQuotaRejected);
            return Err(QUOTA);
        }
        let opened = self.open_relay(cx, req, v4, true, tcp);
        let (socket, local, token) = match opened {
            Ok(x) => x,
            Err(f) => {
                self.shared.allocations.fetch_sub(1, Ordering::Relaxed);
                self.shared.release_user(&authed.username);
                cx.stats.incr(Counter::TurnQuotaRejected);
                // No free relay port is the box being full too; a reservation token that
                // cannot be redeemed names a port of this box, so it is not redirected.
                if f.0 == CAPACITY.0 && req.token.is_none() {
                    return Err(box_full(s, d.from));
                }
                return Err(f);
            }
        };
        let relay = Relay {
            socket,
            local,
            public: s.public_address(local),
        };
        // The additional IPv6 relay of a dual allocation: a random port of the range (EVEN-PORT
        // is about the first relay). If it cannot be had, the IPv4 allocation stands and the
        // answer says why in ADDRESS-ERROR-CODE (RFC 8656 §7.2).
        let (second, family_error) = if !dual {
            (None, None)
        } else if s.relay_ip(false).is_none() {
            (None, Some(FAMILY_NOT_SUPPORTED))
        } else {
            match self.open_relay(cx, req, false, false, false) {
                Ok((socket, local, _)) => {
                    let public = s.public_address(local);
                    (
                        Some(Relay {
                            socket,
                            local,
                            public,
                        }),
                        None,
                    )
                }
                Err(f) => (None, Some(f)),
            }
        };
        let lifetime = Self::lifetime(s, req.lifetime);
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let a = Allocation {
            id,
            client: d.from,
            listen_socket: d.socket,
            relay,
            second,
            tcp,
            family_error: family_error.map(|f| f.0),
            created: now.mono,
            expires: now.mono + lifetime,
            tid: req.tid,
            username: authed.username.clone(),
            key: authed.key,
            integrity: authed.integrity,
            reservation_token: token,
            permissions: Vec::new(),
            channels: Vec::new(),
            traffic: Traffic::default(),
            up: Bucket::new(now.mono, s.max_bandwidth),
            down: Bucket::new(now.mono, s.max_bandwidth),
        };
        self.shared.hold(d.from.ip(), 1);
        let slot = self.table.insert(a);
        if let Some(a) = self.table.get(slot) {
            self.control.allocations.publish(a, now);
        }
        cx.stats.incr(Counter::TurnAllocationsCreated);
        cx.stats.add(Counter::TurnAllocationsActive, 1);
        match (second, family_error) {
            (Some(r), _) => tracing::info!(
                id,
                client = %d.from,
                relay = %relay.public,
                relay6 = %r.public,
                user = %authed.username,
                lifetime = lifetime.as_secs(),
                "allocation created"
            ),
            (None, f) => tracing::info!(
                id,
                client = %d.from,
                relay = %relay.public,
                user = %authed.username,
                lifetime = lifetime.as_secs(),
                ipv6_refused = f.map(|f| f.0),
                "allocation created"
            ),
        }
        Ok(Success::Allocate {
            relayed: relay.public,
            second: second.map(|r| r.public),
            lifetime: lifetime.as_secs() as u32,
            token,
            family_error,
        })
    }

    /// Binds a relay socket of family `v4`: for the `first` relay of an allocation a redeemed
    /// reservation, an even port (with its odd neighbour reserved when asked), or a random
    /// port of the range; for the second relay of a dual allocation, a random port.
    fn open_relay(
        &mut self,
        cx: &mut Ctx<'_>,
        req: &Req,
        v4: bool,
        first: bool,
        tcp: bool,
    ) -> Result<(usize, SocketAddr, Option<[u8; 8]>), Failure> {
        let (s, now, io) = (cx.settings, cx.now, &mut *cx.io);
        let even_port = if first { req.even_port } else { None };
        if let (Some(token), true) = (req.token, first) {
            let r = self
                .shared
                .reservations
                .lock()
                .ok()
                .and_then(|mut m| m.remove(&token))
                .ok_or(CAPACITY)?;
            let addr = r.addr;
            let socket = io
                .adopt(r.reserved, req.dont_fragment)
                .map_err(|_| CAPACITY)?;
            return Ok((socket, addr, None));
        }
        let ips = s.relay_ip_count(v4) as u32;
        if ips == 0 {
            return Err(FAMILY_NOT_SUPPORTED);
        }
        let (low, high) = (s.ports.low(), s.ports.high());
        let span = u32::from(high - low) + 1;
        // Every (address, port) pair is one number below `pairs`.
        let pairs = span.saturating_mul(ips);
        let walk_from = self.random.next_u32() % pairs;
        for attempt in 0..PORT_TRIES + pairs.min(PORT_SCAN) {
            // A random port of a random relay address of the family: the addresses share
            // the allocations evenly, each with the whole range.
            let r = match attempt.checked_sub(PORT_TRIES) {
                None => self.random.next_u32(),
                Some(i) => (walk_from + i) % pairs,
            };
            let Some(ip) = s.relay_ip_nth(v4, ((r / span) % ips) as usize) else {
                return Err(FAMILY_NOT_SUPPORTED);
            };
            let mut port = (u32::from(low) + r % span) as u16;
            if even_port.is_some() {
                port &= !1;
                if port < low || port.checked_add(1).is_none_or(|p| p > high) {
                    continue;
                }
            }
            let addr = SocketAddr::new(ip, port);
            let reserve = even_port == Some(true);
            let odd = if reserve {
                match io.reserve(SocketAddr::new(ip, port + 1)) {
                    Ok(r) => Some(r),
                    Err(_) => continue,
                }
            } else {
                None
            };
            let opened = if tcp {
                io.listen_tcp(addr)
            } else {
                io.open(addr, req.dont_fragment)
            };
            let Ok(socket) = opened else {
                if let Some(r) = odd {
                    io.release(r);
                }
                continue;
            };
            let token = match odd {
                Some(reserved) => {
                    let mut t = [0u8; 8];
                    self.random.fill(&mut t);
                    match self.shared.reservations.lock() {
                        Ok(mut m) => {
                            let r = Reservation {
                                reserved,
                                addr: SocketAddr::new(ip, port + 1),
                                expires: now.mono + RESERVATION_LIFETIME,
                            };
                            // A token drawn twice (one chance in 2^64) retires the older.
                            if let Some(old) = m.insert(t, r) {
                                io.release(old.reserved);
                            }
                            Some(t)
                        }
                        Err(_) => {
                            io.release(reserved);
                            None
                        }
                    }
                }
                None => None,
            };
            return Ok((socket, addr, token));
        }
        Err(CAPACITY)
    }

    fn refresh(
        &mut self,
        cx: &mut Ctx<'_>,
        req: &Req,
        authed: &Authed,
        d: Datagram,
    ) -> Result<Success, Failure> {
        let (s, now) = (cx.settings, cx.now);
        let slot = self.own_allocation(d, authed)?;
        if let (Some(f), Some(a)) = (req.family, self.table.get(slot)) {
            if a.relay_for(f == FAMILY_V4).is_none() {
                return Err(FAMILY_MISMATCH);
            }
            // RFC 8656 §7.3: a Refresh naming one family of a dual allocation applies to that
            // family; with LIFETIME 0 it deletes that relay alone. (A non-zero lifetime
            // refreshes the allocation as a whole: both relays share one lifetime here.)
            if req.lifetime == Some(0) && a.second.is_some() {
                if let Some((gone, p, c)) = self.table.remove_relay(slot, f == FAMILY_V4) {
                    cx.io.close(gone.socket);
                    cx.stats.sub(Counter::TurnPermissionsActive, p as u64);
                    cx.stats.sub(Counter::TurnChannelsActive, c as u64);
                    if let Some(a) = self.table.get(slot) {
                        self.changes.mark((a.client, a.listen_socket));
                        tracing::info!(id = a.id, relay = %gone.public, "relay of one family deleted");
                        self.control.allocations.publish(a, now);
                    }
                    return Ok(Success::Refresh { lifetime: 0 });
                }
            }
        }
        if req.lifetime == Some(0) {
            self.end(cx, slot, Counter::TurnAllocationsDeleted);
            return Ok(Success::Refresh { lifetime: 0 });
        }
        let lifetime = Self::lifetime(s, req.lifetime);
        if let Some(a) = self.table.get_mut(slot) {
            a.expires = now.mono + lifetime;
        }
        // A shorter lifetime than before moves the timer forward; a longer one leaves it,
        // and the earlier timer reschedules when it fires.
        self.table.schedule_earlier(slot, now.mono + lifetime);
        if let Some(a) = self.table.get(slot) {
            self.control.allocations.publish(a, now);
        }
        Ok(Success::Refresh {
            lifetime: lifetime.as_secs() as u32,
        })
    }

    /// Checks a peer against family and policy; counts refusals.
    fn check_peer(
        s: &TurnSettings,
        a: &Allocation,
        peer: SocketAddr,
        stats: &mut Stats,
    ) -> Result<SocketAddr, Failure> {
        let canon = policy::canonical(peer.ip());
        if a.relay_for(canon.is_ipv4()).is_none() {
            return Err(FAMILY_MISMATCH);
        }
        match s.policy.check(peer.ip(), peer.port()) {
            Ok(ip) => Ok(SocketAddr::new(ip, peer.port())),
            Err(reason) => {
                stats.incr(match reason {
                    Denied::SpecialPurpose => Counter::TurnPeerDeniedSpecial,
                    Denied::Configured => Counter::TurnPeerDeniedConfigured,
                });
                tracing::debug!(client = %a.client, peer = %peer, ?reason, "peer refused");
                Err(FORBIDDEN)
            }
        }
    }

    fn permit(
        s: &TurnSettings,
        a: &mut Allocation,
        ip: IpAddr,
        now: Now,
        stats: &mut Stats,
    ) -> Result<(), Failure> {
        let expires = now.mono + PERMISSION_LIFETIME;
        if let Some(p) = a.permissions.iter_mut().find(|p| p.ip == ip) {
            p.expires = expires;
            return Ok(());
        }
        if a.permissions.len() >= s.max_permissions {
            stats.incr(Counter::TurnQuotaRejected);
            return Err(CAPACITY);
        }
        a.permissions.push(Permission { ip, expires });
        stats.incr(Counter::TurnPermissionsCreated);
        stats.add(Counter::TurnPermissionsActive, 1);
        Ok(())
    }

    fn create_permission(
        &mut self,
        cx: &mut Ctx<'_>,
        req: &Req,
        authed: &Authed,
        d: Datagram,
    ) -> Result<Success, Failure> {
        let (s, now, stats) = (cx.settings, cx.now, &mut *cx.stats);
        let slot = self.own_allocation(d, authed)?;
        let a = self.table.get_mut(slot).ok_or(MISMATCH)?;
        if req.n_peers == 0 {
            return Err(BAD_REQUEST);
        }
        // All or nothing: every peer is checked before any permission is installed.
        let mut ips = [None; MAX_PEERS];
        for (i, peer) in req.peers().enumerate() {
            ips[i] = Some(Self::check_peer(s, a, peer, stats)?.ip());
        }
        let new = ips
            .iter()
            .flatten()
            .filter(|ip| !a.permissions.iter().any(|p| p.ip == **ip))
            .count();
        if a.permissions.len() + new > s.max_permissions {
            stats.incr(Counter::TurnQuotaRejected);
            return Err(CAPACITY);
        }
        for ip in ips.into_iter().flatten() {
            Self::permit(s, a, ip, now, stats)?;
        }
        self.changes.mark((a.client, a.listen_socket));
        self.control.allocations.publish(a, now);
        self.table
            .schedule_earlier(slot, now.mono + PERMISSION_LIFETIME);
        Ok(Success::Empty)
    }

    fn channel_bind(
        &mut self,
        cx: &mut Ctx<'_>,
        req: &Req,
        authed: &Authed,
        d: Datagram,
    ) -> Result<Success, Failure> {
        let (s, now, stats) = (cx.settings, cx.now, &mut *cx.stats);
        let slot = self.own_allocation(d, authed)?;
        let a = self.table.get_mut(slot).ok_or(MISMATCH)?;
        let (Some(number), Some(peer), 1) = (req.channel, req.peers[0], req.n_peers) else {
            return Err(BAD_REQUEST);
        };
        if !super::CHANNEL_NUMBERS.contains(&number) {
            return Err(BAD_REQUEST);
        }
        let peer = Self::check_peer(s, a, peer, stats)?;
        // RFC 8656 §12.2: a number bound to another peer, or a peer bound to another number,
        // is refused; the same pair refreshes.
        if a.channels
            .iter()
            .any(|c| (c.number == number) != (c.peer == peer))
        {
            return Err(BAD_REQUEST);
        }
        let expires = now.mono + CHANNEL_LIFETIME;
        match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => c.expires = expires,
            None => {
                if a.channels.len() >= s.max_channels {
                    stats.incr(Counter::TurnQuotaRejected);
                    return Err(CAPACITY);
                }
                a.channels.push(Channel {
                    number,
                    peer,
                    expires,
                });
                stats.incr(Counter::TurnChannelsCreated);
                stats.add(Counter::TurnChannelsActive, 1);
            }
        }
        Self::permit(s, a, peer.ip(), now, stats)?;
        self.changes.mark((a.client, a.listen_socket));
        self.control.allocations.publish(a, now);
        // The permission (300 s) expires before the channel (600 s).
        self.table
            .schedule_earlier(slot, now.mono + PERMISSION_LIFETIME);
        Ok(Success::Empty)
    }
}

impl Turn {
    /// Connect (RFC 6062 §5.2): to XOR-PEER-ADDRESS, which must pass the peer policy and
    /// have a permission. The answer waits for the TCP handshake.
    fn connect(
        &mut self,
        cx: &mut Ctx<'_>,
        req: &Req,
        authed: &Authed,
        d: Datagram,
    ) -> Result<Success, Failure> {
        if !d.stream {
            return Err(BAD_REQUEST);
        }
        let slot = self.own_allocation(d, authed)?;
        let a = self.table.get(slot).ok_or(MISMATCH)?;
        let (Some(peer), 1) = (req.peers[0], req.n_peers) else {
            return Err(BAD_REQUEST);
        };
        if !a.tcp {
            return Err(BAD_REQUEST);
        }
        let peer = Self::check_peer(cx.settings, a, peer, cx.stats)?;
        self.tcp_connect(cx, slot, peer, req.tid)
            .map(|()| Success::Deferred)
            .map_err(refusal)
    }

    /// ConnectionBind (RFC 6062 §5.4), on a new connection of the client: it becomes the
    /// data connection of CONNECTION-ID.
    fn connection_bind(
        &mut self,
        cx: &mut Ctx<'_>,
        req: &Req,
        authed: &Authed,
        d: Datagram,
    ) -> Result<Success, Failure> {
        let Some(id) = req.connection_id.filter(|_| d.stream) else {
            return Err(BAD_REQUEST);
        };
        // A control connection cannot become a data connection.
        if self.table.by_client(d.from, d.socket).is_some() {
            return Err(BAD_REQUEST);
        }
        self.tcp_bind(cx, id, d.socket, &authed.username)
            .map(|()| Success::Empty)
            .map_err(refusal)
    }
}

fn refusal(r: Refusal) -> Failure {
    match r {
        Refusal::BadRequest => BAD_REQUEST,
        Refusal::Forbidden => FORBIDDEN,
        Refusal::Exists => CONNECTION_EXISTS,
        Refusal::Failure => CONNECTION_FAILURE,
        Refusal::Capacity => CAPACITY,
        Refusal::WrongCredentials => WRONG_CREDENTIALS,
    }
}

fn writer<'b>(buf: &'b mut [u8], req: &Req, class: Class) -> Option<MessageWriter<'b>> {
    MessageWriter::new(buf, class, req.method, &req.tid).ok()
}

fn seal(mut w: MessageWriter<'_>, software: &str, authed: Option<&Authed>) -> Option<usize> {
    if !software.is_empty() {
        w.add_attribute(attr::SOFTWARE, software.as_bytes()).ok()?;
    }
    if let Some(a) = authed {
        match a.integrity {
            Integrity::Sha1 => w.add_message_integrity(a.key.bytes()).ok()?,
            Integrity::Sha256 => w.add_message_integrity_sha256(a.key.bytes()).ok()?,
        }
    }
    w.add_fingerprint().ok()?;
    Some(w.finish())
}

fn reply(len: Option<usize>, d: Datagram) -> Action {
    match len {
        Some(len) => Action::Send {
            offset: 0,
            len,
            socket: d.socket,
            to: d.from,
        },
        None => Action::Drop,
    }
}

fn write_success(
    software: &str,
    req: &Req,
    d: Datagram,
    buf: &mut [u8],
    success: &Success,
    authed: &Authed,
) -> Action {
    let len = (|| {
        let mut w = writer(buf, req, Class::SuccessResponse)?;
        match *success {
            Success::Allocate {
                relayed,
                second,
                lifetime,
                token,
                family_error,
            } => {
                // A dual allocation has one XOR-RELAYED-ADDRESS per family (RFC 8656 §7.2).
                w.add_xor_address(attr::XOR_RELAYED_ADDRESS, relayed).ok()?;
                if let Some(second) = second {
                    w.add_xor_address(attr::XOR_RELAYED_ADDRESS, second).ok()?;
                }
                w.add_u32(attr::LIFETIME, lifetime).ok()?;
                if let Some(t) = token {
                    w.add_attribute(attr::RESERVATION_TOKEN, &t).ok()?;
                }
                w.add_xor_address(attr::XOR_MAPPED_ADDRESS, d.from).ok()?;
                if let Some(Failure(code, reason)) = family_error {
                    // ADDRESS-ERROR-CODE (RFC 8656 §18.12): family 0x02 (IPv6, the only
                    // additional family), then an ERROR-CODE-shaped body.
                    let mut v = [0u8; 4 + 64];
                    v[0] = FAMILY_V6;
                    v[2] = (code / 100) as u8;
                    v[3] = (code % 100) as u8;
                    let n = reason.len().min(64);
                    v[4..4 + n].copy_from_slice(&reason.as_bytes()[..n]);
                    w.add_attribute(attr::ADDRESS_ERROR_CODE, &v[..4 + n])
                        .ok()?;
                }
            }
            Success::Refresh { lifetime } => w.add_u32(attr::LIFETIME, lifetime).ok()?,
            Success::Empty | Success::Deferred => {}
        }
        seal(w, software, Some(authed))
    })();
    reply(len, d)
}

/// An error response; one to an unauthenticated request that may retry (401, 438) carries
/// the challenge: REALM, a fresh NONCE and PASSWORD-ALGORITHMS.
fn write_error(
    cx: &Ctx<'_>,
    req: &Req,
    d: Datagram,
    buf: &mut [u8],
    f: Failure,
    authed: Option<&Authed>,
) -> Action {
    let (s, now) = (cx.settings, cx.now);
    let challenge = authed.is_none() && matches!(f.0, 401 | 438);
    let len = (|| {
        let mut w = writer(buf, req, Class::ErrorResponse)?;
        w.add_error_code(f.0, f.1).ok()?;
        if f.0 == 420 {
            w.add_unknown_attributes(req.unknown.as_slice()).ok()?;
        }
        if f.0 == TRY_ALTERNATE.0 {
            // The transaction id chooses among several alternates: clients spread, and a
            // retransmission is sent to the same box.
            let pick = u32::from_be_bytes([req.tid[8], req.tid[9], req.tid[10], req.tid[11]]);
            for a in s.alternates_for(d.from, pick as usize) {
                w.add_address(attr::ALTERNATE_SERVER, a).ok()?;
            }
        }
        if challenge {
            let mut nonce = [0u8; NONCE_BYTES];
            s.credentials.nonce(d.from, now.unix, &mut nonce);
            w.add_attribute(attr::REALM, s.credentials.realm().as_bytes())
                .ok()?;
            w.add_attribute(attr::NONCE, &nonce).ok()?;
            w.add_attribute(
                attr::PASSWORD_ALGORITHMS,
                s.credentials.password_algorithms(),
            )
            .ok()?;
        }
        seal(w, cx.software, authed)
    })();
    reply(len, d)
}
