//! The configuration model: one typed tree, loaded from TOML, validated whole.
//!
//! Both processes use this module: the control plane reads the operator's file, validates it
//! and writes its canonical TOML form into shared memory; the dataplane parses that text with
//! the same code. Unknown keys are errors (a typo must not silently fall back to a default),
//! and every semantic check names the key, the value and the rule, for example
//! `turn.relay_ports: "70000-80000" is not a port range (1-65535)`.
//!
//! Addresses, CIDR lists ([`CidrList`]), port ranges ([`PortRange`]) and durations
//! ([`Duration`]) are typed fields: deserialising the text is what checks them, so a value
//! that loads is one the code can use as it is, and nothing parses it a second time.
//! [`Config::validate`] checks the rest: ranges and rules between keys.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::addr::CidrList;
use crate::media_config::{MediaConfig, NatConfig};
use crate::proxy_config::ProxyConfig;
pub use crate::values::{Duration, Minutes, PortRange};

/// A configuration error a person can act on: the key, and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", self.key, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

/// What the API shows instead of a secret (TURN users' passwords and keys, the TURN REST API
/// shared secrets). Sent back in a PUT or PATCH it means "keep the current value": for a user,
/// the secret of the current user of that name; in `turn.shared_secret`, the current secrets
/// in their order (the first placeholder stands for the first current secret, and so on), so
/// prepending a new secret to what GET returned is a rollover. It is never a valid secret.
pub const REDACTED: &str = "<redacted>";

/// Most `turn.alternate_servers` addresses: a 300 carries one per family, so more only
/// spreads clients wider.
pub const MAX_ALTERNATE_SERVERS: usize = 32;

/// The longest `turn.tcp_coalesce_us`: 10 ms, half a packet interval of 20 ms audio.
pub const MAX_TCP_COALESCE_US: u32 = 10_000;
/// Most `turn.relay_ip` addresses: 64 addresses × 64k ports is over four million relays,
/// four times the `turn.max_allocations` cap.
pub const MAX_RELAY_IPS: usize = 64;

fn err(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the admin token, the generated certificate and persisted state live.
    pub state_dir: PathBuf,
    /// `error`, `warn`, `info`, `debug`, `trace` or `off`, or comma-separated `TARGET=LEVEL`
    /// directives (`"info,portico::proxy=debug"`); anything else is refused at load.
    /// `RUST_LOG` overrides it.
    pub log_level: String,
    pub turn: TurnConfig,
    pub stun: StunConfig,
    pub api: ApiConfig,
    pub proxy: ProxyConfig,
    pub fraud: FraudConfig,
    pub fleet: FleetConfig,
    /// RTP media relay sessions (off without `media.ports`).
    pub media: MediaConfig,
    /// Static UDP NAT maps.
    pub nat: NatConfig,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            state_dir: PathBuf::from("./portico-state"),
            log_level: "info".into(),
            turn: TurnConfig::default(),
            stun: StunConfig::default(),
            api: ApiConfig::default(),
            proxy: ProxyConfig::default(),
            fraud: FraudConfig::default(),
            fleet: FleetConfig::default(),
            media: MediaConfig::default(),
            nat: NatConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// UDP and TCP addresses STUN/TURN listens on. Empty: STUN/TURN is off (a proxy-only
    /// box); the dataplane then opens no socket at all.
    pub listen: Vec<SocketAddr>,
    /// TURN-over-TLS (RFC 8656 §3.1, usually port 5349) addresses, served with the
    /// certificate of `[proxy.tls]` (or the generated one in `state_dir`). Needs `listen`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listen_tls: Vec<SocketAddr>,
    pub realm: String,
    /// Local addresses relay sockets bind to (a string or a list, up to [`MAX_RELAY_IPS`]).
    /// Several of a family share out the allocations: each address has the whole
    /// `relay_ports` range, so a box past ~64k allocations needs more than one. Unset: a
    /// specific listen address of each family, else the address of the interface the
    /// default route leaves from.
    #[serde(
        deserialize_with = "one_or_many_ip",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub relay_ip: Vec<IpAddr>,
    /// Address advertised in XOR-RELAYED-ADDRESS when a static NAT map sits in front of the box.
    pub external_ip: Option<IpAddr>,
    /// `"low-high"`, inclusive.
    pub relay_ports: PortRange,
    /// TURN REST API secrets; the first signs new credentials, all verify (rollover).
    #[serde(
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub shared_secret: Vec<String>,
    pub users: Vec<TurnUser>,
    pub allow_peers: CidrList,
    pub deny_peers: CidrList,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Pin worker i to core i. Right on a box that runs little else; on a shared or
    /// virtual machine the scheduler's freedom to move a worker off a busy core is worth more.
    pub pin_workers: bool,
    pub io: IoMode,
    /// Kernel fast path for established channels (an eBPF program on the interfaces of the
    /// listen and relay addresses): `"auto"` loads it when it can and otherwise runs without
    /// it (one log line), `"on"` refuses to start without it, `"off"` never loads it.
    pub fast_path: FastPathMode,
    /// How UDP relays over IPv4 hold their ports: `"socket"` (a bound socket each, the
    /// default), `"shared"` (no descriptor per allocation: an eBPF `sk_lookup` program steers
    /// the relay ports to one socket per worker and answers leave through a raw socket;
    /// needs io_uring, `CAP_BPF`/`CAP_NET_ADMIN` and `CAP_NET_RAW`, refuses to start
    /// without them) or `"auto"` (shared where it can be had, else sockets, one log line).
    pub relay_mode: RelayMode,
    /// How long a nonce stays valid before a request gets 438 Stale Nonce (plain numbers:
    /// seconds).
    pub nonce_lifetime: Duration,
    /// Allocation lifetime when the client asks for less (RFC 8656: 600 seconds).
    pub default_lifetime: Duration,
    /// Longest allocation lifetime a client may ask for.
    pub max_lifetime: Duration,
    /// Allocations on the whole server.
    pub max_allocations: usize,
    /// Allocations per user name (REST API names count per name).
    pub max_allocations_per_user: usize,
    /// Permissions (peer IPs) per allocation.
    pub max_permissions: usize,
    /// Channels per allocation.
    pub max_channels: usize,
    /// Relayed bytes per second per allocation and direction; 0 means no cap.
    pub max_bandwidth: u64,
    /// Error responses (401 challenges and other failures) per source IP per second; above
    /// it requests are dropped so Portico cannot be used as a reflector.
    pub error_rate: u32,
    /// Other boxes of the fleet (RFC 8489 §10, RFC 8656 §7.2): when this box is full
    /// (`max_allocations` reached, or no free relay port), an Allocate is answered
    /// 300 Try Alternate with ALTERNATE-SERVER naming one of them instead of 508.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alternate_servers: Vec<SocketAddr>,
    /// TURN over TCP and TLS: open client connections in total (read at dataplane start).
    pub tcp_max_connections: usize,
    /// Open client connections per source IP address.
    pub tcp_max_connections_per_source: usize,
    /// Time for the TLS handshake and the first complete message of a connection.
    pub tcp_handshake_timeout: Duration,
    /// A connection without a message for this long is closed (a bound RFC 6062 data
    /// connection: without a byte in either direction).
    pub tcp_idle_timeout: Duration,
    /// Bytes queued towards one connection (and, on an RFC 6062 data connection, towards its
    /// peer) before relayed data is dropped or the other side is no longer read.
    pub tcp_output_buffer: usize,
    /// RFC 6062 data connections (Connect and ConnectionAttempt) per TCP allocation.
    pub tcp_relay_connections: usize,
    /// Microseconds the TCP/TLS thread lets pass between two loop turns while it is busy
    /// (its last wait found work already waiting), so that one turn serves the packets of
    /// many connections: fewer wake-ups for it and for the hosts it sends to, at up to this
    /// much added latency under load and none when idle. 0 turns it off.
    pub tcp_coalesce_us: u32,
}

impl Default for TurnConfig {
    fn default() -> TurnConfig {
        TurnConfig {
            listen: vec![
                SocketAddr::from(([0, 0, 0, 0], 3478)),
                SocketAddr::from(([0u16; 8], 3478)),
            ],
            listen_tls: Vec::new(),
            realm: "portico".into(),
            relay_ip: Vec::new(),
            external_ip: None,
            relay_ports: PortRange::DEFAULT_RELAY,
            shared_secret: Vec::new(),
            users: Vec::new(),
            allow_peers: CidrList::default(),
            deny_peers: CidrList::default(),
            workers: 0,
            pin_workers: false,
            io: IoMode::Auto,
            fast_path: FastPathMode::Off,
            relay_mode: RelayMode::Socket,
            nonce_lifetime: Duration::from_secs(600),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            max_allocations: 8192,
            max_allocations_per_user: 256,
            max_permissions: 32,
            max_channels: 32,
            max_bandwidth: 0,
            error_rate: 100,
            alternate_servers: Vec::new(),
            tcp_max_connections: 4096,
            tcp_max_connections_per_source: 64,
            tcp_handshake_timeout: Duration::from_secs(10),
            tcp_idle_timeout: Duration::from_secs(300),
            tcp_output_buffer: 64 * 1024,
            tcp_relay_connections: 32,
            tcp_coalesce_us: 500,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnUser {
    pub name: String,
    /// Clear-text password; or give `key` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// The long-term key MD5(name:realm:password) as 32 hex digits, so the file need not hold
    /// the password itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoMode {
    /// io_uring where the kernel allows it, epoll otherwise.
    Auto,
    IoUring,
    Epoll,
}

/// `turn.fast_path`: whether relayed packets of established channels are forwarded by an
/// eBPF program in the kernel instead of the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FastPathMode {
    /// Load it where the build has the program and the kernel accepts it; otherwise run
    /// without it and say why in one log line.
    Auto,
    /// Load it or refuse to start.
    On,
    /// Never load it (the default: attaching a TC program changes the box's interfaces).
    Off,
}

/// `turn.relay_mode`: a descriptor per relay, or the relay port range steered to a few
/// sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// One bound UDP socket per relayed address.
    Socket,
    /// Relay ports steered by `sk_lookup` to one socket per worker, sent through a raw
    /// socket; refuse to start where that cannot be set up.
    Shared,
    /// Shared where it can be set up, else sockets.
    Auto,
}

impl fmt::Display for IoMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoMode::Auto => "auto",
            IoMode::IoUring => "io_uring",
            IoMode::Epoll => "epoll",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StunConfig {
    /// SOFTWARE attribute in responses; empty hides it.
    pub software: String,
    /// RFC 5780: the second IP address of the box. With `alternate_port`, the server also
    /// listens on every combination of primary/alternate IP and port, and answers
    /// CHANGE-REQUEST, so clients can discover their NAT's mapping and filtering behaviour.
    pub alternate_ip: Option<IpAddr>,
    pub alternate_port: Option<u16>,
}

impl Default for StunConfig {
    fn default() -> StunConfig {
        StunConfig {
            software: concat!("Portico ", env!("CARGO_PKG_VERSION")).into(),
            alternate_ip: None,
            alternate_port: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: SocketAddr,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8088)),
        }
    }
}

/// Several boxes behind one DNS name: blacklist, whitelist and TURN users shared through
/// Redis. Off by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// `redis://HOST:PORT` of the fleet's Redis; unset: no sharing.
    pub redis: Option<String>,
    /// This box's name in the fleet (letters, digits, `.`, `_`, `-`; at most 64); empty: the
    /// host name. Entries carry the name of the box that made them.
    pub name: String,
}

impl FleetConfig {
    /// (host, port) of `redis`, which [`Config::validate`] has checked.
    pub fn redis_addr(&self) -> Option<(String, u16)> {
        parse_redis_url(self.redis.as_deref()?).ok()
    }
}

/// `redis://HOST:PORT` (HOST a name, an IPv4 address or `[IPv6]`; PORT 6379 when left out).
pub fn parse_redis_url(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| format!("\"{url}\" must start with redis://"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '@', '?', ' ']) {
        return Err(format!(
            "\"{url}\" must be redis://HOST:PORT (no user, password, database or options)"
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| format!("\"{url}\": unclosed ["))?;
        (h.to_string(), p.strip_prefix(':').unwrap_or(p))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (rest.to_string(), ""),
        }
    };
    let port = if port.is_empty() {
        6379
    } else {
        port.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("\"{url}\": bad port \"{port}\""))?
    };
    if host.is_empty() {
        return Err(format!("\"{url}\" has no host"));
    }
    Ok((host, port))
}

/// Fraud detection (reference: "Fraud Detection", "Blacklist/Whitelist Details").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FraudConfig {
    /// Suspicious events from one source within a minute that put it on the blacklist;
    /// 0 turns automatic blacklisting off.
    pub suspicious_per_minute: u32,
    /// How long an automatic blacklist entry lasts: minutes as a number, or a duration with
    /// a unit ("30s", "10m", "2h").
    pub blacklist_minutes: Minutes,
    /// Sources never blocked: addresses or CIDR blocks.
    pub whitelist: CidrList,
    /// IPv6 sources are counted and blocked per prefix of this length (one subscriber
    /// usually holds a whole /64); IPv4 sources per address.
    pub ipv6_prefix: u8,
    /// STUN/TURN requests per second from one source above which the dataplane reports a
    /// suspicious event (once per second while it lasts); 0 turns the check off.
    pub request_rate: u32,
    /// Sources tracked at once by the counting table; when full, the quietest is evicted.
    pub max_tracked_sources: usize,
    /// Whether TURN CreatePermission/ChannelBind requests refused by the peer policy (403)
    /// count as suspicious. Off by default: a WebRTC client asks permissions for every
    /// candidate of the remote party, whose host candidates are private addresses — a handful
    /// of refusals per call is normal behaviour, not an attack.
    pub count_peer_refusals: bool,
}

impl Default for FraudConfig {
    fn default() -> FraudConfig {
        FraudConfig {
            suspicious_per_minute: 20,
            blacklist_minutes: Minutes::from_secs(600),
            whitelist: CidrList::default(),
            ipv6_prefix: 64,
            request_rate: 500,
            max_tracked_sources: 65_536,
            count_peer_refusals: false,
        }
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

fn one_or_many_ip<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(IpAddr),
        Many(Vec<IpAddr>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl Config {
    /// Parses and validates TOML text. A value of the wrong form is refused naming its key
    /// (`turn.relay_ports: "70000-80000" is not a port range (1-65535)`); text that is not
    /// TOML at all, with toml's own message, which shows the line and the column.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| toml_error(&e))?;
        config.validate()?;
        Ok(config)
    }

    /// The canonical TOML form, as written to shared memory and to the state dir.
    pub fn to_toml(&self) -> String {
        // Serialising plain structs of strings, numbers and arrays cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// This configuration with every secret replaced by [`REDACTED`], as the API shows it.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        for s in &mut c.turn.shared_secret {
            *s = REDACTED.to_string();
        }
        for u in &mut c.turn.users {
            for secret in [&mut u.password, &mut u.key].into_iter().flatten() {
                *secret = REDACTED.to_string();
            }
        }
        c
    }

    /// Replaces the [`REDACTED`] placeholders of a configuration sent to the API by the
    /// secrets of `current` (see [`REDACTED`] for the rules). A placeholder with no current
    /// secret to stand for is an error naming the key.
    pub fn restore_secrets(&mut self, current: &Config) -> Result<(), ConfigError> {
        let mut kept = current.turn.shared_secret.iter();
        for s in &mut self.turn.shared_secret {
            if s == REDACTED {
                *s = kept.next().cloned().ok_or_else(|| {
                    err(
                        "turn.shared_secret",
                        format!(
                            "more \"{REDACTED}\" placeholders than the {} secrets they stand for",
                            current.turn.shared_secret.len()
                        ),
                    )
                })?;
            }
        }
        for (i, u) in self.turn.users.iter_mut().enumerate() {
            let hidden = [&u.password, &u.key]
                .into_iter()
                .any(|s| s.as_deref() == Some(REDACTED));
            if !hidden {
                continue;
            }
            let Some(now) = current.turn.users.iter().find(|c| c.name == u.name) else {
                return Err(err(
                    &format!("turn.users[{i}]"),
                    format!(
                        "\"{REDACTED}\" keeps the current secret of a user, but there is no user \"{}\"",
                        u.name
                    ),
                ));
            };
            u.password = now.password.clone();
            u.key = now.key.clone();
        }
        Ok(())
    }

    /// Checks everything serde cannot: ranges, lists, cross-key rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.state_dir.as_os_str().is_empty() {
            return Err(err("state_dir", "must not be empty"));
        }
        check_log_level(&self.log_level).map_err(|e| err("log_level", e))?;
        let t = &self.turn;
        for (i, a) in t.listen.iter().enumerate() {
            if a.port() == 0 {
                return Err(err("turn.listen", format!("\"{a}\" needs a port")));
            }
            if t.listen[..i].contains(a) {
                return Err(err("turn.listen", format!("\"{a}\" is listed twice")));
            }
        }
        for (i, a) in t.listen_tls.iter().enumerate() {
            if a.port() == 0 {
                return Err(err("turn.listen_tls", format!("\"{a}\" needs a port")));
            }
            if t.listen_tls[..i].contains(a) {
                return Err(err("turn.listen_tls", format!("\"{a}\" is listed twice")));
            }
            // turn.listen opens TCP too: the same address cannot serve plain and TLS.
            if t.listen.contains(a) {
                return Err(err(
                    "turn.listen_tls",
                    format!("\"{a}\" is also in turn.listen, which serves plain TCP there"),
                ));
            }
        }
        if !t.listen_tls.is_empty() && t.listen.is_empty() {
            return Err(err(
                "turn.listen_tls",
                "needs turn.listen: relays and workers start only with a turn.listen address",
            ));
        }
        if t.realm.is_empty() || t.realm.len() > 127 {
            return Err(err(
                "turn.realm",
                format!("\"{}\" must be 1 to 127 characters", t.realm),
            ));
        }
        for s in &t.shared_secret {
            if s.is_empty() {
                return Err(err("turn.shared_secret", "a secret must not be empty"));
            }
            if s == REDACTED {
                return Err(err(
                    "turn.shared_secret",
                    format!("\"{REDACTED}\" is the placeholder the API shows, not a secret"),
                ));
            }
        }
        for (i, u) in t.users.iter().enumerate() {
            let key = format!("turn.users[{i}]");
            if u.name.is_empty() || u.name.len() > 512 {
                return Err(err(&key, "name must be 1 to 512 bytes"));
            }
            if u.password.as_deref() == Some(REDACTED) {
                return Err(err(
                    &format!("{key}.password"),
                    format!("\"{REDACTED}\" is the placeholder the API shows, not a password"),
                ));
            }
            match (&u.password, &u.key) {
                (Some(_), Some(_)) => {
                    return Err(err(&key, "give either password or key, not both"));
                }
                (None, None) => return Err(err(&key, "needs a password or a key")),
                (None, Some(k)) => {
                    if k.len() != 32 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(err(
                            &format!("{key}.key"),
                            "must be 32 hex digits: MD5(name:realm:password)",
                        ));
                    }
                }
                (Some(_), None) => {}
            }
            if t.users[..i].iter().any(|o| o.name == u.name) {
                return Err(err(&key, format!("user \"{}\" is listed twice", u.name)));
            }
        }
        // Several addresses of a family multiply the relay ports (each address has the whole
        // `relay_ports` range): one address caps a box near 64k allocations.
        if t.relay_ip.len() > MAX_RELAY_IPS {
            return Err(err(
                "turn.relay_ip",
                format!(
                    "{} addresses is more than {MAX_RELAY_IPS}",
                    t.relay_ip.len()
                ),
            ));
        }
        for (i, ip) in t.relay_ip.iter().enumerate() {
            if t.relay_ip[..i].contains(ip) {
                return Err(err("turn.relay_ip", format!("{ip} is listed twice")));
            }
        }
        if let Some(ext) = t.external_ip {
            let same = t
                .relay_ip
                .iter()
                .filter(|ip| ip.is_ipv4() == ext.is_ipv4())
                .count();
            if same > 1 {
                return Err(err(
                    "turn.external_ip",
                    format!(
                        "a static NAT map names one relay address, but turn.relay_ip has {same} of its family"
                    ),
                ));
            }
        }
        if let Some(ip) = t
            .relay_ip
            .iter()
            .find(|ip| ip.is_unspecified() || ip.is_multicast())
        {
            return Err(err(
                "turn.relay_ip",
                format!("{ip} is not a unicast address"),
            ));
        }
        check_duration("turn.nonce_lifetime", t.nonce_lifetime, 30, 86_400)?;
        if t.default_lifetime.as_secs() < 60 || t.default_lifetime > t.max_lifetime {
            return Err(err(
                "turn.default_lifetime",
                format!(
                    "{} must be at least 60s and at most turn.max_lifetime ({})",
                    t.default_lifetime, t.max_lifetime
                ),
            ));
        }
        check_duration("turn.max_lifetime", t.max_lifetime, 60, 86_400)?;
        for (key, v, max) in [
            ("turn.max_allocations", t.max_allocations, 1_000_000),
            (
                "turn.max_allocations_per_user",
                t.max_allocations_per_user,
                1_000_000,
            ),
            ("turn.max_permissions", t.max_permissions, 1024),
            ("turn.max_channels", t.max_channels, 4096),
        ] {
            if v == 0 || v > max {
                return Err(err(key, format!("{v} is not between 1 and {max}")));
            }
        }
        if t.error_rate == 0 {
            return Err(err("turn.error_rate", "must be at least 1 per second"));
        }
        for (key, v, min, max) in [
            (
                "turn.tcp_max_connections",
                t.tcp_max_connections,
                1,
                1 << 20,
            ),
            (
                "turn.tcp_max_connections_per_source",
                t.tcp_max_connections_per_source,
                1,
                1 << 20,
            ),
            (
                "turn.tcp_output_buffer",
                t.tcp_output_buffer,
                4096,
                16 << 20,
            ),
            (
                "turn.tcp_relay_connections",
                t.tcp_relay_connections,
                1,
                1024,
            ),
        ] {
            if v < min || v > max {
                return Err(err(key, format!("{v} is not between {min} and {max}")));
            }
        }
        if t.tcp_coalesce_us > MAX_TCP_COALESCE_US {
            return Err(err(
                "turn.tcp_coalesce_us",
                format!(
                    "{} is not between 0 and {MAX_TCP_COALESCE_US}",
                    t.tcp_coalesce_us
                ),
            ));
        }
        if t.tcp_max_connections_per_source > t.tcp_max_connections {
            return Err(err(
                "turn.tcp_max_connections_per_source",
                format!(
                    "{} is more than turn.tcp_max_connections ({})",
                    t.tcp_max_connections_per_source, t.tcp_max_connections
                ),
            ));
        }
        check_duration(
            "turn.tcp_handshake_timeout",
            t.tcp_handshake_timeout,
            1,
            300,
        )?;
        check_duration("turn.tcp_idle_timeout", t.tcp_idle_timeout, 1, 86_400)?;
        if t.alternate_servers.len() > MAX_ALTERNATE_SERVERS {
            return Err(err(
                "turn.alternate_servers",
                format!(
                    "{} addresses is more than {MAX_ALTERNATE_SERVERS}",
                    t.alternate_servers.len()
                ),
            ));
        }
        for (i, a) in t.alternate_servers.iter().enumerate() {
            let ip = a.ip();
            if ip.is_unspecified() || ip.is_multicast() || a.port() == 0 {
                return Err(err(
                    "turn.alternate_servers",
                    format!("{a} is not a unicast address with a port"),
                ));
            }
            if t.alternate_servers[..i].contains(a) {
                return Err(err(
                    "turn.alternate_servers",
                    format!("{a} is listed twice"),
                ));
            }
            if t.listen.contains(a) {
                return Err(err(
                    "turn.alternate_servers",
                    format!("{a} is this box's own turn.listen address"),
                ));
            }
        }
        if t.workers > crate::shm::MAX_WORKERS {
            return Err(err(
                "turn.workers",
                format!("{} is more than {}", t.workers, crate::shm::MAX_WORKERS),
            ));
        }
        self.proxy.validate()?;
        crate::media_config::validate(&self.media, &self.nat, t.relay_ports)?;
        let f = &self.fraud;
        check_duration(
            "fraud.blacklist_minutes",
            f.blacklist_minutes,
            1,
            366 * 86_400,
        )?;
        if !crate::shm::BLACKLIST_V6_PREFIXES.contains(&f.ipv6_prefix) {
            return Err(err(
                "fraud.ipv6_prefix",
                format!("{} is not one of 48, 56, 64 or 128", f.ipv6_prefix),
            ));
        }
        if f.max_tracked_sources < 16 || f.max_tracked_sources > 10_000_000 {
            return Err(err(
                "fraud.max_tracked_sources",
                format!("{} is not between 16 and 10000000", f.max_tracked_sources),
            ));
        }
        let fl = &self.fleet;
        if let Some(url) = &fl.redis {
            parse_redis_url(url).map_err(|e| err("fleet.redis", e))?;
        }
        if fl.name.len() > 64
            || !fl
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(err(
                "fleet.name",
                format!(
                    "\"{}\" must be at most 64 letters, digits, '.', '_' or '-'",
                    fl.name
                ),
            ));
        }
        if self.stun.software.len() > 763 {
            return Err(err("stun.software", "is longer than 763 bytes (RFC 8489)"));
        }
        match (self.stun.alternate_ip, self.stun.alternate_port) {
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(err(
                    "stun.alternate_ip",
                    "RFC 5780 needs both stun.alternate_ip and stun.alternate_port",
                ));
            }
            (Some(ip), Some(port)) => {
                if ip.is_unspecified() {
                    return Err(err("stun.alternate_ip", "must be a specific address"));
                }
                let primary = t
                    .listen
                    .iter()
                    .find(|a| a.is_ipv4() == ip.is_ipv4())
                    .ok_or_else(|| {
                        err(
                            "stun.alternate_ip",
                            format!("{ip}: turn.listen has no address of the same family"),
                        )
                    })?;
                if primary.ip().is_unspecified() {
                    return Err(err(
                        "stun.alternate_ip",
                        format!(
                            "RFC 5780 needs a specific primary address: turn.listen has {primary}"
                        ),
                    ));
                }
                if primary.ip() == ip || primary.port() == port {
                    return Err(err(
                        "stun.alternate_ip",
                        "alternate address and port must both differ from the primary ones",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The worker count to run: the configured one, or one per core.
    pub fn worker_count(&self) -> usize {
        if self.turn.workers > 0 {
            self.turn.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(crate::shm::MAX_WORKERS)
        }
    }
}

/// The levels a `log_level` directive may name.
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a `log_level` value strictly: directives separated by commas, each a level
/// (`info`) or `TARGET=LEVEL` (`portico::proxy=debug`; a target may carry a `tracing` span
/// filter, `portico[conn]=trace`). `tracing`'s own parser is lenient where it hurts: a bare
/// word is taken as a target with every level on (`"verbose"` would log nothing but a target
/// called `verbose`), and it skips empty directives. The control plane also runs the value
/// through `tracing`'s parser, for what the grammar here lets through.
pub fn check_log_level(value: &str) -> Result<(), String> {
    let hint = "a level (error, warn, info, debug, trace, off) or TARGET=LEVEL directives \
                separated by commas, e.g. \"info,portico::proxy=debug\"";
    if value.trim().is_empty() {
        return Err(format!("must not be empty: give {hint}"));
    }
    if value.len() > 1024 {
        return Err("is longer than 1024 bytes".into());
    }
    let is_level = |l: &str| LOG_LEVELS.iter().any(|x| x.eq_ignore_ascii_case(l));
    for d in value.split(',') {
        let d = d.trim();
        if d.is_empty() {
            return Err(format!(
                "\"{value}\" has an empty directive (two commas in a row, or one at an end)"
            ));
        }
        let Some((target, level)) = d.rsplit_once('=') else {
            if is_level(d) {
                continue;
            }
            return Err(format!(
                "\"{d}\" in \"{value}\" is not a level: give {hint}"
            ));
        };
        if !is_level(level.trim()) {
            return Err(format!(
                "\"{d}\" in \"{value}\": \"{}\" is not a level (error, warn, info, debug, trace, off)",
                level.trim()
            ));
        }
        let target = target.trim();
        let name = target.split('[').next().unwrap_or(target);
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_:-.".contains(&b));
        let spans_ok = target.len() == name.len() || target.ends_with(']');
        if !name_ok || !spans_ok || target.bytes().any(|b| b.is_ascii_control()) {
            return Err(format!(
                "\"{d}\" in \"{value}\": \"{target}\" is not a target (a module path such as portico::proxy)"
            ));
        }
    }
    Ok(())
}

/// Checks that `d` lies between `min` and `max` seconds, both included.
pub(crate) fn check_duration<const PLAIN: u64>(
    key: &str,
    d: Duration<PLAIN>,
    min: u64,
    max: u64,
) -> Result<(), ConfigError> {
    if d.as_secs() < min || d.as_secs() > max {
        return Err(err(
            key,
            format!(
                "{d} is not between {} and {}",
                Duration::<1>::from_secs(min),
                Duration::<1>::from_secs(max)
            ),
        ));
    }
    Ok(())
}

/// A value of the wrong form: the key path serde was at (`turn.relay_ports`,
/// `proxy.services[0].allow_from.sip[0]`) and the problem alone. Text that is not TOML fails
/// before any key: then toml's own message, which shows the line, the column and the text.
fn toml_error(e: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let path = e.path().to_string();
    if path == "." {
        return ConfigError {
            key: String::new(),
            problem: e.inner().to_string().trim_end().to_string(),
        };
    }
    ConfigError {
        key: path,
        problem: e.inner().message().trim_end().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_round_trips() {
        let c = Config::default();
        c.validate().unwrap();
        let back = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn fleet_settings_are_checked_at_load_naming_the_key() {
        let c =
            Config::from_toml("[fleet]\nredis = \"redis://127.0.0.1:6390\"\nname = \"box-a\"\n")
                .unwrap();
        assert_eq!(c.fleet.redis_addr(), Some(("127.0.0.1".into(), 6390)));
        assert_eq!(
            parse_redis_url("redis://[::1]").unwrap(),
            ("::1".to_string(), 6379)
        );
        for (text, key) in [
            ("redis = \"http://x:1\"", "fleet.redis"),
            ("redis = \"redis://x:0\"", "fleet.redis"),
            ("redis = \"redis://u:p@x:1\"", "fleet.redis"),
            ("name = \"a b\"", "fleet.name"),
        ] {
            let e = Config::from_toml(&format!("[fleet]\n{text}\n")).unwrap_err();
            assert!(e.to_string().starts_with(key), "{text}: {e}");
        }
    }

    #[test]
    fn alternate_servers_are_checked_at_load_naming_the_key() {
        let c = Config::from_toml(
            "[turn]\nalternate_servers = [\"203.0.113.8:3478\", \"[2001:db8::8]:3478\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.turn.alternate_servers,
            vec![
                "203.0.113.8:3478".parse::<SocketAddr>().unwrap(),
                "[2001:db8::8]:3478".parse().unwrap()
            ]
        );
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        for text in [
            "[\"203.0.113.8\"]",
            "[\"0.0.0.0:3478\"]",
            "[\"203.0.113.8:0\"]",
            "[\"[ff02::1]:3478\"]",
            "[\"203.0.113.8:3478\", \"203.0.113.8:3478\"]",
            "[\"127.0.0.1:3478\"]",
            "\"203.0.113.8:3478\"",
        ] {
            let e = Config::from_toml(&format!(
                "[turn]\nlisten = [\"127.0.0.1:3478\"]\nalternate_servers = {text}\n"
            ))
            .unwrap_err();
            assert!(e.key.starts_with("turn.alternate_servers"), "{text}: {e}");
        }
        let many: Vec<String> = (0..=MAX_ALTERNATE_SERVERS)
            .map(|i| format!("\"203.0.113.{}:3478\"", i + 1))
            .collect();
        let e = Config::from_toml(&format!(
            "[turn]\nalternate_servers = [{}]\n",
            many.join(", ")
        ))
        .unwrap_err();
        assert_eq!(e.key, "turn.alternate_servers", "{e}");
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml("[turn]\nlisten_on = [\"0.0.0.0:1\"]\n").unwrap_err();
        assert_eq!(e.key, "turn.listen_on", "{e}");
        assert!(e.problem.starts_with("unknown field `listen_on`"), "{e}");
        let e = Config::from_toml("bogus = 1\n").unwrap_err();
        assert_eq!(e.key, "bogus", "{e}");
    }

    #[test]
    fn text_that_is_not_toml_gets_tomls_message_with_the_line() {
        let e = Config::from_toml("[turn]\nrealm = \"unterminated\n").unwrap_err();
        assert_eq!(e.key, "");
        assert!(e.problem.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_port_range_names_key_value_and_rule() {
        let e = Config::from_toml("[turn]\nrelay_ports = \"70000-80000\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "turn.relay_ports: \"70000-80000\" is not a port range (1-65535)"
        );
        let e = Config::from_toml("[turn]\nrelay_ports = \"2000-1000\"\n").unwrap_err();
        assert!(e.to_string().starts_with("turn.relay_ports:"), "{e}");
    }

    #[test]
    fn shared_secret_accepts_one_or_many() {
        let c = Config::from_toml("[turn]\nshared_secret = \"s1\"\n").unwrap();
        assert_eq!(c.turn.shared_secret, vec!["s1"]);
        let c = Config::from_toml("[turn]\nshared_secret = [\"s2\", \"s1\"]\n").unwrap();
        assert_eq!(c.turn.shared_secret, vec!["s2", "s1"]);
    }

    #[test]
    fn users_need_exactly_one_secret_form() {
        let e = Config::from_toml("[turn]\nusers = [{ name = \"a\" }]\n").unwrap_err();
        assert_eq!(e.key, "turn.users[0]");
        let e =
            Config::from_toml("[turn]\nusers = [{ name = \"a\", key = \"zz\" }]\n").unwrap_err();
        assert_eq!(e.key, "turn.users[0].key");
        Config::from_toml(
            "[turn]\nusers = [{ name = \"a\", key = \"0123456789abcdef0123456789ABCDEF\" }]\n",
        )
        .unwrap();
    }

    #[test]
    fn peers_must_be_cidrs() {
        let e = Config::from_toml("[turn]\nallow_peers = [\"10.1.0.0/16\", \"10.0.0.0/40\"]\n")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "turn.allow_peers[1]: \"10.0.0.0/40\": prefix /40 is longer than 32 bits"
        );
        let e = Config::from_toml("[turn]\ndeny_peers = [\"fe80::/x\"]\n").unwrap_err();
        assert_eq!(e.key, "turn.deny_peers[0]");
        let c = Config::from_toml("[turn]\nallow_peers = [\"10.1.0.0/16\"]\n").unwrap();
        assert!(c.turn.allow_peers.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.turn.allow_peers.contains("10.2.0.1".parse().unwrap()));
    }

    #[test]
    fn rfc5780_needs_specific_distinct_addresses() {
        let e = Config::from_toml("[stun]\nalternate_ip = \"127.0.0.2\"\nalternate_port = 3479\n")
            .unwrap_err();
        assert!(e.problem.contains("specific primary"), "{e}");
        Config::from_toml(
            "[turn]\nlisten = [\"127.0.0.1:3478\"]\n[stun]\nalternate_ip = \"127.0.0.2\"\nalternate_port = 3479\n",
        )
        .unwrap();
        let e = Config::from_toml("[stun]\nalternate_port = 3479\n").unwrap_err();
        assert_eq!(e.key, "stun.alternate_ip");
    }

    #[test]
    fn fraud_durations_take_minutes_or_units() {
        let c = Config::from_toml("[fraud]\nblacklist_minutes = 5\n").unwrap();
        assert_eq!(c.fraud.blacklist_minutes.as_secs(), 300);
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        let c = Config::from_toml("[fraud]\nblacklist_minutes = \"30s\"\n").unwrap();
        assert_eq!(c.fraud.blacklist_minutes.as_secs(), 30);
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        let c = Config::from_toml("[fraud]\nblacklist_minutes = \"2h\"\n").unwrap();
        assert_eq!(c.fraud.blacklist_minutes.as_secs(), 7200);
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        let e = Config::from_toml("[fraud]\nblacklist_minutes = \"soon\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "fraud.blacklist_minutes: \"soon\" is not a duration (a number of minutes, or 30s, 10m, 2h, 1d)"
        );
        let e = Config::from_toml("[fraud]\nwhitelist = [\"nope\"]\n").unwrap_err();
        assert_eq!(e.key, "fraud.whitelist[0]");
        let e = Config::from_toml("[fraud]\nblacklist_minutes = 0\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "fraud.blacklist_minutes: 0s is not between 1s and 366d"
        );
    }

    /// Minutes that do not fit in 64 bits of seconds are refused; they used to overflow
    /// (a panic in a debug build, a wrapped, far too short block in a release build).
    #[test]
    fn durations_that_overflow_are_refused_naming_the_key() {
        let e =
            Config::from_toml("[fraud]\nblacklist_minutes = 9223372036854775807\n").unwrap_err();
        assert_eq!(e.key, "fraud.blacklist_minutes", "{e}");
        let e = Config::from_toml("[fraud]\nblacklist_minutes = -1\n").unwrap_err();
        assert_eq!(e.key, "fraud.blacklist_minutes", "{e}");
        assert!(e.problem.contains("is not a duration"), "{e}");
    }

    /// The keys counted in seconds before units existed still count seconds as plain
    /// numbers, take units, and come back from `to_toml` as the same value.
    #[test]
    fn second_keys_take_numbers_and_units() {
        let c = Config::from_toml(
            "[turn]\nnonce_lifetime = 45\ndefault_lifetime = \"5m\"\nmax_lifetime = \"2h\"\n",
        )
        .unwrap();
        assert_eq!(c.turn.nonce_lifetime.as_secs(), 45);
        assert_eq!(c.turn.default_lifetime.as_secs(), 300);
        assert_eq!(c.turn.max_lifetime.as_secs(), 7200);
        let text = c.to_toml();
        assert!(text.contains("nonce_lifetime = \"45s\""), "{text}");
        assert!(text.contains("max_lifetime = \"2h\""), "{text}");
        assert_eq!(Config::from_toml(&text).unwrap(), c);
        let e = Config::from_toml("[turn]\nnonce_lifetime = \"10\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "turn.nonce_lifetime: 10s is not between 30s and 1d"
        );
        let e = Config::from_toml("[turn]\nmax_lifetime = \"1h30\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "turn.max_lifetime: \"1h30\" is not a duration (a number of seconds, or 30s, 10m, 2h, 1d)"
        );
        let e = Config::from_toml("[turn]\nmax_lifetime = 1.5\n").unwrap_err();
        assert_eq!(e.key, "turn.max_lifetime", "{e}");
    }

    #[test]
    fn log_level_is_parsed_strictly() {
        for good in [
            "info",
            "DEBUG",
            "off",
            "info,portico::proxy=debug",
            "warn, portico=trace",
            "portico_dataplane=info",
            "portico[conn]=trace",
        ] {
            let c = Config::from_toml(&format!("log_level = \"{good}\"\n"));
            assert!(c.is_ok(), "{good}: {c:?}");
        }
        for bad in [
            "nonsense=,,",
            "verbose",
            "",
            " ",
            "info,",
            ",info",
            "info,,debug",
            "portico=loud",
            "=debug",
            "a b=info",
            "portico[x=info",
        ] {
            let e = Config::from_toml(&format!("log_level = \"{bad}\"\n")).unwrap_err();
            assert_eq!(e.key, "log_level", "{bad}: {e}");
        }
        let e = Config::from_toml("log_level = \"verbose\"\n").unwrap_err();
        assert!(e.to_string().starts_with("log_level: \"verbose\""), "{e}");
    }

    #[test]
    fn secrets_are_redacted_and_restored() {
        let current = Config::from_toml(
            "[turn]\nshared_secret = [\"s0\", \"s1\"]\nusers = [{ name = \"a\", password = \"pa\" }, { name = \"k\", key = \"0123456789abcdef0123456789abcdef\" }]\n",
        )
        .unwrap();
        let shown = current.redacted();
        assert!(!shown.to_toml().contains("pa\""));
        assert!(!shown.to_toml().contains("s0"));
        assert!(!shown.to_toml().contains("0123456789abcdef"));
        assert_eq!(shown.turn.shared_secret, vec![REDACTED, REDACTED]);
        assert_eq!(shown.turn.users[1].key.as_deref(), Some(REDACTED));
        assert_eq!(shown.turn.users[1].password, None);
        // Sent back as is: the same secrets.
        let mut back = shown.clone();
        back.restore_secrets(&current).unwrap();
        assert_eq!(back, current);
        back.validate().unwrap();
        // Rollover: a new secret first, the old ones kept.
        let mut c = shown.clone();
        c.turn.shared_secret.insert(0, "new".into());
        c.restore_secrets(&current).unwrap();
        assert_eq!(c.turn.shared_secret, vec!["new", "s0", "s1"]);
        // More placeholders than secrets, an unknown user: errors naming the key.
        let mut c = shown.clone();
        c.turn.shared_secret.push(REDACTED.into());
        assert_eq!(
            c.restore_secrets(&current).unwrap_err().key,
            "turn.shared_secret"
        );
        let mut c = shown.clone();
        c.turn.users[0].name = "z".into();
        assert_eq!(
            c.restore_secrets(&current).unwrap_err().key,
            "turn.users[0]"
        );
        // A placeholder left in place is never taken as a secret.
        let e = shown.validate().unwrap_err();
        assert_eq!(e.key, "turn.shared_secret");
        let mut c = shown.clone();
        c.turn.shared_secret.clear();
        assert_eq!(c.validate().unwrap_err().key, "turn.users[0].password");
    }

    #[test]
    fn empty_listen_turns_stun_and_turn_off() {
        let c = Config::from_toml("[turn]\nlisten = []\n").unwrap();
        assert!(c.turn.listen.is_empty());
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        // RFC 5780 still needs a primary address to pair with.
        let e = Config::from_toml(
            "[turn]\nlisten = []\n[stun]\nalternate_ip = \"127.0.0.2\"\nalternate_port = 3479\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "stun.alternate_ip");
    }

    #[test]
    fn listen_tls_is_validated_naming_the_key() {
        let c = Config::from_toml("[turn]\nlisten_tls = [\"127.0.0.1:5349\"]\n").unwrap();
        assert_eq!(c.turn.listen_tls, vec!["127.0.0.1:5349".parse().unwrap()]);
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        for bad in [
            "[turn]\nlisten_tls = [\"127.0.0.1:0\"]\n",
            "[turn]\nlisten_tls = [\"127.0.0.1:5349\", \"127.0.0.1:5349\"]\n",
            "[turn]\nlisten = [\"127.0.0.1:3478\"]\nlisten_tls = [\"127.0.0.1:3478\"]\n",
            "[turn]\nlisten = []\nlisten_tls = [\"127.0.0.1:5349\"]\n",
        ] {
            let e = Config::from_toml(bad).unwrap_err();
            assert_eq!(e.key, "turn.listen_tls", "{bad}");
        }
    }

    #[test]
    fn stream_limits_are_typed_and_checked_naming_the_key() {
        let c = Config::from_toml(
            "[turn]\ntcp_max_connections = 20000\ntcp_max_connections_per_source = 100\n\
             tcp_handshake_timeout = \"2s\"\ntcp_idle_timeout = \"1m\"\n\
             tcp_output_buffer = 8192\ntcp_relay_connections = 4\ntcp_coalesce_us = 0\n",
        )
        .unwrap();
        assert_eq!(c.turn.tcp_max_connections, 20000);
        assert_eq!(c.turn.tcp_max_connections_per_source, 100);
        assert_eq!(c.turn.tcp_handshake_timeout.as_secs(), 2);
        assert_eq!(c.turn.tcp_idle_timeout.as_secs(), 60);
        assert_eq!(c.turn.tcp_output_buffer, 8192);
        assert_eq!(c.turn.tcp_relay_connections, 4);
        assert_eq!(c.turn.tcp_coalesce_us, 0);
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        for (bad, key) in [
            ("tcp_max_connections = 0", "turn.tcp_max_connections"),
            (
                "tcp_max_connections_per_source = 0",
                "turn.tcp_max_connections_per_source",
            ),
            (
                "tcp_max_connections = 10\ntcp_max_connections_per_source = 11",
                "turn.tcp_max_connections_per_source",
            ),
            ("tcp_handshake_timeout = 0", "turn.tcp_handshake_timeout"),
            (
                "tcp_handshake_timeout = \"1h\"",
                "turn.tcp_handshake_timeout",
            ),
            ("tcp_idle_timeout = \"soon\"", "turn.tcp_idle_timeout"),
            ("tcp_output_buffer = 100", "turn.tcp_output_buffer"),
            ("tcp_output_buffer = -1", "turn.tcp_output_buffer"),
            ("tcp_relay_connections = 0", "turn.tcp_relay_connections"),
            ("tcp_coalesce_us = 10001", "turn.tcp_coalesce_us"),
            ("tcp_coalesce_us = -1", "turn.tcp_coalesce_us"),
            ("tcp_coalesce_us = \"1ms\"", "turn.tcp_coalesce_us"),
        ] {
            let e = Config::from_toml(&format!("[turn]\n{bad}\n")).unwrap_err();
            assert_eq!(e.key, key, "{bad}: {e}");
        }
    }

    #[test]
    fn io_mode_names() {
        let c = Config::from_toml("[turn]\nio = \"io_uring\"\n").unwrap();
        assert_eq!(c.turn.io, IoMode::IoUring);
        assert!(Config::from_toml("[turn]\nio = \"uring\"\n").is_err());
    }

    #[test]
    fn fast_path_modes_default_off_and_a_bad_one_names_the_key() {
        assert_eq!(Config::default().turn.fast_path, FastPathMode::Off);
        for (text, mode) in [
            ("auto", FastPathMode::Auto),
            ("on", FastPathMode::On),
            ("off", FastPathMode::Off),
        ] {
            let c = Config::from_toml(&format!("[turn]\nfast_path = \"{text}\"\n")).unwrap();
            assert_eq!(c.turn.fast_path, mode);
        }
        let e = Config::from_toml("[turn]\nfast_path = \"maybe\"\n").unwrap_err();
        assert_eq!(e.key, "turn.fast_path");
    }

    #[test]
    fn relay_modes_default_socket_and_a_bad_one_names_the_key() {
        assert_eq!(Config::default().turn.relay_mode, RelayMode::Socket);
        for (text, mode) in [
            ("socket", RelayMode::Socket),
            ("shared", RelayMode::Shared),
            ("auto", RelayMode::Auto),
        ] {
            let c = Config::from_toml(&format!("[turn]\nrelay_mode = \"{text}\"\n")).unwrap();
            assert_eq!(c.turn.relay_mode, mode);
        }
        let e = Config::from_toml("[turn]\nrelay_mode = \"descriptorless\"\n").unwrap_err();
        assert_eq!(e.key, "turn.relay_mode");
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// The documented example must stay a valid configuration, equal to the defaults it
    /// claims to show (plus its one example user).
    #[test]
    fn example_parses_and_shows_the_defaults() {
        let text = include_str!("../../portico.example.toml");
        let mut expected = Config::default();
        expected.turn.users = vec![TurnUser {
            name: "alice".into(),
            password: Some("change-me".into()),
            key: None,
        }];
        assert_eq!(Config::from_toml(text).unwrap(), expected);
    }

    #[test]
    fn several_relay_ips_are_accepted_and_checked_naming_the_key() {
        let c = Config::from_toml("[turn]\nrelay_ip = [\"127.0.0.2\", \"127.0.0.3\", \"::1\"]\n")
            .unwrap();
        assert_eq!(c.turn.relay_ip.len(), 3);
        let e =
            Config::from_toml("[turn]\nrelay_ip = [\"127.0.0.2\", \"127.0.0.2\"]\n").unwrap_err();
        assert_eq!(e.to_string(), "turn.relay_ip: 127.0.0.2 is listed twice");
        let e = Config::from_toml(
            "[turn]\nrelay_ip = [\"127.0.0.2\", \"127.0.0.3\"]\nexternal_ip = \"203.0.113.9\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("turn.external_ip: "), "{e}");
        let many: Vec<String> = (1..=65).map(|i| format!("\"10.0.0.{i}\"")).collect();
        let e =
            Config::from_toml(&format!("[turn]\nrelay_ip = [{}]\n", many.join(", "))).unwrap_err();
        assert_eq!(e.to_string(), "turn.relay_ip: 65 addresses is more than 64");
    }
}
