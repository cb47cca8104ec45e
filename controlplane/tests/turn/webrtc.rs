//! Headless Chromium (libwebrtc) through Portico: one page (`webrtc_pair.html`, served by
//! the test on 127.0.0.1) with two RTCPeerConnections, `iceTransportPolicy: "relay"`, the
//! TURN server given as `turn:…?transport=udp`, `turn:…?transport=tcp` (on 127.0.0.1 or
//! [::1]) or `turns:localhost…`, opens a data channel and sends messages both ways; the page
//! POSTs the outcome back. Portico's API shows the allocations carrying the traffic with
//! clients on the expected transport, and none left once the page closes its connections.
//!
//! TURNS: Chromium verifies the TURN server's certificate (a certificate it does not trust
//! fails gathering with 701), and `--ignore-certificate-errors-spki-list` with the SHA-256
//! of the generated certificate's public key makes it accept exactly that certificate; the
//! TLS test checks both.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;
use portico_shared::counters::Counter;
use portico_testkit::process::require;
use portico_testkit::{Portico, TempDir, LOCAL4, LOCAL6};
use serde_json::{json, Value};

use crate::ice::{
    allocations, expect_no_allocations, expect_relayed_through, ice_portico, Creds, Traffic, Via,
};

const PAGE: &str = include_str!("webrtc_pair.html");
/// Messages each way and their size: each one fills most of a datagram, so the bytes each
/// allocation carries bound the messages from below whatever SCTP bundles.
pub(crate) const COUNT: u64 = 500;
pub(crate) const SIZE: u64 = 1000;
/// From Chromium's start to the page's report, on a loaded machine.
const LIMIT: Duration = Duration::from_secs(60);

/// One Chromium at a time: each is a handful of processes on a small machine.
static ONE_BROWSER: Mutex<()> = Mutex::new(());

/// A tiny HTTP server on 127.0.0.1: `GET /` answers the page with its configuration,
/// `POST /result` and `POST /closed` hand the body to the test, `GET /close` is answered
/// when the test sends on `release` (or after a minute); anything else is 404.
pub(crate) struct PageServer {
    addr: SocketAddr,
    results: mpsc::Receiver<(String, String)>,
    release: mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PageServer {
    /// The server on 127.0.0.1 of network namespace `netns` (or this one).
    fn start(config: Value, netns: Option<&str>) -> PageServer {
        let bind = || TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        let listener = match netns {
            Some(ns) => crate::fast_path::in_ns(ns, bind),
            None => bind(),
        };
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let page = PAGE.replace("/*CONFIG*/null", &config.to_string());
        let (tx, results) = mpsc::channel();
        let (release, released) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let released = Arc::new(Mutex::new(released));
        let page = Arc::new(page);
        let thread = std::thread::spawn(move || {
            // A thread per connection (an idle speculative one must not hold up the
            // report), at most 64 of them.
            let mut connections = 0;
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) if connections < 64 => {
                        connections += 1;
                        let (page, tx, released) = (page.clone(), tx.clone(), released.clone());
                        std::thread::spawn(move || serve(s, &page, &tx, &released));
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        PageServer {
            addr,
            results,
            release,
            stop,
            thread: Some(thread),
        }
    }
}

impl PageServer {
    /// The body the page POSTs to `path` next, within `limit`.
    pub(crate) fn next(&self, path: &str, limit: Duration, browser: &Browser) -> String {
        match self.results.recv_timeout(limit) {
            Ok((p, body)) if p == path => body,
            other => panic!(
                "no POST {path} from the page within {limit:?} ({other:?}); Chromium's \
                 console:\n{}",
                browser.console()
            ),
        }
    }
}

impl PageServer {
    /// Lets the page close its connections and waits for it to say so.
    pub(crate) fn close(&self, browser: &Browser) {
        let _ = self.release.send(());
        self.next("/closed", Duration::from_secs(20), browser);
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        // A page waiting on /close is answered, so the thread ends.
        let _ = self.release.send(());
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One request on `s` (bounded in size and time), answered and closed.
fn serve(
    mut s: TcpStream,
    page: &str,
    results: &mpsc::Sender<(String, String)>,
    released: &Mutex<mpsc::Receiver<()>>,
) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(n) if n > 0 && buf.len() < 64 * 1024 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
        .min(1 << 20);
    while buf.len() < head_end + length {
        match s.read(&mut chunk) {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
    let answer = |status: &str, kind: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let reply = if head.starts_with("GET / ") {
        answer("200 OK", "text/html; charset=utf-8", page)
    } else if head.starts_with("POST /result ") || head.starts_with("POST /closed ") {
        let path = head.split(' ').nth(1).unwrap_or_default().to_string();
        let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
        let _ = results.send((path, body));
        answer("200 OK", "text/plain", "")
    } else if head.starts_with("GET /close ") {
        if let Ok(r) = released.lock() {
            let _ = r.recv_timeout(Duration::from_secs(60));
        }
        answer("200 OK", "text/plain", "")
    } else {
        answer("404 Not Found", "text/plain", "")
    };
    let _ = s.write_all(reply.as_bytes());
}

/// Headless Chromium in its own process group with a fresh profile; the group is killed
/// (and the browser reaped) when dropped.
pub(crate) struct Browser {
    child: Child,
    log: std::path::PathBuf,
    _dir: TempDir,
}

impl Browser {
    /// Chromium in network namespace `netns` (or this one).
    fn open(url: &str, extra: &[String], netns: Option<&str>) -> Browser {
        let chromium = require("chromium", "chromium");
        let dir = TempDir::new("chromium");
        let profile = dir.join("profile");
        std::fs::create_dir_all(&profile).unwrap_or_else(|e| panic!("{e}"));
        let log = dir.join("chromium.log");
        let out = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let err = out.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new(require("ip", "iproute2"));
                c.args(["netns", "exec", ns]).arg(chromium);
                c
            }
            None => Command::new(chromium),
        };
        let child = cmd
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-logging=stderr",
                "--v=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting chromium: {e}"));
        Browser {
            child,
            log,
            _dir: dir,
        }
    }

    /// The page's console lines and Chromium's errors, for a failure message.
    pub(crate) fn console(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("CONSOLE") || (l.contains("ERROR") && !l.contains("dbus")))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Opens the page in Chromium (in network namespace `netns`, or this one) with the TURN
/// server `url` and returns the page's report (the browser is still running, its
/// connections open).
pub(crate) fn run_page(
    urls: [&str; 2],
    creds: &Creds,
    extra: &[String],
    netns: Option<&str>,
) -> (Value, Browser, PageServer) {
    let server = PageServer::start(
        json!({
            "urls": urls,
            "user": creds.user,
            "password": creds.password,
            "count": COUNT,
            "size": SIZE,
            "wait_ms": 15000,
            "timeout_ms": 45000,
        }),
        netns,
    );
    let browser = Browser::open(&format!("http://{}/", server.addr), extra, netns);
    let started = Instant::now();
    let body = server.next("/result", LIMIT, &browser);
    let report: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("the page's report ({e}): {body}"));
    eprintln!("{urls:?}: report after {:?}", started.elapsed());
    (report, browser, server)
}

fn addr(v: &Value) -> SocketAddr {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an address: {v}"))
}

/// The page through Portico, connection a via `vias[0]` and b via `vias[1]`: every message
/// arrives intact both ways, the selected pairs are relay to relay over the expected
/// protocols, Portico's API shows the allocations carrying the traffic, and none is left once
/// the page closes its connections.
fn data_channel_through(
    p: &Portico,
    vias: [Via; 2],
    turn_ip: IpAddr,
    tls_port: u16,
    creds: &Creds,
    extra: &[String],
) {
    let host = SocketAddr::new(turn_ip, 0).to_string();
    let host = host.trim_end_matches(":0");
    let url = |via| match via {
        Via::Udp => format!("turn:{host}:{}?transport=udp", p.port),
        Via::Tcp => format!("turn:{host}:{}?transport=tcp", p.port),
        Via::Tls => format!("turns:localhost:{tls_port}?transport=tcp"),
    };
    let urls = vias.map(url);
    let (report, browser, server) = run_page([&urls[0], &urls[1]], creds, extra, None);
    let (side_a, side_b) = check_report(&report, vias, &browser);
    expect_relayed_through(
        p,
        vias,
        turn_ip,
        tls_port,
        &creds.user,
        Traffic {
            sides: [&side_a, &side_b],
            bytes: COUNT * SIZE,
        },
    );
    // Closing the connections releases the allocations (Refresh with lifetime 0, which
    // Portico must accept over every transport).
    server.close(&browser);
    expect_no_allocations(p, "after the page closed its connections");
    drop(browser);
}

/// Checks the page's report for connections reaching the server via `vias`: every message
/// arrived intact both ways, relay candidates only, and each selected pair is one of its
/// relays to one of the other side's over the expected protocol. Returns the relayed
/// candidates of a and of b.
pub(crate) fn check_report(
    report: &Value,
    vias: [Via; 2],
    browser: &Browser,
) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let context = || format!("{report:#}\nChromium's console:\n{}", browser.console());
    assert_eq!(report["ok"], true, "{}", context());
    for name in ["a", "b"] {
        assert_eq!(
            report["received"][name].as_u64(),
            Some(COUNT),
            "{}",
            context()
        );
        assert_eq!(report["intact"][name], true, "{}", context());
        let cands = report["candidates"][name]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!cands.is_empty(), "{}", context());
        assert!(
            cands.iter().all(|c| c["type"] == "relay"),
            "relay candidates only: {}",
            context()
        );
    }
    let side = |name: &str| -> Vec<SocketAddr> {
        report["candidates"][name]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|c| {
                format!("{}:{}", c["address"].as_str().unwrap_or("?"), c["port"])
                    .parse()
                    .unwrap_or_else(|e| panic!("candidate {c}: {e}"))
            })
            .collect()
    };
    let (side_a, side_b) = (side("a"), side("b"));
    for (i, (me, other)) in [(&side_a, &side_b), (&side_b, &side_a)]
        .into_iter()
        .enumerate()
    {
        let pair = &report["pairs"][["a", "b"][i]];
        assert_eq!(pair["local_type"], "relay", "{}", context());
        assert_eq!(pair["remote_type"], "relay", "{}", context());
        let protocol = match vias[i] {
            Via::Udp => "udp",
            Via::Tcp => "tcp",
            Via::Tls => "tls",
        };
        assert_eq!(pair["relay_protocol"], protocol, "{}", context());
        // Each side's selected pair is one of its relays to one of the other's (with two
        // allocations a side, from `turns:localhost`, the two sides' choices may differ).
        assert!(me.contains(&addr(&pair["local"])), "{}", context());
        assert!(other.contains(&addr(&pair["remote"])), "{}", context());
    }
    (side_a, side_b)
}

/// SHA-256 of the generated certificate's public key (SubjectPublicKeyInfo), base64: what
/// `--ignore-certificate-errors-spki-list` takes.
fn spki_of(p: &Portico) -> String {
    let path = p.state_dir.join("key.pem");
    let pem = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let key = rcgen::KeyPair::from_pem(&pem).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &key.public_key_der());
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

pub(crate) fn one_browser() -> std::sync::MutexGuard<'static, ()> {
    ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn chromium_data_channel_relay_to_relay_over_udp() {
    let _one = one_browser();
    let (p, tls_port) = ice_portico("webrtc-udp", "", true);
    data_channel_through(&p, [Via::Udp; 2], LOCAL4, tls_port, &Creds::kit(), &[]);
}

#[test]
fn chromium_data_channel_relay_to_relay_over_tcp() {
    let _one = one_browser();
    let (p, tls_port) = ice_portico("webrtc-tcp", "", true);
    data_channel_through(&p, [Via::Tcp; 2], LOCAL4, tls_port, &Creds::kit(), &[]);
}

/// What WebRTC applications hand to browsers: TURN REST API credentials (here over TCP).
#[test]
fn chromium_data_channel_with_rest_api_credentials() {
    let _one = one_browser();
    let (p, tls_port) = ice_portico("webrtc-rest", "", true);
    data_channel_through(
        &p,
        [Via::Tcp; 2],
        LOCAL4,
        tls_port,
        &Creds::rest("carol"),
        &[],
    );
}

/// As deployed: one browser over UDP, the other behind a UDP-hostile firewall over
/// `turns:` (its relay lives in the TCP thread, the other's in a UDP worker), under
/// Portico's default peer policy: loopback is denied, the relays reach each other as
/// Portico's own.
#[test]
fn chromium_udp_to_turns_under_the_default_peer_policy() {
    let _one = one_browser();
    let (p, tls_port) = ice_portico("webrtc-udp-tls", "", false);
    data_channel_through(
        &p,
        [Via::Udp, Via::Tls],
        LOCAL4,
        tls_port,
        &Creds::kit(),
        &[format!(
            "--ignore-certificate-errors-spki-list={}",
            spki_of(&p)
        )],
    );
    assert_eq!(p.counter(Counter::TurnPeerDeniedSpecial), 0);
    assert_eq!(p.counter(Counter::TurnPeerDeniedConfigured), 0);
}

/// Chromium reaching Portico on [::1] (its relays stay IPv4: it asks for no other family).
#[test]
fn chromium_data_channel_relay_to_relay_from_ipv6_over_udp() {
    let _one = one_browser();
    let (p, tls_port) = ice_portico("webrtc-udp6", "", true);
    data_channel_through(&p, [Via::Udp; 2], LOCAL6, tls_port, &Creds::kit(), &[]);
}

#[test]
fn chromium_data_channel_relay_to_relay_from_ipv6_over_tcp() {
    let _one = one_browser();
    let (p, tls_port) = ice_portico("webrtc-tcp6", "", true);
    data_channel_through(&p, [Via::Tcp; 2], LOCAL6, tls_port, &Creds::kit(), &[]);
}

#[test]
fn chromium_data_channel_relay_to_relay_over_tls() {
    let _one = one_browser();
    let (p, tls_port) = ice_portico("webrtc-tls", "", true);
    let url = format!("turns:localhost:{tls_port}?transport=tcp");
    let urls = [url.as_str(), url.as_str()];

    // Chromium verifies a TURNS server's certificate: the generated one is self-signed, so
    // without an exception gathering fails (701) and no allocation is made.
    let (report, browser, _server) = run_page(urls, &Creds::kit(), &[], None);
    assert_eq!(report["ok"], false, "{report:#}");
    assert_eq!(report["why"], "no relayed candidate", "{report:#}");
    let errors = report["errors"].as_array().cloned().unwrap_or_default();
    assert!(
        !errors.is_empty() && errors.iter().all(|e| e["code"] == 701),
        "{report:#}\n{}",
        browser.console()
    );
    drop(browser);
    assert!(allocations(&p).is_empty());
    assert_eq!(p.counter(Counter::TlsHandshakes), 0);
    assert!(
        p.counter(Counter::TcpAccepted) >= 1,
        "Chromium did try Portico"
    );
    // Chromium ends each handshake with an alert; Portico counts the failure.
    assert!(p.wait_counter(Counter::TcpClosedTlsError, 1) >= 1);

    // Pinned to the certificate's key, it connects.
    data_channel_through(
        &p,
        [Via::Tls; 2],
        LOCAL4,
        tls_port,
        &Creds::kit(),
        &[format!(
            "--ignore-certificate-errors-spki-list={}",
            spki_of(&p)
        )],
    );
}
