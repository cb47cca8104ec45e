//! TURN settings derived from one configuration generation, shared read-only by workers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use portico_shared::config::{Config, PortRange};

use super::auth::Credentials;
use super::policy::PeerPolicy;

pub struct TurnSettings {
    pub credentials: Credentials,
    pub policy: PeerPolicy,
    /// Address relay sockets bind to, per family.
    pub relay_v4: Option<IpAddr>,
    pub relay_v6: Option<IpAddr>,
    /// The further `turn.relay_ip` addresses of either family, after `relay_v4`/`relay_v6`:
    /// relays are spread over all addresses of their family, each with the whole port range.
    pub relay_more: Vec<IpAddr>,
    /// Advertised relay address when a static NAT map sits in front (same family only).
    pub external_ip: Option<IpAddr>,
    pub ports: PortRange,
    pub default_lifetime: Duration,
    pub max_lifetime: Duration,
    pub max_allocations: usize,
    pub max_allocations_per_user: usize,
    pub max_permissions: usize,
    pub max_channels: usize,
    pub max_bandwidth: u64,
    pub error_rate: u32,
    /// Other boxes a full box sends clients to (300 Try Alternate), in configuration order.
    pub alternate_servers: Vec<SocketAddr>,
    /// TURN over TCP and TLS: the stream driver's limits and the RFC 6062 bound.
    pub stream: StreamLimits,
}

/// Bounds of TURN over TCP and TLS (`turn.tcp_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    /// Client connections in total; fixed when the stream thread starts (it sizes the
    /// socket index space).
    pub max_connections: usize,
    pub per_source: usize,
    /// Time for the TLS handshake and the first complete message.
    pub first_message: Duration,
    pub idle: Duration,
    /// Bytes queued for a connection that does not read fast enough (and per direction of
    /// an RFC 6062 data connection).
    pub max_output: usize,
    /// RFC 6062 data connections per TCP allocation.
    pub relay_connections: usize,
    /// While busy, the least time from one loop turn's start to the next poll
    /// (`turn.tcp_coalesce_us`); zero polls at once.
    pub coalesce: Duration,
}

impl Default for StreamLimits {
    fn default() -> StreamLimits {
        StreamLimits::from_config(&Config::default())
    }
}

impl StreamLimits {
    pub fn from_config(config: &Config) -> StreamLimits {
        let t = &config.turn;
        StreamLimits {
            max_connections: t.tcp_max_connections,
            per_source: t.tcp_max_connections_per_source,
            first_message: t.tcp_handshake_timeout.get(),
            idle: t.tcp_idle_timeout.get(),
            max_output: t.tcp_output_buffer,
            relay_connections: t.tcp_relay_connections,
            coalesce: Duration::from_micros(u64::from(t.tcp_coalesce_us)),
        }
    }
}

/// The source address of each family's default route, as the runtime found it (the core
/// opens no socket to ask the routing table). Used for the relay address when `turn.listen`
/// has only wildcard addresses of a family and `turn.relay_ip` names none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DefaultRoutes {
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
}

fn pick_relay(config: &Config, routes: &DefaultRoutes, v4: bool) -> Option<IpAddr> {
    if let Some(ip) = config.turn.relay_ip.iter().find(|ip| ip.is_ipv4() == v4) {
        return Some(*ip);
    }
    if let Some(a) = config
        .turn
        .listen
        .iter()
        .find(|a| a.is_ipv4() == v4 && !a.ip().is_unspecified())
    {
        return Some(a.ip());
    }
    // Only wildcard listeners of this family (or none): use the default route's source.
    if !config.turn.listen.iter().any(|a| a.is_ipv4() == v4) {
        return None;
    }
    if v4 {
        routes
            .v4
            .filter(|ip| ip.is_ipv4())
            .or(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)))
    } else {
        routes.v6.filter(|ip| ip.is_ipv6())
    }
}

impl TurnSettings {
    pub fn from_config(
        config: &Config,
        nonce_secret: &[u8; 32],
        routes: &DefaultRoutes,
    ) -> TurnSettings {
        let t = &config.turn;
        let relay_v4 = pick_relay(config, routes, true);
        let relay_v6 = pick_relay(config, routes, false);
        let ports = t.relay_ports;
        let relay_more: Vec<IpAddr> = t
            .relay_ip
            .iter()
            .filter(|ip| Some(**ip) != relay_v4 && Some(**ip) != relay_v6)
            .copied()
            .collect();
        let mut own: Vec<IpAddr> = [relay_v4, relay_v6, t.external_ip]
            .into_iter()
            .flatten()
            .chain(relay_more.iter().copied())
            .collect();
        own.dedup();
        TurnSettings {
            credentials: Credentials::from_config(config, nonce_secret),
            policy: PeerPolicy::new(
                t.allow_peers.clone(),
                t.deny_peers.clone(),
                own,
                (ports.low(), ports.high()),
            ),
            relay_v4,
            relay_v6,
            relay_more,
            external_ip: t.external_ip,
            ports,
            default_lifetime: t.default_lifetime.get(),
            max_lifetime: t.max_lifetime.get(),
            max_allocations: t.max_allocations,
            max_allocations_per_user: t.max_allocations_per_user,
            max_permissions: t.max_permissions,
            max_channels: t.max_channels,
            max_bandwidth: t.max_bandwidth,
            error_rate: t.error_rate,
            alternate_servers: t.alternate_servers.clone(),
            stream: StreamLimits::from_config(config),
        }
    }

    pub fn relay_ip(&self, v4: bool) -> Option<IpAddr> {
        if v4 {
            self.relay_v4
        } else {
            self.relay_v6
        }
    }

    /// How many relay addresses a family has (each with the whole port range).
    pub fn relay_ip_count(&self, v4: bool) -> usize {
        match self.relay_ip(v4) {
            None => 0,
            Some(_) => {
                1 + self
                    .relay_more
                    .iter()
                    .filter(|ip| ip.is_ipv4() == v4)
                    .count()
            }
        }
    }

    /// The `n`th relay address of a family (`n` below [`TurnSettings::relay_ip_count`]).
    pub fn relay_ip_nth(&self, v4: bool, n: usize) -> Option<IpAddr> {
        match n {
            0 => self.relay_ip(v4),
            n => self
                .relay_more
                .iter()
                .filter(|ip| ip.is_ipv4() == v4)
                .nth(n - 1)
                .copied(),
        }
    }

    /// Whether a full box redirects a client at `client`: RFC 8489 §10 needs an alternate of
    /// the request's own address family.
    pub fn redirects(&self, client: SocketAddr) -> bool {
        let v4 = super::policy::canonical(client.ip()).is_ipv4();
        self.alternate_servers.iter().any(|a| a.is_ipv4() == v4)
    }

    /// The ALTERNATE-SERVER addresses for a client at `client`: one of its family first,
    /// then one of the other family if configured. `pick` chooses among several of a
    /// family, so clients spread over the alternates.
    pub fn alternates_for(
        &self,
        client: SocketAddr,
        pick: usize,
    ) -> impl Iterator<Item = SocketAddr> + '_ {
        let v4 = super::policy::canonical(client.ip()).is_ipv4();
        [v4, !v4].into_iter().filter_map(move |family| {
            let n = self
                .alternate_servers
                .iter()
                .filter(|a| a.is_ipv4() == family)
                .count();
            if n == 0 {
                return None;
            }
            self.alternate_servers
                .iter()
                .filter(|a| a.is_ipv4() == family)
                .nth(pick % n)
                .copied()
        })
    }

    /// The address clients are told for a relay bound at `local`.
    pub fn public_address(&self, local: SocketAddr) -> SocketAddr {
        match self.external_ip {
            Some(ext) if ext.is_ipv4() == local.is_ipv4() => SocketAddr::new(ext, local.port()),
            _ => local,
        }
    }
}
