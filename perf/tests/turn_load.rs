//! The TURN load generator over real loopback sockets: against the bundled do-nothing relay,
//! against coturn's `turnserver` (long-term and REST credentials), against Portico itself,
//! and against a scripted server that answers 438 Stale Nonce. A missing `turnserver` or
//! Portico binary fails the test.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_dataplane::stun::{
    attr, long_term_key_md5, method, verify_message_integrity, Class, Message, MessageWriter,
};
use portico_perf::echo_server::{EchoArgs, EchoServer};
use portico_perf::turn_load::{self, TurnArgs, TurnReport};
use portico_perf::turn_plan::Mode;
use portico_perf::udp::free_port;
use portico_testkit::process::require;
use portico_testkit::{Portico, Proc, Spec, TempDir};

const USER: &str = "perf";
const PASSWORD: &str = "perf-secret";
const SECRET: &str = "rest-secret";

fn stub() -> EchoServer {
    EchoServer::start(&EchoArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        threads: 2,
        duration: 60.0,
        turn: true,
    })
    .unwrap()
}

fn args(server: SocketAddr, clients: usize, secs: f64) -> TurnArgs {
    let mut a = TurnArgs::new(server, USER, PASSWORD);
    a.clients = clients;
    a.duration = secs;
    a
}

/// Every packet out and back, each counted once, none misrouted.
fn assert_lossless(r: &TurnReport, clients: u64) {
    let text = r.text();
    assert_eq!(r.setup.ready, clients, "{text}");
    assert_eq!(r.setup.failed, 0, "{text}");
    let d = r.data.as_ref().expect("data phase");
    assert!(d.up.sent > 0, "{text}");
    assert_eq!(d.up.received, d.up.sent, "client→peer: {text}");
    assert_eq!(
        d.down.sent, d.up.received,
        "the peer echoes everything: {text}"
    );
    assert_eq!(d.down.received, d.down.sent, "peer→client: {text}");
    assert_eq!(d.round_trip_loss_ratio, 0.0);
    assert_eq!(
        (d.bad, d.misrouted, d.up.duplicates, d.down.duplicates),
        (0, 0, 0, 0),
        "{text}"
    );
    assert_eq!(d.up.latency_us.samples, d.up.received);
    assert_eq!(d.down.latency_us.samples, d.down.received);
    assert!(d.up.latency_us.p50 > 0.0 && d.up.latency_us.p50 <= d.up.latency_us.p99);
    assert_eq!(r.deleted, clients, "every allocation deleted: {text}");
    assert_eq!(r.delete_failed, 0);
}

#[test]
fn channel_and_send_modes_through_the_stub_relay() {
    let s = stub();
    for mode in [Mode::Channel, Mode::Send] {
        let mut a = args(s.local, 40, 1.0);
        a.mode = mode;
        a.rate = 100.0;
        let r = turn_load::run(&a).unwrap();
        assert_lossless(&r, 40);
        let d = r.data.as_ref().unwrap();
        // 40 streams × 100 packets/s × 1 s, give or take the pacing at the edges.
        assert!((3_800..=4_100).contains(&d.up.sent), "{}", r.text());
        assert_eq!(r.setup.challenges_401, 0, "the stub does not authenticate");
    }
    assert!(s.stop().unwrap() > 0);
}

#[test]
fn flat_out_keeps_a_window_in_flight() {
    let s = stub();
    let mut a = args(s.local, 8, 1.0);
    a.flat_out = true;
    a.window = 4;
    let r = turn_load::run(&a).unwrap();
    assert_lossless(&r, 8);
    let d = r.data.as_ref().unwrap();
    // Closed loop: far more than a paced 50/s per stream would send.
    assert!(d.up.sent > 8 * 50 * 4, "{}", r.text());
    assert_eq!(r.rate_per_stream, None);
    assert_eq!(r.window, Some(4));
}

#[test]
fn allocations_are_refreshed_before_they_expire() {
    let s = stub();
    let mut a = args(s.local, 5, 2.5);
    // The stub grants what is asked: a 2 s allocation is refreshed at 1 s and 2 s.
    a.lifetime = Some(2);
    let r = turn_load::run(&a).unwrap();
    assert_lossless(&r, 5);
    assert!(r.refreshes >= 10, "{} refreshes\n{}", r.refreshes, r.text());
}

#[test]
fn churn_cycles_through_fresh_clients() {
    let s = stub();
    let mut a = args(s.local, 4, 1.0);
    a.mode = Mode::Churn;
    let r = turn_load::run(&a).unwrap();
    let c = r.churn.as_ref().expect("churn report");
    assert!(c.cycles > 20, "{}", r.text());
    assert_eq!(c.failed, 0);
    assert_eq!(r.deleted, c.cycles, "each cycle ends with a delete");
    assert!(r.data.is_none());
    assert!(r.allocated_any());
}

/// Waits until one client can allocate on `server`.
fn wait_ready(server: SocketAddr, user: Option<(&str, &str)>, secret: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut a = args(server, 1, 0.1);
        a.user = user.map(|u| u.0.to_string());
        a.password = user.map(|u| u.1.to_string());
        a.secret = secret.map(str::to_string);
        a.setup_timeout = 1.0;
        a.timeout_ms = 100;
        if turn_load::run(&a).is_ok_and(|r| r.allocated_any()) {
            return;
        }
        assert!(Instant::now() < deadline, "{server} never allocated");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// coturn's `turnserver` on a free port of 127.0.0.1 with `extra` arguments, its files in a
/// directory of its own; stopped when the returned process is dropped.
fn coturn(extra: &[&str]) -> (Proc, SocketAddr, TempDir) {
    let port = free_port("127.0.0.1".parse().unwrap()).unwrap();
    let dir = TempDir::new("perf-coturn");
    let mut cmd = Command::new(require("turnserver", "coturn"));
    cmd.args([
        "-n",
        "--listening-ip",
        "127.0.0.1",
        "--relay-ip",
        "127.0.0.1",
    ])
    .args([
        "--listening-port",
        &port.to_string(),
        "--relay-threads",
        "2",
    ])
    .args([
        "--realm",
        "perf",
        "--allow-loopback-peers",
        "--no-cli",
        "--no-tls",
    ])
    .args(["--no-dtls", "--simple-log"])
    .arg("--log-file")
    .arg(dir.join("turn.log"))
    .arg("--pidfile")
    .arg(dir.join("pid"))
    .arg("--userdb")
    .arg(dir.join("db"))
    .args(extra);
    let proc = Proc::spawn("turnserver", &mut cmd, &dir.join("turnserver.out"));
    (proc, SocketAddr::from(([127, 0, 0, 1], port)), dir)
}

#[test]
fn coturn_with_long_term_credentials_both_modes() {
    let user = format!("{USER}:{PASSWORD}");
    let (_p, server, _dir) = coturn(&["--lt-cred-mech", "--user", &user]);
    wait_ready(server, Some((USER, PASSWORD)), None);
    for mode in [Mode::Channel, Mode::Send] {
        let mut a = args(server, 20, 1.0);
        a.mode = mode;
        let r = turn_load::run(&a).unwrap();
        assert_lossless(&r, 20);
        assert_eq!(r.setup.challenges_401, 20, "one 401 round trip per client");
    }
}

#[test]
fn coturn_with_rest_api_credentials() {
    let secret = format!("--static-auth-secret={SECRET}");
    let (_p, server, _dir) = coturn(&["--use-auth-secret", &secret]);
    wait_ready(server, None, Some(SECRET));
    let mut a = args(server, 10, 1.0);
    a.user = None;
    a.password = None;
    a.secret = Some(SECRET.into());
    let r = turn_load::run(&a).unwrap();
    assert_lossless(&r, 10);
    // A wrong secret: every client is refused after its challenge, nothing relayed.
    a.secret = Some("wrong".into());
    let r = turn_load::run(&a).unwrap();
    assert_eq!(r.setup.ready, 0, "{}", r.text());
    assert_eq!(r.setup.failed, 10);
    assert_eq!(
        r.setup.failures.get("Allocate: error 401"),
        Some(&10),
        "{:?}",
        r.setup.failures
    );
    assert!(!r.allocated_any());
}

#[test]
fn portico_relays_measures_and_churns() {
    // `portico` of this build (scripts/test.sh builds the workspace first).
    let site = Portico::start(
        "perf-turn",
        Spec::new()
            .log_level("warn")
            .workers(2)
            .turn(&format!(
                "realm = \"perf\"\nusers = [{{ name = \"{USER}\", password = \"{PASSWORD}\" }}]"
            ))
            .loopback_peers(),
    );
    let main_pid = site.pid();
    let server = site.udp4();
    wait_ready(server, Some((USER, PASSWORD)), None);

    // The dataplane is the control plane's child process; both are charged.
    let children = std::fs::read_to_string(format!("/proc/{main_pid}/task/{main_pid}/children"))
        .unwrap_or_default();
    let mut pids = vec![main_pid];
    pids.extend(
        children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok()),
    );
    assert_eq!(pids.len(), 2, "control plane and dataplane: {pids:?}");
    let mut a = args(server, 30, 1.0);
    a.server_pids = pids;
    let r = turn_load::run(&a).unwrap();
    assert_lossless(&r, 30);
    let u = r.server_usage.as_ref().expect("server usage");
    assert!(u.cpu_s > 0.0, "{}", r.text());
    assert!(u.cpu_s_per_million_relayed.is_some_and(|x| x > 0.0));
    assert!(u.rss_idle_kib > 0 && u.peak_rss_kib >= u.rss_after_setup_kib);

    let mut a = args(server, 4, 1.0);
    a.mode = Mode::Churn;
    let r = turn_load::run(&a).unwrap();
    let c = r.churn.as_ref().unwrap();
    assert!(c.cycles > 10, "{}", r.text());
    assert_eq!(c.failed, 0, "{}", r.text());
    assert_eq!(
        r.setup.challenges_401, c.cycles,
        "every new client is challenged"
    );
}

/// A scripted TURN server: challenges the first Allocate, answers the credentialed one with
/// 438 Stale Nonce and a new nonce, and accepts the retry only if its MESSAGE-INTEGRITY
/// verifies with the long-term key; every other request succeeds. It relays nothing.
fn stale_nonce_server() -> (
    SocketAddr,
    Arc<AtomicBool>,
    std::thread::JoinHandle<(u32, u32)>,
) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let h = std::thread::spawn(move || {
        let key = long_term_key_md5(USER.as_bytes(), b"r", PASSWORD.as_bytes());
        let (mut stale, mut verified) = (0, 0);
        let mut buf = [0u8; 1500];
        let mut out = [0u8; 512];
        while !stop2.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            // ChannelData and anything else that is not a request: relayed nowhere.
            let Ok(m) = Message::parse(&buf[..n]) else {
                continue;
            };
            if m.class() != Class::Request {
                continue;
            }
            let tid = m.transaction_id();
            let nonce = m.get(attr::NONCE);
            let (class, code, new_nonce): (Class, u16, &[u8]) = match (m.method(), nonce) {
                (method::ALLOCATE, None) => (Class::ErrorResponse, 401, b"first"),
                (method::ALLOCATE, Some(b"first")) => {
                    stale += 1;
                    (Class::ErrorResponse, 438, b"second")
                }
                (_, Some(b"second")) => {
                    verify_message_integrity(&m, &key).unwrap();
                    verified += 1;
                    (Class::SuccessResponse, 0, b"")
                }
                _ => (Class::ErrorResponse, 400, b""),
            };
            let mut w = MessageWriter::new(&mut out, class, m.method(), &tid).unwrap();
            if code != 0 {
                w.add_error_code(code, "x").unwrap();
                if !new_nonce.is_empty() {
                    w.add_attribute(attr::REALM, b"r").unwrap();
                    w.add_attribute(attr::NONCE, new_nonce).unwrap();
                }
            } else {
                if m.method() == method::ALLOCATE {
                    w.add_xor_address(attr::XOR_RELAYED_ADDRESS, "127.0.0.1:9".parse().unwrap())
                        .unwrap();
                }
                w.add_message_integrity(&key).unwrap();
            }
            let len = w.finish();
            sock.send_to(&out[..len], from).unwrap();
        }
        (stale, verified)
    });
    (addr, stop, h)
}

#[test]
fn stale_nonce_is_retried_with_the_new_nonce() {
    let (server, stop, h) = stale_nonce_server();
    let mut a = args(server, 6, 0.2);
    a.timeout_ms = 100;
    let r = turn_load::run(&a).unwrap();
    stop.store(true, Ordering::Relaxed);
    let (stale, verified) = h.join().unwrap();
    assert_eq!(r.setup.stale_nonces_438, 6, "{}", r.text());
    assert_eq!(r.setup.challenges_401, 6);
    assert_eq!(r.setup.ready, 6, "{}", r.text());
    assert_eq!(stale, 6);
    // Allocate, CreatePermission, ChannelBind and the final delete, each verified.
    assert_eq!(verified, 6 * 4, "{}", r.text());
    assert_eq!(r.deleted, 6);
    // It relays nothing: every packet is lost, and the report says so.
    let d = r.data.as_ref().unwrap();
    assert!(d.up.sent > 0);
    assert_eq!(d.up.received, 0);
    assert_eq!(d.round_trip_loss_ratio, 1.0);
}

#[test]
fn stream_transports_against_portico_and_coturn() {
    use portico_perf::turn_load::Transport;
    let tls_port = free_port("127.0.0.1".parse().unwrap()).unwrap();
    let site = Portico::start(
        "perf-turn-tcp",
        Spec::new()
            .log_level("warn")
            .turn(&format!(
                "realm = \"perf\"\nusers = [{{ name = \"{USER}\", password = \"{PASSWORD}\" }}]\n\
                 listen_tls = [\"127.0.0.1:{tls_port}\"]"
            ))
            .loopback_peers(),
    );
    let server = site.udp4();
    wait_ready(server, Some((USER, PASSWORD)), None);
    for (transport, port, alpn) in [
        (Transport::Tcp, server.port(), false),
        (Transport::Tls, tls_port, false),
        (Transport::Tls, tls_port, true),
    ] {
        let mut a = args(SocketAddr::from(([127, 0, 0, 1], port)), 10, 1.0);
        a.transport = transport;
        a.alpn = alpn;
        let r = turn_load::run(&a).unwrap();
        assert_lossless(&r, 10);
        assert_eq!(
            r.setup.retransmits, 0,
            "nothing is retransmitted on a stream"
        );
    }
    // Churn is UDP only; --alpn needs TLS.
    let mut a = args(server, 1, 1.0);
    a.transport = Transport::Tcp;
    a.mode = Mode::Churn;
    assert!(turn_load::run(&a).is_err());
    let mut a = args(server, 1, 1.0);
    a.alpn = true;
    assert!(turn_load::run(&a).is_err());

    // coturn over TCP, same generator.
    let user = format!("{USER}:{PASSWORD}");
    let (_p, server, _dir) = coturn(&["--lt-cred-mech", "--user", &user]);
    wait_ready(server, Some((USER, PASSWORD)), None);
    let mut a = args(server, 10, 1.0);
    a.transport = Transport::Tcp;
    let r = turn_load::run(&a).unwrap();
    assert_lossless(&r, 10);
}
