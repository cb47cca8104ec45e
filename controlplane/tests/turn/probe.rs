//! `portico probe` against real servers: SUCCESS against Portico (UDP, TCP, TLS, RFC 5780)
//! and coturn; a specific failure (which step, which transport) for a wrong password, an
//! unexpected realm, the relay's peer policy refusing the probe's peer, and UDP dropped by an
//! nftables rule in a network namespace the test creates (TCP and TLS still relay); behind a
//! masquerading router in namespaces, the NAT classified by RFC 5780 and the relay reached
//! through it; bad arguments; `--json` parsed.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use portico_shared::counters::Counter;
use portico_testkit::dirs::TempDir;
use portico_testkit::portico::portico_bin;
use portico_testkit::process::{require, run, Proc, Run};
use portico_testkit::turn::{PASSWORD, REALM_NAME, SHARED_SECRET, USER};
use portico_testkit::{free_port, free_port_on, Portico, LOCAL4};
use serde_json::Value;

use crate::turn_spec;

const LIMIT: Duration = Duration::from_secs(60);

fn probe(args: &[&str]) -> Run {
    let r = run(portico_bin(), &[&["probe"], args].concat(), &[], LIMIT);
    assert!(
        !r.timed_out,
        "portico probe {args:?} did not finish:\n{}",
        r.text
    );
    r
}

fn json(r: &Run) -> Value {
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("--json printed no JSON ({e}):\n{}", r.text))
}

/// The step `step` of transport `t` in a `--json` report.
fn step<'a>(v: &'a Value, t: &str, step: &str) -> &'a Value {
    v["transports"]
        .as_array()
        .and_then(|ts| ts.iter().find(|x| x["transport"] == t))
        .and_then(|x| x["steps"].as_array())
        .and_then(|ss| ss.iter().find(|s| s["step"] == step))
        .unwrap_or_else(|| panic!("no {t}/{step} in {v:#}"))
}

/// Every step of `transports` is OK and each relay echoed all `count` packets.
fn assert_all_ok(v: &Value, transports: &[&str], count: u64) {
    assert_eq!(v["success"], true, "{v:#}");
    for t in transports {
        for s in ["host", "server_reflexive", "relayed", "round_trip"] {
            assert_eq!(step(v, t, s)["status"], "ok", "{t}/{s}: {v:#}");
        }
        let tr = v["transports"]
            .as_array()
            .and_then(|ts| ts.iter().find(|x| x["transport"] == *t))
            .unwrap();
        assert_eq!(tr["round_trip"]["sent"], count, "{t}: {tr:#}");
        assert_eq!(tr["round_trip"]["received"], count, "{t}: {tr:#}");
        assert!(tr["round_trip"]["min_ms"].as_f64().is_some_and(|x| x > 0.0));
        let relayed: SocketAddr = tr["relayed"].as_str().unwrap().parse().unwrap();
        assert!(relayed.port() != 0, "{t}: {tr:#}");
    }
}

/// A Portico with TLS, RFC 5780 and loopback peers allowed; returns it and its TLS port.
fn portico_for_probe(tag: &str, loopback_peers: bool) -> (Portico, u16) {
    let tls = free_port();
    let spec = turn_spec("auto", loopback_peers)
        .rfc5780()
        .turn(&format!("listen_tls = [\"127.0.0.1:{tls}\"]"));
    (Portico::start(tag, spec), tls)
}

#[test]
fn probe_succeeds_against_portico_over_udp_tcp_tls() {
    let (p, tls) = portico_for_probe("probe-ok", true);
    let server = format!("localhost:{}", p.port);
    let tls_port = tls.to_string();
    let ca = p.state_dir.join("cert.pem");
    let ca = ca.to_str().unwrap();
    let before = p.counter(Counter::TurnAllocationsCreated);
    let r = probe(&[
        &server,
        "--tls-port",
        &tls_port,
        "--ca",
        ca,
        "--user",
        USER,
        "--password",
        PASSWORD,
    ]);
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert!(
        r.stdout.contains(
            "Conclusion SUCCESS: media will flow through the relay over UDP, TCP and TLS"
        ),
        "{}",
        r.text
    );
    assert!(
        r.stdout
            .contains("NAT (RFC 5780, UDP): no NAT (the mapped address is the local address)"),
        "{}",
        r.text
    );
    assert!(
        r.stdout.contains("endpoint-independent filtering"),
        "{}",
        r.text
    );
    assert!(!r.stdout.contains("FAIL"), "{}", r.text);
    // The server saw the three allocations.
    assert!(p.counter(Counter::TurnAllocationsCreated) >= before + 3);

    // REST API credentials and --json: the same, machine-readable.
    let r = probe(&[
        &server,
        "--tls-port",
        &tls_port,
        "--ca",
        ca,
        "--secret",
        SHARED_SECRET,
        "--count",
        "5",
        "--json",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.text);
    let v = json(&r);
    assert_all_ok(&v, &["udp", "tcp", "tls"], 5);
    assert_eq!(v["nat"]["status"], "classified", "{v:#}");
    assert_eq!(v["nat"]["no_nat"], true, "{v:#}");
    assert_eq!(v["nat"]["filtering"], "endpoint-independent", "{v:#}");
    assert_eq!(
        v["nat"]["other_address"],
        format!("127.0.0.2:{}", p.alt.unwrap()),
        "{v:#}"
    );
    assert!(v["conclusion"]
        .as_str()
        .unwrap()
        .starts_with("Conclusion SUCCESS"));

    // IPv6: the same server on [::1].
    let r = probe(&[
        &format!("[::1]:{}", p.port),
        "--transports",
        "udp,tcp",
        "--user",
        USER,
        "--password",
        PASSWORD,
        "--json",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.text);
    let v = json(&r);
    assert_all_ok(&v, &["udp", "tcp"], 10);
    let host = step(&v, "udp", "host")["detail"].as_str().unwrap();
    assert!(host.starts_with("[::1]:"), "{host}");
    // An IPv6 relay (REQUESTED-ADDRESS-FAMILY) to reach the probe's IPv6 peer.
    for t in ["udp", "tcp"] {
        let relayed = step(&v, t, "relayed")["detail"].as_str().unwrap();
        assert!(relayed.starts_with("[::1]:"), "{t}: {relayed}");
    }

    // Without --ca the generated certificate is not trusted: TLS fails at its handshake.
    let r = probe(&[
        &server,
        "--transports",
        "tls",
        "--tls-port",
        &tls_port,
        "--user",
        USER,
        "--password",
        PASSWORD,
    ]);
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(
        r.stdout.contains(
            "Conclusion FAILURE: TLS fails at host: TLS handshake: invalid peer certificate: UnknownIssuer"
        ),
        "{}",
        r.text
    );
}

#[test]
fn probe_names_a_wrong_password_at_the_relay_step() {
    let (p, tls) = portico_for_probe("probe-pw", true);
    let server = format!("127.0.0.1:{}", p.port);
    let r = probe(&[
        &server,
        "--tls-port",
        &tls.to_string(),
        "--insecure",
        "--user",
        USER,
        "--password",
        "not-the-password",
        "--json",
    ]);
    assert_eq!(r.code, Some(1), "{}", r.text);
    let v = json(&r);
    assert_eq!(v["success"], false);
    for t in ["udp", "tcp", "tls"] {
        assert_eq!(step(&v, t, "server_reflexive")["status"], "ok", "{v:#}");
        let s = step(&v, t, "relayed");
        assert_eq!(s["status"], "fail", "{v:#}");
        assert_eq!(s["error_code"], 401, "{v:#}");
        let d = s["detail"].as_str().unwrap();
        assert!(
            d.starts_with("401 Unauthorized: wrong user or password")
                && d.contains(&format!("realm \"{REALM_NAME}\"")),
            "{d}"
        );
        assert_eq!(step(&v, t, "round_trip")["status"], "skipped");
    }
    assert_eq!(
        v["conclusion"],
        format!(
            "Conclusion FAILURE: UDP, TCP and TLS fail at relayed: 401 Unauthorized: wrong user \
             or password (user \"{USER}\", realm \"{REALM_NAME}\"); no transport works"
        )
    );
    assert_eq!(p.counter(Counter::TurnAllocationsCreated), 0);

    // The table says the same.
    let r = probe(&[
        &server,
        "--transports",
        "tcp",
        "--user",
        USER,
        "--password",
        "x",
    ]);
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(
        r.stdout.lines().any(|l| l.starts_with("TCP")
            && l.contains("relayed")
            && l.contains("FAIL")
            && l.contains("401 Unauthorized: wrong user or password")),
        "{}",
        r.text
    );
}

/// A realm other than the one expected, and arguments that cannot work, are named.
#[test]
fn probe_names_an_unexpected_realm_and_bad_arguments() {
    let (p, _) = portico_for_probe("probe-args", true);
    let server = format!("127.0.0.1:{}", p.port);
    let r = probe(&[
        &server,
        "--transports",
        "udp",
        "--user",
        USER,
        "--password",
        PASSWORD,
        "--realm",
        "example.org",
    ]);
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(
        r.stdout.contains(&format!(
            "Conclusion FAILURE: UDP fails at relayed: the server's realm is \"{REALM_NAME}\", \
             not \"example.org\" (--realm)"
        )),
        "{}",
        r.text
    );
    for (args, says) in [
        (&["--user", USER][..], "--user needs --password"),
        (&["--timeout", "0"][..], "--timeout must be above 0"),
        (&["--count", "100000"][..], "--count must be 1 to 1000"),
        (&["--transports", "sctp"][..], "invalid value 'sctp'"),
    ] {
        let r = probe(&[&[&server[..]], args].concat());
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.text);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.text);
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.text);
    }
    let r = probe(&["127.0.0.1:notaport"]);
    assert_eq!(r.code, Some(2), "{}", r.text);
    assert!(r.stderr.contains("bad port \"notaport\""), "{}", r.text);
}

#[test]
fn probe_names_the_peer_policy_refusing_its_peer() {
    // Portico's default policy refuses loopback peers.
    let (p, tls) = portico_for_probe("probe-policy", false);
    let server = format!("127.0.0.1:{}", p.port);
    let r = probe(&[
        &server,
        "--tls-port",
        &tls.to_string(),
        "--insecure",
        "--user",
        USER,
        "--password",
        PASSWORD,
        "--json",
    ]);
    assert_eq!(r.code, Some(1), "{}", r.text);
    let v = json(&r);
    for t in ["udp", "tcp", "tls"] {
        assert_eq!(step(&v, t, "relayed")["status"], "ok", "{v:#}");
        let s = step(&v, t, "round_trip");
        assert_eq!(s["status"], "fail", "{v:#}");
        assert_eq!(s["error_code"], 403, "{v:#}");
        let d = s["detail"].as_str().unwrap();
        assert!(
            d.starts_with("403 Forbidden: peer 127.0.0.1 refused by the relay's peer policy (at CreatePermission)"),
            "{d}"
        );
    }
    assert_eq!(
        v["conclusion"],
        "Conclusion FAILURE: UDP, TCP and TLS fail at round trip: 403 Forbidden: peer 127.0.0.1 \
         refused by the relay's peer policy (at CreatePermission); no transport works"
    );
    assert!(p.counter(Counter::TurnPeerDeniedSpecial) >= 3);
}

// --- coturn ----------------------------------------------------------------------------------

/// coturn's `turnserver` on free ports of 127.0.0.1 (TURN and TLS, with a certificate for
/// `localhost` the test makes), long-term credentials, loopback peers allowed.
struct Coturn {
    _proc: Proc,
    port: u16,
    tls_port: u16,
    ca: PathBuf,
    _dir: TempDir,
}

fn coturn() -> Coturn {
    let dir = TempDir::new("probe-coturn");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let port = free_port_on(&[LOCAL4]);
    let tls_port = free_port_on(&[LOCAL4]);
    let user = format!("{USER}:{PASSWORD}");
    let mut cmd = Command::new(require("turnserver", "coturn"));
    cmd.args([
        "-n",
        "--listening-ip",
        "127.0.0.1",
        "--relay-ip",
        "127.0.0.1",
    ])
    .args(["--listening-port", &port.to_string()])
    .args(["--tls-listening-port", &tls_port.to_string()])
    .args(["--lt-cred-mech", "--user", &user, "--realm", "coturn.test"])
    .args(["--allowed-peer-ip=127.0.0.1", "--allow-loopback-peers"])
    .args(["--no-cli", "--no-dtls", "--simple-log"])
    .arg("--cert")
    .arg(&cert)
    .arg("--pkey")
    .arg(&key)
    .arg("--log-file")
    .arg(dir.join("turn.log"))
    .arg("--pidfile")
    .arg(dir.join("pid"))
    .arg("--userdb")
    .arg(dir.join("db"));
    let proc = Proc::spawn("turnserver", &mut cmd, &dir.join("turnserver.out"));
    for p in [port, tls_port] {
        wait_tcp(
            SocketAddr::from((Ipv4Addr::LOCALHOST, p)),
            &dir.join("turnserver.out"),
        );
    }
    Coturn {
        _proc: proc,
        port,
        tls_port,
        ca: cert,
        _dir: dir,
    }
}

fn wait_tcp(addr: SocketAddr, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {addr}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn probe_succeeds_against_coturn() {
    let c = coturn();
    let server = format!("localhost:{}", c.port);
    let (tls, ca) = (c.tls_port.to_string(), c.ca.to_str().unwrap().to_string());
    let args = [
        &server[..],
        "--tls-port",
        &tls,
        "--ca",
        &ca,
        "--user",
        USER,
        "--password",
        PASSWORD,
    ];
    let r = probe(&args);
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert!(
        r.stdout.contains(
            "Conclusion SUCCESS: media will flow through the relay over UDP, TCP and TLS"
        ),
        "{}",
        r.text
    );
    let r = probe(&[&args[..], &["--json"]].concat());
    assert_eq!(r.code, Some(0), "{}", r.text);
    let v = json(&r);
    assert_all_ok(&v, &["udp", "tcp", "tls"], 10);
    // One listening address: no RFC 5780.
    assert_eq!(v["nat"]["status"], "not_supported", "{v:#}");

    let r = probe(&[
        &server[..],
        "--transports",
        "udp",
        "--user",
        USER,
        "--password",
        "bad",
    ]);
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(
        r.stdout.contains(
            "Conclusion FAILURE: UDP fails at relayed: 401 Unauthorized: wrong user or password (user \"alice\", realm \"coturn.test\")"
        ),
        "{}",
        r.text
    );
}

// --- UDP blocked in a network namespace ------------------------------------------------------

/// A network namespace joined to this one by a veth pair (`10.213.N.1` here, `10.213.N.2`
/// inside); deleted (with its veth pair) on drop.
struct Netns {
    name: String,
    outside: Ipv4Addr,
    inside: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
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

impl Netns {
    fn create() -> Result<Netns, String> {
        let pid = std::process::id();
        let name = format!("portico-probe-{pid}");
        let n = (pid % 250) as u8 + 1;
        let ns = Netns {
            name: name.clone(),
            outside: Ipv4Addr::new(10, 213, n, 1),
            inside: Ipv4Addr::new(10, 213, n, 2),
        };
        ip(&["netns", "add", &name])?;
        // From here on, drop deletes the namespace (and the veth pair with it).
        let (a, b) = (format!("prb{pid}a"), format!("prb{pid}b"));
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        ip(&["link", "set", &b, "netns", &name])?;
        ip(&["addr", "add", &format!("{}/30", ns.outside), "dev", &a])?;
        ip(&["link", "set", &a, "up"])?;
        let inside = format!("{}/30", ns.inside);
        ip(&["-n", &name, "addr", "add", &inside, "dev", &b])?;
        ip(&["-n", &name, "link", "set", &b, "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `nft -f -` inside the namespace.
    fn nft(&self, script: &str) {
        nft_in(&self.name, script);
    }
}

/// `nft -f -` inside namespace `ns`.
fn nft_in(ns: &str, script: &str) {
    {
        use std::io::Write;
        let mut child = Command::new(require("ip", "iproute2"))
            .args(["netns", "exec", ns])
            .arg(require("nft", "nftables"))
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("nft: {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft -f - in {ns}: {}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("removing network namespace {}: {e}", self.name);
        }
    }
}

/// Portico inside network namespace `ns` on `[turn]` lines `turn` and `[stun]` lines `stun`
/// (with the kit's realm and user). Field order: the process stops before its directory goes.
struct NsPortico {
    proc: Proc,
    dir: TempDir,
}

impl NsPortico {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("portico.log")).unwrap_or_default()
    }
}

fn start_portico_in(ns: &str, turn: &str, stun: &str, whitelist: Ipv4Addr) -> NsPortico {
    let dir = TempDir::new("probe-netns");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let config = dir.join("portico.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n\n[turn]\n{turn}\n\
             realm = \"{REALM_NAME}\"\nusers = [{{ name = \"{USER}\", password = \"{PASSWORD}\" }}]\n\n\
             [stun]\n{stun}\n\n[fraud]\nwhitelist = [\"{whitelist}\"]\n\n\
             [api]\nlisten = \"127.0.0.1:{}\"\n",
            state.display(),
            free_port()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(require("ip", "iproute2"));
    cmd.args(["netns", "exec", ns])
        .arg(portico_bin())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("PORTICO_DATAPLANE", portico_bin())
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    let proc = Proc::spawn("portico", &mut cmd, &dir.join("portico.log"));
    NsPortico { proc, dir }
}

/// Portico inside `ns` on its veth address (STUN/TURN 3478, TLS 5349), the probe's side of
/// the veth pair allowed as a peer.
fn portico_in(ns: &Netns) -> NsPortico {
    let inside = ns.inside;
    let p = start_portico_in(
        &ns.name,
        &format!(
            "listen = [\"{inside}:3478\"]\nlisten_tls = [\"{inside}:5349\"]\n\
             relay_ip = [\"{inside}\"]\nallow_peers = [\"{}/32\"]",
            ns.outside
        ),
        "",
        ns.outside,
    );
    for port in [3478, 5349] {
        wait_tcp(SocketAddr::from((inside, port)), &p.dir.join("portico.log"));
    }
    p
}

#[test]
fn probe_names_udp_blocked_by_a_firewall_in_a_namespace() {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!(
                "\n*** SKIPPED probe_names_udp_blocked_by_a_firewall_in_a_namespace: cannot \
                 create a network namespace here ({e}); it needs root (CAP_NET_ADMIN) ***\n"
            );
            return;
        }
    };
    let portico = portico_in(&ns);
    let server = ns.inside.to_string();
    let args = [
        &server[..],
        "--insecure",
        "--user",
        USER,
        "--password",
        PASSWORD,
    ];

    // Open first: everything works, the peer being the probe's side of the veth pair.
    let r = probe(&[&args[..], &["--timeout", "2"]].concat());
    assert_eq!(
        r.code,
        Some(0),
        "{}\nportico log:\n{}",
        r.text,
        portico.log()
    );
    assert!(r.stdout.contains("Conclusion SUCCESS"), "{}", r.text);

    // Then STUN/TURN over UDP dropped on its way in.
    ns.nft(
        "table inet probe_test {\n  chain input {\n    type filter hook input priority 0;\n    \
         udp dport 3478 drop\n  }\n}\n",
    );
    let r = probe(&[&args[..], &["--timeout", "1", "--json"]].concat());
    assert_eq!(r.code, Some(1), "{}", r.text);
    let v = json(&r);
    let s = step(&v, "udp", "server_reflexive");
    assert_eq!(s["status"], "fail", "{v:#}");
    assert_eq!(s["error_kind"], "timeout", "{v:#}");
    assert_eq!(
        s["detail"], "timeout: no answer to Binding within 1 s",
        "{v:#}"
    );
    for t in ["tcp", "tls"] {
        for st in ["host", "server_reflexive", "relayed", "round_trip"] {
            assert_eq!(step(&v, t, st)["status"], "ok", "{t}/{st}: {v:#}");
        }
    }
    assert_eq!(
        v["conclusion"],
        "Conclusion FAILURE: UDP blocked (timeout: no answer to Binding within 1 s); \
         relay over TCP and TLS works",
        "{v:#}"
    );
    assert_eq!(v["nat"]["status"], "failed", "{v:#}");

    // The table names it too.
    let r = probe(&[&args[..], &["--timeout", "1", "--transports", "udp,tcp"]].concat());
    assert_eq!(r.code, Some(1), "{}", r.text);
    assert!(
        r.stdout.contains(
            "Conclusion FAILURE: UDP blocked (timeout: no answer to Binding within 1 s); relay over TCP works"
        ),
        "{}",
        r.text
    );
    drop(portico.proc);
}

// --- behind a NAT: RFC 5780 classification -----------------------------------------------------

/// Three namespaces: a client behind a masquerading router, the router, and a server with
/// two addresses (for RFC 5780); deleted on drop.
struct NatLab {
    names: Vec<String>,
    n: u8,
}

impl NatLab {
    fn client(&self) -> &str {
        &self.names[0]
    }
    fn router(&self) -> &str {
        &self.names[1]
    }
    fn server(&self) -> &str {
        &self.names[2]
    }
    /// The router's address on the server side: the client's address after the NAT.
    fn public(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 215, self.n, 1)
    }
    fn primary(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 215, self.n, 2)
    }
    fn alternate(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 215, self.n, 3)
    }

    fn create() -> Result<NatLab, String> {
        let pid = std::process::id();
        let n = (pid % 250) as u8 + 1;
        let mut lab = NatLab {
            names: Vec::new(),
            n,
        };
        for role in ["client", "router", "server"] {
            let name = format!("portico-probe-{role}-{pid}");
            ip(&["netns", "add", &name])?;
            lab.names.push(name);
        }
        let (c, r, s) = (lab.client(), lab.router(), lab.server());
        let (c0, r0, r1, s1) = (
            format!("pnc{pid}"),
            format!("pnr{pid}"),
            format!("pns{pid}"),
            format!("pnt{pid}"),
        );
        ip(&[
            "link", "add", &c0, "netns", c, "type", "veth", "peer", "name", &r0, "netns", r,
        ])?;
        ip(&[
            "link", "add", &r1, "netns", r, "type", "veth", "peer", "name", &s1, "netns", s,
        ])?;
        let client_ip = format!("10.214.{n}.2/30");
        let router_in = format!("10.214.{n}.1/30");
        ip(&["-n", c, "addr", "add", &client_ip, "dev", &c0])?;
        ip(&["-n", r, "addr", "add", &router_in, "dev", &r0])?;
        ip(&[
            "-n",
            r,
            "addr",
            "add",
            &format!("{}/24", lab.public()),
            "dev",
            &r1,
        ])?;
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("{}/24", lab.primary()),
            "dev",
            &s1,
        ])?;
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("{}/24", lab.alternate()),
            "dev",
            &s1,
        ])?;
        for (ns, dev) in [(c, &c0), (r, &r0), (r, &r1), (s, &s1)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        for ns in [c, r, s] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "-n",
            c,
            "route",
            "add",
            "default",
            "via",
            &format!("10.214.{n}.1"),
        ])?;
        ip(&["netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        nft_in(
            r,
            &format!(
                "table ip probe_nat {{\n  chain post {{\n    type nat hook postrouting priority 100;\n    \
                 oifname \"{r1}\" masquerade\n  }}\n}}\n"
            ),
        );
        Ok(lab)
    }

    /// `portico probe ARGS` run inside the client namespace.
    fn probe(&self, args: &[&str]) -> Run {
        let bin = portico_bin().to_str().unwrap();
        let r = run(
            &require("ip", "iproute2"),
            &[&["netns", "exec", self.client(), bin, "probe"][..], args].concat(),
            &[],
            LIMIT,
        );
        assert!(
            !r.timed_out,
            "portico probe {args:?} did not finish:\n{}",
            r.text
        );
        r
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for name in &self.names {
            if let Err(e) = ip(&["netns", "del", name]) {
                eprintln!("removing network namespace {name}: {e}");
            }
        }
    }
}

#[test]
fn probe_classifies_a_masquerading_nat_and_relays_through_it() {
    let lab = match NatLab::create() {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!(
                "\n*** SKIPPED probe_classifies_a_masquerading_nat_and_relays_through_it: cannot \
                 create network namespaces here ({e}); it needs root (CAP_NET_ADMIN) ***\n"
            );
            return;
        }
    };
    let (primary, alternate) = (lab.primary(), lab.alternate());
    let portico = start_portico_in(
        lab.server(),
        &format!(
            "listen = [\"{primary}:3478\"]\nrelay_ip = [\"{primary}\"]\n\
             allow_peers = [\"{}/32\"]",
            lab.public()
        ),
        &format!("alternate_ip = \"{alternate}\"\nalternate_port = 3479"),
        lab.public(),
    );
    let server = primary.to_string();
    // Ready once STUN over TCP answers from the client's side (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = lab.probe(&[&server, "--transports", "tcp", "--timeout", "0.5"]);
        if r.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "portico never answered the probe:\n{}\nportico log:\n{}",
            r.text,
            portico.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let r = lab.probe(&[
        &server,
        "--transports",
        "udp,tcp",
        "--user",
        USER,
        "--password",
        PASSWORD,
        "--json",
    ]);
    assert_eq!(
        r.code,
        Some(0),
        "{}\nportico log:\n{}",
        r.text,
        portico.log()
    );
    let v = json(&r);
    assert_all_ok(&v, &["udp", "tcp"], 10);
    let public = lab.public().to_string();
    for t in ["udp", "tcp"] {
        let d = step(&v, t, "server_reflexive")["detail"].as_str().unwrap();
        assert!(
            d.starts_with(&format!("{public}:")) && d.ends_with("(differs from host: behind NAT)"),
            "{t}: {d}"
        );
        // The peer was reached at its address outside the NAT.
        let rt = step(&v, t, "round_trip")["detail"].as_str().unwrap();
        assert!(rt.contains(&format!("via peer {public}:")), "{t}: {rt}");
    }
    // Linux masquerading keeps one mapping per socket and lets in only the destinations the
    // socket sent to (conntrack).
    assert_eq!(v["nat"]["status"], "classified", "{v:#}");
    assert_eq!(v["nat"]["no_nat"], false, "{v:#}");
    assert_eq!(v["nat"]["mapping"], "endpoint-independent", "{v:#}");
    assert_eq!(v["nat"]["filtering"], "address-and-port-dependent", "{v:#}");
    assert_eq!(
        v["nat"]["other_address"],
        format!("{alternate}:3479"),
        "{v:#}"
    );

    let r = lab.probe(&[
        &server,
        "--transports",
        "udp",
        "--user",
        USER,
        "--password",
        PASSWORD,
    ]);
    assert_eq!(r.code, Some(0), "{}", r.text);
    assert!(
        r.stdout.contains(
            "NAT (RFC 5780, UDP): NAT with endpoint-independent mapping; \
             address-and-port-dependent filtering"
        ),
        "{}",
        r.text
    );
    drop(portico.proc);
}
