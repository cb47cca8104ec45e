//! The reverse proxy (reference: "Reverse Proxy"): one listener per configured service type,
//! TLS termination, routing on the content of each request, access limitation, and
//! suspicious-event reporting for fraud detection.
//!
//! Layout: [`sniff`] knows protocols (sans-IO), [`route`] maps names to targets, [`access`]
//! holds the access rules, [`tls`] both TLS sides, [`forward`] target connections and byte
//! relaying, [`http`] the per-request HTTP loop, [`stream`] first-message routing for the
//! other protocols, [`events`] and [`metrics`] what is reported. This file owns listeners,
//! connection limits and configuration changes.
//!
//! Configuration is followed by polling a getter once a second: a changed `[proxy]` section
//! is applied to new connections (listeners are re-bound when their address changed), and the
//! certificate files are re-read when their modification time changes, so a renewed
//! certificate is picked up without a restart and without dropping a connection.

pub mod access;
pub mod events;
pub mod forward;
pub mod http;
pub mod metrics;
pub mod route;
pub mod sniff;
pub mod stream;
pub mod tls;
pub mod turn;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use portico_shared::addr::CidrList;
use portico_shared::proxy_config::{PerType, ProxyConfig, ProxyLimits, Redirect, ServiceType};
use rustls::{ClientConfig, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use self::access::canonical_ip;
use self::events::{Events, Reason, SuspiciousEvent};
use self::forward::BoxStream;
use self::metrics::ProxyMetrics;
use self::route::{Route, Routes};
use self::tls::CertResolver;

/// The generated certificate and key in the state dir, used when `[proxy.tls]` names none.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything a connection needs from the configuration, fixed for the connection's life.
pub struct Snapshot {
    pub routes: Routes,
    pub limits: ProxyLimits,
    pub trusted: CidrList,
    pub redirect: PerType<Redirect>,
    pub client_tls: Arc<ClientConfig>,
    pub client_tls_unverified: Arc<ClientConfig>,
    server_https: Arc<ServerConfig>,
    server_other: Arc<ServerConfig>,
    /// Check Certificate: the trust list for client certificates (`client_ca_file`), and
    /// the server side that asks for them (SIPS, H.323/TLS).
    pub client_trust: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    server_asking: Option<Arc<ServerConfig>>,
    /// `proxy.turn_on_https`: where TURN clients on the HTTPS port are handed over.
    turn_handoff: Option<PathBuf>,
}

impl Snapshot {
    fn build(
        c: &ProxyConfig,
        resolver: &Arc<CertResolver>,
        handoff: &std::path::Path,
    ) -> Result<Snapshot, String> {
        let (roots, _) = tls::root_store(c.tls.ca_file.as_deref())?;
        let (client_tls, client_tls_unverified) = tls::client_configs(roots, &[])?;
        let client_trust = c
            .tls
            .client_ca_file
            .as_deref()
            .map(tls::client_verifier)
            .transpose()?;
        let server_asking = client_trust
            .as_ref()
            .map(|t| tls::server_config_asking(Arc::clone(resolver), Arc::clone(t)))
            .transpose()?;
        Ok(Snapshot {
            routes: Routes::new(&c.services),
            limits: c.limits.clone(),
            trusted: c.trusted_proxies.clone(),
            redirect: c.redirect.clone(),
            client_tls,
            client_tls_unverified,
            server_https: tls::server_config(Arc::clone(resolver), &[b"http/1.1"])?,
            server_other: tls::server_config(Arc::clone(resolver), &[])?,
            client_trust,
            server_asking,
            turn_handoff: c.turn_on_https.then(|| handoff.to_path_buf()),
        })
    }

    pub fn routes_by_index(&self, i: usize) -> &Route {
        self.routes.get(i)
    }

    fn server_tls(&self, t: ServiceType) -> Arc<ServerConfig> {
        match (t, &self.server_asking) {
            (ServiceType::Https, _) => Arc::clone(&self.server_https),
            (ServiceType::Sips | ServiceType::H323Tls, Some(asking)) => Arc::clone(asking),
            _ => Arc::clone(&self.server_other),
        }
    }
}

/// Says whether a source is blacklisted (by fraud detection). A new connection from it is
/// closed before any byte is read; an open one loses its next HTTP request (403) or, when it
/// is relayed as a byte stream, is cut within [`BLOCK_CHECK`]: a blacklist that spared
/// keep-alive connections would let a brute-force client go on over the one it holds.
///
/// Behind a trusted proxy (`proxy.trusted_proxies`) the source of an HTTP request is the
/// client that proxy forwarded (see [`http`]): the proxy's own address is never charged with
/// events, so it is blacklisted only by hand, and a blocked client behind it loses its
/// requests, not the proxy's connection slots.
pub type Blocked = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// How often a relayed connection asks whether its source has been blacklisted meanwhile.
pub const BLOCK_CHECK: Duration = Duration::from_millis(50);

/// Resolves once `source` is blacklisted; polled every [`BLOCK_CHECK`].
pub async fn until_blocked(blocked: &Blocked, source: IpAddr) {
    let mut tick = tokio::time::interval(BLOCK_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if blocked(source) {
            return;
        }
    }
}

/// Runs the proxy for as long as the task lives. `current` returns the configuration in
/// force; it is polled once a second.
pub async fn run<F>(
    current: F,
    defaults: CertPaths,
    events: mpsc::Sender<SuspiciousEvent>,
    metrics: Arc<ProxyMetrics>,
    blocked: Blocked,
    turn_handoff: PathBuf,
) where
    F: Fn() -> ProxyConfig + Send + 'static,
{
    let resolver = Arc::new(CertResolver::default());
    let events = Events::new(events, Arc::clone(&metrics));
    let limiter = Arc::new(Limiter::default());
    let mut shared: Option<Arc<RwLock<Arc<Snapshot>>>> = None;
    let mut listeners: HashMap<ServiceType, (SocketAddr, JoinHandle<()>)> = HashMap::new();
    let mut applied: Option<ProxyConfig> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let cfg = current();
        let (cert, key) = match (&cfg.tls.cert, &cfg.tls.key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => (defaults.cert.clone(), defaults.key.clone()),
        };
        let has_tls = cfg.listen.iter().any(|(t, _)| t.is_tls());
        if has_tls || resolver.has_key() {
            match resolver.refresh(&cert, &key) {
                Ok(true) => {
                    tracing::info!(cert = %cert.display(), "proxy certificate loaded");
                    metrics.cert_reload(true);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!("proxy certificate not (re)loaded: {e}");
                    metrics.cert_reload(false);
                }
            }
        }
        if applied.as_ref() == Some(&cfg) {
            continue;
        }
        for w in cfg.warnings() {
            tracing::warn!("{w}");
        }
        let snap = match Snapshot::build(&cfg, &resolver, &turn_handoff) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!("proxy configuration not applied: {e}");
                applied = Some(cfg);
                continue;
            }
        };
        let shared = match &shared {
            Some(s) => {
                *s.write().unwrap_or_else(PoisonError::into_inner) = snap;
                Arc::clone(s)
            }
            None => {
                let s = Arc::new(RwLock::new(snap));
                shared = Some(Arc::clone(&s));
                s
            }
        };
        for t in ServiceType::ALL {
            let want = cfg.listen.get(t).copied();
            let have = listeners.get(&t).map(|(a, _)| *a);
            if want == have {
                continue;
            }
            if let Some((a, h)) = listeners.remove(&t) {
                h.abort();
                tracing::info!("proxy stopped listening for {t} on {a}");
            }
            let Some(addr) = want else { continue };
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    tracing::info!("proxy listening for {t} on {addr}");
                    let task = tokio::spawn(accept_loop(
                        l,
                        t,
                        Arc::clone(&shared),
                        events.clone(),
                        Arc::clone(&limiter),
                        Arc::clone(&blocked),
                    ));
                    listeners.insert(t, (addr, task));
                }
                Err(e) => tracing::error!("proxy.listen.{t} {addr}: {e}"),
            }
        }
        applied = Some(cfg);
    }
}

async fn accept_loop(
    listener: TcpListener,
    stype: ServiceType,
    shared: Arc<RwLock<Arc<Snapshot>>>,
    events: Events,
    limiter: Arc<Limiter>,
    blocked: Blocked,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!("proxy accept ({stype}): {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = canonical_ip(peer.ip());
        if blocked(source) {
            events.metrics().refused_blocked.inc();
            continue;
        }
        let snap = Arc::clone(&shared.read().unwrap_or_else(PoisonError::into_inner));
        // A trusted proxy carries many clients over its connections: only the total limit
        // applies to it, or one busy balancer would lock out everyone behind it.
        let per_source = !snap.trusted.contains(source);
        let slot = match limiter.acquire(source, &snap.limits, per_source) {
            Ok(s) => s,
            Err(Full::Total) => {
                events.metrics().refused_full.inc();
                continue;
            }
            Err(Full::PerSource) => {
                // Closed before a byte is read: the connections this source already holds
                // go on untouched. Reported (metrics, debug log) but not counted toward
                // blacklisting: an office's browsers behind one NAT address get here.
                events.report(source, stype, Reason::TooManyConnections);
                continue;
            }
        };
        let blocked = Arc::clone(&blocked);
        tokio::spawn(handle(
            tcp,
            peer,
            stype,
            snap,
            events.clone(),
            blocked,
            slot,
        ));
    }
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    stype: ServiceType,
    snap: Arc<Snapshot>,
    events: Events,
    blocked: Blocked,
    _slot: Slot,
) {
    let _open = OpenConn::new(&events, stype);
    let _ = tcp.set_nodelay(true);
    let local = match tcp.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let source = canonical_ip(peer.ip());
    // What a TLS failure is charged to: never a trusted proxy (its clients' failures are
    // charged to them, per request, once a request names them).
    let charged = (!snap.trusted.contains(source)).then_some(source);
    let first_deadline = tokio::time::Instant::now() + snap.limits.first_message_timeout.get();
    let mut client_cert = None;
    let turn_handoff = match stype {
        ServiceType::Https => snap.turn_handoff.clone(),
        _ => None,
    };
    if let Some(socket) = &turn_handoff {
        // A TURN client that says so in its ClientHello goes to the dataplane untouched.
        if turn::peek_hello(&tcp, first_deadline).await == sniff::turn::Verdict::Turn {
            turn::hand_over_socket(tcp, peer, socket, events.metrics(), first_deadline).await;
            return;
        }
    }
    let client: BoxStream = if stype.is_tls() {
        let acceptor = tokio_rustls::TlsAcceptor::from(snap.server_tls(stype));
        match tokio::time::timeout_at(first_deadline, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => {
                if let (Some(trust), ServiceType::Sips | ServiceType::H323Tls) =
                    (&snap.client_trust, stype)
                {
                    client_cert =
                        tls::check_client(trust.as_ref(), s.get_ref().1.peer_certificates());
                }
                Box::new(s)
            }
            Ok(Err(e)) => {
                // A TLS alert or garbage is a rejection by the proxy; a peer that merely
                // went away (reset, EOF: scanners, `s_time`) is not.
                if e.kind() == std::io::ErrorKind::InvalidData {
                    events.report_for(charged, stype, Reason::TlsHandshake(e.to_string()));
                }
                return;
            }
            Err(_) => {
                events.report_for(charged, stype, Reason::FirstMessageTimeout);
                return;
            }
        }
    } else {
        Box::new(tcp)
    };
    let client = match &turn_handoff {
        Some(socket) => {
            let Some(client) =
                turn_after_tls(client, peer, socket, &events, &blocked, first_deadline).await
            else {
                return;
            };
            client
        }
        None => client,
    };
    match stype {
        ServiceType::Http | ServiceType::Https => {
            let conn = http::Conn {
                peer,
                local,
                stype,
                snap,
                events: events.clone(),
                first_deadline,
                blocked,
            };
            http::serve(client, conn).await;
        }
        other => {
            if let Some(sniffer) = sniff::for_type(other) {
                let conn = stream::Conn {
                    peer,
                    local,
                    stype,
                    snap,
                    events: events.clone(),
                    first_deadline,
                    sniffer,
                    blocked,
                    client_cert,
                };
                stream::serve(client, conn).await;
            }
        }
    }
}

/// With `proxy.turn_on_https`: reads the first decrypted bytes; a TURN client's go to the
/// dataplane (and `None` is returned when it is done), anything else is given back with
/// those bytes in front. A client that sends nothing in time or closes is given back too:
/// the HTTP loop reports it as before.
async fn turn_after_tls(
    mut client: BoxStream,
    peer: SocketAddr,
    socket: &std::path::Path,
    events: &Events,
    blocked: &Blocked,
    deadline: tokio::time::Instant,
) -> Option<BoxStream> {
    use tokio::io::AsyncReadExt;
    let mut first = [0u8; 8];
    let mut n = 0;
    while n < first.len() {
        match tokio::time::timeout_at(deadline, client.read(&mut first[n..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(k)) => n += k,
        }
        match sniff::turn::first_bytes(&first[..n]) {
            sniff::turn::Verdict::NeedMore => continue,
            sniff::turn::Verdict::Turn => {
                turn::relay_plaintext(
                    client,
                    &first[..n],
                    peer,
                    socket,
                    events.metrics(),
                    blocked,
                    deadline,
                )
                .await;
                return None;
            }
            sniff::turn::Verdict::NotTurn => break,
        }
    }
    Some(Box::new(turn::Prefixed {
        prefix: first[..n].to_vec(),
        at: 0,
        inner: client,
    }))
}

/// Counts a connection as open in the metrics for exactly as long as it lives.
struct OpenConn<'a> {
    events: &'a Events,
    stype: ServiceType,
}

impl<'a> OpenConn<'a> {
    fn new(events: &'a Events, stype: ServiceType) -> OpenConn<'a> {
        events.metrics().accepted(stype);
        OpenConn { events, stype }
    }
}

impl Drop for OpenConn<'_> {
    fn drop(&mut self) {
        self.events.metrics().closed(self.stype);
    }
}

enum Full {
    Total,
    PerSource,
}

/// Connection counts, total and per source address.
#[derive(Default)]
struct Limiter {
    state: Mutex<LimiterState>,
}

#[derive(Default)]
struct LimiterState {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// One counted connection; dropping it gives the slot back.
struct Slot {
    limiter: Arc<Limiter>,
    source: IpAddr,
}

/// What `max_connections_per_ip` counts: an IPv4 address, or the /64 of an IPv6 one. A
/// single subscriber is routinely given a whole /64, so counting full IPv6 addresses would
/// let one client open the limit's worth of connections from each of 2^64 addresses.
fn limit_key(source: IpAddr) -> IpAddr {
    match canonical_ip(source) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl Limiter {
    /// Takes a slot; `per_source` false exempts the source from `max_connections_per_ip`
    /// (a trusted proxy), though its connections are still counted.
    fn acquire(
        self: &Arc<Self>,
        source: IpAddr,
        limits: &ProxyLimits,
        per_source: bool,
    ) -> Result<Slot, Full> {
        let source = limit_key(source);
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.total >= limits.max_connections {
            return Err(Full::Total);
        }
        let n = s.per_source.entry(source).or_insert(0);
        if per_source && *n >= limits.max_connections_per_ip {
            return Err(Full::PerSource);
        }
        *n += 1;
        s.total += 1;
        Ok(Slot {
            limiter: Arc::clone(self),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self
            .limiter
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                s.per_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_counts_per_source_and_total() {
        let l = Arc::new(Limiter::default());
        let limits = ProxyLimits {
            max_connections: 3,
            max_connections_per_ip: 2,
            ..ProxyLimits::default()
        };
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.acquire(a, &limits, true).ok().unwrap();
        let _s2 = l.acquire(a, &limits, true).ok().unwrap();
        assert!(matches!(l.acquire(a, &limits, true), Err(Full::PerSource)));
        let _s3 = l.acquire(b, &limits, true).ok().unwrap();
        assert!(matches!(l.acquire(b, &limits, true), Err(Full::Total)));
        drop(s1);
        assert!(l.acquire(a, &limits, true).is_ok());
    }

    #[test]
    fn limiter_counts_ipv6_sources_per_64() {
        let l = Arc::new(Limiter::default());
        let limits = ProxyLimits {
            max_connections: 100,
            max_connections_per_ip: 2,
            ..ProxyLimits::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let s1 = l
            .acquire(ip("2001:db8:1:2::1"), &limits, true)
            .ok()
            .unwrap();
        let _s2 = l
            .acquire(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), &limits, true)
            .ok()
            .unwrap();
        // A third address of the same /64 is the same subscriber.
        assert!(matches!(
            l.acquire(ip("2001:db8:1:2:abcd::9"), &limits, true),
            Err(Full::PerSource)
        ));
        // The neighbouring /64 is someone else.
        let _s3 = l
            .acquire(ip("2001:db8:1:3::1"), &limits, true)
            .ok()
            .unwrap();
        drop(s1);
        assert!(l.acquire(ip("2001:db8:1:2::77"), &limits, true).is_ok());
        // IPv4 (also when mapped into IPv6) is still counted per address.
        let _a = l.acquire(ip("10.0.0.1"), &limits, true).ok().unwrap();
        let _b = l
            .acquire(ip("::ffff:10.0.0.1"), &limits, true)
            .ok()
            .unwrap();
        assert!(matches!(
            l.acquire(ip("10.0.0.1"), &limits, true),
            Err(Full::PerSource)
        ));
        assert!(l.acquire(ip("10.0.0.2"), &limits, true).is_ok());
    }

    #[test]
    fn a_trusted_proxy_is_held_to_the_total_only() {
        let l = Arc::new(Limiter::default());
        let limits = ProxyLimits {
            max_connections: 5,
            max_connections_per_ip: 2,
            ..ProxyLimits::default()
        };
        let lb: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<Slot> = (0..4)
            .map(|_| l.acquire(lb, &limits, false).ok().unwrap())
            .collect();
        // Its connections still count toward the total.
        let _other = l
            .acquire("10.0.0.2".parse().unwrap(), &limits, true)
            .ok()
            .unwrap();
        assert!(matches!(l.acquire(lb, &limits, false), Err(Full::Total)));
        drop(held);
        assert!(l.acquire(lb, &limits, false).is_ok());
    }
}
