//! aioice (the Python ICE stack under aiortc) through Portico: two agents, relay
//! candidates only, reach Portico over UDP, TCP or TLS (verifying the generated certificate
//! for `localhost`), on 127.0.0.1 or [::1], connect relay-to-relay and send datagrams both ways
//! (`aioice_pair.py`); Portico's API shows the two allocations carrying the traffic, with
//! clients on the expected transport, and none left once the agents close (also when their
//! nonce went stale meanwhile).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use portico_shared::counters::Counter;
use portico_testkit::process::require;
use portico_testkit::turn::{PASSWORD, USER};
use portico_testkit::{Portico, LOCAL4, LOCAL6};
use serde_json::Value;

use crate::ice::{expect_no_allocations, expect_relayed_through, ice_portico, Traffic, Via};

/// Datagrams each way, and their sizes in the script (100 and 200 bytes of payload after
/// an 11-byte header).
pub(crate) const COUNT: u64 = 300;
pub(crate) const A_TO_B: u64 = 111;
pub(crate) const B_TO_A: u64 = 211;
/// The whole exchange, from start to the report, on a loaded machine.
const LIMIT: Duration = Duration::from_secs(60);

/// The script's process, killed (and reaped) when dropped, whatever happened.
pub(crate) struct Agents {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
    _dir: portico_testkit::TempDir,
}

impl Drop for Agents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agents {
    fn start(p: &Portico, vias: [Via; 2], server: IpAddr, tls_port: u16) -> Agents {
        let name = |v: Via| match v {
            Via::Udp => "udp",
            Via::Tcp => "tcp",
            Via::Tls => "tls",
        };
        let ip = server.to_string();
        // The certificate names localhost: over TLS the script connects by that name and
        // verifies the certificate against itself.
        let (host, port, transport) = match vias {
            [Via::Tls, Via::Tls] => ("localhost", tls_port, "tls".to_string()),
            [a, b] if a == b => (ip.as_str(), p.port, name(a).to_string()),
            [a, b] => (ip.as_str(), p.port, format!("{},{}", name(a), name(b))),
        };
        Agents::spawn(
            None,
            (host, port),
            &transport,
            &p.state_dir.join("cert.pem"),
            tls_port,
        )
    }

    /// The script in network namespace `netns` (or this one), to the TURN server `server`
    /// over `transport` (as the script takes it).
    pub(crate) fn spawn(
        netns: Option<&str>,
        server: (&str, u16),
        transport: &str,
        cafile: &Path,
        tls_port: u16,
    ) -> Agents {
        let python = require("python3", "python3");
        let check = Command::new(&python)
            .args(["-c", "import aioice; print(aioice.__version__)"])
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
        assert!(
            check.status.success(),
            "the Python package aioice is not installed (scripts/test.sh installs it: \
             python3 -m pip install --break-system-packages aioice==0.13.0): {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/turn/aioice_pair.py");
        let (host, port) = server;
        let dir = portico_testkit::TempDir::new("aioice");
        let stderr = dir.join("aioice.log");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new(require("ip", "iproute2"));
                c.args(["netns", "exec", ns]).arg(&python);
                c
            }
            None => Command::new(&python),
        };
        cmd.arg("-u")
            .arg(&script)
            .args([host, &port.to_string(), transport, USER, PASSWORD])
            .arg(COUNT.to_string())
            .arg(cafile)
            .arg(tls_port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap_or_else(|e| panic!("{e}")));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", script.display()));
        let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Agents {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            _dir: dir,
        }
    }

    /// The next line starting with `tag` (its rest), within `limit`.
    pub(crate) fn expect(&mut self, tag: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(tag) {
                        return rest.trim().to_string();
                    }
                }
                Err(e) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "aioice: no {tag} line ({e:?}); its stderr:\n{}",
                        std::fs::read_to_string(&self.stderr).unwrap_or_default()
                    );
                }
            }
        }
    }

    /// The script's `READY` report.
    pub(crate) fn report(&mut self) -> Value {
        serde_json::from_str(&self.expect("READY", LIMIT)).unwrap_or_else(|e| panic!("report: {e}"))
    }

    /// Lets the script close its agents, and waits for it to end.
    pub(crate) fn close(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        self.expect("CLOSED", Duration::from_secs(20));
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = self.child.try_wait();
        assert!(
            matches!(status, Ok(Some(s)) if s.success()),
            "aioice script ended with {status:?}"
        );
    }
}

fn addr(v: &Value) -> SocketAddr {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an address: {v}"))
}

/// Checks the script's report for agents reaching the server via `vias`: each has one relay
/// candidate, received every datagram intact, and nominated its relay to the other's; its
/// TURN client socket is of the expected kind. Returns the relayed addresses (a's, b's).
pub(crate) fn check_report(report: &Value, vias: [Via; 2]) -> Vec<SocketAddr> {
    let mut relayed = Vec::new();
    for (i, (me, other)) in [("a", "b"), ("b", "a")].into_iter().enumerate() {
        let r = &report[me];
        let cands = r["candidates"].as_array().cloned().unwrap_or_default();
        assert_eq!(cands.len(), 1, "{me}: one candidate: {r}");
        assert_eq!(cands[0]["type"], "relay", "{me}: {r}");
        relayed.push(addr(&cands[0]["addr"]));
        assert_eq!(r["received"].as_u64(), Some(COUNT), "{me} received: {r}");
        assert_eq!(r["intact"], true, "{me}: every datagram intact: {r}");
        // The nominated pair is this agent's relay to the other's.
        assert_eq!(r["pair"]["local"], cands[0]["addr"], "{me}: {r}");
        assert_eq!(
            r["pair"]["remote"], report[other]["candidates"][0]["addr"],
            "{me}: {r}"
        );
        assert_eq!(r["pair"]["remote_type"], "relay", "{me}: {r}");
        let client = &r["client"];
        let (socket, tls) = match vias[i] {
            Via::Udp => ("datagram", false),
            Via::Tcp => ("stream", false),
            Via::Tls => ("stream", true),
        };
        assert_eq!(client["socket"], socket, "{me}: {r}");
        assert_eq!(client["tls"], tls, "{me}: {r}");
    }
    relayed
}

/// One run of the agents.
struct Case {
    tag: &'static str,
    /// How agents a and b reach Portico.
    vias: [Via; 2],
    /// Portico's address for UDP and TCP.
    server: IpAddr,
    /// `turn.nonce_lifetime`, and how long the agents stay before closing.
    nonce_lifetime: Option<u64>,
    hold: Duration,
    /// Portico's default peer policy (loopback denied): each relay reaches the other only
    /// because both are Portico's own.
    own_relays_only: bool,
}

impl Case {
    fn new(tag: &'static str, via: Via) -> Case {
        Case {
            tag,
            vias: [via, via],
            server: LOCAL4,
            nonce_lifetime: None,
            hold: Duration::ZERO,
            own_relays_only: false,
        }
    }
}

/// The agents through Portico; they close after `hold` (their Refresh with lifetime 0 is
/// answered 438 Stale Nonce once the nonce is older than `nonce_lifetime`, and they retry
/// with the new one).
fn relay_to_relay(case: Case) {
    let extra = case
        .nonce_lifetime
        .map(|s| format!("nonce_lifetime = {s}"))
        .unwrap_or_default();
    let (p, tls_port) = ice_portico(case.tag, &extra, !case.own_relays_only);
    let mut agents = Agents::start(&p, case.vias, case.server, tls_port);
    let report = agents.report();
    let relayed = check_report(&report, case.vias);
    let list = expect_relayed_through(
        &p,
        case.vias,
        case.server,
        tls_port,
        USER,
        Traffic {
            sides: [&relayed[..1], &relayed[1..]],
            bytes: COUNT * A_TO_B.min(B_TO_A),
        },
    );
    // Each agent's own TURN client socket is the client of the allocation for its relay.
    for (me, r) in relayed.iter().enumerate() {
        let name = ["a", "b"][me];
        let a = list
            .iter()
            .find(|a| a["relayed"] == r.to_string())
            .unwrap_or_else(|| panic!("{r} not listed"));
        assert_eq!(a["client"], report[name]["client"]["addr"], "{name}: {a}");
    }
    if case.own_relays_only {
        assert_eq!(p.counter(Counter::TurnPeerDeniedSpecial), 0);
        assert_eq!(p.counter(Counter::TurnPeerDeniedConfigured), 0);
    }
    std::thread::sleep(case.hold);
    let stale = p.counter(Counter::TurnAuthStaleNonce);
    agents.close();
    expect_no_allocations(&p, "after the agents closed");
    if let Some(lifetime) = case.nonce_lifetime {
        assert!(case.hold > Duration::from_secs(lifetime));
        assert!(
            p.counter(Counter::TurnAuthStaleNonce) >= stale + 2,
            "each agent's closing Refresh met a stale nonce first"
        );
    }
}

#[test]
fn aioice_relay_to_relay_over_udp() {
    relay_to_relay(Case::new("aioice-udp", Via::Udp));
}

#[test]
fn aioice_relay_to_relay_over_tcp() {
    relay_to_relay(Case::new("aioice-tcp", Via::Tcp));
}

#[test]
fn aioice_relay_to_relay_over_tls() {
    relay_to_relay(Case::new("aioice-tls", Via::Tls));
}

/// Clients reaching Portico on [::1] (the relays stay IPv4: they ask for no other family).
#[test]
fn aioice_relay_to_relay_from_ipv6_over_udp() {
    relay_to_relay(Case {
        server: LOCAL6,
        ..Case::new("aioice-udp6", Via::Udp)
    });
}

#[test]
fn aioice_relay_to_relay_from_ipv6_over_tcp() {
    relay_to_relay(Case {
        server: LOCAL6,
        ..Case::new("aioice-tcp6", Via::Tcp)
    });
}

/// As deployed: one agent over UDP, the other behind a UDP-hostile firewall over TLS (its
/// relay lives in the TCP thread, the other's in a UDP worker), and Portico's default peer
/// policy, under which loopback is denied and the relays reach each other as Portico's own.
#[test]
fn aioice_udp_agent_to_tls_agent_under_the_default_peer_policy() {
    relay_to_relay(Case {
        vias: [Via::Udp, Via::Tls],
        own_relays_only: true,
        ..Case::new("aioice-udp-tls", Via::Udp)
    });
}

/// The shortest nonce lifetime (30 s) passes before the agents close: over UDP and over a
/// stream, the 438 carries the new nonce and the retried Refresh deletes the allocation.
#[test]
fn aioice_close_after_the_nonce_went_stale_over_udp() {
    relay_to_relay(Case {
        nonce_lifetime: Some(30),
        hold: Duration::from_secs(32),
        ..Case::new("aioice-stale-udp", Via::Udp)
    });
}

#[test]
fn aioice_close_after_the_nonce_went_stale_over_tcp() {
    relay_to_relay(Case {
        nonce_lifetime: Some(30),
        hold: Duration::from_secs(32),
        ..Case::new("aioice-stale-tcp", Via::Tcp)
    });
}
