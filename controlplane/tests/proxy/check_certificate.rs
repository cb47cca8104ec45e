//! Check Certificate (reference: "Reverse Proxy and PBX Interaction"): an H.323/TLS or SIPS
//! registration reaches the PBX over TLS only when the client's certificate chains to
//! `proxy.tls.client_ca_file` and names what it registers; another name, an untrusted
//! certificate, none, or plain TCP go to the PBX over TCP; with the switch off, forwarding
//! keeps the client's encryption. Each PBX is two fake targets (a TCP and a TLS listener of
//! this test) that record what reaches them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_testkit::sip::{read_sip, sip_request};
use portico_testkit::stun::b64;
use portico_testkit::{free_port, Portico, TempDir};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::h323_support::*;
use crate::proxy_site;

/// A CA of the test's own, with the leaves this test needs.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf with subject CN `cn` and the given SANs: `(chain, key)` in DER.
    fn leaf(
        &self,
        cn: &str,
        sans: Vec<SanType>,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (vec![cert.der().clone()], der)
    }

    fn write(&self, dir: &TempDir, name: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.cert.pem()).unwrap();
        p
    }
}

fn ip_san() -> SanType {
    SanType::IpAddress("127.0.0.1".parse().unwrap())
}

/// A client certificate to offer, or none.
type ClientId = Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>;

struct Env {
    _dir: TempDir,
    ca: Ca,
    rogue: Ca,
    portico: Portico,
    h323: u16,
    h323_tls: u16,
    sip: u16,
    sips: u16,
    /// (plain, TLS) targets of the services with Check Certificate on.
    on: (FakePbx, FakePbx),
    /// ... and of those with it off.
    off: (FakePbx, FakePbx),
}

fn env() -> Env {
    let dir = TempDir::new("checkcert");
    let ca = Ca::new("trust");
    let rogue = Ca::new("rogue");
    let ca_file = ca.write(&dir, "clients-ca.pem");
    // The proxy's own certificate, and the fake PBXs' (not verified: verify_target_certificate
    // is off, which these tests also exercise).
    let (chain, key) = ca.leaf("proxy.test", vec![ip_san()]);
    let proxy_cert = dir.join("proxy.crt");
    let proxy_key = dir.join("proxy.key");
    let pem = |label: &str, der: &[u8]| {
        use std::fmt::Write as _;
        let encoded = b64(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in encoded.as_bytes().chunks(64) {
            writeln!(out, "{}", std::str::from_utf8(line).unwrap()).unwrap();
        }
        out + &format!("-----END {label}-----\n")
    };
    std::fs::write(&proxy_cert, pem("CERTIFICATE", &chain[0])).unwrap();
    std::fs::write(&proxy_key, pem("PRIVATE KEY", key.secret_der())).unwrap();
    let (pbx_chain, pbx_key) = ca.leaf("pbx.test", vec![ip_san()]);
    let pbx_tls = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pbx_chain, pbx_key)
        .unwrap(),
    );
    let on = (
        FakePbx::start(None),
        FakePbx::start_with(None, Some(Arc::clone(&pbx_tls))),
    );
    let off = (
        FakePbx::start(None),
        FakePbx::start_with(None, Some(pbx_tls)),
    );
    let (h323, h323_tls, sip, sips) = (free_port(), free_port(), free_port(), free_port());
    let svc = |name: &str, (p, t): (u16, u16), check: bool| {
        format!(
            "[[proxy.services]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\n\
             h323 = {p}\nh323_tls = {t}\nsip = {p}\nsips = {t}\n\
             check_certificate = {check}\nverify_target_certificate = false\n"
        )
    };
    let toml = format!(
        "[proxy.listen]\nh323 = \"127.0.0.1:{h323}\"\nh323_tls = \"127.0.0.1:{h323_tls}\"\n\
         sip = \"127.0.0.1:{sip}\"\nsips = \"127.0.0.1:{sips}\"\n\
         [proxy.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca_file = \"{}\"\n{}{}",
        proxy_cert.display(),
        proxy_key.display(),
        ca_file.display(),
        svc("on.test", (on.0.port, on.1.port), true),
        svc("off.test", (off.0.port, off.1.port), false),
    );
    let portico = proxy_site("checkcert", &toml, &[h323, h323_tls, sip, sips]);
    Env {
        _dir: dir,
        ca,
        rogue,
        portico,
        h323,
        h323_tls,
        sip,
        sips,
        on,
        off,
    }
}

/// A connection to the proxy: TLS (with `id` as client certificate) when `tls`.
fn connect(e: &Env, port: u16, tls: bool, id: ClientId) -> Box<dyn ReadWrite + Send> {
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    if !tls {
        return Box::new(sock);
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(e.ca.cert.der().clone()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match id {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
        None => b.with_no_client_auth(),
    };
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    Box::new(rustls::StreamOwned::new(conn, sock))
}

/// Sends `m` and returns which of `(plain, tls)` got it: `"tcp"` or `"tls"`.
fn where_did_it_go(
    e: &Env,
    targets: &(FakePbx, FakePbx),
    port: u16,
    tls: bool,
    id: ClientId,
    m: &[u8],
) -> (&'static str, Box<dyn ReadWrite + Send>) {
    let before = (targets.0.all(), targets.1.all());
    let mut c = connect(e, port, tls, id);
    c.write_all(m).unwrap();
    c.flush().unwrap();
    let t0 = Instant::now();
    loop {
        let now = (targets.0.all(), targets.1.all());
        let got = |b: &Vec<Vec<u8>>, n: &Vec<Vec<u8>>| n.len() > b.len() && n.last().unwrap() == m;
        match (got(&before.0, &now.0), got(&before.1, &now.1)) {
            (true, false) => return ("tcp", c),
            (false, true) => return ("tls", c),
            (true, true) => panic!("both targets got it"),
            _ => {}
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no target got the message; log:\n{}",
            e.portico.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn h323_registrations_go_over_tls_only_with_a_certificate_for_their_alias() {
    let e = env();
    let rrq = msg(&["rrq", "on.test", "alice"]);
    let alice = || Some(e.ca.leaf("alice", vec![ip_san()]));
    let cases: Vec<(&str, bool, ClientId, &str)> = vec![
        ("valid certificate for the alias", true, alice(), "tls"),
        // The name may also be a subjectAltName (an e-mail address here) of any case.
        (
            "alias in a subjectAltName",
            true,
            Some(e.ca.leaf(
                "device-0815",
                vec![SanType::Rfc822Name("ALICE".try_into().unwrap())],
            )),
            "tls",
        ),
        (
            "certificate of another name",
            true,
            Some(e.ca.leaf("bob", vec![])),
            "tcp",
        ),
        (
            "untrusted certificate",
            true,
            Some(e.rogue.leaf("alice", vec![])),
            "tcp",
        ),
        ("no certificate", true, None, "tcp"),
        ("plain TCP", false, None, "tcp"),
    ];
    for (what, tls, id, want) in cases {
        let port = if tls { e.h323_tls } else { e.h323 };
        let (got, _c) = where_did_it_go(&e, &e.on, port, tls, id, &rrq);
        assert_eq!(got, want, "{what}");
    }
    // A Setup (no registration) over TLS with a valid certificate still goes over TCP.
    let setup = msg(&["setup", "carol@on.test"]);
    let (got, _c) = where_did_it_go(&e, &e.on, e.h323_tls, true, alice(), &setup);
    assert_eq!(got, "tcp", "a call is no registration");
    // Switched off: transparent, TLS stays TLS and TCP stays TCP, with or without a cert.
    let rrq_off = msg(&["rrq", "off.test", "alice"]);
    let (got, _c) = where_did_it_go(&e, &e.off, e.h323_tls, true, None, &rrq_off);
    assert_eq!(got, "tls");
    let (got, _c) = where_did_it_go(&e, &e.off, e.h323_tls, true, alice(), &rrq_off);
    assert_eq!(got, "tls");
    let (got, _c) = where_did_it_go(&e, &e.off, e.h323, false, None, &rrq_off);
    assert_eq!(got, "tcp");

    // On a connection vouched for by alice's certificate, a registration of bob is refused
    // and the connection closed; one of alice again passes.
    let (got, mut c) = where_did_it_go(&e, &e.on, e.h323_tls, true, alice(), &rrq);
    assert_eq!(got, "tls");
    let n = e.on.1.all().len();
    c.write_all(&rrq).unwrap();
    c.flush().unwrap();
    e.on.1.wait(n, rrq.len() * 2);
    c.write_all(&msg(&["rrq", "on.test", "bob"])).unwrap();
    c.flush().unwrap();
    let mut b = [0u8; 16];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        match c.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    e.portico
        .wait_log("a later registration is not the client certificate's");
    assert_eq!(e.on.1.all().last().unwrap().len(), rrq.len() * 2);
}

#[test]
fn sips_registers_go_over_tls_only_with_a_certificate_for_their_from() {
    let e = env();
    let register = |user: &str, domain: &str| {
        sip_request("REGISTER", domain, user, &format!("reg-{user}"), 1, "").into_bytes()
    };
    let reg = register("alice", "on.test");
    let alice = || {
        Some(e.ca.leaf(
            "Alice Example",
            vec![SanType::Rfc822Name("alice@on.test".try_into().unwrap())],
        ))
    };
    let cases: Vec<(&str, bool, ClientId, &str)> = vec![
        ("valid certificate for the From", true, alice(), "tls"),
        (
            "From in the CN",
            true,
            Some(e.ca.leaf("alice@on.test", vec![])),
            "tls",
        ),
        (
            "certificate of another name",
            true,
            Some(e.ca.leaf("bob@on.test", vec![])),
            "tcp",
        ),
        (
            "untrusted certificate",
            true,
            Some(e.rogue.leaf("alice@on.test", vec![])),
            "tcp",
        ),
        ("no certificate", true, None, "tcp"),
        ("plain TCP", false, None, "tcp"),
    ];
    for (what, tls, id, want) in cases {
        let port = if tls { e.sips } else { e.sip };
        let (got, _c) = where_did_it_go(&e, &e.on, port, tls, id, &reg);
        assert_eq!(got, want, "{what}");
    }
    // An INVITE first is no registration: TCP.
    let invite = sip_request("INVITE", "on.test", "alice", "inv-1", 1, "").into_bytes();
    let (got, _c) = where_did_it_go(&e, &e.on, e.sips, true, alice(), &invite);
    assert_eq!(got, "tcp");
    // Switched off: transparent.
    let reg_off = register("alice", "off.test");
    let (got, _c) = where_did_it_go(&e, &e.off, e.sips, true, None, &reg_off);
    assert_eq!(got, "tls");
    let (got, _c) = where_did_it_go(&e, &e.off, e.sip, false, None, &reg_off);
    assert_eq!(got, "tcp");
    // A later REGISTER of someone else on a vouched connection: answered 403, not forwarded.
    let (got, mut c) = where_did_it_go(&e, &e.on, e.sips, true, alice(), &reg);
    assert_eq!(got, "tls");
    c.write_all(&register("bob", "on.test")).unwrap();
    c.flush().unwrap();
    let answer = read_sip(&mut c);
    assert!(answer.starts_with("SIP/2.0 403 "), "{answer}");
    assert_eq!(e.on.1.all().last().unwrap(), &reg);
}
