//! Media relay sessions and static NAT maps against the real `portico`: real RTP (12-byte
//! header, sequence numbers checked) and RTCP between UDP endpoints on loopback through a
//! session on both packet drivers, latching to the real source, a hijack attempt after the
//! learn window (never forwarded, counted, reported to the fraud engine), idle expiry,
//! delete, limits and bad configuration; a full-cone NAT map to an internal echo.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use portico_testkit::{Portico, Spec};
use serde_json::{json, Value};

mod nat;
mod sessions;

/// Media port range of every test site (away from `turn.relay_ports` below).
pub const MEDIA_PORTS: &str = "21000-21999";

/// A site on driver `io` with the media relay on 127.0.0.1, loopback peers allowed, and
/// `media` as extra `[media]` lines.
pub fn media_spec(io: &'static str, media: &str) -> Spec {
    Spec::new()
        .io(io)
        .loopback_peers()
        .relay_ports("20000-20999")
        .turn("relay_ip = \"127.0.0.1\"")
        .tables(&format!("[media]\nports = \"{MEDIA_PORTS}\"\n{media}"))
}

/// An RTP packet: version 2, payload type 0 (PCMU), `seq`, a timestamp, SSRC `ssrc`, and
/// 160 bytes of payload (20 ms of G.711).
pub fn rtp(seq: u16, ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend(std::iter::repeat_n((seq & 0xff) as u8, 160));
    p
}

/// Checks an RTP packet's header: (sequence number, SSRC).
pub fn parse_rtp(p: &[u8]) -> (u16, u32) {
    assert!(p.len() >= 12, "short RTP packet: {p:02x?}");
    assert_eq!(p[0] >> 6, 2, "RTP version 2");
    (
        u16::from_be_bytes([p[2], p[3]]),
        u32::from_be_bytes([p[8], p[9], p[10], p[11]]),
    )
}

/// An RTCP receiver report (RFC 3550 §6.4.2, no report blocks) from `ssrc`.
pub fn rtcp_rr(ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 201, 0, 1];
    p.extend_from_slice(&ssrc.to_be_bytes());
    p
}

pub fn recv(s: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    portico_testkit::net::recv_within(s, wait)
}

/// Sends `count` RTP packets from `from` to `to`, 2 ms apart, and checks that `at` receives
/// every one, in order, from `relay`.
pub fn stream(
    from: &UdpSocket,
    to: SocketAddr,
    at: &UdpSocket,
    relay: SocketAddr,
    count: u16,
    ssrc: u32,
) {
    for seq in 0..count {
        from.send_to(&rtp(seq, ssrc), to).unwrap();
        let (p, src) = recv(at, Duration::from_secs(2)).unwrap_or_else(|| {
            panic!(
                "RTP seq {seq} from {to} not relayed to {:?}",
                at.local_addr()
            )
        });
        assert_eq!(src, relay, "relayed from the other leg's local address");
        assert_eq!(parse_rtp(&p), (seq, ssrc), "sequence in order, SSRC kept");
        assert_eq!(p, rtp(seq, ssrc), "payload unchanged");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Creates a session; returns (id, legs' RTP locals, legs' RTCP locals).
pub fn create(
    p: &Portico,
    legs: [Option<SocketAddr>; 2],
) -> (String, [SocketAddr; 2], [SocketAddr; 2]) {
    let body = json!({
        "legs": legs.iter().map(|a| json!({"address": a.map(|a| a.to_string())})).collect::<Vec<_>>(),
        "label": "test-call",
    });
    let (code, v) = p.call("POST", "/api/v1/media/sessions", &body.to_string());
    assert_eq!(code, 201, "{v}");
    let addr = |x: &Value| -> SocketAddr { x.as_str().unwrap().parse().unwrap() };
    let id = v["id"].as_str().expect("id is a string").to_string();
    let locals = [addr(&v["legs"][0]["local"]), addr(&v["legs"][1]["local"])];
    let rtcp = [
        addr(&v["legs"][0]["rtcp_local"]),
        addr(&v["legs"][1]["rtcp_local"]),
    ];
    for (l, r) in locals.iter().zip(rtcp) {
        assert_eq!(l.port() % 2, 0, "RTP on an even port");
        assert_eq!(r.port(), l.port() + 1, "RTCP on the next port");
        assert_eq!(l.ip().to_string(), "127.0.0.1", "bound on turn.relay_ip");
    }
    (id, locals, rtcp)
}

pub fn session(p: &Portico, id: &str) -> (u16, Value) {
    p.call("GET", &format!("/api/v1/media/sessions/{id}"), "")
}

/// Polls the session until `check` holds (counters are published every 250 ms).
pub fn wait_session(p: &Portico, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, v) = session(p, id);
        if code == 200 && check(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {code} {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two UDP sockets on 127.0.0.1 at ports p and p + 1 (an endpoint's RTP and RTCP).
pub fn endpoint() -> (UdpSocket, UdpSocket) {
    for _ in 0..50 {
        let p = portico_testkit::ports::free_udp_pair();
        if let (Ok(a), Ok(b)) = (
            UdpSocket::bind(("127.0.0.1", p)),
            UdpSocket::bind(("127.0.0.1", p + 1)),
        ) {
            return (a, b);
        }
    }
    panic!("no free UDP port pair on 127.0.0.1");
}

/// An SRTP packet's 80-bit tag for `master` (16-byte key ‖ 14-byte salt), rollover counter 0,
/// computed by python3's `cryptography` (AES-CTR key derivation) and `hmac`: an
/// implementation independent of the relay's.
pub fn srtp_tag(master: &[u8; 30], packet: &[u8]) -> Vec<u8> {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let script = r#"
import sys, hmac, hashlib
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
m = bytes.fromhex(sys.argv[1]); p = bytes.fromhex(sys.argv[2])
iv = bytearray(m[16:] + b"\0\0"); iv[7] ^= 0x01
enc = Cipher(algorithms.AES(m[:16]), modes.CTR(bytes(iv))).encryptor()
k = enc.update(b"\0" * 20) + enc.finalize()
print(hmac.new(k, p + b"\0\0\0\0", hashlib.sha1).hexdigest()[:20])
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &hex(master), &hex(packet)])
        .output()
        .expect("python3 runs (required by scripts/test.sh)");
    assert!(
        out.status.success(),
        "python3 with the cryptography module is required for the SRTP test: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&t[i..i + 2], 16).unwrap())
        .collect()
}

/// `rtp(seq, ssrc)` with its SRTP tag for `master` appended (the payload is taken as already
/// encrypted: the relay only authenticates).
pub fn srtp(master: &[u8; 30], seq: u16, ssrc: u32) -> Vec<u8> {
    let mut p = rtp(seq, ssrc);
    let tag = srtp_tag(master, &p);
    p.extend(tag);
    p
}
