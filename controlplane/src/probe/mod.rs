//! `portico probe`: tests a TURN/STUN server from where it runs, as the reference's test tool
//! does ("Conclusion SUCCESS"). Over UDP, TCP and TLS it gathers the host, server-reflexive
//! and relayed candidates, sends packets through the relay to a local peer socket and back
//! (RTT and loss), classifies the NAT with RFC 5780 where the server supports it, and prints
//! a table and a one-line conclusion (or `--json`). Works against any TURN server (Portico,
//! coturn); it uses the dataplane's STUN codec and blocking sockets with deadlines.

mod client;
mod conn;
mod nat;
mod report;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::ValueEnum;
use portico_dataplane::stun::{attr, method};
use portico_dataplane::turn::auth::rest_password;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::ClientConfig;

use client::{secs_text, Client, Credentials, Failure, Request};
use conn::Conn;
pub use nat::{Behaviour, Nat};
pub use report::{Report, Rtt, Status, Step, StepResult, TransportReport};

use crate::proxy::tls as ptls;

/// Packets sent through the relay per transport, at most.
const MAX_COUNT: u32 = 1000;
/// Packets tried before a round trip that gets none through gives up.
const GIVE_UP_AFTER: u32 = 3;
/// Longest `--timeout`.
const MAX_TIMEOUT: f64 = 60.0;
/// First wait for the peer's opening packet to come through the relay (doubled each resend).
const OPEN_RESEND: Duration = Duration::from_millis(250);
/// How long a REST API credential made from `--secret` lives.
const REST_LIFETIME_SECS: u64 = 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// `portico probe` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    /// The TURN/STUN server: host[:port], port 3478 when omitted (`[v6addr]:port` for IPv6).
    #[arg(value_name = "SERVER")]
    pub server: String,
    /// The server's TURN-over-TLS port.
    #[arg(long, default_value_t = 5349)]
    pub tls_port: u16,
    /// Long-term credential: user name (with --secret: the name part of the REST user).
    #[arg(long)]
    pub user: Option<String>,
    /// Long-term credential: password.
    #[arg(long, conflicts_with = "secret")]
    pub password: Option<String>,
    /// TURN REST API shared secret: the probe makes "<expiry>:<user>" and its password.
    #[arg(long)]
    pub secret: Option<String>,
    /// The realm to expect (the server's is used when unset).
    #[arg(long)]
    pub realm: Option<String>,
    /// Transports to probe, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "udp,tcp,tls")]
    pub transports: Vec<Transport>,
    /// TLS: accept any certificate (the handshake signature is still checked).
    #[arg(long, conflicts_with = "ca")]
    pub insecure: bool,
    /// TLS: trust this PEM CA file (besides the system's CAs).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// TLS: the name to check the certificate against (default: the host given).
    #[arg(long, value_name = "NAME")]
    pub tls_name: Option<String>,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 2.0)]
    pub timeout: f64,
    /// Packets to send through each relay.
    #[arg(long, default_value_t = 10)]
    pub count: u32,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs the probe, prints the report, and returns the exit status: 0 success, 1 failure,
/// 2 bad arguments.
pub fn main(args: &ProbeArgs) -> i32 {
    match run(args) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("portico probe: {e}");
                        return 1;
                    }
                }
            } else {
                print!("{}", report.table());
            }
            if report.success {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("portico probe: {e}");
            2
        }
    }
}

/// What every transport's probe needs.
struct Ctx {
    timeout: Duration,
    creds: Option<Credentials>,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    count: u32,
}

/// Checks the arguments and probes; `Err` for bad arguments only.
pub fn run(args: &ProbeArgs) -> Result<Report, String> {
    if !(args.timeout > 0.0 && args.timeout <= MAX_TIMEOUT) {
        return Err(format!(
            "--timeout must be above 0 and at most {MAX_TIMEOUT} seconds"
        ));
    }
    if args.count == 0 || args.count > MAX_COUNT {
        return Err(format!("--count must be 1 to {MAX_COUNT}"));
    }
    let creds = credentials(args)?;
    let (host, port) = split_host_port(&args.server)?;
    let server = resolve(&host, port)?;
    let mut transports = args.transports.clone();
    transports.sort();
    transports.dedup();
    if transports.is_empty() {
        return Err("--transports names none".into());
    }
    let tls = if transports.contains(&Transport::Tls) {
        let name = args.tls_name.clone().unwrap_or_else(|| host.clone());
        Some((tls_config(args)?, server_name(&name)?))
    } else {
        None
    };
    let ctx = Ctx {
        timeout: Duration::from_secs_f64(args.timeout),
        creds,
        tls,
        count: args.count,
    };
    let mut reports = Vec::new();
    let mut udp_works = false;
    for t in &transports {
        let addr = match t {
            Transport::Tls => SocketAddr::new(server.ip(), args.tls_port),
            _ => server,
        };
        let r = probe_transport(*t, addr, server, udp_works, &ctx);
        if *t == Transport::Udp {
            udp_works = r
                .steps
                .iter()
                .any(|s| s.step == Step::ServerReflexive && s.status == Status::Ok);
        }
        reports.push(r);
    }
    let nat = if !transports.contains(&Transport::Udp) {
        Nat::NotRun
    } else if udp_works {
        nat::classify(server, ctx.timeout)
    } else {
        Nat::Failed {
            error: "no Binding answer over UDP".into(),
        }
    };
    let mut label = server.to_string();
    if transports.contains(&Transport::Tls) {
        label.push_str(&format!(", TLS port {}", args.tls_port));
    }
    if host.parse::<IpAddr>().is_err() {
        label = format!("{host} ({label})");
    }
    Ok(Report::new(label, ctx.creds.is_some(), reports, nat))
}

fn credentials(args: &ProbeArgs) -> Result<Option<Credentials>, String> {
    if let Some(secret) = &args.secret {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            + REST_LIFETIME_SECS;
        let name = args.user.as_deref().unwrap_or("portico-probe");
        let username = format!("{expiry}:{name}");
        let password = rest_password(secret.as_bytes(), username.as_bytes());
        return Ok(Some(Credentials {
            username,
            password,
            realm: args.realm.clone(),
        }));
    }
    match (&args.user, &args.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
            realm: args.realm.clone(),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err("--user needs --password (or use --secret)".into()),
        (None, Some(_)) => Err("--password needs --user".into()),
    }
}

/// "host", "host:port", "[v6]", "[v6]:port", or a bare IPv6 address.
fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let bad = || format!("{s:?}: expected host[:port]");
    let port_of = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{s:?}: bad port {p:?}"))
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest.split_once(']').ok_or_else(bad)?;
        let port = match tail {
            "" => 3478,
            t => port_of(t.strip_prefix(':').ok_or_else(bad)?)?,
        };
        return Ok((h.to_string(), port));
    }
    if s.parse::<IpAddr>().is_ok() {
        return Ok((s.to_string(), 3478));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Ok((h.to_string(), port_of(p)?)),
        Some(_) => Err(bad()),
        None if s.is_empty() => Err(bad()),
        None => Ok((s.to_string(), 3478)),
    }
}

/// The server's address, IPv4 first when the name has both.
fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {host}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{host} has no address"))
}

fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string()).map_err(|e| format!("TLS name {name:?}: {e}"))
}

fn tls_config(args: &ProbeArgs) -> Result<Arc<ClientConfig>, String> {
    let (mut roots, _) = ptls::root_store(None)?;
    if let Some(f) = &args.ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(f)
            .map_err(|e| format!("--ca {}: {e}", f.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--ca {}: {e}", f.display()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!("--ca {}: no usable certificate", f.display()));
        }
    }
    let (verifying, trusting) = ptls::client_configs(roots, &[])?;
    Ok(if args.insecure { trusting } else { verifying })
}

/// Results of one transport so far.
struct Steps {
    done: Vec<StepResult>,
}

impl Steps {
    fn ok(&mut self, step: Step, detail: String) {
        self.done.push(StepResult {
            step,
            status: Status::Ok,
            detail,
            error_kind: None,
            error_code: None,
        });
    }

    fn fail(&mut self, step: Step, f: &Failure) {
        self.done.push(StepResult {
            step,
            status: Status::Fail,
            detail: f.to_string(),
            error_kind: Some(f.kind()),
            error_code: match f {
                Failure::Error { code, .. } => Some(*code),
                _ => None,
            },
        });
    }

    /// Marks the remaining steps as not run.
    fn skip_rest(&mut self, why: &str) {
        for step in Step::ALL.into_iter().skip(self.done.len()) {
            self.done.push(StepResult {
                step,
                status: Status::Skipped,
                detail: format!("not run: {why}"),
                error_kind: None,
                error_code: None,
            });
        }
    }
}

fn probe_transport(
    t: Transport,
    addr: SocketAddr,
    udp_server: SocketAddr,
    udp_works: bool,
    ctx: &Ctx,
) -> TransportReport {
    let mut rep = TransportReport {
        transport: t.name(),
        server: addr.to_string(),
        steps: Vec::new(),
        host: None,
        server_reflexive: None,
        relayed: None,
        round_trip: None,
    };
    let mut steps = Steps { done: Vec::new() };
    let secs = ctx.timeout.as_secs_f64();
    let deadline = Instant::now() + ctx.timeout;
    // Host: the socket (and for TCP/TLS the connection and handshake).
    let conn = match t {
        Transport::Udp => Conn::udp(addr),
        Transport::Tcp => Conn::tcp(addr, deadline),
        Transport::Tls => match &ctx.tls {
            Some((config, name)) => Conn::tls(addr, name.clone(), Arc::clone(config), deadline),
            None => Err(conn::WireError::Io("no TLS configuration".into())),
        },
    };
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            let what = match t {
                Transport::Tls => "the TLS handshake",
                _ => "the TCP connection",
            };
            let f = match e {
                conn::WireError::Timeout => Failure::Wire(format!(
                    "timeout: no answer to {what} within {} s",
                    secs_text(secs)
                )),
                other => Failure::wire(other, "connect", secs),
            };
            steps.fail(Step::Host, &f);
            steps.skip_rest("no connection");
            rep.steps = steps.done;
            return rep;
        }
    };
    rep.host = Some(conn.local.to_string());
    let connected = if conn.is_udp() {
        String::new()
    } else {
        format!(", connected to {addr}")
    };
    steps.ok(Step::Host, format!("{}{connected}", conn.local));
    let local = conn.local;
    let mut client = Client::new(conn, ctx.timeout);

    // Server-reflexive: Binding.
    let srflx = client
        .transact(&Request::new(method::BINDING), false)
        .and_then(|r| {
            r.xor_address(attr::XOR_MAPPED_ADDRESS)?.ok_or_else(|| {
                Failure::Protocol("Binding response without XOR-MAPPED-ADDRESS".into())
            })
        });
    match srflx {
        Ok(a) => {
            rep.server_reflexive = Some(a.to_string());
            let nat = if a == local {
                "same as host: no NAT"
            } else {
                "differs from host: behind NAT"
            };
            steps.ok(Step::ServerReflexive, format!("{a} ({nat})"));
        }
        Err(f) => {
            steps.fail(Step::ServerReflexive, &f);
            steps.skip_rest("no Binding answer");
            rep.steps = steps.done;
            client.conn.close();
            return rep;
        }
    }

    // Relayed: Allocate.
    if ctx.creds.is_none() {
        steps.skip_rest("no credentials (give --user and --password, or --secret)");
        rep.steps = steps.done;
        client.conn.close();
        return rep;
    }
    let relayed = client.allocate(ctx.creds.as_ref()).and_then(|r| {
        let relayed = r.xor_address(attr::XOR_RELAYED_ADDRESS)?.ok_or_else(|| {
            Failure::Protocol("Allocate response without XOR-RELAYED-ADDRESS".into())
        })?;
        let lifetime = r
            .message()?
            .get(attr::LIFETIME)
            .and_then(|v| attr::decode_u32(v).ok());
        Ok((relayed, lifetime))
    });
    let relayed = match relayed {
        Ok((a, lifetime)) => {
            rep.relayed = Some(a.to_string());
            let life = lifetime
                .map(|l| format!(" (lifetime {l} s)"))
                .unwrap_or_default();
            steps.ok(Step::Relayed, format!("{a}{life}"));
            a
        }
        Err(f) => {
            steps.fail(Step::Relayed, &f);
            steps.skip_rest("no relayed address");
            rep.steps = steps.done;
            client.conn.close();
            return rep;
        }
    };

    // Round trip: through the relay to a local peer socket and back.
    // Over UDP this transport's own Binding just showed that UDP reaches the server.
    let udp_reaches = udp_works || t == Transport::Udp;
    match round_trip(&mut client, relayed, udp_server, udp_reaches, ctx) {
        Ok((rtt, detail)) => {
            rep.round_trip = Some(rtt);
            steps.ok(Step::RoundTrip, detail);
        }
        Err((rtt, f)) => {
            rep.round_trip = rtt;
            steps.fail(Step::RoundTrip, &f);
        }
    }
    client.release();
    rep.steps = steps.done;
    rep
}

type RoundTripResult = Result<(Rtt, String), (Option<Rtt>, Failure)>;

fn round_trip(
    client: &mut Client,
    relayed: SocketAddr,
    udp_server: SocketAddr,
    udp_works: bool,
    ctx: &Ctx,
) -> RoundTripResult {
    let secs = ctx.timeout.as_secs_f64();
    let wire = |e| (None, Failure::wire(e, "the peer's Binding", secs));
    let peer_conn = Conn::udp(udp_server).map_err(wire)?;
    let host = peer_conn.local;
    // The peer's address as the relay will see it: its server-reflexive address when UDP
    // reaches the server, else its host address.
    let (mut peer, peer_addr) = if udp_works {
        let mut pc = Client::new(peer_conn, ctx.timeout);
        let a = pc
            .transact(&Request::new(method::BINDING), false)
            .and_then(|r| {
                r.xor_address(attr::XOR_MAPPED_ADDRESS)?
                    .ok_or_else(|| Failure::Protocol("no XOR-MAPPED-ADDRESS".into()))
            })
            .map_err(|f| (None, f))?;
        (pc.conn, a)
    } else {
        (peer_conn, host)
    };
    client
        .create_permission(peer_addr)
        .map_err(|f| (None, prefixed("CreatePermission", f)))?;
    let token: u64 = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // A NAT in front of the peer lets the relay's packets in only once the peer has sent to
    // the relayed address (as an ICE agent's checks would). A NAT that maps per destination
    // (symmetric) gives that packet another source than the peer's STUN-mapped address, so,
    // as an ICE agent learns a peer-reflexive candidate, the probe takes the peer's address
    // from the Data indication the relay makes of that packet (its XOR-PEER-ADDRESS).
    let learnt = learn_peer(client, &mut peer, relayed, token, ctx)?;
    let via = learnt.unwrap_or(peer_addr);
    // Permissions are per IP address: only a NAT that also changes the address needs one
    // more.
    if via.ip() != peer_addr.ip() {
        client
            .create_permission(via)
            .map_err(|f| (None, prefixed("CreatePermission", f)))?;
    }
    client
        .channel_bind(via)
        .map_err(|f| (None, prefixed("ChannelBind", f)))?;

    let mut rtts: Vec<f64> = Vec::new();
    let mut reached_peer = 0u32;
    let mut relay_source = None;
    let mut sent = 0u32;
    for seq in 0..ctx.count {
        // Nothing through after the first few: the path is closed, waiting on is no use.
        if seq == GIVE_UP_AFTER && rtts.is_empty() {
            break;
        }
        sent += 1;
        let mut payload = Vec::with_capacity(172);
        payload.extend_from_slice(b"portico-probe");
        payload.extend_from_slice(&token.to_be_bytes());
        payload.extend_from_slice(&seq.to_be_bytes());
        payload.resize(172, 0x55);
        let t0 = Instant::now();
        let deadline = t0 + ctx.timeout;
        client.send_channel(&payload).map_err(|f| (None, f))?;
        // The peer receives it from the relay and echoes it back.
        let mut at_peer = false;
        while let Some((data, from)) = peer.recv(deadline).map_err(wire)? {
            if data == payload {
                relay_source = Some(from);
                at_peer = true;
                peer.send_to(&data, from).map_err(wire)?;
                break;
            }
        }
        if !at_peer {
            continue;
        }
        reached_peer += 1;
        while let Some(data) = client.recv_data(deadline).map_err(|f| (None, f))? {
            if data == payload {
                rtts.push(t0.elapsed().as_secs_f64() * 1000.0);
                break;
            }
        }
    }
    let received = rtts.len() as u32;
    let mut rtt = Rtt {
        sent,
        received,
        loss_percent: f64::from(sent - received) * 100.0 / f64::from(sent),
        ..Rtt::default()
    };
    if !rtts.is_empty() {
        rtt.min_ms = rtts.iter().copied().reduce(f64::min);
        rtt.max_ms = rtts.iter().copied().reduce(f64::max);
        rtt.avg_ms = Some(rtts.iter().sum::<f64>() / rtts.len() as f64);
    }
    if received == 0 {
        let f = if reached_peer == 0 {
            let opened = if learnt.is_none() {
                "; nor did the peer's own packet to the relayed address come through"
            } else {
                ""
            };
            Failure::Lost(format!(
                "timeout: the relay delivered none of {sent} packets to the peer {via} within {} s each{opened}",
                secs_text(secs)
            ))
        } else {
            Failure::Lost(format!(
                "timeout: the peer got {reached_peer}/{sent} packets, but none of its echoes came back through the relay within {} s",
                secs_text(secs)
            ))
        };
        return Err((Some(rtt), f));
    }
    let mut detail = format!(
        "{received}/{sent} back via peer {via}, RTT min/avg/max {:.2}/{:.2}/{:.2} ms, loss {:.0}%",
        rtt.min_ms.unwrap_or(0.0),
        rtt.avg_ms.unwrap_or(0.0),
        rtt.max_ms.unwrap_or(0.0),
        rtt.loss_percent
    );
    if let Some(src) = relay_source.filter(|s| *s != relayed) {
        detail.push_str(&format!(" (relay sends from {src})"));
    }
    if via != peer_addr {
        let known = if udp_works { "STUN-mapped" } else { "host" };
        detail.push_str(&format!(
            " (the relay sees the peer there, not at its {known} address {peer_addr}: the NAT maps per destination)"
        ));
    }
    Ok((rtt, detail))
}

/// Sends a marked packet from the peer to the relayed address (again at growing intervals
/// until the timeout, as it may be lost) and returns the peer's address as the relay saw it,
/// from the Data indication that brings the packet to the client; `None` when none came.
fn learn_peer(
    client: &mut Client,
    peer: &mut Conn,
    relayed: SocketAddr,
    token: u64,
    ctx: &Ctx,
) -> Result<Option<SocketAddr>, (Option<Rtt>, Failure)> {
    let secs = ctx.timeout.as_secs_f64();
    let mut opener = b"portico-probe: open the NAT ".to_vec();
    opener.extend_from_slice(&token.to_be_bytes());
    let deadline = Instant::now() + ctx.timeout;
    let mut interval = OPEN_RESEND;
    loop {
        peer.send_to(&opener, relayed)
            .map_err(|e| (None, Failure::wire(e, "the peer's packet", secs)))?;
        let resend = (Instant::now() + interval).min(deadline);
        interval *= 2;
        while let Some((data, from)) = client.recv_peer_data(resend).map_err(|f| (None, f))? {
            if data == opener {
                if let Some(a) = from {
                    return Ok(Some(a));
                }
            }
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
    }
}

fn prefixed(step: &str, f: Failure) -> Failure {
    match f {
        Failure::Error { code, reason, hint } => Failure::Error {
            code,
            reason,
            hint: if hint.is_empty() {
                format!("at {step}")
            } else {
                format!("{hint} (at {step})")
            },
        },
        Failure::Timeout { what, secs } => Failure::Timeout { what, secs },
        other => Failure::Protocol(format!("{step}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("a.example").unwrap(),
            ("a.example".into(), 3478)
        );
        assert_eq!(
            split_host_port("a.example:1").unwrap(),
            ("a.example".into(), 1)
        );
        assert_eq!(split_host_port("::1").unwrap(), ("::1".into(), 3478));
        assert_eq!(split_host_port("[::1]:9").unwrap(), ("::1".into(), 9));
        assert_eq!(split_host_port("[::1]").unwrap(), ("::1".into(), 3478));
        assert!(split_host_port("a:x").is_err());
        assert!(split_host_port(":1").is_err());
        assert!(split_host_port("").is_err());
        assert!(split_host_port("[::1]x").is_err());
    }
}
