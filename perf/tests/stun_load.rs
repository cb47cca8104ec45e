//! The STUN load generator against real loopback servers: the bundled echo server, a server
//! that answers wrongly, and one that never answers.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use portico_dataplane::stun::{attr, method, Class, Message, MessageWriter};
use portico_perf::echo_server::{EchoArgs, EchoServer};
use portico_perf::stun_load::{self, StunArgs};

fn echo() -> EchoServer {
    EchoServer::start(&EchoArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        threads: 1,
        duration: 30.0,
        turn: false,
    })
    .unwrap()
}

/// A server that answers every Binding request with a success response whose
/// XOR-MAPPED-ADDRESS is off by one port — what a broken NAT-mapping would look like.
fn lying_server() -> (SocketAddr, Arc<AtomicBool>, JoinHandle<u64>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let h = std::thread::spawn(move || {
        let mut answered = 0;
        let mut buf = [0u8; 1500];
        let mut out = [0u8; 128];
        while !s2.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let m = Message::parse(&buf[..n]).unwrap();
            let mut w = MessageWriter::new(
                &mut out,
                Class::SuccessResponse,
                method::BINDING,
                &m.transaction_id(),
            )
            .unwrap();
            let wrong = SocketAddr::new(from.ip(), from.port().wrapping_add(1));
            w.add_xor_address(attr::XOR_MAPPED_ADDRESS, wrong).unwrap();
            let len = w.finish();
            sock.send_to(&out[..len], from).unwrap();
            answered += 1;
        }
        answered
    });
    (addr, stop, h)
}

#[test]
fn flat_out_against_the_echo_server_completes_every_request() {
    let server = echo();
    let mut a = StunArgs::new(server.local);
    a.sockets = 4;
    a.window = 16;
    a.requests = Some(5000);
    a.duration = 20.0;
    let r = stun_load::run(&a).unwrap();
    assert_eq!(r.sent, 5000);
    assert_eq!(r.completed, 5000, "{}", r.text());
    assert_eq!(r.lost, 0);
    assert_eq!(r.bad, 0);
    assert_eq!(r.unmatched, 0);
    assert_eq!(r.rtt_us.samples, 5000);
    assert!(r.rtt_us.p50 > 0.0 && r.rtt_us.p50 <= r.rtt_us.p99);
    assert!(r.rtt_us.p99 <= r.rtt_us.max);
    assert!(r.tx_per_s > 1000.0, "{}", r.text());
    assert!(r.elapsed_s < 20.0, "stops at --requests, not --duration");
    assert_eq!(server.stop().unwrap(), 5000);
}

#[test]
fn rate_mode_paces_sends() {
    let server = echo();
    let mut a = StunArgs::new(server.local);
    a.sockets = 3;
    a.rate = Some(2000);
    a.duration = 1.0;
    let t = Instant::now();
    let r = stun_load::run(&a).unwrap();
    let took = t.elapsed();
    assert!(
        (1800..=2100).contains(&r.sent),
        "2000/s for 1 s sent {}",
        r.sent
    );
    assert_eq!(r.completed, r.sent);
    assert_eq!(r.generator_behind, 0);
    assert!(took < Duration::from_secs(3), "run took {took:?}");
    assert!((r.send_rate - 2000.0).abs() < 200.0, "{}", r.send_rate);
    server.stop().unwrap();
}

#[test]
fn wrong_mapped_address_is_a_bad_response_not_a_success() {
    let (addr, stop, h) = lying_server();
    let mut a = StunArgs::new(addr);
    a.sockets = 2;
    a.window = 4;
    a.requests = Some(200);
    let r = stun_load::run(&a).unwrap();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(h.join().unwrap(), 200);
    assert_eq!(r.completed, 0, "{}", r.text());
    assert_eq!(r.bad, 200);
    assert_eq!(r.bad_reasons["wrong_mapped_address"], 200);
    assert_eq!(r.lost, 0, "a bad answer still ends its transaction");
}

#[test]
fn a_silent_server_means_loss_within_bounded_time() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut a = StunArgs::new(silent.local_addr().unwrap());
    a.sockets = 2;
    a.window = 8;
    a.duration = 0.5;
    a.timeout_ms = 100;
    let t = Instant::now();
    let r = stun_load::run(&a).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(r.sent > 0);
    assert_eq!(r.completed, 0);
    assert_eq!(r.lost, r.sent, "{}", r.text());
    assert_eq!(r.rtt_us.samples, 0);
}

#[test]
fn json_report_and_server_accounting() {
    let server = echo();
    let dir = portico_testkit::TempDir::new("perf-stun-json");
    let json = dir.join("r.json");
    let mut a = StunArgs::new(server.local);
    a.sockets = 2;
    a.rate = Some(5000);
    a.duration = 0.5;
    // The echo server runs in this process, so charge this process.
    a.server_pids = vec![std::process::id()];
    a.json = Some(json.clone());
    let r = stun_load::run(&a).unwrap();
    server.stop().unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["scenario"], "stun");
    assert_eq!(v["mode"], "rate");
    assert_eq!(v["offered_rate"], 5000);
    assert_eq!(v["completed"], r.completed);
    assert!(v["rtt_us"]["p99"].as_f64().unwrap() > 0.0);
    let srv = &v["server"];
    assert!(srv["cpu_s"].as_f64().unwrap() >= 0.0);
    assert!(srv["peak_rss_kib"].as_u64().unwrap() > 0);
    assert_eq!(srv["processes"][0]["pid"], std::process::id());
}

#[test]
fn binary_exit_status_tells_whether_anything_completed() {
    let exe = env!("CARGO_BIN_EXE_portico-perf");
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let out = Command::new(exe)
        .args(["stun", "--quiet", "--sockets", "1", "--duration", "0.3"])
        .args(["--timeout-ms", "100", "--target"])
        .arg(silent.local_addr().unwrap().to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("completed"));

    let server = echo();
    let out = Command::new(exe)
        .args(["stun", "--sockets", "2", "--requests", "100", "--target"])
        .arg(server.local.to_string())
        .output()
        .unwrap();
    server.stop().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("completed"), "{stdout}");

    let out = Command::new(exe).args(["free-port"]).output().unwrap();
    let port: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_ne!(port, 0);
}
