//! The reverse proxy for LDAP and LDAPS in front of a real slapd with two suffixes, driven by
//! `ldapsearch` binding with both name forms of the reference.

mod proxy_common;

use proxy_common::*;

struct Env {
    _dir: TempDir,
    pki: Pki,
    _slapd: Slapd,
    portico: Portico,
    ldap: u16,
    ldaps: u16,
}

fn env() -> Env {
    env_with("")
}

/// `limits`: the body of `[proxy.limits]`.
fn env_with(limits: &str) -> Env {
    let dir = TempDir::new("ldap");
    let pki = Pki::new(&dir.0, "test");
    let slapd = Slapd::start(&dir);
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
    let portico = Portico::start("ldap", &toml, &[ldap, ldaps]);
    Env {
        _dir: dir,
        pki,
        _slapd: slapd,
        portico,
        ldap,
        ldaps,
    }
}

fn search(e: &Env, url: &str, bind: &str, password: &str, base: &str) -> String {
    let ca = e.pki.ca_path.display().to_string();
    let o = run(
        &program("ldapsearch", "ldap-utils"),
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
    );
    text(&o)
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
