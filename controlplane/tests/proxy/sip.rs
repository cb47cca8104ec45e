//! The reverse proxy for SIP over TCP and TLS in front of a real Kamailio registrar: REGISTER
//! with digest authentication and INVITE, routed by the From domain, from a scripted client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_testkit::fixtures::{Kamailio, Pki};
use portico_testkit::sip::{read_sip, sip_authorization, sip_nonce, sip_request};
use portico_testkit::{free_port, Portico};

use crate::proxy_site;

struct Env {
    pki: Pki,
    kamailio: Kamailio,
    portico: Portico,
    sip: u16,
    sips: u16,
}

fn env() -> Env {
    let kamailio = Kamailio::start("sip");
    let pki = Pki::new(&kamailio.dir, "test");
    let (cert, key) = pki.leaf("proxy", &["sip.alpha.test", "127.0.0.1"]);
    let (sip, sips) = (free_port(), free_port());
    // Only a plain target port: SIPS from clients is forwarded as SIP/TCP (reference:
    // "Service Name Definition").
    let toml = format!(
        "[proxy.listen]\nsip = \"127.0.0.1:{sip}\"\nsips = \"127.0.0.1:{sips}\"\n\
         [proxy.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[proxy.services]]\nname = \"alpha.test\"\nhost = \"127.0.0.1\"\nsip = {p}\n\
         [[proxy.services]]\nname = \"beta.test\"\nhost = \"127.0.0.1\"\nsip = {p}\n\
         [[proxy.services]]\nname = \"closed.test\"\nhost = \"127.0.0.1\"\nsip = {p}\nallow_from = {{ sip = [\"10.0.0.0/8\"] }}\n",
        cert.display(),
        key.display(),
        p = kamailio.port,
    );
    let portico = proxy_site("sip", &toml, &[sip, sips]);
    Env {
        pki,
        kamailio,
        portico,
        sip,
        sips,
    }
}

fn read_msg(s: &mut impl Read) -> String {
    read_sip(s)
}

fn request(method: &str, from_domain: &str, cseq: u32, extra: &str) -> String {
    let call_id = format!("call-{method}-{from_domain}@127.0.0.1");
    sip_request(method, from_domain, "alice", &call_id, cseq, extra)
}

/// REGISTER (challenged, then authenticated) and INVITE on one connection, then a REGISTER
/// with a wrong password.
fn register_and_invite(s: &mut (impl Read + Write)) {
    s.write_all(request("REGISTER", "alpha.test", 1, "").as_bytes())
        .unwrap();
    let challenge = read_msg(s);
    assert!(challenge.starts_with("SIP/2.0 401 "), "{challenge}");
    let nonce = sip_nonce(&challenge).expect("nonce in the challenge");
    let auth = sip_authorization("REGISTER", "alpha.test", "alice", "secret", &nonce);
    s.write_all(request("REGISTER", "alpha.test", 2, &auth).as_bytes())
        .unwrap();
    let ok = read_msg(s);
    assert!(ok.starts_with("SIP/2.0 200 Registered"), "{ok}");
    s.write_all(request("INVITE", "alpha.test", 3, "").as_bytes())
        .unwrap();
    let busy = read_msg(s);
    assert!(busy.starts_with("SIP/2.0 486 Busy Here"), "{busy}");
    let wrong = sip_authorization("REGISTER", "alpha.test", "alice", "guess", &nonce);
    s.write_all(request("REGISTER", "alpha.test", 4, &wrong).as_bytes())
        .unwrap();
    let refused = read_msg(s);
    assert!(refused.starts_with("SIP/2.0 401 "), "{refused}");
}

fn rejections(p: &Portico) -> usize {
    // The fraud engine's consumer logs each event once at INFO.
    p.log()
        .matches("suspicious request: target rejected the request")
        .count()
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
    // The wrong passwords count as target rejections; the challenges that start every
    // login, the successes and the busy callee do not. Events are logged in order, so once
    // the second wrong password shows, anything earlier would have shown too.
    let t0 = Instant::now();
    while rejections(&e.portico) < 2 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = e.portico.log();
    assert_eq!(rejections(&e.portico), 2, "{log}");
    assert_eq!(
        log.matches("suspicious request: target rejected the request: SIP 401 Unauthorized")
            .count(),
        2,
        "{log}"
    );
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

/// Every REGISTER and INVITE on a connection is routed, not only the first: one naming
/// another service (here even one on the same registrar) or an unknown one is answered 403
/// by the proxy and never reaches the connection's target; other methods pass.
#[test]
fn later_requests_for_other_domains_are_refused_on_the_same_connection() {
    let e = env();
    let mut s = TcpStream::connect(("127.0.0.1", e.sip)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request("REGISTER", "alpha.test", 1, "").as_bytes())
        .unwrap();
    let challenge = read_msg(&mut s);
    assert!(challenge.starts_with("SIP/2.0 401 "), "{challenge}");
    assert!(!challenge.contains("Server: Portico"), "{challenge}");
    let mut cseq = 1;
    for (method, domain) in [
        ("REGISTER", "beta.test"),
        ("INVITE", "beta.test"),
        ("REGISTER", "nowhere.test"),
        ("INVITE", "nowhere.test"),
    ] {
        cseq += 1;
        s.write_all(request(method, domain, cseq, "").as_bytes())
            .unwrap();
        let r = read_msg(&mut s);
        assert!(
            r.starts_with("SIP/2.0 403 Forbidden\r\n"),
            "{method} {domain}: {r}"
        );
        assert!(r.contains("Server: Portico"), "{r}");
        assert!(r.contains(&format!("CSeq: {cseq} {method}")), "{r}");
    }
    // Other methods go to the connection's target whatever their From.
    s.write_all(request("OPTIONS", "beta.test", 10, "").as_bytes())
        .unwrap();
    let r = read_msg(&mut s);
    assert!(r.starts_with("SIP/2.0 405 Method Not Allowed"), "{r}");
    // Pipelined in one write: the first REGISTER goes on, the one behind it does not.
    let both =
        request("REGISTER", "alpha.test", 11, "") + &request("REGISTER", "beta.test", 12, "");
    s.write_all(both.as_bytes()).unwrap();
    let (a, b) = (read_msg(&mut s), read_msg(&mut s));
    let (challenge, refusal) = if a.contains("CSeq: 11 ") {
        (a, b)
    } else {
        (b, a)
    };
    assert!(challenge.starts_with("SIP/2.0 401 "), "{challenge}");
    assert!(
        refusal.starts_with("SIP/2.0 403 Forbidden\r\n"),
        "{refusal}"
    );
    // The connection still serves its own domain.
    let nonce = sip_nonce(&challenge).expect("nonce");
    let auth = sip_authorization("REGISTER", "alpha.test", "alice", "secret", &nonce);
    s.write_all(request("REGISTER", "alpha.test", 13, &auth).as_bytes())
        .unwrap();
    let ok = read_msg(&mut s);
    assert!(ok.starts_with("SIP/2.0 200 Registered"), "{ok}");
    // The registrar saw exactly the requests for alpha.test, and the OPTIONS.
    let got = |k: &Kamailio| {
        k.proc
            .log_text()
            .lines()
            .filter_map(|l| l.split("kamailio got ").nth(1).map(str::to_string))
            .collect::<Vec<_>>()
    };
    let t0 = Instant::now();
    while got(&e.kamailio).len() < 4 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        got(&e.kamailio),
        [
            "REGISTER From alpha.test CSeq 1",
            "OPTIONS From beta.test CSeq 10",
            "REGISTER From alpha.test CSeq 11",
            "REGISTER From alpha.test CSeq 13",
        ]
    );
    e.portico
        .wait_log("a later request names another service than the connection's");
    e.portico.wait_log("unknown service name \"nowhere.test\"");
}
