//! Static UDP NAT maps: public ports on `turn.relay_ip` forwarded 1:1 to an internal host's
//! ports, full cone. The first datagram from an external source S creates a binding: a
//! socket of its own (an ephemeral port) from which everything S sends to public port
//! `low + k` is forwarded to the internal `port + k`; what the internal host sends back to
//! that socket from `port + k` leaves from public port `low + k` towards S. Any source may
//! open a binding (full cone), within `max_bindings` per map and the peer policy; bindings
//! idle for the map's `idle_timeout` are closed. Each map belongs to one worker (its first
//! public port modulo the worker count), which holds its sockets.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use portico_shared::counters::Counter;
use portico_shared::media_config::NatMap;

use super::offload::{self, KernelFlow, Offload, Owner, Part, MAX_OFFSETS};
use super::{MediaCtx, Role};
use crate::server::Action;

#[derive(Debug)]
struct Binding {
    source: SocketAddr,
    socket: usize,
    last: Instant,
    /// Tells this binding from a later one in the same slot ([`Owner`]).
    serial: u64,
    /// The binding socket's port (a wildcard socket), if the driver could say.
    port: Option<u16>,
    /// Port offsets this binding carried, offered to a kernel fast path.
    offsets: Vec<u16>,
}

impl Binding {
    /// Records that offset `k` carried a packet; true when that is new.
    fn used(&mut self, k: u16) -> bool {
        if self.offsets.contains(&k) || self.offsets.len() >= MAX_OFFSETS {
            return false;
        }
        self.offsets.push(k);
        true
    }
}

#[derive(Debug)]
struct MapState {
    map: NatMap,
    /// The public ports' address (`turn.relay_ip`).
    ip: Option<IpAddr>,
    /// Public socket per port offset (`None`: that port could not be bound).
    public: Vec<Option<usize>>,
    bindings: Vec<Option<Binding>>,
    free: Vec<u32>,
    by_source: BTreeMap<SocketAddr, u32>,
}

impl MapState {
    fn active(&self) -> usize {
        self.by_source.len()
    }
}

/// The NAT maps one worker owns.
#[derive(Debug, Default)]
pub struct Nat {
    maps: Vec<Option<MapState>>,
    serial: u64,
}

fn set_role(roles: &mut Vec<Role>, socket: usize, role: Role) {
    if socket >= roles.len() {
        roles.resize(socket + 1, Role::None);
    }
    roles[socket] = role;
}

fn clear_role(roles: &mut [Role], socket: usize) {
    if let Some(r) = roles.get_mut(socket) {
        *r = Role::None;
    }
}

impl Nat {
    /// Public ports this worker holds, over all its maps (tests, status).
    pub fn public_sockets(&self) -> usize {
        self.maps
            .iter()
            .flatten()
            .map(|m| m.public.iter().flatten().count())
            .sum()
    }

    /// Bindings held now.
    pub fn bindings(&self) -> usize {
        self.maps.iter().flatten().map(MapState::active).sum()
    }

    /// Brings the maps this worker owns in line with the settings: maps gone or changed are
    /// closed, new ones opened, and bindings whose source the peer policy now refuses closed.
    /// `worker` is (index, count); a count of 0 owns nothing.
    pub(super) fn reconcile(
        &mut self,
        cx: &mut MediaCtx<'_>,
        roles: &mut Vec<Role>,
        offload: &mut Offload,
        worker: (usize, usize),
    ) {
        let (me, workers) = worker;
        let wanted: Vec<&NatMap> = cx
            .settings
            .nat_maps
            .iter()
            .filter(|m| workers > 0 && usize::from(m.public_ports.low()) % workers == me)
            .collect();
        for i in 0..self.maps.len() {
            let keep = self.maps[i]
                .as_ref()
                .is_some_and(|s| wanted.contains(&&s.map));
            if !keep {
                if let Some(s) = self.maps[i].take() {
                    close_map(cx, roles, offload, i as u16, s);
                }
            }
        }
        for m in wanted {
            if self.maps.iter().flatten().any(|s| s.map == *m) {
                continue;
            }
            let slot = match self.maps.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.maps.push(None);
                    self.maps.len() - 1
                }
            };
            let Ok(map_no) = u16::try_from(slot) else {
                continue;
            };
            let ip = cx.turn.relay_ip(true).or(cx.turn.relay_ip(false));
            let mut public = Vec::with_capacity(m.public_ports.len());
            for (k, port) in (m.public_ports.low()..=m.public_ports.high()).enumerate() {
                let sock = ip.and_then(|ip| cx.io.open(SocketAddr::new(ip, port), false).ok());
                match sock {
                    Some(s) => set_role(
                        roles,
                        s,
                        Role::NatPublic {
                            map: map_no,
                            offset: k as u16,
                        },
                    ),
                    None => tracing::warn!(
                        port,
                        internal = %m.internal,
                        "nat.maps: public port could not be bound on turn.relay_ip"
                    ),
                }
                public.push(sock);
            }
            self.maps[slot] = Some(MapState {
                map: m.clone(),
                ip,
                public,
                bindings: Vec::new(),
                free: Vec::new(),
                by_source: BTreeMap::new(),
            });
        }
        // The peer policy may have narrowed.
        for (map_no, s) in self.maps.iter_mut().enumerate() {
            let Some(s) = s else { continue };
            let denied: Vec<u32> = s
                .by_source
                .iter()
                .filter(|(src, _)| !super::allowed(&cx.turn.policy, **src))
                .map(|(_, b)| *b)
                .collect();
            for b in denied {
                drop_binding(cx, roles, offload, map_no as u16, s, b);
            }
        }
    }

    /// A datagram from an external source to public port `low + offset` of `map`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn inbound(
        &mut self,
        cx: &mut MediaCtx<'_>,
        roles: &mut Vec<Role>,
        offload: &mut Offload,
        map: u16,
        offset: u16,
        from: SocketAddr,
        start: usize,
        len: usize,
    ) -> Action {
        let Some(Some(s)) = self.maps.get_mut(usize::from(map)) else {
            return Action::Drop;
        };
        let b = match s.by_source.get(&from) {
            Some(b) => *b,
            None => {
                if !super::allowed(&cx.turn.policy, from) {
                    cx.stats.incr(Counter::DropNatPeerDenied);
                    return Action::Drop;
                }
                if s.active() >= s.map.max_bindings {
                    cx.stats.incr(Counter::DropNatBindingsFull);
                    return Action::Drop;
                }
                let any = if s.map.internal.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                };
                let Ok(socket) = cx.io.open(SocketAddr::new(any, 0), false) else {
                    cx.stats.incr(Counter::DropNatBindingsFull);
                    return Action::Drop;
                };
                self.serial += 1;
                let binding = Binding {
                    source: from,
                    socket,
                    last: cx.now.mono,
                    serial: self.serial,
                    port: cx.io.local_addr(socket).map(|a| a.port()),
                    offsets: Vec::new(),
                };
                let b = match s.free.pop() {
                    Some(b) => {
                        s.bindings[b as usize] = Some(binding);
                        b
                    }
                    None => {
                        s.bindings.push(Some(binding));
                        (s.bindings.len() - 1) as u32
                    }
                };
                s.by_source.insert(from, b);
                set_role(roles, socket, Role::NatBinding { map, binding: b });
                cx.stats.incr(Counter::NatBindingsCreated);
                cx.stats.incr(Counter::NatBindingsActive);
                b
            }
        };
        let Some(Some(binding)) = s.bindings.get_mut(b as usize) else {
            return Action::Drop;
        };
        binding.last = cx.now.mono;
        if binding.used(offset) {
            offload.mark(Owner::Binding {
                map,
                binding: b,
                serial: binding.serial,
            });
        }
        let internal = s.map.internal;
        cx.stats.incr(Counter::NatInboundPackets);
        Action::Send {
            offset: start,
            len,
            socket: binding.socket,
            to: SocketAddr::new(internal.ip(), internal.port().saturating_add(offset)),
        }
    }

    /// A datagram to a binding socket: from the internal host, back to the binding's source.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn outbound(
        &mut self,
        cx: &mut MediaCtx<'_>,
        offload: &mut Offload,
        map: u16,
        binding: u32,
        from: SocketAddr,
        start: usize,
        len: usize,
    ) -> Action {
        let Some(Some(s)) = self.maps.get_mut(usize::from(map)) else {
            return Action::Drop;
        };
        let internal = s.map.internal;
        let offset = from.port().wrapping_sub(internal.port());
        let public = (from.ip() == internal.ip())
            .then(|| s.public.get(usize::from(offset)).copied().flatten())
            .flatten();
        let (Some(public), Some(Some(b))) = (public, s.bindings.get_mut(binding as usize)) else {
            cx.stats.incr(Counter::DropNatForeignReply);
            return Action::Drop;
        };
        b.last = cx.now.mono;
        if b.used(offset) {
            offload.mark(Owner::Binding {
                map,
                binding,
                serial: b.serial,
            });
        }
        cx.stats.incr(Counter::NatOutboundPackets);
        Action::Send {
            offset: start,
            len,
            socket: public,
            to: b.source,
        }
    }

    /// Closes bindings idle longer than their map's `idle_timeout`.
    pub(super) fn expire(
        &mut self,
        cx: &mut MediaCtx<'_>,
        roles: &mut [Role],
        offload: &mut Offload,
    ) {
        let now = cx.now.mono;
        for (map_no, s) in self.maps.iter_mut().enumerate() {
            let Some(s) = s else { continue };
            let idle = s.map.idle_timeout.get();
            let old: Vec<u32> = s
                .bindings
                .iter()
                .enumerate()
                .filter_map(|(i, b)| {
                    b.as_ref()
                        .filter(|b| now.saturating_duration_since(b.last) >= idle)
                        .map(|_| i as u32)
                })
                .collect();
            for b in old {
                drop_binding(cx, roles, offload, map_no as u16, s, b);
            }
        }
    }

    /// Every binding (a full check of the kernel's paths).
    pub(super) fn owners(&self, out: &mut Vec<Owner>) {
        for (m, s) in self.maps.iter().enumerate() {
            let Some(s) = s else { continue };
            for (i, b) in s.bindings.iter().enumerate() {
                if let Some(b) = b {
                    out.push(Owner::Binding {
                        map: m as u16,
                        binding: i as u32,
                        serial: b.serial,
                    });
                }
            }
        }
    }

    fn binding(&self, owner: Owner) -> Option<(&MapState, &Binding)> {
        let (map, binding, serial) = slot(owner)?;
        let s = self.maps.get(map)?.as_ref()?;
        let b = s.bindings.get(binding)?.as_ref()?;
        (b.serial == serial).then_some((s, b))
    }

    /// A binding's paths, both directions on each port offset it carried.
    pub(super) fn kernel_flows(
        &self,
        owner: Owner,
        blocked: &dyn Fn(IpAddr) -> bool,
        out: &mut Vec<KernelFlow>,
    ) {
        let Some((s, b)) = self.binding(owner) else {
            return;
        };
        let (Some(ip), Some(port)) = (s.ip, b.port) else {
            return;
        };
        let internal = s.map.internal;
        let local = SocketAddr::new(offload::any_like(internal.ip()), port);
        for &k in &b.offsets {
            let (Some(public), Some(inside)) = (
                s.map
                    .public_ports
                    .low()
                    .checked_add(k)
                    .map(|p| SocketAddr::new(ip, p)),
                offload::port_plus(internal, k),
            ) else {
                continue;
            };
            if s.public.get(usize::from(k)).copied().flatten().is_none() {
                continue;
            }
            if !blocked(b.source.ip()) {
                out.push(KernelFlow {
                    owner,
                    part: Part::NatIn { offset: k },
                    from: b.source,
                    at: public,
                    out: local,
                    to: inside,
                });
            }
            if !blocked(inside.ip()) {
                out.push(KernelFlow {
                    owner,
                    part: Part::NatOut { offset: k },
                    from: inside,
                    at: local,
                    out: public,
                    to: b.source,
                });
            }
        }
    }

    /// The kernel relayed packets of `owner`'s binding: it is not idle.
    pub(super) fn touch(&mut self, owner: Owner, now: Instant) {
        let Some((map, binding, serial)) = slot(owner) else {
            return;
        };
        let b = self
            .maps
            .get_mut(map)
            .and_then(Option::as_mut)
            .and_then(|s| s.bindings.get_mut(binding))
            .and_then(Option::as_mut)
            .filter(|b| b.serial == serial);
        if let Some(b) = b {
            b.last = b.last.max(now);
        }
    }
}

/// The map slot, binding slot and serial `owner` names, if it is a NAT binding.
fn slot(owner: Owner) -> Option<(usize, usize, u64)> {
    match owner {
        Owner::Binding {
            map,
            binding,
            serial,
        } => Some((usize::from(map), binding as usize, serial)),
        Owner::Session { .. } => None,
    }
}

fn drop_binding(
    cx: &mut MediaCtx<'_>,
    roles: &mut [Role],
    offload: &mut Offload,
    map: u16,
    s: &mut MapState,
    b: u32,
) {
    if let Some(binding) = s.bindings.get_mut(b as usize).and_then(Option::take) {
        offload.mark(Owner::Binding {
            map,
            binding: b,
            serial: binding.serial,
        });
        s.by_source.remove(&binding.source);
        clear_role(roles, binding.socket);
        cx.io.close(binding.socket);
        s.free.push(b);
        cx.stats.sub(Counter::NatBindingsActive, 1);
    }
}

fn close_map(
    cx: &mut MediaCtx<'_>,
    roles: &mut [Role],
    offload: &mut Offload,
    map: u16,
    mut s: MapState,
) {
    for b in 0..s.bindings.len() as u32 {
        drop_binding(cx, roles, offload, map, &mut s, b);
    }
    for sock in s.public.iter().flatten() {
        clear_role(roles, *sock);
        cx.io.close(*sock);
    }
}
