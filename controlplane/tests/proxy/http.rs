//! The reverse proxy for HTTP and HTTPS against real nginx virtual hosts, driven by curl,
//! openssl and raw sockets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use portico_testkit::fixtures::Nginx;
use portico_testkit::http::{curl, raw_exchange, read_response, read_until};
use portico_testkit::process::{require, run};
use portico_testkit::{free_port, Portico};

use crate::{connect_from, proxy_site, proxy_spec};

struct Env {
    nginx: Nginx,
    portico: Portico,
    http: u16,
    https: u16,
}

/// nginx with alpha.test and beta.test, and portico in front on one HTTP and one HTTPS port.
fn env(tag: &str, services_extra: &str, proxy_extra: &str) -> Env {
    let nginx = Nginx::start(tag);
    let (cert, key) = nginx.pki.leaf(
        "proxy",
        &[
            "alpha.test",
            "beta.test",
            "guarded.test",
            "localhost",
            "127.0.0.1",
        ],
    );
    let (http, https) = (free_port(), free_port());
    let toml = format!(
        "[proxy]\n{proxy_extra}\n\
         [proxy.listen]\nhttp = \"127.0.0.1:{http}\"\nhttps = \"127.0.0.1:{https}\"\n\n\
         [proxy.tls]\ncert = \"{}\"\nkey = \"{}\"\nca_file = \"{}\"\n\n\
         [proxy.limits]\nfirst_message_timeout = 2\nidle_timeout = 10\nmax_connections_per_ip = 200\n\n\
         [[proxy.services]]\nname = \"alpha.test\"\nhost = \"127.0.0.1\"\ntarget_name = \"alpha.internal\"\n\
         http = {}\nhttps = {}\nurls = [\"/\", \"/app/\", \"/files/\", \"/deny\"]\n\n\
         [[proxy.services]]\nname = \"beta.test\"\nhost = \"127.0.0.1\"\nhttp = {}\n\n\
         {}",
        cert.display(),
        key.display(),
        nginx.pki.ca_path.display(),
        nginx.alpha,
        nginx.alpha_tls,
        nginx.beta,
        services_extra.replace("BETA_PORT", &nginx.beta.to_string()),
    );
    let portico = proxy_site(tag, &toml, &[http, https]);
    Env {
        nginx,
        portico,
        http,
        https,
    }
}

impl Env {
    fn ca(&self) -> String {
        self.nginx.pki.ca_path.display().to_string()
    }
}

#[test]
fn routes_by_host_over_http_and_https_with_forwarding_headers() {
    let e = env("route", "", "");
    let ca = e.ca();
    // Plain to plain; Host port and case do not matter.
    let (code, body) = curl("http", "alpha.test", e.http, "/", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with(&format!(
            "alpha {} GET / xff=[127.0.0.1] proto=[http]",
            e.nginx.alpha
        )),
        "{body}"
    );
    let (code, body) = curl("http", "BETA.test", e.http, "/x?q=1", &[]);
    assert_eq!(code, 200);
    assert!(
        body.starts_with(&format!("beta {} GET /x?q=1", e.nginx.beta)),
        "{body}"
    );
    // TLS to TLS: alpha has both ports, so HTTPS goes to its TLS port, verified against the CA.
    let (code, body) = curl("https", "alpha.test", e.https, "/", &["--cacert", &ca]);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with(&format!(
            "alpha-tls {} GET / xff=[127.0.0.1] proto=[https]",
            e.nginx.alpha_tls
        )),
        "{body}"
    );
    // TLS to plain: beta has only a plain port.
    let (code, body) = curl("https", "beta.test", e.https, "/", &["--cacert", &ca]);
    assert_eq!(code, 200);
    assert!(
        body.starts_with(&format!(
            "beta {} GET / xff=[127.0.0.1] proto=[https]",
            e.nginx.beta
        )),
        "{body}"
    );
    // A client's own X-Forwarded-For/-Proto are not trusted: replaced, not appended to.
    let (_, body) = curl(
        "http",
        "alpha.test",
        e.http,
        "/",
        &[
            "-H",
            "X-Forwarded-For: 6.6.6.6",
            "-H",
            "X-Forwarded-Proto: https",
        ],
    );
    assert!(body.contains("xff=[127.0.0.1] proto=[http]"), "{body}");
    // Keep-alive: curl reuses one connection for both URLs; each request is routed and checked.
    let (code, body) = curl(
        "http",
        "alpha.test",
        e.http,
        "/one",
        &["-o", "-", &format!("http://alpha.test:{}/two", e.http)],
    );
    assert_eq!(code, 200);
    assert!(
        body.contains("GET /one") && body.contains("GET /two"),
        "{body}"
    );
}

#[test]
fn trusted_proxy_forwarding_headers_are_kept() {
    let e = env("trusted", "", "trusted_proxies = [\"127.0.0.0/8\"]");
    let (_, body) = curl(
        "http",
        "alpha.test",
        e.http,
        "/",
        &[
            "-H",
            "X-Forwarded-For: 192.0.2.9",
            "-H",
            "X-Forwarded-Proto: https",
        ],
    );
    assert!(
        body.contains("xff=[192.0.2.9, 127.0.0.1] proto=[https]"),
        "{body}"
    );
}

#[test]
fn rejections_answer_and_report() {
    let extra = "[[proxy.services]]\nname = \"closed.test\"\nhost = \"127.0.0.1\"\nhttp = 1\nallow_from = { http = [\"10.0.0.0/8\", \"fd00::/8\"] }\n\n\
                 [[proxy.services]]\nname = \"ldaponly.test\"\nhost = \"127.0.0.1\"\nldap = 1\n";
    let e = env("reject", extra, "");
    let (code, _) = curl("http", "nobody.test", e.http, "/", &[]);
    assert_eq!(code, 421);
    e.portico
        .wait_log("suspicious request: unknown service name \"nobody.test\"");
    let (code, _) = curl("http", "ldaponly.test", e.http, "/", &[]);
    assert_eq!(code, 421);
    e.portico.wait_log("has no target for this type");
    let (code, _) = curl("http", "closed.test", e.http, "/", &[]);
    assert_eq!(code, 403);
    e.portico
        .wait_log("suspicious request: source not in allow_from");
    // A 401 challenge to a request without credentials is what every browser gets first:
    // not a rejection. (The event would be logged before the answer is relayed.)
    let (code, body) = curl("http", "alpha.test", e.http, "/deny", &[]);
    assert_eq!((code, body.as_str()), (401, "denied\n"));
    assert!(
        !e.portico.log().contains("target rejected the request"),
        "{}",
        e.portico.log()
    );
    // The target's own refusal of credentials counts.
    let (code, body) = curl(
        "http",
        "alpha.test",
        e.http,
        "/deny",
        &["-u", "alice:wrong"],
    );
    assert_eq!((code, body.as_str()), (401, "denied\n"));
    e.portico.wait_log("target rejected the request: HTTP 401");
    // Garbage is answered with 400 and reported.
    let out = raw_exchange(e.http, b"BLAH\r\n\r\n", Duration::from_secs(5));
    assert!(
        out.starts_with(b"HTTP/1.1 400 "),
        "{}",
        String::from_utf8_lossy(&out)
    );
    e.portico.wait_log("malformed request");
    // A head over the limit gets 431.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: alpha.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let out = raw_exchange(e.http, big.as_bytes(), Duration::from_secs(5));
    assert!(
        out.starts_with(b"HTTP/1.1 431 "),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // Smuggling-shaped framing is refused.
    let out = raw_exchange(
        e.http,
        b"POST / HTTP/1.1\r\nHost: alpha.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(
        out.starts_with(b"HTTP/1.1 400 "),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn url_allow_list_with_normalisation() {
    let e = env("urls", "", "");
    // alpha.test allows "/", "/app/", "/files/", "/deny": "/" ends with a slash, so only
    // top-level paths pass it; "/app/" allows files directly below it.
    for (path, want) in [
        ("/index.html", 200),
        ("/app/main.js", 200),
        ("/app/sub/main.js", 404),
        ("/secret/x", 404),
        ("/app/../secret/x", 404),
        ("/app/%2e%2e/secret/x", 404),
        ("/app//sub/x", 404),
        ("/app/.%2fx", 400),
        ("/app%2Fsub%2Fx", 400),
        ("/../../etc/passwd", 400),
        ("/app/./main.js", 200),
    ] {
        let (code, body) = curl("http", "alpha.test", e.http, path, &["--path-as-is"]);
        assert_eq!(code, want, "{path}: {body}");
    }
    // What passes is what the target receives: the normalised path.
    let (_, body) = curl(
        "http",
        "alpha.test",
        e.http,
        "/app/./x/../main.js",
        &["--path-as-is"],
    );
    assert!(body.contains("GET /app/main.js "), "{body}");
    e.portico.wait_log("URL \"/secret/x\" not allowed");
    // Per request on one connection: the second request is refused, the first answered.
    let req = "GET /app/a HTTP/1.1\r\nHost: alpha.test\r\n\r\nGET /secret/b HTTP/1.1\r\nHost: alpha.test\r\n\r\n";
    let out = String::from_utf8_lossy(&raw_exchange(
        e.http,
        req.as_bytes(),
        Duration::from_secs(5),
    ))
    .to_string();
    let first = out.find("HTTP/1.1 200").expect(&out);
    let second = out.find("HTTP/1.1 404").expect(&out);
    assert!(first < second, "{out}");
    // Another service on the same connection: 421 after the first answer.
    let req =
        "GET /a HTTP/1.1\r\nHost: alpha.test\r\n\r\nGET /b HTTP/1.1\r\nHost: beta.test\r\n\r\n";
    let out = String::from_utf8_lossy(&raw_exchange(
        e.http,
        req.as_bytes(),
        Duration::from_secs(5),
    ))
    .to_string();
    assert!(
        out.contains("alpha") && out.contains("HTTP/1.1 421"),
        "{out}"
    );
    assert!(!out.contains("beta "), "{out}");
}

#[test]
fn upstream_certificates_are_verified_unless_disabled() {
    // The untrusted target is configured twice: verified (default) and not.
    let nginx = Nginx::start("verify2");
    let pki = &nginx.pki;
    let (cert, key) = pki.leaf("proxy", &["strict.test", "lax.test"]);
    let http = free_port();
    let toml = format!(
        "[proxy.listen]\nhttp = \"127.0.0.1:{http}\"\n[proxy.tls]\ncert = \"{}\"\nkey = \"{}\"\nca_file = \"{}\"\n\
         [[proxy.services]]\nname = \"strict.test\"\nhost = \"127.0.0.1\"\ntarget_name = \"alpha.internal\"\nhttps = {u}\n\
         [[proxy.services]]\nname = \"lax.test\"\nhost = \"127.0.0.1\"\nhttps = {u}\nverify_target = false\n\
         [[proxy.services]]\nname = \"good.test\"\nhost = \"127.0.0.1\"\ntarget_name = \"alpha.internal\"\nhttps = {g}\n\
         [[proxy.services]]\nname = \"wrongname.test\"\nhost = \"127.0.0.1\"\ntarget_name = \"other.internal\"\nhttps = {g}\n",
        cert.display(),
        key.display(),
        pki.ca_path.display(),
        u = nginx.untrusted_tls,
        g = nginx.alpha_tls,
    );
    let p = proxy_site("verify2", &toml, &[http]);
    assert_eq!(curl("http", "strict.test", http, "/", &[]).0, 502);
    p.wait_log("target unreachable");
    let (code, body) = curl("http", "lax.test", http, "/", &[]);
    assert_eq!(code, 200);
    assert!(body.starts_with("untrusted "), "{body}");
    let (code, body) = curl("http", "good.test", http, "/", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("proto=[http]"), "{body}");
    assert_eq!(curl("http", "wrongname.test", http, "/", &[]).0, 502);
}

#[test]
fn large_bodies_both_ways_and_chunked_uploads() {
    let e = env("bodies", "", "");
    let data: Vec<u8> = (0..6_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let src = e.nginx.dir.join("upload.bin");
    std::fs::write(&src, &data).unwrap();
    let src_s = src.display().to_string();
    let (code, _) = curl(
        "http",
        "alpha.test",
        e.http,
        "/files/big.bin",
        &["-T", &src_s],
    );
    assert!(code == 201 || code == 204, "{code}");
    let stored = std::fs::read(e.nginx.www.join("files/big.bin")).unwrap_or_else(|err| {
        panic!(
            "{err}; nginx log: {}",
            std::fs::read_to_string(e.nginx.dir.join("nginx-error.log")).unwrap_or_default()
        )
    });
    assert_eq!(stored, data);
    // Chunked upload (curl streams stdin-like input with Transfer-Encoding: chunked).
    let (code, _) = curl(
        "https",
        "alpha.test",
        e.https,
        "/files/chunked.bin",
        &[
            "--cacert",
            &e.ca(),
            "-T",
            &src_s,
            "-H",
            "Transfer-Encoding: chunked",
        ],
    );
    assert!(code == 201 || code == 204, "{code}");
    assert_eq!(
        std::fs::read(e.nginx.www.join("files/chunked.bin")).unwrap(),
        data
    );
    // Download through HTTPS.
    let out = e.nginx.dir.join("down.bin");
    let o = run(
        &require("curl", "curl"),
        &[
            "-sS",
            "--fail",
            "--cacert",
            &e.ca(),
            "--resolve",
            &format!("alpha.test:{}:127.0.0.1", e.https),
            "-o",
            &out.display().to_string(),
            &format!("https://alpha.test:{}/files/big.bin", e.https),
        ],
        &[],
        Duration::from_secs(30),
    );
    assert!(o.success(), "{}", o.text);
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

#[test]
fn half_close_and_target_going_away() {
    // A target that answers only after the client half-closed, then one that dies mid-body.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tport = target.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        // 1: read until EOF (the proxy passes the client's half-close on), then answer.
        let (mut s, _) = target.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        let tail = got[got.len() - 3..].to_vec();
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n")
            .unwrap();
        s.write_all(&tail).unwrap();
        drop(s);
        // 2: promise 1000 bytes, send 10, vanish.
        let (mut s, _) = target.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
            .unwrap();
        drop(s);
        // 3: PROXY v2 header first.
        let (mut s, _) = target.accept().unwrap();
        let mut h = [0u8; 28];
        s.read_exact(&mut h).unwrap();
        let _ = s.read(&mut buf).unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .unwrap();
        h
    });
    let toml_svc = format!(
        "[[proxy.services]]\nname = \"raw.test\"\nhost = \"127.0.0.1\"\nhttp = {tport}\n\n\
         [[proxy.services]]\nname = \"pp.test\"\nhost = \"127.0.0.1\"\nhttp = {tport}\nproxy_protocol = true\n"
    );
    let e = env("halfclose", &toml_svc, "");
    let mut c = TcpStream::connect(("127.0.0.1", e.http)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"POST /x HTTP/1.1\r\nHost: raw.test\r\nContent-Length: 3\r\n\r\nabc")
        .unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 200 OK") && out.ends_with("\r\n\r\nabc"),
        "{out}"
    );
    // The target dies mid-body: the client sees the partial body, then a clean close.
    let t0 = Instant::now();
    let out = raw_exchange(
        e.http,
        b"GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n",
        Duration::from_secs(8),
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "closed promptly");
    assert!(String::from_utf8_lossy(&out).ends_with("0123456789"));
    let out = raw_exchange(
        e.http,
        b"GET / HTTP/1.1\r\nHost: pp.test\r\n\r\n",
        Duration::from_secs(8),
    );
    assert!(String::from_utf8_lossy(&out).ends_with("ok"));
    let h = server.join().unwrap();
    assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!((h[12], h[13]), (0x21, 0x11));
    assert_eq!(&h[16..20], &[127, 0, 0, 1], "client address");
    assert_eq!(u16::from_be_bytes([h[26], h[27]]), e.http, "proxy port");
}

#[test]
fn slow_clients_do_not_starve_others_and_limits_hold() {
    let e = env("slowloris", "", "");
    // 40 clients from other loopback addresses dribble a head that never ends.
    let mut slow = Vec::new();
    for i in 0..40u8 {
        let mut t = connect_from([127, 0, 1, 2 + i], e.http);
        t.write_all(b"GET / HTTP/1.1\r\nHost: alp").unwrap();
        slow.push(t);
    }
    // Everyone else is served at once meanwhile.
    let t0 = Instant::now();
    for _ in 0..5 {
        assert_eq!(curl("http", "alpha.test", e.http, "/", &[]).0, 200);
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // The slow ones are cut off at first_message_timeout (2 s) with 408.
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let _ = s.write_all(b"ha");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(
            out.starts_with(b"HTTP/1.1 408 "),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }
    e.portico.wait_log("no complete request in time");
}

#[test]
fn per_source_connection_limit() {
    let nginx = Nginx::start("perip2");
    let http = free_port();
    let toml = format!(
        "[proxy.listen]\nhttp = \"127.0.0.1:{http}\"\n[proxy.limits]\nmax_connections_per_ip = 3\n\
         [[proxy.services]]\nname = \"alpha.test\"\nhost = \"127.0.0.1\"\nhttp = {}\n",
        nginx.alpha
    );
    let p = proxy_site("perip2", &toml, &[http]);
    std::thread::sleep(Duration::from_millis(200));
    let held: Vec<TcpStream> = (0..3).map(|_| connect_from([127, 0, 0, 9], http)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut fourth = connect_from([127, 0, 0, 9], http);
    fourth
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let _ = fourth.write_all(b"GET / HTTP/1.1\r\nHost: alpha.test\r\n\r\n");
    let mut out = Vec::new();
    let r = fourth.read_to_end(&mut out);
    // Closed without an answer: EOF, or a reset because the request was never read.
    assert!(out.is_empty(), "fourth connection answered: {r:?} {out:?}");
    p.wait_log("too many connections from this address");
    // Another source is still served.
    assert_eq!(curl("http", "alpha.test", http, "/", &[]).0, 200);
    drop(held);
}

#[test]
fn redirect_rule_and_certificate_reload() {
    let nginx = Nginx::start("redirect2");
    let pki = &nginx.pki;
    let (cert, key) = pki.leaf("proxy", &["alpha.test"]);
    let (http, https) = (free_port(), free_port());
    let toml = format!(
        "[proxy.listen]\nhttp = \"127.0.0.1:{http}\"\nhttps = \"127.0.0.1:{https}\"\n\
         [proxy.redirect]\nhttp = {{ scheme = \"https\", port = {https} }}\n\
         [proxy.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[proxy.services]]\nname = \"alpha.test\"\nhost = \"127.0.0.1\"\nhttp = {}\n",
        cert.display(),
        key.display(),
        nginx.alpha
    );
    let p = proxy_site("redirect2", &toml, &[http, https]);
    let (code, _) = curl(
        "http",
        "alpha.test",
        http,
        "/a/../b?x=1",
        &["--path-as-is", "-D", "/dev/stderr"],
    );
    assert_eq!(code, 308);
    let out = run(
        &require("curl", "curl"),
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "--resolve",
            &format!("alpha.test:{http}:127.0.0.1"),
            &format!("http://alpha.test:{http}/b?x=1"),
        ],
        &[],
        Duration::from_secs(30),
    );
    assert!(
        out.text
            .contains(&format!("Location: https://alpha.test:{https}/b?x=1")),
        "{}",
        out.text
    );
    // Unknown names are not redirected anywhere.
    assert_eq!(curl("http", "evil.test", http, "/", &[]).0, 421);
    // Following the redirect lands on the HTTPS listener.
    let ca = pki.ca_path.display().to_string();
    let (code, body) = curl(
        "http",
        "alpha.test",
        http,
        "/hello",
        &[
            "-L",
            "--cacert",
            &ca,
            "--resolve",
            &format!("alpha.test:{https}:127.0.0.1"),
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("proto=[https]"), "{body}");

    // Certificate reload: a connection made before keeps working; new handshakes get the new
    // certificate.
    let serial = |port: u16| -> String {
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo | timeout 10 openssl s_client -connect 127.0.0.1:{port} -servername alpha.test 2>/dev/null | openssl x509 -noout -serial"
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let before = serial(https);
    assert!(before.starts_with("serial="), "{before}");
    let config = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert))
        .with_no_client_auth(),
    );
    let name = rustls::pki_types::ServerName::try_from("alpha.test").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut sock = TcpStream::connect(("127.0.0.1", https)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(b"GET /1 HTTP/1.1\r\nHost: alpha.test\r\n\r\n")
        .unwrap();
    assert!(read_until(&mut tls, "GET /1").contains("GET /1"));
    let (c2, k2) = pki.leaf("proxy-new", &["alpha.test"]);
    std::fs::copy(&k2, &key).unwrap();
    std::fs::copy(&c2, &cert).unwrap();
    let t0 = Instant::now();
    let mut after = before.clone();
    while after == before && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(300));
        after = serial(https);
    }
    assert!(
        after.starts_with("serial=") && after != before,
        "{before} -> {after}"
    );
    tls.write_all(b"GET /2 HTTP/1.1\r\nHost: alpha.test\r\n\r\n")
        .unwrap();
    assert!(
        read_until(&mut tls, "GET /2").contains("GET /2"),
        "old connection still served"
    );
    p.wait_log("proxy certificate loaded");
}

#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A plain HTTP target that answers every request head with `status` over keep-alive, counts
/// the requests that reached it and hands each head to the test. Requests carry no body.
struct RawTarget {
    port: u16,
    count: Arc<AtomicUsize>,
    heads: mpsc::Receiver<String>,
}

fn raw_target(status: u16) -> RawTarget {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let (tx, heads) = mpsc::channel();
    let counter = Arc::clone(&count);
    std::thread::spawn(move || {
        for conn in listener.incoming().take(50) {
            let Ok(mut c) = conn else { return };
            let (tx, counter) = (tx.clone(), Arc::clone(&counter));
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        counter.fetch_add(1, Ordering::SeqCst);
                        let _ = tx.send(String::from_utf8_lossy(&head).to_string());
                        let answer =
                            format!("HTTP/1.1 {status} Whatever\r\nContent-Length: 2\r\n\r\nno");
                        if c.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                    match c.read(&mut tmp) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
            });
        }
    });
    RawTarget { port, count, heads }
}

fn raw_proxy(tag: &str, fraud: &str, target: u16, limits: &str) -> (Portico, u16) {
    raw_proxy_with(tag, fraud, "", target, limits)
}

/// [`raw_proxy`] with `proxy` as the body of the `[proxy]` table.
fn raw_proxy_with(
    tag: &str,
    fraud: &str,
    proxy: &str,
    target: u16,
    limits: &str,
) -> (Portico, u16) {
    let http = free_port();
    let toml = format!(
        "[proxy]\n{proxy}\n[proxy.listen]\nhttp = \"127.0.0.1:{http}\"\n[proxy.limits]\n{limits}\n\
         [[proxy.services]]\nname = \"raw.test\"\nhost = \"127.0.0.1\"\nhttp = {target}\n"
    );
    let mut spec = proxy_spec(&toml, &[http]);
    if !fraud.is_empty() {
        spec = spec.fraud(fraud);
    }
    (Portico::start(tag, spec), http)
}

/// One request on a new connection from 127.0.0.1 through the proxy on `port`, and the
/// head the target received for it (`None` when nothing reached the target).
fn through(port: u16, target: &RawTarget, request: &str) -> (Option<u16>, Option<String>) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let status = read_response(&mut c).map(|r| r.0);
    let head = target
        .heads
        .recv_timeout(Duration::from_millis(500))
        .ok()
        .map(|h| h.to_ascii_lowercase());
    (status, head)
}

#[test]
fn blacklisting_cuts_an_open_keep_alive_connection() {
    const THRESHOLD: usize = 3;
    let target = raw_target(401);
    let (p, http) = raw_proxy(
        "blockopen",
        &format!("suspicious_per_minute = {THRESHOLD}"),
        target.port,
        "",
    );
    // Password guesses over one keep-alive connection, each answered 401 by the target.
    let mut c = connect_from([127, 0, 0, 5], http);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answers = Vec::new();
    for i in 0..20 {
        let req = format!(
            "GET /login?guess={i} HTTP/1.1\r\nHost: raw.test\r\nAuthorization: Basic Z3Vlc3M6e2l9\r\n\r\n"
        );
        if c.write_all(req.as_bytes()).is_err() {
            break;
        }
        match read_response(&mut c) {
            Some((code, _)) => answers.push(code),
            None => break,
        }
        if answers.last() != Some(&401) {
            break;
        }
    }
    let reached = target.count.load(Ordering::SeqCst);
    // The (THRESHOLD+1)th rejection blacklists; at most a couple more may slip through.
    assert!(
        (THRESHOLD + 1..=THRESHOLD + 3).contains(&reached),
        "{reached} guesses reached the target; answers {answers:?}"
    );
    assert_eq!(answers.last(), Some(&403), "answers {answers:?}");
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    assert!(rest.is_empty(), "connection not closed after the 403");
    p.wait_log("blacklisted: too many suspicious events");
    // A new connection from the same source is closed unanswered; others are served.
    let mut again = connect_from([127, 0, 0, 5], http);
    again
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = again.write_all(b"GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n");
    assert!(read_response(&mut again).is_none());
    let mut other = connect_from([127, 0, 0, 6], http);
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    other
        .write_all(b"GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut other).map(|r| r.0), Some(401));
}

#[test]
fn counterpart_listener_applies_the_counterparts_allow_list() {
    // guarded.test has only an http port, open to 127.0.0.2 alone: HTTPS, forwarded to that
    // same port, must not be open to everyone.
    let extra =
        "[[proxy.services]]\nname = \"guarded.test\"\nhost = \"127.0.0.1\"\nhttp = BETA_PORT\n\
                 allow_from = { http = [\"127.0.0.2/32\"] }\n";
    let e = env("counterpart", extra, "");
    let ca = e.ca();
    let (code, body) = curl("https", "guarded.test", e.https, "/", &["--cacert", &ca]);
    assert_eq!(code, 403, "{body}");
    let (code, _) = curl("http", "guarded.test", e.http, "/", &[]);
    assert_eq!(code, 403);
    e.portico.wait_log("source not in allow_from");
    // From the allowed address both work, HTTPS landing on the plain port.
    let from = ["--interface", "127.0.0.2"];
    let (code, body) = curl("http", "guarded.test", e.http, "/", &from);
    assert_eq!(code, 200, "{body}");
    let (code, body) = curl(
        "https",
        "guarded.test",
        e.https,
        "/",
        &["--cacert", &ca, "--interface", "127.0.0.2"],
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("proto=[https]"), "{body}");
}

#[test]
fn client_forwarding_claims_and_foreign_upgrades_are_stripped() {
    let target = raw_target(200);
    let (_p, http) = raw_proxy("claims", "", target.port, "");
    let mut c = TcpStream::connect(("127.0.0.1", http)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(
        b"GET /a HTTP/1.1\r\nHost: raw.test\r\nX_Forwarded_For: 6.6.6.1\r\nx-forwarded_proto: gopher\r\n\
          X-Forwarded-Host: evil.example\r\nForwarded: for=6.6.6.2;proto=https\r\nX-Real-IP: 6.6.6.3\r\n\
          Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\
          X-Kept: yes\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_response(&mut c).map(|r| r.0), Some(200));
    let head = target
        .heads
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .to_ascii_lowercase();
    for gone in [
        "6.6.6.",
        "gopher",
        "evil.example",
        "forwarded:",
        "upgrade: h2c",
        "http2-settings",
    ] {
        assert!(!head.contains(gone), "{gone:?} reached the target:\n{head}");
    }
    assert!(head.contains("x-forwarded-for: 127.0.0.1\r\n"), "{head}");
    assert!(head.contains("x-real-ip: 127.0.0.1\r\n"), "{head}");
    assert!(head.contains("x-forwarded-proto: http\r\n"), "{head}");
    assert!(head.contains("x-kept: yes\r\n"), "{head}");
}

#[test]
fn later_request_heads_have_a_deadline_too() {
    let target = raw_target(200);
    let (p, http) = raw_proxy(
        "slowlater",
        "",
        target.port,
        "first_message_timeout = 2\nidle_timeout = 30",
    );
    let mut c = TcpStream::connect(("127.0.0.1", http)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /1 HTTP/1.1\r\nHost: raw.test\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut c).map(|r| r.0), Some(200));
    // Idle between requests is fine (idle_timeout)...
    std::thread::sleep(Duration::from_millis(2500));
    c.write_all(b"GET /2 HTTP/1.1\r\nHost: raw.test\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut c).map(|r| r.0), Some(200));
    // ...but a head dribbled a byte at a time must complete within first_message_timeout.
    let t0 = Instant::now();
    let dribble = b"GET /3 HTTP/1.1\r\nHost: raw.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa";
    let mut answer = None;
    c.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    for b in dribble.iter() {
        if c.write_all(std::slice::from_ref(b)).is_err() {
            break;
        }
        let mut peek = [0u8; 1];
        if let Ok(n) = c.peek(&mut peek) {
            if n > 0 {
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                answer = read_response(&mut c);
                break;
            }
        }
    }
    assert_eq!(answer.map(|r| r.0), Some(408), "after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    p.wait_log("no complete request in time");
}

/// X-Real-IP is the proxy's word, like X-Forwarded-For: set to the client it saw, once; the
/// other client-address headers targets and frameworks read (CDN spellings included, and
/// their CGI-style underscored forms) never get through.
#[test]
fn client_address_headers_are_the_proxys_own() {
    let target = raw_target(200);
    let (_p, http) = raw_proxy("realip", "", target.port, "");
    let (status, head) = through(
        http,
        &target,
        "GET / HTTP/1.1\r\nHost: raw.test\r\nX-Real-IP: 6.6.6.1\r\nX_Real_IP: 6.6.6.2\r\n\
         True-Client-IP: 6.6.6.3\r\nX-Client-IP: 6.6.6.4\r\nCF-Connecting-IP: 6.6.6.5\r\n\
         X-Cluster-Client-IP: 6.6.6.6\r\nClient-IP: 6.6.6.7\r\nFastly-Client-IP: 6.6.6.8\r\n\
         X-Originating-IP: 6.6.6.9\r\nX_Client_IP: 6.6.6.10\r\nX-Kept: yes\r\n\r\n",
    );
    assert_eq!(status, Some(200));
    let head = head.expect("the request reached the target");
    assert!(
        !head.contains("6.6.6."),
        "a client's address claim got through:\n{head}"
    );
    for gone in [
        "true-client-ip",
        "x-client-ip",
        "x_client_ip",
        "cf-connecting-ip",
        "x-cluster-client-ip",
        "\r\nclient-ip",
        "fastly-client-ip",
        "x-originating-ip",
        "x_real_ip",
    ] {
        assert!(!head.contains(gone), "{gone:?} reached the target:\n{head}");
    }
    assert_eq!(
        head.matches("x-real-ip:").count(),
        1,
        "X-Real-IP not set exactly once:\n{head}"
    );
    assert!(head.contains("\r\nx-real-ip: 127.0.0.1\r\n"), "{head}");
    assert!(head.contains("x-kept: yes\r\n"), "{head}");
}

/// Path overrides would have the target serve a path the URL allow-list never saw.
#[test]
fn path_override_headers_never_reach_the_target() {
    let target = raw_target(200);
    let (_p, http) = raw_proxy("override", "", target.port, "");
    let (status, head) = through(
        http,
        &target,
        "GET /public/x HTTP/1.1\r\nHost: raw.test\r\nX-Original-URL: /admin/a\r\n\
         X-Rewrite-URL: /admin/b\r\nX_Original_URL: /admin/c\r\nX-Override-URL: /admin/d\r\n\
         X-Original-URI: /admin/e\r\n\r\n",
    );
    assert_eq!(status, Some(200));
    let head = head.expect("the request reached the target");
    assert!(head.starts_with("get /public/x http/1.1\r\n"), "{head}");
    assert!(
        !head.contains("/admin"),
        "a path override got through:\n{head}"
    );
    // Also from a trusted proxy: no one may override the path the proxy checked.
    let target = raw_target(200);
    let (_p, http) = raw_proxy_with(
        "override-trusted",
        "",
        "trusted_proxies = [\"127.0.0.1/32\"]",
        target.port,
        "",
    );
    let (status, head) = through(
        http,
        &target,
        "GET /public/x HTTP/1.1\r\nHost: raw.test\r\nX-Original-URL: /admin/a\r\n\
         X-Rewrite-URL: /admin/b\r\n\r\n",
    );
    assert_eq!(status, Some(200));
    let head = head.expect("the request reached the target");
    assert!(
        !head.contains("/admin"),
        "a path override got through:\n{head}"
    );
}

/// Behind a trusted proxy the client is the rightmost hop it forwarded that is not trusted
/// itself; X-Real-IP names that client, X-Forwarded-For keeps the whole chain.
#[test]
fn behind_a_trusted_proxy_x_real_ip_is_the_forwarded_client() {
    let target = raw_target(200);
    let (_p, http) = raw_proxy_with(
        "realip-trusted",
        "",
        "trusted_proxies = [\"127.0.0.1/32\", \"10.0.0.0/8\"]",
        target.port,
        "",
    );
    let (status, head) = through(
        http,
        &target,
        "GET / HTTP/1.1\r\nHost: raw.test\r\nX-Forwarded-For: 6.6.6.6, 198.51.100.7, 10.1.1.1\r\n\
         X-Real-IP: 6.6.6.7\r\n\r\n",
    );
    assert_eq!(status, Some(200));
    let head = head.expect("the request reached the target");
    assert!(
        head.contains("x-forwarded-for: 6.6.6.6, 198.51.100.7, 10.1.1.1, 127.0.0.1\r\n"),
        "{head}"
    );
    assert!(head.contains("x-real-ip: 198.51.100.7\r\n"), "{head}");
    assert!(!head.contains("6.6.6.7"), "{head}");
    // A trusted proxy that names no client: X-Real-IP is the proxy itself.
    let (status, head) = through(http, &target, "GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n");
    assert_eq!(status, Some(200));
    assert!(head
        .expect("reached the target")
        .contains("x-real-ip: 127.0.0.1\r\n"),);
}

/// A backend that takes h2c from ANY `Upgrade` line, the way some servers read the first
/// or any of repeated headers: it answers 101 and starts HTTP/2 when a line offers h2c,
/// 200 otherwise. It hands every head it received to the test.
struct H2cTarget {
    port: u16,
    switched: Arc<AtomicUsize>,
    heads: mpsc::Receiver<String>,
}

fn h2c_target() -> H2cTarget {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let switched = Arc::new(AtomicUsize::new(0));
    let (tx, heads) = mpsc::channel();
    let counter = Arc::clone(&switched);
    std::thread::spawn(move || {
        for conn in listener.incoming().take(50) {
            let Ok(mut c) = conn else { return };
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            let head = loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break String::from_utf8_lossy(&buf[..end + 4]).to_string();
                }
                match c.read(&mut tmp) {
                    Ok(0) | Err(_) => break String::new(),
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            };
            if head.is_empty() {
                continue;
            }
            let h2c = head.lines().any(|l| {
                l.split_once(':').is_some_and(|(n, v)| {
                    n.trim().eq_ignore_ascii_case("upgrade")
                        && v.to_ascii_lowercase().contains("h2c")
                })
            });
            let _ = tx.send(head);
            if h2c {
                counter.fetch_add(1, Ordering::SeqCst);
                // 101, then the server's HTTP/2 preface: an empty SETTINGS frame.
                let _ = c.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n\
                      \x00\x00\x00\x04\x00\x00\x00\x00\x00",
                );
            } else {
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nno upgrade");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    H2cTarget {
        port,
        switched,
        heads,
    }
}

/// h2c smuggling (issue 11.1): the proxy cannot follow HTTP/2 streams, so an h2c switch would
/// let every later request bypass routing, URL rules and fraud accounting. Whatever the
/// client puts on how many Upgrade lines, such a backend must never see h2c offered.
#[test]
fn h2c_never_reaches_a_backend_through_repeated_upgrade_headers() {
    let target = h2c_target();
    let (_p, http) = raw_proxy("h2c", "", target.port, "");
    let settings = "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n";
    let ask = |upgrade_lines: &str| {
        let mut c = TcpStream::connect(("127.0.0.1", http)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let req = format!(
            "GET / HTTP/1.1\r\nHost: raw.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             {upgrade_lines}{settings}\r\n"
        );
        c.write_all(req.as_bytes()).unwrap();
        read_response(&mut c)
    };
    // WebSocket together with h2c, on two lines (either order) or one: ambiguous, refused.
    for lines in [
        "Upgrade: h2c\r\nUpgrade: websocket\r\n",
        "Upgrade: websocket\r\nUpgrade: h2c\r\n",
        "Upgrade: websocket, h2c\r\n",
        "Upgrade: WebSocket\r\nupgrade: H2C\r\n",
    ] {
        let r = ask(lines);
        assert_eq!(r.as_ref().map(|r| r.0), Some(400), "{lines:?}: {r:?}");
    }
    assert_eq!(
        target.switched.load(Ordering::SeqCst),
        0,
        "the backend switched to h2c"
    );
    assert!(
        target.heads.try_recv().is_err(),
        "a refused request reached the backend"
    );
    // h2c alone (curl --http2 on http://): served as HTTP/1.1 with the offer taken out.
    for lines in ["Upgrade: h2c\r\n", "Upgrade: h2c\r\nUpgrade: TLS/1.0\r\n"] {
        let r = ask(lines);
        assert_eq!(
            r,
            Some((200, "no upgrade".to_string())),
            "{lines:?} was not served as HTTP/1.1"
        );
        let head = target
            .heads
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .to_ascii_lowercase();
        for gone in ["upgrade", "http2-settings", "h2c"] {
            assert!(
                !head.contains(gone),
                "{gone:?} reached the backend:\n{head}"
            );
        }
    }
    // WebSocket alone still goes through, as one clean offer without HTTP2-Settings.
    let r = ask("Upgrade: websocket\r\n");
    assert_eq!(r.map(|r| r.0), Some(200));
    let head = target
        .heads
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(!head.contains("http2-settings"), "{head}");
    assert_eq!(target.switched.load(Ordering::SeqCst), 0);
}

/// A client naming a header in Connection could have a proxying target drop it (the
/// X-Forwarded-For the proxy added, say); only close/keep-alive/upgrade go on.
#[test]
fn connection_tokens_cannot_name_the_proxys_headers() {
    let target = raw_target(200);
    let (_p, http) = raw_proxy("conntokens", "", target.port, "");
    let (status, head) = through(
        http,
        &target,
        "GET / HTTP/1.1\r\nHost: raw.test\r\nConnection: keep-alive, X-Forwarded-For, X-Real-IP\r\n\r\n",
    );
    assert_eq!(status, Some(200));
    let head = head.expect("reached the target");
    assert!(head.contains("\r\nconnection: keep-alive\r\n"), "{head}");
    assert!(head.contains("x-forwarded-for: 127.0.0.1\r\n"), "{head}");
}
