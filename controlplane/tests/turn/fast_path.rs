//! The kernel fast path (`turn.fast_path`) in the topology it is made for: Portico in a
//! network namespace of its own, the client in a second and the peer in a third, joined by
//! veth pairs, all created (and removed) by the test. The TC program is attached only to the
//! interfaces of Portico's namespace, never to the host's.
//!
//! * A recorded stream (every length 0 to 1400, padded and unpadded ChannelData, payloads that
//!   look like ChannelData or STUN) relayed both ways arrives byte for byte as it does through
//!   the user-space relay, with checksums the receiving stacks verify in software (transmit
//!   checksum offload off on the client's and peer's veth) and, in a second round, with
//!   offload on (CHECKSUM_PARTIAL packets).
//! * The worker's receive counter does not move while the fast path's counters do, and
//!   `/metrics` and the API's allocation record count the relayed packets all the same.
//! * Deleting the allocation (API) or blacklisting the client or the peer stops forwarding
//!   within one second; a peer without a permission is never forwarded.
//! * `fast_path = "off"` never loads it; `"auto"` with a missing object falls back with one
//!   log line; `"on"` with a missing object refuses to start.
//! * Two allocations relaying to each other's relayed address are joined in the kernel:
//!   ChannelData in, the other channel's ChannelData out, checksums verified on the wire.
//! * Both packet drivers (io_uring and epoll) install and remove entries.
//! * coturn's `turnutils_uclient` relays through it to `turnutils_peer` without loss.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use portico_testkit::dirs::TempDir;
use portico_testkit::http::parse_response;
use portico_testkit::metrics::metric;
use portico_testkit::portico::portico_bin;
use portico_testkit::process::{require, Proc};
use portico_testkit::turn::{Relayed, TurnClient, PASSWORD, REALM_NAME, USER};

pub(crate) const CHANNEL: u16 = 0x4001;
const API_PORT: u16 = 8080;

/// Client, Portico and peer namespaces; removed on drop.
pub(crate) struct Lab {
    pub(crate) client_ns: String,
    pub(crate) portico_ns: String,
    pub(crate) peer_ns: String,
    pub(crate) client: Ipv4Addr,
    pub(crate) listen: Ipv4Addr,
    pub(crate) relay: Ipv4Addr,
    pub(crate) peer: Ipv4Addr,
    /// A second peer address with no permission.
    pub(crate) stranger: Ipv4Addr,
    veths: [String; 2],
}

pub(crate) fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new(require("ip", "iproute2"))
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn in_ns_cmd(ns: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(require("ip", "iproute2"))
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{args:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

static LABS: AtomicU32 = AtomicU32::new(0);

impl Lab {
    fn create() -> Result<Lab, String> {
        let pid = std::process::id();
        let k = LABS.fetch_add(1, Ordering::Relaxed);
        let n = ((pid * 7 + k) % 250) as u8 + 1;
        let tag = format!("{}{k}", pid % 100_000);
        let lab = Lab {
            client_ns: format!("fpc-{tag}"),
            portico_ns: format!("fpp-{tag}"),
            peer_ns: format!("fpq-{tag}"),
            client: Ipv4Addr::new(10, 231, n, 2),
            listen: Ipv4Addr::new(10, 231, n, 1),
            relay: Ipv4Addr::new(10, 232, n, 1),
            peer: Ipv4Addr::new(10, 232, n, 2),
            stranger: Ipv4Addr::new(10, 232, n, 3),
            veths: [format!("fpc{tag}"), format!("fpq{tag}")],
        };
        ip(&["netns", "add", &lab.client_ns])?;
        // From here on drop removes what exists.
        let r = (|| {
            ip(&["netns", "add", &lab.portico_ns])?;
            ip(&["netns", "add", &lab.peer_ns])?;
            let [vc, vq] = &lab.veths;
            let (pc, pq) = (format!("{vc}p"), format!("{vq}p"));
            ip(&[
                "link",
                "add",
                vc,
                "netns",
                &lab.client_ns,
                "type",
                "veth",
                "peer",
                "name",
                &pc,
                "netns",
                &lab.portico_ns,
            ])?;
            ip(&[
                "link",
                "add",
                vq,
                "netns",
                &lab.peer_ns,
                "type",
                "veth",
                "peer",
                "name",
                &pq,
                "netns",
                &lab.portico_ns,
            ])?;
            let a = |ip: Ipv4Addr| format!("{ip}/24");
            ip(&[
                "-n",
                &lab.client_ns,
                "addr",
                "add",
                &a(lab.client),
                "dev",
                vc,
            ])?;
            ip(&[
                "-n",
                &lab.portico_ns,
                "addr",
                "add",
                &a(lab.listen),
                "dev",
                &pc,
            ])?;
            ip(&[
                "-n",
                &lab.portico_ns,
                "addr",
                "add",
                &a(lab.relay),
                "dev",
                &pq,
            ])?;
            ip(&["-n", &lab.peer_ns, "addr", "add", &a(lab.peer), "dev", vq])?;
            ip(&[
                "-n",
                &lab.peer_ns,
                "addr",
                "add",
                &a(lab.stranger),
                "dev",
                vq,
            ])?;
            for (ns, dev) in [
                (&lab.client_ns, vc.as_str()),
                (&lab.portico_ns, pc.as_str()),
                (&lab.portico_ns, pq.as_str()),
                (&lab.peer_ns, vq.as_str()),
            ] {
                ip(&["-n", ns, "link", "set", dev, "up"])?;
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
            }
            Ok::<(), String>(())
        })();
        match r {
            Ok(()) => {
                lab.set_tx_checksum(false)?;
                Ok(lab)
            }
            Err(e) => Err(e),
        }
    }

    /// Transmit checksum offload of the client's and the peer's veth: off, every checksum
    /// is computed in software and verified by the receiving stack; on, packets cross
    /// Portico's namespace as CHECKSUM_PARTIAL.
    fn set_tx_checksum(&self, on: bool) -> Result<(), String> {
        let ethtool = require("ethtool", "ethtool");
        let e = ethtool.to_string_lossy();
        let v = if on { "on" } else { "off" };
        in_ns_cmd(&self.client_ns, &[&e, "-K", &self.veths[0], "tx", v])?;
        in_ns_cmd(&self.peer_ns, &[&e, "-K", &self.veths[1], "tx", v])?;
        Ok(())
    }

    /// Transmit checksum offload of Portico's veth towards the client: off, what user space
    /// sends there carries a complete checksum too (a capture can check every datagram).
    fn set_portico_tx_checksum(&self, on: bool) -> Result<(), String> {
        let ethtool = require("ethtool", "ethtool");
        let e = ethtool.to_string_lossy();
        let v = if on { "on" } else { "off" };
        let dev = format!("{}p", self.veths[0]);
        in_ns_cmd(&self.portico_ns, &[&e, "-K", &dev, "tx", v])?;
        Ok(())
    }

    fn server(&self) -> SocketAddr {
        SocketAddr::from((self.listen, 3478))
    }

    /// UDP checksum errors the receiving stacks of client and peer counted.
    pub(crate) fn checksum_errors(&self) -> u64 {
        [&self.client_ns, &self.peer_ns]
            .iter()
            .map(|ns| {
                let snmp = in_ns_cmd(ns, &["cat", "/proc/net/snmp"]).unwrap_or_default();
                let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
                let (Some(h), Some(v)) = (udp.first(), udp.get(1)) else {
                    return 0;
                };
                let i = h.split_whitespace().position(|x| x == "InCsumErrors");
                i.and_then(|i| v.split_whitespace().nth(i))
                    .and_then(|x| x.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client_ns, &self.portico_ns, &self.peer_ns] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Runs `f` on a thread inside namespace `ns`: sockets it creates stay in that namespace.
pub(crate) fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = PathBuf::from("/var/run/netns").join(ns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        // SAFETY: setns on a namespace file this thread opened; it changes only this thread.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path:?}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|_| panic!("thread in {ns} panicked"))
}

/// Portico inside the lab's namespace. Field order: the process stops before its
/// directory goes.
pub(crate) struct NsPortico {
    proc: Proc,
    pub(crate) dir: TempDir,
    ns: String,
}

impl NsPortico {
    fn start(lab: &Lab, mode: &str, env: &[(&str, &str)]) -> NsPortico {
        NsPortico::start_on(lab, mode, "auto", env)
    }

    fn start_on(lab: &Lab, mode: &str, io: &str, env: &[(&str, &str)]) -> NsPortico {
        NsPortico::start_with(lab, mode, io, "", env)
    }

    /// Portico in the lab's namespace with `extra` lines added to `[turn]`.
    pub(crate) fn start_with(
        lab: &Lab,
        mode: &str,
        io: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> NsPortico {
        let allow = format!("\"{}/24\"", lab.relay);
        NsPortico::start_full(lab, mode, io, extra, &allow, "", env)
    }

    /// [`NsPortico::start_with`] with `turn.allow_peers` = `allow` (TOML array items) and
    /// whole `tables` (`[media]`, `[[nat.maps]]`) at the end.
    pub(crate) fn start_full(
        lab: &Lab,
        mode: &str,
        io: &str,
        extra: &str,
        allow: &str,
        tables: &str,
        env: &[(&str, &str)],
    ) -> NsPortico {
        let dir = TempDir::new("fast-path");
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let config = dir.join("portico.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\n\n[turn]\nlisten = [\"{}:3478\"]\nrelay_ip = [\"{}\"]\n\
                 allow_peers = [{allow}]\nfast_path = \"{mode}\"\nworkers = 1\nio = \"{io}\"\n{extra}\
                 realm = \"{REALM_NAME}\"\nusers = [{{ name = \"{USER}\", password = \"{PASSWORD}\" }}]\n\n\
                 [api]\nlisten = \"127.0.0.1:{API_PORT}\"\n\n{tables}\n",
                state.display(),
                lab.listen,
                lab.relay,
            ),
        )
        .unwrap();
        let mut cmd = Command::new(require("ip", "iproute2"));
        cmd.args(["netns", "exec", &lab.portico_ns])
            .arg(portico_bin())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("PORTICO_DATAPLANE", portico_bin())
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn("portico", &mut cmd, &dir.join("portico.log"));
        NsPortico {
            proc,
            dir,
            ns: lab.portico_ns.clone(),
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("portico.log")).unwrap_or_default()
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("state").join("admin.token"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// One API request over a connection opened inside Portico's namespace.
    pub(crate) fn api(&self, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        let api = SocketAddr::from(([127, 0, 0, 1], API_PORT));
        let mut s = in_ns(&self.ns, move || {
            TcpStream::connect_timeout(&api, Duration::from_secs(2))
        })
        .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.token(),
            body.len()
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let r = parse_response(&raw)?;
        Some((r.status, String::from_utf8_lossy(&r.body).into_owned()))
    }

    pub(crate) fn metrics(&self) -> String {
        match self.api("GET", "/metrics", "") {
            Some((200, text)) => text,
            other => panic!("/metrics: {other:?}\nlog:\n{}", self.log()),
        }
    }

    /// Waits until the API answers (the dataplane is up when /metrics shows a worker).
    pub(crate) fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((200, text)) = self.api("GET", "/metrics", "") {
                if counter(&text, "portico_dataplane_loop_turns", &[]) > 0 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline && self.proc.alive(),
                "Portico did not come up in its namespace; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub(crate) fn counter(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    let v = metric(text, name, labels);
    if v == 0.0 {
        // Counters may carry the OpenMetrics suffix.
        metric(text, &format!("{name}_total"), labels) as u64
    } else {
        v as u64
    }
}

/// The recorded stream: every length from 0 to 1400 bytes in a shuffled order, payloads that
/// look like ChannelData (0x40...) and STUN (0x00...) among them.
pub(crate) fn recorded_stream() -> Vec<Vec<u8>> {
    let mut seed: u32 = 0x9e37_79b9;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    let mut lens: Vec<usize> = (0..=64).chain((65..=1400).step_by(7)).collect();
    for i in (1..lens.len()).rev() {
        lens.swap(i, next() as usize % (i + 1));
    }
    lens.iter()
        .enumerate()
        .map(|(i, &len)| {
            let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if len >= 2 && i % 5 == 0 {
                p[0] = 0x40;
            }
            if len >= 2 && i % 5 == 1 {
                p[0] = 0x00;
                p[1] = 0x01;
            }
            p
        })
        .collect()
}

/// An allocation from the client namespace with a channel to the peer; the peer socket.
pub(crate) struct Session {
    pub(crate) client: TurnClient,
    pub(crate) peer: UdpSocket,
    pub(crate) relayed: SocketAddr,
}

pub(crate) fn session(lab: &Lab) -> Session {
    let (c, server) = (lab.client, lab.server());
    let mut client = in_ns(&lab.client_ns, move || {
        TurnClient::from(IpAddr::V4(c), server, USER, PASSWORD)
    });
    let relayed = client.allocate();
    let p = lab.peer;
    let peer = in_ns(&lab.peer_ns, move || {
        UdpSocket::bind((p, 0)).unwrap_or_else(|e| panic!("peer bind: {e}"))
    });
    let peer_addr = peer.local_addr().unwrap();
    assert!(client.bind(CHANNEL, peer_addr).is_success(), "ChannelBind");
    Session {
        client,
        peer,
        relayed,
    }
}

/// What the peer and the client received for the stream, in order: the peer's datagrams
/// (with their source) and the client's ChannelData.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Received {
    pub(crate) at_peer: Vec<(SocketAddr, Vec<u8>)>,
    pub(crate) at_client: Vec<(u16, Vec<u8>)>,
}

pub(crate) fn relay_stream(s: &Session, stream: &[Vec<u8>]) -> Received {
    let wait = Duration::from_secs(2);
    s.peer.set_read_timeout(Some(wait)).unwrap();
    let mut buf = vec![0u8; 2048];
    let mut at_peer = Vec::new();
    for (i, p) in stream.iter().enumerate() {
        s.client.channel_data(CHANNEL, p, i % 2 == 0);
        match s.peer.recv_from(&mut buf) {
            Ok((n, from)) => at_peer.push((from, buf[..n].to_vec())),
            Err(e) => panic!("packet {i} ({} bytes) did not reach the peer: {e}", p.len()),
        }
    }
    let mut at_client = Vec::new();
    for (i, p) in stream.iter().enumerate() {
        s.peer.send_to(p, s.relayed).unwrap();
        match s.client.recv_relayed(wait) {
            Some(Relayed::Channel { number, data }) => at_client.push((number, data)),
            other => panic!(
                "packet {i} ({} bytes) did not reach the client as ChannelData: {other:?}",
                p.len()
            ),
        }
    }
    Received { at_peer, at_client }
}

/// Whether anything of 20 packets sent each way within `wait` gets through.
fn forwards(s: &Session, wait: Duration) -> (usize, usize) {
    s.peer
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = [0u8; 2048];
    while s.peer.recv_from(&mut buf).is_ok() {}
    while s.client.recv_relayed(Duration::from_millis(20)).is_some() {}
    let (mut up, mut down) = (0, 0);
    for _ in 0..20 {
        s.client.channel_data(CHANNEL, b"after", false);
        s.peer.send_to(b"after", s.relayed).unwrap();
    }
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if s.peer.recv_from(&mut buf).is_ok() {
            up += 1;
        }
        if s.client.recv_relayed(Duration::from_millis(20)).is_some() {
            down += 1;
        }
    }
    (up, down)
}

pub(crate) fn lab_or_skip(test: &str) -> Option<Lab> {
    match Lab::create() {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!(
                "\n*** SKIPPED {test}: cannot create the network namespaces and veth pairs \
                 ({e}); it needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) ***\n"
            );
            None
        }
    }
}

/// Portico with the fast path on, or `None` (loudly) where this kernel or build refuses it.
pub(crate) fn fast_portico(lab: &Lab, test: &str) -> Option<NsPortico> {
    fast_portico_on(lab, "auto", test)
}

fn fast_portico_on(lab: &Lab, io: &str, test: &str) -> Option<NsPortico> {
    fast_portico_with(lab, io, "", test)
}

/// [`fast_portico`] with `extra` lines in `[turn]`.
pub(crate) fn fast_portico_with(lab: &Lab, io: &str, extra: &str, test: &str) -> Option<NsPortico> {
    let allow = format!("\"{}/24\"", lab.relay);
    fast_portico_full(lab, io, extra, &allow, "", test)
}

/// [`fast_portico_with`] with `turn.allow_peers` and whole tables ([`NsPortico::start_full`]).
pub(crate) fn fast_portico_full(
    lab: &Lab,
    io: &str,
    extra: &str,
    allow: &str,
    tables: &str,
    test: &str,
) -> Option<NsPortico> {
    let mut p = NsPortico::start_full(lab, "on", io, extra, allow, tables, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = p.log();
        if log.contains("kernel fast path loaded") {
            break;
        }
        // Only an environment that cannot run it is skipped (no clang at build time, a
        // kernel without BPF or TCX, no privilege); any other refusal fails the test.
        if log.contains("this build has no fast path")
            || log.contains("the kernel refused the program")
            || log.contains("(TCX, Linux 6.6+)")
        {
            eprintln!(
                "\n*** SKIPPED {test}: the kernel or the build refused the fast path here; \
                 log:\n{log} ***\n"
            );
            return None;
        }
        assert!(
            Instant::now() < deadline && !log.contains("turn.fast_path = "),
            "the fast path did not load:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    p.wait_ready();
    Some(p)
}

#[test]
fn fast_path_relays_a_recorded_stream_like_user_space_without_waking_it() {
    const T: &str = "fast_path_relays_a_recorded_stream_like_user_space_without_waking_it";
    let Some(lab) = lab_or_skip(T) else { return };
    let stream = recorded_stream();

    // The user-space relay's answer first.
    let mut user = NsPortico::start(&lab, "off", &[]);
    user.wait_ready();
    let s = session(&lab);
    let by_user = relay_stream(&s, &stream);
    drop(s);
    assert!(
        !user.log().contains("fast path"),
        "fast_path = \"off\" must not load or mention it:\n{}",
        user.log()
    );
    drop(user);

    let Some(fast) = fast_portico(&lab, T) else {
        return;
    };
    let s = session(&lab);
    std::thread::sleep(Duration::from_millis(500));
    let before = fast.metrics();
    let csum_before = lab.checksum_errors();
    let by_kernel = relay_stream(&s, &stream);
    let n = stream.len() as u64;
    let bytes: u64 = stream.iter().map(|p| p.len() as u64).sum();

    // Byte for byte what the user-space relay delivered, and what was sent.
    assert_eq!(by_kernel.at_peer.len(), stream.len());
    for (i, ((from_k, k), (from_u, u))) in by_kernel
        .at_peer
        .iter()
        .zip(by_user.at_peer.iter())
        .enumerate()
    {
        assert_eq!(k, &stream[i], "packet {i} at the peer");
        assert_eq!(
            k, u,
            "packet {i} at the peer differs from the user-space relay's"
        );
        assert_eq!(from_k.ip(), from_u.ip(), "source of packet {i}");
        assert_eq!(*from_k, s.relayed, "the peer sees the relayed address");
    }
    assert_eq!(by_kernel.at_client, by_user.at_client);
    for (i, (number, data)) in by_kernel.at_client.iter().enumerate() {
        assert_eq!(
            (*number, data),
            (CHANNEL, &stream[i]),
            "packet {i} at the client"
        );
    }
    assert_eq!(lab.checksum_errors(), csum_before, "UDP checksum errors");

    // Not through user space, yet counted.
    let deadline = Instant::now() + Duration::from_secs(3);
    let after = loop {
        let m = fast.metrics();
        if counter(&m, "portico_fastpath_packets", &[]) >= 2 * n || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let d = |name: &str, labels: &[(&str, &str)]| {
        counter(&after, name, labels) - counter(&before, name, labels)
    };
    assert_eq!(d("portico_dataplane_rx_packets", &[]), 0, "worker receives");
    assert_eq!(d("portico_fastpath_packets", &[]), 2 * n, "{after}");
    let up = [("direction", "client_to_peer")];
    let down = [("direction", "peer_to_client")];
    assert_eq!(d("portico_relay_packets", &up), n);
    assert_eq!(d("portico_relay_packets", &down), n);
    assert_eq!(d("portico_relay_bytes", &up), bytes);
    assert_eq!(d("portico_relay_bytes", &down), bytes);
    assert_eq!(counter(&after, "portico_fastpath_entries_active", &[]), 1);
    // The allocation record (republished each second) has them too.
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let (code, body) = fast
            .api("GET", "/api/v1/turn/allocations", "")
            .expect("allocations");
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let a = &v["allocations"][0];
        if a["to_peer"]["packets"].as_u64() == Some(n)
            && a["to_client"]["bytes"].as_u64() == Some(bytes)
        {
            break;
        }
        assert!(Instant::now() < deadline, "allocation record: {v:#}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // With transmit checksum offload on: CHECKSUM_PARTIAL packets through the program.
    lab.set_tx_checksum(true).unwrap();
    let again = relay_stream(&s, &stream);
    assert_eq!(again, by_kernel);
    let m = fast.metrics();
    assert_eq!(
        counter(&m, "portico_dataplane_rx_packets", &[])
            - counter(&before, "portico_dataplane_rx_packets", &[]),
        0
    );

    // A dataplane that stops takes its entries out of the kernel (the gauge back to 0) and
    // the next one loads the program again.
    let log = fast.log();
    let pid: i32 = log
        .split("dataplane_pid=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no dataplane_pid in the log:\n{log}"));
    // SAFETY: a signal to the dataplane process this test's Portico started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let loaded = fast.log().matches("kernel fast path loaded").count();
        if loaded >= 2 {
            if let Some((200, m)) = fast.api("GET", "/metrics", "") {
                if counter(&m, "portico_fastpath_entries_active", &[]) == 0 {
                    break;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no restart with the fast path, or entries left:\n{}",
            fast.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// IPv4 packets captured in a namespace below the socket layer (AF_PACKET), so their IPv4 and
/// UDP checksums can be checked as they arrived.
pub(crate) struct Capture {
    fd: std::os::fd::OwnedFd,
}

impl Capture {
    pub(crate) fn start(ns: &str) -> Capture {
        in_ns(ns, || {
            use std::os::fd::FromRawFd;
            let proto = (libc::ETH_P_IP as u16).to_be() as libc::c_int;
            // SAFETY: a plain socket(2) call; the descriptor is owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            // SAFETY: fd is a new descriptor nobody else owns.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            let size: libc::c_int = 16 << 20;
            // SAFETY: a valid descriptor and a pointer to an int of the length given.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            Capture { fd }
        })
    }

    /// The IPv4 packets of the UDP datagrams from `from` to `to_ip` captured so far.
    pub(crate) fn udp(&self, from: SocketAddr, to_ip: Ipv4Addr) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                return out;
            }
            let Some(ip) = buf.get(14..n as usize) else {
                continue;
            };
            if ip.len() < 28 || ip[0] != 0x45 || ip[9] != 17 {
                continue;
            }
            let src = SocketAddr::from((
                Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
                u16::from_be_bytes([ip[20], ip[21]]),
            ));
            if src == from && ip[16..20] == to_ip.octets() {
                out.push(ip.to_vec());
            }
        }
    }
}

/// Whether an IPv4 packet (no options) carrying UDP has a correct header checksum and a
/// present, correct UDP checksum.
pub(crate) fn checksums_ok(ip: &[u8]) -> bool {
    let sum = |words: &mut dyn Iterator<Item = u16>| -> u16 {
        let mut s: u32 = 0;
        for w in words {
            s += u32::from(w);
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    };
    let be = |b: &[u8]| {
        b.chunks(2)
            .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
            .collect::<Vec<u16>>()
    };
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if total != ip.len() || sum(&mut be(&ip[..20]).into_iter()) != 0xffff {
        return false;
    }
    let udp = &ip[20..];
    if udp[6..8] == [0, 0] {
        return false;
    }
    let mut pseudo = be(&ip[12..20]);
    pseudo.push(17);
    pseudo.push(udp.len() as u16);
    pseudo.extend(be(udp));
    sum(&mut pseudo.into_iter()) == 0xffff
}

/// Two clients whose channels lead to each other's relayed address (relay-only ICE through
/// one server): the kernel turns one's ChannelData straight into the other's, byte for byte,
/// with checksums that verify on the wire; padded ChannelData takes the user-space path;
/// either way `/metrics` counts every packet once out of one allocation and once into the
/// other.
#[test]
fn fast_path_joins_two_allocations_that_relay_to_each_other() {
    const T: &str = "fast_path_joins_two_allocations_that_relay_to_each_other";
    let Some(lab) = lab_or_skip(T) else { return };
    let Some(fast) = fast_portico(&lab, T) else {
        return;
    };
    let (c, server) = (lab.client, lab.server());
    let client = move || TurnClient::from(IpAddr::V4(c), server, USER, PASSWORD);
    let mut a = in_ns(&lab.client_ns, client);
    let mut b = in_ns(&lab.client_ns, client);
    let (ra, rb) = (a.allocate(), b.allocate());
    assert!(a.bind(CHANNEL, rb).is_success(), "ChannelBind a -> b");
    assert!(b.bind(CHANNEL + 1, ra).is_success(), "ChannelBind b -> a");
    std::thread::sleep(Duration::from_millis(500));
    let stream = recorded_stream();
    let n = stream.len() as u64;
    // Padded ChannelData (every other packet, unless its length is a multiple of 4) goes to
    // user space; the rest is joined in the kernel.
    let padded = |i: usize, p: &[u8]| i.is_multiple_of(2) && !p.len().is_multiple_of(4);
    let joined = stream
        .iter()
        .enumerate()
        .filter(|(i, p)| !padded(*i, p))
        .count() as u64;
    let wait = Duration::from_secs(2);
    let one_way = |from: &TurnClient, to: &TurnClient, out: u16, back: u16| {
        for (i, p) in stream.iter().enumerate() {
            from.channel_data(out, p, i % 2 == 0);
            match to.recv_relayed(wait) {
                Some(Relayed::Channel { number, data }) => {
                    assert_eq!((number, &data), (back, p), "packet {i} ({} bytes)", p.len())
                }
                other => panic!("packet {i} ({} bytes) did not arrive: {other:?}", p.len()),
            }
        }
    };

    // The padded datagrams come from user space's socket: with offload off on Portico's
    // side their checksums are complete on the wire too.
    lab.set_portico_tx_checksum(false).unwrap();
    let capture = Capture::start(&lab.client_ns);
    let csum_before = lab.checksum_errors();
    let before = fast.metrics();
    one_way(&a, &b, CHANNEL, CHANNEL + 1);
    one_way(&b, &a, CHANNEL + 1, CHANNEL);
    let deadline = Instant::now() + Duration::from_secs(3);
    let after = loop {
        let m = fast.metrics();
        let d = counter(&m, "portico_fastpath_packets", &[])
            - counter(&before, "portico_fastpath_packets", &[]);
        if d >= 4 * joined || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let d = |name: &str, labels: &[(&str, &str)]| {
        counter(&after, name, labels) - counter(&before, name, labels)
    };
    // Each packet: once out of the sender's allocation, once into the receiver's.
    assert_eq!(d("portico_fastpath_packets", &[]), 4 * joined, "{after}");
    let up = [("direction", "client_to_peer")];
    let down = [("direction", "peer_to_client")];
    assert_eq!(d("portico_relay_packets", &up), 2 * n, "{after}");
    assert_eq!(d("portico_relay_packets", &down), 2 * n, "{after}");
    let bytes: u64 = stream.iter().map(|p| p.len() as u64).sum();
    assert_eq!(d("portico_relay_bytes", &up), 2 * bytes);
    assert_eq!(d("portico_relay_bytes", &down), 2 * bytes);
    // As they arrived at the clients' namespace: every datagram from the listen address,
    // checksums correct.
    let seen = capture.udp(lab.server(), lab.client);
    assert_eq!(
        seen.len() as u64,
        2 * n,
        "captured datagrams to the clients"
    );
    for (i, ip) in seen.iter().enumerate() {
        assert!(
            checksums_ok(ip),
            "datagram {i} to a client: bad checksum {ip:02x?}"
        );
    }
    assert_eq!(lab.checksum_errors(), csum_before, "UDP checksum errors");

    // With transmit checksum offload on (CHECKSUM_PARTIAL packets), the same.
    lab.set_portico_tx_checksum(true).unwrap();
    lab.set_tx_checksum(true).unwrap();
    one_way(&a, &b, CHANNEL, CHANNEL + 1);
    one_way(&b, &a, CHANNEL + 1, CHANNEL);
}

#[test]
fn fast_path_stops_on_delete_and_blacklist_and_never_serves_a_peer_without_permission() {
    stops_on_delete_and_blacklist(
        "io_uring",
        "fast_path_stops_on_delete_and_blacklist_and_never_serves_a_peer_without_permission",
    );
}

#[test]
fn fast_path_stops_on_delete_and_blacklist_over_epoll() {
    stops_on_delete_and_blacklist(
        "epoll",
        "fast_path_stops_on_delete_and_blacklist_over_epoll",
    );
}

fn stops_on_delete_and_blacklist(io: &str, test: &str) {
    let Some(lab) = lab_or_skip(test) else { return };
    let Some(fast) = fast_portico_on(&lab, io, test) else {
        return;
    };
    assert!(
        fast.log().contains(&format!("driver=\"{io}\"")),
        "{}",
        fast.log()
    );

    // A peer address without a permission: nothing reaches the client, in the kernel or
    // in user space, and user space saw (and dropped) it.
    let s = session(&lab);
    assert_eq!(forwards(&s, Duration::from_millis(500)), (20, 20), "before");
    let st = lab.stranger;
    let stranger = in_ns(&lab.peer_ns, move || UdpSocket::bind((st, 0)).unwrap());
    let before = fast.metrics();
    for _ in 0..20 {
        stranger.send_to(b"no permission", s.relayed).unwrap();
    }
    assert!(
        s.client.recv_relayed(Duration::from_millis(500)).is_none(),
        "a peer without permission was forwarded"
    );
    std::thread::sleep(Duration::from_millis(400));
    let after = fast.metrics();
    let dropped = |m: &str| counter(m, "portico_dataplane_drops", &[("reason", "no_permission")]);
    assert_eq!(dropped(&after) - dropped(&before), 20, "{after}");

    // Blacklisting the peer stops forwarding within a second.
    let body = format!("{{\"ip\": \"{}\", \"kind\": \"black\"}}", lab.peer);
    let (code, answer) = fast.api("POST", "/api/v1/fraud/entries", &body).unwrap();
    assert!(code == 200 || code == 201, "{code} {answer}");
    std::thread::sleep(Duration::from_secs(1));
    let (_, down) = forwards(&s, Duration::from_millis(500));
    assert_eq!(
        down, 0,
        "peer blacklisted 1 s ago still forwarded to the client"
    );
    let (code, _) = fast
        .api("DELETE", &format!("/api/v1/fraud/entries/{}", lab.peer), "")
        .unwrap();
    assert!(code == 200 || code == 204, "{code}");
    drop(s);

    // Deleting the allocation through the API stops it within a second.
    let s = session(&lab);
    assert_eq!(
        forwards(&s, Duration::from_millis(500)),
        (20, 20),
        "new session"
    );
    let (_, body) = fast.api("GET", "/api/v1/turn/allocations", "").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let relayed = s.relayed.to_string();
    let id = v["allocations"]
        .as_array()
        .and_then(|l| l.iter().find(|a| a["relayed"].as_str() == Some(&relayed)))
        .and_then(|a| a["id"].as_u64())
        .unwrap_or_else(|| panic!("allocation {relayed} not listed: {v:#}"));
    let (code, _) = fast
        .api("DELETE", &format!("/api/v1/turn/allocations/{id}"), "")
        .unwrap();
    assert!(code == 200 || code == 204, "{code}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        forwards(&s, Duration::from_millis(500)),
        (0, 0),
        "deleted 1 s ago"
    );
    drop(s);

    // Blacklisting the client stops it within a second.
    let s = session(&lab);
    assert_eq!(
        forwards(&s, Duration::from_millis(500)),
        (20, 20),
        "third session"
    );
    let body = format!("{{\"ip\": \"{}\", \"kind\": \"black\"}}", lab.client);
    let (code, answer) = fast.api("POST", "/api/v1/fraud/entries", &body).unwrap();
    assert!(code == 200 || code == 201, "{code} {answer}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        forwards(&s, Duration::from_millis(500)),
        (0, 0),
        "client blacklisted 1 s ago"
    );
    let m = fast.metrics();
    assert_eq!(
        counter(&m, "portico_fastpath_entries_active", &[]),
        0,
        "{m}"
    );
}

#[test]
fn fast_path_modes_fall_back_or_refuse_when_the_object_is_missing() {
    const T: &str = "fast_path_modes_fall_back_or_refuse_when_the_object_is_missing";
    let Some(lab) = lab_or_skip(T) else { return };
    let missing = [("PORTICO_FASTPATH_OBJECT", "/nonexistent/relay.bpf.o")];

    // "auto": one line, then the user-space relay.
    let mut auto = NsPortico::start(&lab, "auto", &missing);
    auto.wait_ready();
    let s = session(&lab);
    let before = auto.metrics();
    assert_eq!(forwards(&s, Duration::from_millis(500)), (20, 20));
    std::thread::sleep(Duration::from_millis(300));
    let after = auto.metrics();
    let rx = |m: &str| counter(m, "portico_dataplane_rx_packets", &[]);
    assert!(rx(&after) - rx(&before) >= 40, "relayed in user space");
    assert_eq!(counter(&after, "portico_fastpath_packets", &[]), 0);
    let log = auto.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("fast path")).collect();
    assert_eq!(lines.len(), 1, "one line says why:\n{log}");
    // The reason: the missing object, or (a build without clang) no program at all.
    let reason = if lines[0].contains("this build has no fast path") {
        eprintln!(
            "\n*** {T}: this build has no fast path (clang or libbpf-dev missing at build \
             time); only the fallback itself is checked ***\n"
        );
        "this build has no fast path"
    } else {
        "/nonexistent/relay.bpf.o"
    };
    assert!(
        lines[0].contains("not used") && lines[0].contains(reason),
        "{}",
        lines[0]
    );
    drop(s);
    drop(auto);

    // "on": the dataplane refuses to start, naming the key.
    let on = NsPortico::start(&lab, "on", &missing);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !on.log().contains("turn.fast_path = ") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = on.log();
    assert!(
        log.contains("turn.fast_path = ") && log.contains(reason),
        "{log}"
    );
    assert!(!log.contains("kernel fast path loaded"), "{log}");
}

/// coturn's `turnutils_uclient` in the client namespace, relaying ChannelData to coturn's
/// `turnutils_peer` in the peer namespace: no loss, and the kernel relayed the stream.
#[test]
fn uclient_relays_through_the_fast_path_without_loss() {
    const T: &str = "uclient_relays_through_the_fast_path_without_loss";
    let uclient = crate::uclient();
    let peer_tool = require("turnutils_peer", "coturn");
    let Some(lab) = lab_or_skip(T) else { return };
    let Some(fast) = fast_portico(&lab, T) else {
        return;
    };
    let mut cmd = Command::new(require("ip", "iproute2"));
    cmd.args(["netns", "exec", &lab.peer_ns])
        .arg(&peer_tool)
        .args(["-L", &lab.peer.to_string(), "-p", "3480"]);
    let _peer = Proc::spawn("turnutils_peer", &mut cmd, &fast.dir.join("peer.log"));
    std::thread::sleep(Duration::from_millis(300));
    let before = fast.metrics();
    let (messages, clients) = (200u64, 8u64);
    let (peer, listen) = (lab.peer.to_string(), lab.listen.to_string());
    let (n, m) = (messages.to_string(), clients.to_string());
    let tool = uclient.to_string_lossy().into_owned();
    let args = [
        "netns",
        "exec",
        &lab.client_ns,
        &tool,
        "-c",
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-p",
        "3478",
        "-e",
        &peer,
        "-r",
        "3480",
        "-n",
        &n,
        "-m",
        &m,
        "-l",
        "172",
        &listen,
    ];
    let r = portico_testkit::process::run(&require("ip", "iproute2"), &args, &[], crate::LIMIT);
    assert!(!r.timed_out, "uclient did not finish:\n{}", r.text);
    assert_eq!(r.code, Some(0), "uclient failed:\n{}", r.text);
    assert!(
        r.text.contains("Total lost packets 0 (0.000000%)"),
        "uclient lost packets:\n{}",
        r.text
    );
    let (sent, received) =
        crate::totals(&r.text).unwrap_or_else(|| panic!("no totals line:\n{}", r.text));
    assert_eq!(sent, messages * clients, "{}", r.text);
    assert_eq!(received, sent, "{}", r.text);
    std::thread::sleep(Duration::from_millis(600));
    let after = fast.metrics();
    let d = |name: &str| counter(&after, name, &[]) - counter(&before, name, &[]);
    // Every message went out and came back; the kernel carried most of them (the first
    // packets of a channel may reach user space before the worker installs it).
    assert!(d("portico_relay_packets") >= 2 * sent, "{after}");
    assert!(
        d("portico_fastpath_packets") >= sent,
        "the kernel relayed {} of {} packets",
        d("portico_fastpath_packets"),
        2 * sent
    );
}
