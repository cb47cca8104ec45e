//! The reverse proxy for SIP over TCP and TLS in front of a real Kamailio registrar: REGISTER
//! with digest authentication and INVITE, routed by the From domain, from a scripted client.

mod proxy_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_common::*;

struct Env {
    _dir: TempDir,
    pki: Pki,
    _kamailio: Kamailio,
    portico: Portico,
    sip: u16,
    sips: u16,
}

fn env() -> Env {
    let dir = TempDir::new("sip");
    let pki = Pki::new(&dir.0, "test");
    let kamailio = Kamailio::start(&dir);
    let (cert, key) = pki.leaf("proxy", &["sip.alpha.test", "127.0.0.1"]);
    let (sip, sips) = (free_port(), free_port());
    // Only a plain target port: SIPS from clients is forwarded as SIP/TCP (reference:
    // "Service Name Definition").
    let toml = format!(
        "[proxy.listen]\nsip = \"127.0.0.1:{sip}\"\nsips = \"127.0.0.1:{sips}\"\n\
         [proxy.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[proxy.services]]\nname = \"alpha.test\"\nhost = \"127.0.0.1\"\nsip = {p}\n\
         [[proxy.services]]\nname = \"closed.test\"\nhost = \"127.0.0.1\"\nsip = {p}\nallow_from = {{ sip = [\"10.0.0.0/8\"] }}\n",
        cert.display(),
        key.display(),
        p = kamailio.port,
    );
    let portico = Portico::start("sip", &toml, &[sip, sips]);
    Env {
        _dir: dir,
        pki,
        _kamailio: kamailio,
        portico,
        sip,
        sips,
    }
}

/// Reads one SIP message (head plus Content-Length body).
fn read_msg(s: &mut impl Read) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => got.push(b[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&got).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("Content-Length:")
                .or_else(|| l.strip_prefix("l:"))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = s.read_exact(&mut body);
    head + &String::from_utf8_lossy(&body)
}

fn request(method: &str, from_domain: &str, cseq: u32, extra: &str) -> String {
    format!(
        "{method} sip:{from_domain} SIP/2.0\r\n\
         Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-{method}-{cseq}\r\n\
         Max-Forwards: 70\r\n\
         From: \"Alice\" <sip:alice@{from_domain}>;tag=a1\r\n\
         To: <sip:alice@{from_domain}>\r\n\
         Call-ID: call-{method}-{from_domain}@127.0.0.1\r\n\
         CSeq: {cseq} {method}\r\n\
         Contact: <sip:alice@127.0.0.1:5999;transport=tcp>\r\n\
         {extra}Content-Length: 0\r\n\r\n"
    )
}

/// REGISTER (challenged, then authenticated) and INVITE on one connection.
fn register_and_invite(s: &mut (impl Read + Write)) {
    s.write_all(request("REGISTER", "alpha.test", 1, "").as_bytes())
        .unwrap();
    let challenge = read_msg(s);
    assert!(challenge.starts_with("SIP/2.0 401 "), "{challenge}");
    let nonce = challenge
        .split("nonce=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("nonce in the challenge");
    let uri = "sip:alpha.test";
    let ha1 = md5_hex("alice:alpha.test:secret");
    let ha2 = md5_hex(&format!("REGISTER:{uri}"));
    let response = md5_hex(&format!("{ha1}:{nonce}:{ha2}"));
    let auth = format!(
        "Authorization: Digest username=\"alice\", realm=\"alpha.test\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{response}\", algorithm=MD5\r\n"
    );
    s.write_all(request("REGISTER", "alpha.test", 2, &auth).as_bytes())
        .unwrap();
    let ok = read_msg(s);
    assert!(ok.starts_with("SIP/2.0 200 Registered"), "{ok}");
    s.write_all(request("INVITE", "alpha.test", 3, "").as_bytes())
        .unwrap();
    let busy = read_msg(s);
    assert!(busy.starts_with("SIP/2.0 486 Busy Here"), "{busy}");
}

#[test]
fn register_and_invite_over_tcp_and_tls() {
    let e = env();
    let mut tcp = TcpStream::connect(("127.0.0.1", e.sip)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    register_and_invite(&mut tcp);

    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(&e.pki.ca_path).unwrap();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("sip.alpha.test").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut sock = TcpStream::connect(("127.0.0.1", e.sips)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    register_and_invite(&mut tls);
    // The registrar's challenges count as target rejections.
    e.portico
        .wait_log("target rejected the request: SIP 401 Unauthorized");
}

#[test]
fn unknown_domains_and_closed_services_are_answered_by_the_proxy() {
    let e = env();
    let mut s = TcpStream::connect(("127.0.0.1", e.sip)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request("INVITE", "nowhere.test", 1, "").as_bytes())
        .unwrap();
    let r = read_msg(&mut s);
    assert!(r.starts_with("SIP/2.0 404 Not Found\r\n"), "{r}");
    assert!(
        r.contains("Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-INVITE-1"),
        "{r}"
    );
    assert!(r.contains("Server: Portico"), "{r}");
    e.portico.wait_log("unknown service name \"nowhere.test\"");
    let mut s = TcpStream::connect(("127.0.0.1", e.sip)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Compact header form `f:` is understood too.
    let req = request("REGISTER", "closed.test", 1, "").replace("From: ", "f: ");
    s.write_all(req.as_bytes()).unwrap();
    let r = read_msg(&mut s);
    assert!(r.starts_with("SIP/2.0 403 Forbidden\r\n"), "{r}");
    e.portico.wait_log("source not in allow_from");
}

#[test]
fn keepalive_crlf_flood_is_cut_at_the_head_limit() {
    // Default limits: max_header_bytes 16 KiB, first_message_timeout 10 s.
    let mut e = env();
    let rss_before = e.portico.rss_kib();
    let mut s = TcpStream::connect(("127.0.0.1", e.sip)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let chunk = b"\r\n".repeat(32 * 1024);
    let t0 = Instant::now();
    let mut sent = 0usize;
    // Bounded: at most 256 MiB or 8 s of keep-alives.
    while sent < 256 << 20 && t0.elapsed() < Duration::from_secs(8) {
        match s.write(&chunk) {
            Ok(n) if n > 0 => sent += n,
            _ => break,
        }
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the proxy took {sent} bytes of CRLF over {took:?} without closing"
    );
    // What the kernel buffers on loopback, not what the proxy kept.
    assert!(sent < 64 << 20, "{sent} bytes accepted");
    e.portico.wait_log("request head too large");
    let grown = e.portico.rss_kib().saturating_sub(rss_before);
    assert!(grown < 32 * 1024, "portico grew by {grown} KiB");
    assert!(e.portico.alive());
    // The proxy still answers.
    let mut s = TcpStream::connect(("127.0.0.1", e.sip)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request("INVITE", "nowhere.test", 1, "").as_bytes())
        .unwrap();
    assert!(read_msg(&mut s).starts_with("SIP/2.0 404 Not Found\r\n"));
}
