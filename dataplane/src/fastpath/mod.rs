//! The kernel fast path: established TURN channels relayed by an eBPF program (TC ingress,
//! `bpf/relay.bpf.c`) without a trip through user space.
//!
//! The protocol core stays the only authority and knows nothing of BPF. It records which
//! allocations changed ([`crate::turn::Changes`]: channel bound, permission created, either
//! expired or removed, allocation ended, blacklist or settings changed); once per loop turn
//! the driver hands that list to this module's [`Worker`], which derives what the kernel may
//! relay for each changed allocation ([`flows`]) and makes the maps say exactly that. A
//! channel is relayed in the kernel only while
//!
//! * the channel is bound and a permission for its peer's IP is installed, both unexpired;
//! * client, listen, relay and peer addresses are IPv4 and the listen and relay addresses
//!   specific (not a wildcard), the allocation made over UDP;
//! * no bandwidth cap (`turn.max_bandwidth`) asks user space to meter every packet;
//! * neither the client nor the peer is blacklisted.
//!
//! Anything else -- Send and Data indications, STUN, IPv6, packets the program cannot handle
//! -- reaches user space as before. The program counts packets and bytes per entry; the
//! worker folds them into its counters (`relay_packets`, `relay_bytes`, and
//! `fastpath_packets`) and the allocation's traffic figures about once a second (and at
//! removal, read and deleted in one step), so
//! `/metrics` and the API show the same totals with and without the fast path.
//!
//! The media relay's latched legs and the static NAT maps' bindings are taken over the same
//! way ([`crate::media::offload`] says which paths, from the media core's tables): plain UDP
//! forwards, addresses and ports rewritten, in the same map as the channels' peer side. The
//! program is attached to the interface facing each path's source when the path first needs
//! it (a NAT map's internal side has no TURN address). Their counts are credited to the
//! session's legs or the binding, and to `media_relay_packets` or `nat_packets`, often
//! enough that no idle timer ends a session whose packets only the kernel sees.

pub mod kernel;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_shared::config::{Config, FastPathMode};
use portico_shared::counters::Counter;

use crate::media::offload::{KernelFlow, Owner, Part};
use crate::media::Media;
use crate::server::{Now, Server, Settings};
use crate::turn::Turn;
pub use kernel::FastPath;
use kernel::Plain;

/// Routes and interfaces looked up, at most (they are looked up again after a full check).
const ROUTES_MAX: usize = 4096;

/// How often a worker reads the counters of its entries (two `bpf(2)` calls per channel;
/// allocation records are republished once a second anyway).
const FOLD_EVERY: Duration = Duration::from_secs(1);
/// How often a worker checks all its allocations even without a recorded change (blacklist
/// entries that lapse, for one).
const FULL_EVERY: Duration = Duration::from_secs(10);

/// One channel the kernel relays, both directions: ChannelData from `client` to `listen`
/// with number `channel` leaves from `relay` to `peer`, and UDP from `peer` to `relay` leaves
/// from `listen` to `client` as ChannelData.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub client: SocketAddrV4,
    pub listen: SocketAddrV4,
    pub channel: u16,
    pub peer: SocketAddrV4,
    pub relay: SocketAddrV4,
}

fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) if !a.ip().is_unspecified() => Some(a),
        _ => None,
    }
}

/// The channels of the allocation of `client` on listen socket `listen_socket` that the
/// kernel may relay now (sans-IO: decided from the core's table alone).
pub fn flows(
    turn: &Turn,
    settings: &Settings,
    client: SocketAddr,
    listen_socket: usize,
    now: Now,
    out: &mut Vec<Flow>,
) {
    if settings.turn.max_bandwidth != 0 {
        return;
    }
    // A stream connection's index is past the listen sockets: not UDP, not for the kernel.
    let Some(listen) = settings
        .endpoints
        .addrs()
        .get(listen_socket)
        .copied()
        .and_then(v4)
    else {
        return;
    };
    let Some(a) = turn
        .table()
        .by_client(client, listen_socket)
        .and_then(|s| turn.table().get(s))
    else {
        return;
    };
    let (Some(client), Some(relay)) = (v4(a.client), a.relay_for(true).and_then(|r| v4(r.local)))
    else {
        return;
    };
    if turn.blocked(a.client.ip(), now.unix) || a.expires <= now.mono {
        return;
    }
    for c in &a.channels {
        let Some(peer) = v4(c.peer) else { continue };
        if c.expires > now.mono
            && a.has_permission(c.peer.ip(), now.mono)
            && !turn.blocked(IpAddr::V4(*peer.ip()), now.unix)
        {
            out.push(Flow {
                client,
                listen,
                channel: c.number,
                peer,
                relay,
            });
        }
    }
}

/// Loads the fast path as `turn.fast_path` says: `Ok(None)` when it is off or, with
/// `"auto"`, unavailable (logged in one line); an error only with `"on"`.
pub fn start(config: &Config, settings: &Settings) -> Result<Option<Arc<FastPath>>, String> {
    let mode = config.turn.fast_path;
    if mode == FastPathMode::Off {
        return Ok(None);
    }
    let loaded = addresses(settings)
        .and_then(|addrs| {
            // Per map: two channels per allocation on average (a WebRTC allocation usually has
            // one peer), at most 2^18. Hash maps are preallocated, and a bigger table spreads
            // lookups over more cache lines; channels past it stay in user space (logged).
            let max = config
                .turn
                .max_allocations
                .saturating_mul(2)
                .clamp(1024, 1 << 18) as u32;
            FastPath::load(&addrs, max)
        })
        .map_err(|e| one_line(&e));
    match (loaded, mode) {
        (Ok(fp), _) => {
            tracing::info!(
                interfaces = ?fp.interfaces,
                max_entries = fp.max_entries,
                "kernel fast path loaded: established channels are relayed in the kernel"
            );
            Ok(Some(Arc::new(fp)))
        }
        (Err(e), FastPathMode::On) => Err(format!("turn.fast_path = \"on\": {e}")),
        (Err(e), _) => {
            tracing::warn!("kernel fast path not used (turn.fast_path = \"auto\"): {e}; relaying in user space");
            Ok(None)
        }
    }
}

/// An error on one line of bounded length: the verifier's log can run to thousands of lines.
fn one_line(e: &str) -> String {
    let mut s: String = e
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    if s.chars().count() > 400 {
        s = s.chars().take(400).collect::<String>() + " ...";
    }
    s
}

/// The IPv4 listen and relay addresses the program must see: their interfaces get it.
fn addresses(settings: &Settings) -> Result<Vec<std::net::Ipv4Addr>, String> {
    let mut out = Vec::new();
    for a in settings.endpoints.addrs() {
        if let SocketAddr::V4(a) = a {
            if !a.ip().is_unspecified() && !out.contains(a.ip()) {
                out.push(*a.ip());
            }
        }
    }
    if out.is_empty() {
        return Err(
            "turn.listen has no specific IPv4 address (a wildcard cannot be matched in the kernel)"
                .into(),
        );
    }
    match settings.turn.relay_v4 {
        Some(IpAddr::V4(ip)) if !ip.is_unspecified() => {
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
        _ => return Err("no specific IPv4 relay address".into()),
    }
    Ok(out)
}

#[cfg(test)]
#[test]
fn errors_are_logged_on_one_bounded_line() {
    assert_eq!(one_line("a\nb\r\n\n c "), "a | b | c");
    let long = "x\n".repeat(1000);
    let l = one_line(&long);
    assert!(!l.contains('\n') && l.chars().count() <= 404, "{l}");
}

/// An installed channel and the counts already folded.
struct Entry {
    flow: Flow,
    up: kernel::Counts,
    down: kernel::Counts,
}

/// An installed media or NAT direction and the counts already credited.
struct PlainEntry {
    flow: KernelFlow,
    plain: Plain,
    done: kernel::Counts,
}

/// A worker's share of the fast path: the entries of its allocations, media sessions and
/// NAT bindings.
pub struct Worker {
    media: HashMap<Owner, Vec<PlainEntry>>,
    media_changed: Vec<Owner>,
    media_desired: Vec<KernelFlow>,
    media_fold: Option<Instant>,
    /// Source address towards a destination, and the interface (name, index) holding a
    /// local address: looked up once, forgotten at each full check.
    routes: HashMap<std::net::Ipv4Addr, Option<std::net::Ipv4Addr>>,
    interfaces: HashMap<std::net::Ipv4Addr, Option<(String, u32)>>,
    fp: Arc<FastPath>,
    /// Installed entries by allocation (client address, listen socket).
    installed: HashMap<(SocketAddr, usize), Vec<Entry>>,
    changed: Vec<(SocketAddr, usize)>,
    desired: Vec<Flow>,
    last_fold: Option<Instant>,
    last_full: Option<Instant>,
    install_errors: u64,
}

impl Worker {
    /// Starts following the core's changes.
    pub fn new(fp: Arc<FastPath>, server: &mut Server) -> Worker {
        server.turn_mut().changes.enable();
        server.media_offload().enable();
        Worker {
            media: HashMap::new(),
            media_changed: Vec::new(),
            media_desired: Vec::new(),
            media_fold: None,
            routes: HashMap::new(),
            interfaces: HashMap::new(),
            fp,
            installed: HashMap::new(),
            changed: Vec::new(),
            desired: Vec::new(),
            last_fold: None,
            last_full: None,
            install_errors: 0,
        }
    }

    /// Once per loop turn, after [`Server::tick`]: brings the changed allocations' entries
    /// in line with the core, and folds the kernel's counters now and then.
    pub fn sync(&mut self, server: &mut Server, now: Now) {
        let mut all = server.turn_mut().changes.drain(&mut self.changed);
        if self
            .last_full
            .is_none_or(|t| now.mono.saturating_duration_since(t) >= FULL_EVERY)
        {
            all = true;
        }
        if all {
            self.last_full = Some(now.mono);
            self.changed.clear();
            self.changed.extend(self.installed.keys().copied());
            self.changed.extend(
                server
                    .turn()
                    .table()
                    .slots()
                    .map(|(_, a)| (a.client, a.listen_socket)),
            );
        }
        if !self.changed.is_empty() {
            self.changed.sort_unstable();
            self.changed.dedup();
            let changed = std::mem::take(&mut self.changed);
            for key in &changed {
                self.reconcile(server, *key, now);
            }
            self.changed = changed;
            self.changed.clear();
        }
        if self
            .last_fold
            .is_none_or(|t| now.mono.saturating_duration_since(t) >= FOLD_EVERY)
        {
            self.last_fold = Some(now.mono);
            self.fold_all(server);
        }
        self.sync_media(server, all, now);
    }

    /// The media sessions' and NAT bindings' share of [`Worker::sync`].
    fn sync_media(&mut self, server: &mut Server, all: bool, now: Now) {
        let mut changed = std::mem::take(&mut self.media_changed);
        if server.media_offload().drain(&mut changed) || all {
            changed.clear();
            changed.extend(self.media.keys().copied());
            server.media().owners(&mut changed);
            self.routes.clear();
            self.interfaces.clear();
        }
        if !changed.is_empty() {
            changed.sort_unstable();
            changed.dedup();
            for owner in &changed {
                self.reconcile_media(server, *owner, now);
            }
            changed.clear();
        }
        self.media_changed = changed;
        let every = Media::credit_every(&server.settings().media);
        if !self.media.is_empty()
            && self
                .media_fold
                .is_none_or(|t| now.mono.saturating_duration_since(t) >= every)
        {
            self.media_fold = Some(now.mono);
            for entries in self.media.values_mut() {
                for e in entries.iter_mut() {
                    let c = self.fp.counts_plain(&e.plain);
                    credit_plain(server, e, c, now.mono);
                }
            }
        }
    }

    fn reconcile_media(&mut self, server: &mut Server, owner: Owner, now: Now) {
        self.media_desired.clear();
        {
            let turn = server.turn();
            let blocked = |ip: IpAddr| turn.blocked(ip, now.unix);
            server
                .media()
                .kernel_flows(owner, &blocked, &mut self.media_desired);
        }
        let mut cur = self.media.remove(&owner).unwrap_or_default();
        for mut e in cur.extract_if(.., |e| !self.media_desired.contains(&e.flow)) {
            let c = self.fp.remove_plain(&e.plain);
            credit_plain(server, &mut e, c, now.mono);
            server.stats_mut().sub(Counter::FastPathMediaEntries, 1);
        }
        let desired = std::mem::take(&mut self.media_desired);
        for f in &desired {
            if cur.iter().any(|e| e.flow == *f) {
                continue;
            }
            let Some(plain) = self.resolve(f) else {
                continue;
            };
            match self.fp.install_plain(&plain) {
                Ok(()) => {
                    cur.push(PlainEntry {
                        flow: *f,
                        plain,
                        done: kernel::Counts::default(),
                    });
                    server.stats_mut().add(Counter::FastPathMediaEntries, 1);
                }
                Err(e) => install_failed(
                    &mut self.install_errors,
                    format_args!(
                        "cannot install a media or NAT map path ({e}); it is relayed in user space"
                    ),
                ),
            }
        }
        self.media_desired = desired;
        if !cur.is_empty() {
            self.media.insert(owner, cur);
        }
    }

    /// The kernel's view of a path: wildcard local addresses filled in with the routing's
    /// source address towards the other side, the program attached to the interface the
    /// packets come in on, and the interface they leave by. `None`: it stays in user space
    /// (IPv6, no route, an interface the program cannot be attached to).
    fn resolve(&mut self, f: &KernelFlow) -> Option<Plain> {
        let (SocketAddr::V4(from), SocketAddr::V4(at), SocketAddr::V4(out), SocketAddr::V4(to)) =
            (f.from, f.at, f.out, f.to)
        else {
            return None;
        };
        let towards_from = self.route(*from.ip())?;
        let at_ip = if at.ip().is_unspecified() {
            towards_from
        } else {
            *at.ip()
        };
        let out_ip = if out.ip().is_unspecified() {
            self.route(*to.ip())?
        } else {
            *out.ip()
        };
        let (in_name, _) = self.interface(towards_from)?;
        if let Err(e) = self.fp.attach(&in_name) {
            install_failed(
                &mut self.install_errors,
                format_args!("{e}; media and NAT map paths there stay in user space"),
            );
            return None;
        }
        let ifindex = if self.fp.is_local(*to.ip()) {
            self.fp.loopback()
        } else {
            let via = self.route(*to.ip())?;
            self.interface(via)?.1
        };
        Some(Plain {
            from,
            at: SocketAddrV4::new(at_ip, at.port()),
            out: SocketAddrV4::new(out_ip, out.port()),
            to,
            ifindex,
        })
    }

    fn route(&mut self, dst: std::net::Ipv4Addr) -> Option<std::net::Ipv4Addr> {
        if self.routes.len() >= ROUTES_MAX {
            self.routes.clear();
        }
        *self
            .routes
            .entry(dst)
            .or_insert_with(|| kernel::route_source(dst))
    }

    fn interface(&mut self, ip: std::net::Ipv4Addr) -> Option<(String, u32)> {
        if self.interfaces.len() >= ROUTES_MAX {
            self.interfaces.clear();
        }
        self.interfaces
            .entry(ip)
            .or_insert_with(|| kernel::interface_of(ip))
            .clone()
    }

    /// The worker stops: every entry leaves the kernel, its last counts credited, so the
    /// gauge and the totals are right for the next dataplane.
    pub fn shutdown(&mut self, server: &mut Server) {
        let now = Instant::now();
        for (_, entries) in std::mem::take(&mut self.media) {
            for mut e in entries {
                let c = self.fp.remove_plain(&e.plain);
                credit_plain(server, &mut e, c, now);
                server.stats_mut().sub(Counter::FastPathMediaEntries, 1);
            }
        }
        for (key, entries) in std::mem::take(&mut self.installed) {
            for mut e in entries {
                let (up, down) = self.fp.remove(&e.flow);
                credit(server, key, &mut e, up, down);
                server.stats_mut().sub(Counter::FastPathEntries, 1);
            }
        }
    }

    fn reconcile(&mut self, server: &mut Server, key: (SocketAddr, usize), now: Now) {
        self.desired.clear();
        let settings = Arc::clone(server.settings());
        flows(
            server.turn(),
            &settings,
            key.0,
            key.1,
            now,
            &mut self.desired,
        );
        let mut cur = self.installed.remove(&key).unwrap_or_default();
        for mut e in cur.extract_if(.., |e| !self.desired.contains(&e.flow)) {
            // Counts up to the removal go to the allocation (if it still exists).
            let (up, down) = self.fp.remove(&e.flow);
            credit(server, key, &mut e, up, down);
            server.stats_mut().sub(Counter::FastPathEntries, 1);
        }
        for f in &self.desired {
            if cur.iter().any(|e| e.flow == *f) {
                continue;
            }
            match self.fp.install(f) {
                Ok(()) => {
                    cur.push(Entry {
                        flow: *f,
                        up: kernel::Counts::default(),
                        down: kernel::Counts::default(),
                    });
                    server.stats_mut().add(Counter::FastPathEntries, 1);
                }
                // A full map (or a vanished interface): this channel stays in user space.
                Err(e) => install_failed(
                    &mut self.install_errors,
                    format_args!("cannot install a channel ({e}); it is relayed in user space"),
                ),
            }
        }
        if !cur.is_empty() {
            self.installed.insert(key, cur);
        }
    }

    fn fold_all(&mut self, server: &mut Server) {
        for (key, entries) in self.installed.iter_mut() {
            for e in entries.iter_mut() {
                fold(&self.fp, server, *key, e);
            }
        }
    }
}

/// Counts a path left in user space in `errors` and logs it, less and less often (at the
/// 1st, 2nd, 4th, 8th ... failure).
fn install_failed(errors: &mut u64, why: std::fmt::Arguments<'_>) {
    *errors += 1;
    if errors.is_power_of_two() {
        tracing::warn!(errors = *errors, "kernel fast path: {why}");
    }
}

/// Credits what the kernel relayed on a media or NAT direction since the last call.
fn credit_plain(server: &mut Server, e: &mut PlainEntry, c: kernel::Counts, now: Instant) {
    let (dp, db) = (
        c.packets.saturating_sub(e.done.packets),
        c.bytes.saturating_sub(e.done.bytes),
    );
    if dp == 0 {
        return;
    }
    e.done = c;
    server.stats_mut().add(
        match e.flow.part {
            Part::Leg { .. } => Counter::FastPathMediaPackets,
            Part::NatIn { .. } => Counter::FastPathNatInboundPackets,
            Part::NatOut { .. } => Counter::FastPathNatOutboundPackets,
        },
        dp,
    );
    server.credit_media(&e.flow, dp, db, now);
}

/// Adds what the kernel relayed for `e` since the last fold to the worker's counters and to
/// the allocation's traffic figures.
fn fold(fp: &FastPath, server: &mut Server, key: (SocketAddr, usize), e: &mut Entry) {
    let (up, down) = fp.counts(&e.flow);
    credit(server, key, e, up, down);
}

/// Adds the counts beyond those already folded for `e`.
fn credit(
    server: &mut Server,
    key: (SocketAddr, usize),
    e: &mut Entry,
    up: kernel::Counts,
    down: kernel::Counts,
) {
    let (dp, db) = (
        up.packets.saturating_sub(e.up.packets),
        up.bytes.saturating_sub(e.up.bytes),
    );
    let (cp, cb) = (
        down.packets.saturating_sub(e.down.packets),
        down.bytes.saturating_sub(e.down.bytes),
    );
    if dp + cp == 0 {
        return;
    }
    e.up = up;
    e.down = down;
    let stats = server.stats_mut();
    stats.add(Counter::RelayClientToPeerPackets, dp);
    stats.add(Counter::RelayClientToPeerBytes, db);
    stats.add(Counter::FastPathClientToPeerPackets, dp);
    stats.add(Counter::RelayPeerToClientPackets, cp);
    stats.add(Counter::RelayPeerToClientBytes, cb);
    stats.add(Counter::FastPathPeerToClientPackets, cp);
    let table = server.turn_mut().table_mut();
    if let Some(slot) = table.by_client(key.0, key.1) {
        if let Some(a) = table.get_mut(slot) {
            a.traffic.packets_to_peer += dp;
            a.traffic.bytes_to_peer += db;
            a.traffic.packets_to_client += cp;
            a.traffic.bytes_to_client += cb;
        }
        // Its API record is republished with the next second's tick.
        table.touch(slot);
    }
}
