//! The reverse proxy for LDAP and LDAPS in front of a real slapd with two suffixes, driven by
//! `ldapsearch` binding with both name forms of the reference.

use std::time::Duration;

use portico_testkit::fixtures::{Pki, Slapd};
use portico_testkit::http::raw_exchange;
use portico_testkit::ldap::LdapClient;
use portico_testkit::process::{require, run};
use portico_testkit::{free_port, Portico};

use crate::proxy_site;

struct Env {
    pki: Pki,
    slapd: Slapd,
    portico: Portico,
    ldap: u16,
    ldaps: u16,
}

fn env() -> Env {
    env_with("")
}

/// `limits`: the body of `[proxy.limits]`.
fn env_with(limits: &str) -> Env {
    let slapd = Slapd::start("ldap");
    let pki = Pki::new(&slapd.dir, "test");
    let (cert, key) = pki.leaf("proxy", &["localhost", "127.0.0.1"]);
    let (ldap, ldaps) = (free_port(), free_port());
    let toml = format!(
        "[proxy.listen]\nldap = \"127.0.0.1:{ldap}\"\nldaps = \"127.0.0.1:{ldaps}\"\n\
         [proxy.limits]\n{limits}\n\
         [proxy.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[proxy.services]]\nname = \"alpha.test\"\nhost = \"127.0.0.1\"\nldap = {p}\n\
         [[proxy.services]]\nname = \"beta.test\"\nhost = \"127.0.0.1\"\nldap = {p}\n\
         [[proxy.services]]\nname = \"closed.test\"\nhost = \"127.0.0.1\"\nldap = {p}\nallow_from = {{ ldap = [\"10.0.0.0/8\"], ldaps = [\"10.0.0.0/8\"] }}\n",
        cert.display(),
        key.display(),
        p = slapd.port,
    );
    let portico = proxy_site("ldap", &toml, &[ldap, ldaps]);
    Env {
        pki,
        slapd,
        portico,
        ldap,
        ldaps,
    }
}

fn search(e: &Env, url: &str, bind: &str, password: &str, base: &str) -> String {
    let ca = e.pki.ca_path.display().to_string();
    let o = run(
        &require("ldapsearch", "ldap-utils"),
        &[
            "-x",
            "-LLL",
            "-o",
            "nettimeout=10",
            "-H",
            url,
            "-D",
            bind,
            "-w",
            password,
            "-b",
            base,
            "(cn=person)",
            "sn",
        ],
        &[("LDAPTLS_CACERT", &ca), ("LDAPTLS_REQCERT", "demand")],
        Duration::from_secs(30),
    );
    o.text
}

#[test]
fn binds_route_by_dc_parts_over_ldap_and_ldaps() {
    let e = env();
    let plain = format!("ldap://127.0.0.1:{}", e.ldap);
    let tls = format!("ldaps://127.0.0.1:{}", e.ldaps);
    for url in [&plain, &tls] {
        let out = search(
            &e,
            url,
            "cn=admin,dc=alpha,dc=test",
            "secret",
            "dc=alpha,dc=test",
        );
        assert!(out.contains("sn: Alpha-Person"), "{url}: {out}");
        let out = search(
            &e,
            url,
            "CN=admin, DC=beta, DC=test",
            "secret",
            "dc=beta,dc=test",
        );
        assert!(out.contains("sn: Beta-Person"), "{url}: {out}");
    }
}

#[test]
fn domain_backslash_user_form_is_routed() {
    let e = env();
    let url = format!("ldap://127.0.0.1:{}", e.ldap);
    // slapd itself has no `domain\user` accounts (a PBX directory has): reaching it shows as
    // slapd's own "invalid DN syntax", while an unknown domain is refused by the proxy.
    let out = search(&e, &url, "alpha.test\\admin", "secret", "dc=alpha,dc=test");
    assert!(out.contains("Invalid DN syntax (34)"), "{out}");
    let out = search(&e, &url, "gamma.test\\admin", "secret", "dc=alpha,dc=test");
    assert!(out.contains("No such object (32)"), "{out}");
    e.portico.wait_log("unknown service name \"gamma.test\"");
    let out = search(
        &e,
        &url,
        "cn=admin,dc=gamma,dc=test",
        "secret",
        "dc=gamma,dc=test",
    );
    assert!(out.contains("No such object (32)"), "{out}");
}

#[test]
fn access_limits_and_target_rejections_are_reported() {
    let e = env();
    for url in [
        format!("ldap://127.0.0.1:{}", e.ldap),
        format!("ldaps://127.0.0.1:{}", e.ldaps),
    ] {
        let out = search(
            &e,
            &url,
            "cn=admin,dc=closed,dc=test",
            "secret",
            "dc=closed,dc=test",
        );
        assert!(out.contains("Insufficient access (50)"), "{url}: {out}");
        let out = search(
            &e,
            &url,
            "cn=admin,dc=alpha,dc=test",
            "wrong",
            "dc=alpha,dc=test",
        );
        assert!(out.contains("Invalid credentials (49)"), "{url}: {out}");
    }
    e.portico.wait_log("source not in allow_from");
    e.portico
        .wait_log("target rejected the request: LDAP invalidCredentials");
    // Not LDAP at all: closed, reported.
    let out = raw_exchange(
        e.ldap,
        b"GET / HTTP/1.0\r\n\r\n",
        std::time::Duration::from_secs(5),
    );
    assert!(out.is_empty());
    e.portico.wait_log("malformed request: not an LDAP message");
}

/// `depth` SEQUENCEs inside one another.
fn nested(depth: usize) -> Vec<u8> {
    let mut inner: Vec<u8> = vec![0x30, 0x00];
    for _ in 0..depth {
        let n = inner.len();
        let mut v = vec![0x30];
        if n < 128 {
            v.push(n as u8);
        } else if n < 256 {
            v.extend_from_slice(&[0x81, n as u8]);
        } else if n < 65536 {
            v.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]);
        } else {
            v.extend_from_slice(&[0x83, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
        }
        v.extend_from_slice(&inner);
        inner = v;
    }
    inner
}

#[test]
fn deeply_nested_first_message_is_refused_and_the_proxy_lives() {
    let mut e = env_with("max_header_bytes = 1048576");
    let msg = nested(40_000);
    assert!(msg.len() > 180_000 && msg.len() < 1 << 20, "{}", msg.len());
    // Refused as soon as the depth shows: the rest of the write may meet a reset.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", e.ldap)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let _ = std::io::Write::write_all(&mut s, &msg);
    let mut out = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut out);
    assert!(out.is_empty(), "{out:?}");
    e.portico
        .wait_log("malformed request: undecodable LDAP message");
    assert!(e.portico.alive(), "portico died:\n{}", e.portico.log());
    let out = search(
        &e,
        &format!("ldap://127.0.0.1:{}", e.ldap),
        "cn=admin,dc=alpha,dc=test",
        "secret",
        "dc=alpha,dc=test",
    );
    assert!(out.contains("sn: Alpha-Person"), "{out}");
}

/// Every bind on a connection is routed, not only the first: a bind naming another service
/// (here even one on the same directory), an unknown domain or none is answered by the proxy
/// and never reaches the connection's target.
#[test]
fn later_binds_for_other_domains_are_refused_on_the_same_connection() {
    use ldap3_proto::proto::LdapResultCode as Code;
    let e = env();
    let mut c = LdapClient::connect(e.ldap);
    let code = |r: Option<(Code, String)>| r.map(|(c, _)| c);
    assert_eq!(
        code(c.bind(1, "cn=admin,dc=alpha,dc=test", "secret")),
        Some(Code::Success)
    );
    for (id, dn) in [
        (2, "cn=admin,dc=beta,dc=test"),
        (3, "beta.test\\admin"),
        (4, "cn=admin,dc=gamma,dc=test"),
        (5, "cn=admin"),
    ] {
        let r = c.bind(id, dn, "secret");
        assert_eq!(
            code(r.clone()),
            Some(Code::InsufficentAccessRights),
            "{dn}: {r:?}"
        );
        assert_eq!(r.map(|(_, m)| m).as_deref(), Some("not allowed"), "{dn}");
    }
    // Two binds in one write: the first goes on, the one behind it does not; answers are
    // told apart by message ID (the proxy's may come first).
    let mut both = bytes::BytesMut::new();
    for m in [
        LdapClient::bind_request(6, "cn=admin,dc=alpha,dc=test", "secret"),
        LdapClient::bind_request(7, "cn=admin,dc=beta,dc=test", "secret"),
    ] {
        tokio_util::codec::Encoder::encode(&mut ldap3_proto::LdapCodec::default(), m, &mut both)
            .unwrap();
    }
    std::io::Write::write_all(&mut c.s, &both).unwrap();
    let mut answers = Vec::new();
    for _ in 0..2 {
        match c.recv().expect("an answer") {
            ldap3_proto::proto::LdapMsg {
                msgid,
                op: ldap3_proto::proto::LdapOp::BindResponse(r),
                ..
            } => answers.push((msgid, r.res.code)),
            other => panic!("{other:?}"),
        }
    }
    answers.sort_by_key(|a| a.0);
    assert_eq!(
        answers,
        [(6, Code::Success), (7, Code::InsufficentAccessRights)]
    );
    // The connection still serves its own domain.
    assert_eq!(
        code(c.bind(8, "cn=admin,dc=alpha,dc=test", "wrong")),
        Some(Code::InvalidCredentials)
    );
    assert_eq!(
        code(c.bind(9, "CN=admin,DC=alpha,DC=test", "secret")),
        Some(Code::Success)
    );
    // slapd saw, on the proxy's connection, the four binds for alpha.test and nothing else.
    // Its log has `conn=N op=M BIND dn="..." method=128` per bind request.
    let binds = |s: &Slapd| {
        s.proc
            .log_text()
            .lines()
            .filter(|l| l.contains(" BIND dn=") && l.contains("method="))
            .filter_map(|l| {
                let conn = l.split("conn=").nth(1)?.split(' ').next()?.to_string();
                let dn = l.split(" BIND dn=").nth(1)?.to_string();
                Some((conn, dn))
            })
            .collect::<Vec<_>>()
    };
    let t0 = std::time::Instant::now();
    // The Slapd helper's own ldapadd binds (one per suffix) come first.
    while binds(&e.slapd).len() < 2 + 4 && t0.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let all = binds(&e.slapd);
    let proxied = &all.last().expect("binds in slapd's log").0;
    let ours: Vec<&str> = all
        .iter()
        .filter(|(c, _)| c == proxied)
        .map(|(_, dn)| dn.as_str())
        .collect();
    assert_eq!(ours.len(), 4, "slapd saw {all:?}");
    assert!(
        ours.iter().all(|dn| dn
            .to_ascii_lowercase()
            .starts_with("\"cn=admin,dc=alpha,dc=test\"")),
        "slapd saw {all:?}"
    );
    e.portico
        .wait_log("a later request names another service than the connection's");
    e.portico.wait_log("unknown service name \"gamma.test\"");
}

/// Bind names are DNs per RFC 4514: an escaped comma is part of a value, a hex pair is the
/// character it encodes, `domainComponent` is `dc`; the domain is the real DC parts.
#[test]
fn escaped_dns_are_routed_by_their_real_domain_components() {
    let e = env();
    let url = format!("ldap://127.0.0.1:{}", e.ldap);
    // `\70` is "p": slapd reads the root DN of dc=alpha,dc=test, and so does the proxy.
    let out = search(
        &e,
        &url,
        r"cn=admin,dc=al\70ha,dc=test",
        "secret",
        "dc=alpha,dc=test",
    );
    assert!(out.contains("sn: Alpha-Person"), "{out}");
    let out = search(
        &e,
        &url,
        "cn=admin,domainComponent=beta,dc=test",
        "secret",
        "dc=beta,dc=test",
    );
    assert!(out.contains("sn: Beta-Person"), "{out}");
    // The cn is "x,dc=alpha": the DN lies under dc=beta,dc=test, so it goes to beta.test
    // (whose directory does not know it) and not to an unknown "alpha.beta.test".
    let out = search(
        &e,
        &url,
        r"cn=x\,dc=alpha,dc=beta,dc=test",
        "wrong",
        "dc=beta,dc=test",
    );
    assert!(out.contains("Invalid credentials (49)"), "{out}");
    // Here the cn is "admin,dc=alpha": the domain is just "test", which names no service.
    let out = search(
        &e,
        &url,
        r"cn=admin\,dc=alpha,dc=test",
        "secret",
        "dc=alpha,dc=test",
    );
    assert!(out.contains("No such object (32)"), "{out}");
    e.portico.wait_log("unknown service name \"test\"");
    assert!(
        !e.portico
            .log()
            .contains("unknown service name \"alpha.beta.test\""),
        "{}",
        e.portico.log()
    );
}
