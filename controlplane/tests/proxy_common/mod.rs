//! Harness for the reverse-proxy tests: a private CA, the real `portico` binary with a
//! `[proxy]` section, and real peers (nginx, slapd, kamailio) started as this test's own
//! processes on free loopback ports with their configuration in a temporary directory.
//!
//! A missing third-party program fails the test with the package to install; nothing is
//! skipped silently.

#![allow(dead_code)]

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A TCP port free on 127.0.0.1 and not handed to another test of this process.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let p = l.local_addr().expect("local addr").port();
        drop(l);
        let mut g = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if g.get_or_insert_with(HashSet::new).insert(p) {
            return p;
        }
    }
    panic!("no free port");
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("portico-proxy-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A private CA and certificates it signs, written as PEM files.
pub struct Pki {
    pub ca_path: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path, name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        let ca_key = KeyPair::generate().unwrap();
        let ca = p.self_signed(&ca_key).unwrap();
        let ca_path = dir.join(format!("{name}-ca.pem"));
        fs::write(&ca_path, ca.pem()).unwrap();
        Pki {
            ca_path,
            ca,
            ca_key,
            dir: dir.to_path_buf(),
        }
    }

    /// A leaf for `names` (DNS names or IP addresses): `(cert.pem, key.pem)`.
    pub fn leaf(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(names.clone()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, names[0].clone());
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let c = self.dir.join(format!("{file}.crt"));
        let k = self.dir.join(format!("{file}.key"));
        fs::write(&c, cert.pem()).unwrap();
        fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// A child process killed when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds a program or fails with the Debian package that has it.
pub fn program(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: install the Debian package {package}");
}

pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
    let f = fs::File::create(&log).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    Proc {
        name: name.to_string(),
        child,
        log,
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_port(addr: SocketAddr, what: &Proc) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{} does not accept on {addr}; its log:\n{}",
        what.name,
        what.log_text()
    );
}

/// Runs a command to completion with a time bound (coreutils `timeout`).
pub fn run(prog: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("timeout");
    c.arg("30").arg(prog).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", prog.display()))
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A running `portico` with the given `[proxy]` TOML (everything after the other tables).
pub struct Portico {
    pub dir: TempDir,
    pub proc: Proc,
    pub config_path: PathBuf,
}

impl Portico {
    /// Starts portico and waits until every address in `ready` accepts. Loopback is
    /// whitelisted for fraud detection, so rejections never block the test's own client.
    pub fn start(tag: &str, proxy_toml: &str, ready: &[u16]) -> Portico {
        Portico::start_with_fraud(tag, "whitelist = [\"127.0.0.0/8\"]", proxy_toml, ready)
    }

    /// Like [`Portico::start`], with `fraud_toml` as the body of `[fraud]`.
    pub fn start_with_fraud(
        tag: &str,
        fraud_toml: &str,
        proxy_toml: &str,
        ready: &[u16],
    ) -> Portico {
        let dir = TempDir::new(tag);
        let config_path = dir.path("portico.toml");
        let text = format!(
            "state_dir = \"{}\"\nlog_level = \"info,portico::proxy=debug\"\n\n[turn]\nlisten = [\"127.0.0.1:{}\"]\nworkers = 1\n\n[api]\nlisten = \"127.0.0.1:{}\"\n\n\
             [fraud]\n{fraud_toml}\n\n{proxy_toml}\n",
            dir.path("state").display(),
            free_port(),
            free_port(),
        );
        fs::write(&config_path, text).unwrap();
        let proc = spawn(
            "portico",
            Command::new(env!("CARGO_BIN_EXE_portico"))
                .arg("run")
                .arg("--config")
                .arg(&config_path)
                .env("RUST_LOG", "info,portico::proxy=debug"),
            dir.path("portico.log"),
        );
        for p in ready {
            wait_port(SocketAddr::from(([127, 0, 0, 1], *p)), &proc);
        }
        Portico {
            dir,
            proc,
            config_path,
        }
    }

    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    /// Whether the portico process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.proc.child.try_wait(), Ok(None))
    }

    /// Resident memory of the portico process (control plane), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.proc.child.id()))
            .expect("portico's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }

    /// Waits until the log contains `needle` (events are logged asynchronously).
    pub fn wait_log(&self, needle: &str) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if self.log().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("log lacks {needle:?}:\n{}", self.log());
    }
}

/// Sends raw bytes, half-closes nothing, and reads until EOF or `limit`.
pub fn raw_exchange(port: u16, request: &[u8], limit: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// A TCP connection to 127.0.0.1:`port` from the loopback address `src` (each test source
/// gets its own address, so per-source limits can be exercised).
pub fn connect_from(src: [u8; 4], port: u16) -> TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    let from = SockaddrIn::new(src[0], src[1], src[2], src[3], 0);
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &from).unwrap();
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(127, 0, 0, 1, port),
    )
    .unwrap();
    TcpStream::from(fd)
}

/// nginx with virtual hosts that say who they are and echo the forwarding headers.
pub struct Nginx {
    pub proc: Proc,
    /// alpha.test, plain.
    pub alpha: u16,
    /// alpha.test over TLS with a certificate from the test CA for `alpha.internal`.
    pub alpha_tls: u16,
    /// beta.test, plain.
    pub beta: u16,
    /// A TLS server whose self-signed certificate no one trusts.
    pub untrusted_tls: u16,
    pub www: PathBuf,
}

impl Nginx {
    pub fn start(dir: &TempDir, pki: &Pki) -> Nginx {
        let nginx = program("nginx", "nginx");
        let (alpha, alpha_tls, beta, untrusted_tls) =
            (free_port(), free_port(), free_port(), free_port());
        let (ac, ak) = pki.leaf("alpha-internal", &["alpha.internal", "127.0.0.1"]);
        let rogue = Pki::new(&dir.0, "rogue");
        let (uc, uk) = rogue.leaf("untrusted", &["alpha.internal", "127.0.0.1"]);
        let www = dir.path("www");
        fs::create_dir_all(www.join("files")).unwrap();
        let d = dir.0.display();
        let echo = "$server_port $request_method $request_uri xff=[$http_x_forwarded_for] proto=[$http_x_forwarded_proto]";
        let locations = |who: &str| {
            format!(
                "location / {{ return 200 \"{who} {echo}\\n\"; }}\n\
                 location /deny {{ return 401 \"denied\\n\"; }}\n\
                 location /files/ {{ root {}; dav_methods PUT; create_full_put_path on; }}\n",
                www.display()
            )
        };
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             keepalive_requests 1000000;\n client_max_body_size 64m;\n default_type text/plain;\n\
             server {{ listen 127.0.0.1:{alpha}; server_name alpha.test; {a} }}\n\
             server {{ listen 127.0.0.1:{alpha_tls} ssl; server_name alpha.test; ssl_certificate {ac}; ssl_certificate_key {ak}; {at} }}\n\
             server {{ listen 127.0.0.1:{beta}; server_name beta.test; {b} }}\n\
             server {{ listen 127.0.0.1:{untrusted_tls} ssl; ssl_certificate {uc}; ssl_certificate_key {uk}; {u} }}\n\
             }}\n",
            a = locations("alpha"),
            at = locations("alpha-tls"),
            b = locations("beta"),
            u = locations("untrusted"),
            ac = ac.display(),
            ak = ak.display(),
            uc = uc.display(),
            uk = uk.display(),
        );
        let conf_path = dir.path("nginx.conf");
        fs::write(&conf_path, conf).unwrap();
        let proc = spawn(
            "nginx",
            Command::new(nginx)
                .arg("-p")
                .arg(&dir.0)
                .arg("-e")
                .arg(dir.path("nginx-error.log"))
                .arg("-c")
                .arg(&conf_path),
            dir.path("nginx.log"),
        );
        for p in [alpha, alpha_tls, beta, untrusted_tls] {
            wait_port(SocketAddr::from(([127, 0, 0, 1], p)), &proc);
        }
        Nginx {
            proc,
            alpha,
            alpha_tls,
            beta,
            untrusted_tls,
            www,
        }
    }
}

/// curl through the proxy: `name` resolves to 127.0.0.1. Returns (status, body).
pub fn curl(scheme: &str, name: &str, port: u16, path: &str, extra: &[&str]) -> (u16, String) {
    let curl = program("curl", "curl");
    let url = format!("{scheme}://{name}:{port}{path}");
    let resolve = format!("{name}:{port}:127.0.0.1");
    let mut args = vec![
        "-sS",
        "--max-time",
        "15",
        "--resolve",
        &resolve,
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ];
    args.extend_from_slice(extra);
    args.push(&url);
    let o = run(&curl, &args, &[]);
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    let (body, code) = t.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// slapd with two suffixes, `dc=alpha,dc=test` and `dc=beta,dc=test`, each with an admin
/// (`cn=admin,...`, password `secret`) and one person whose `sn` names the suffix. It logs
/// its operations (`-d 256`: `conn=N op=M BIND dn="..."` and the like) to `slapd.log`.
pub struct Slapd {
    pub proc: Proc,
    pub port: u16,
}

impl Slapd {
    pub fn start(dir: &TempDir) -> Slapd {
        let slapd = program("slapd", "slapd");
        let ldapadd = program("ldapadd", "ldap-utils");
        let port = free_port();
        let d = dir.0.display();
        let mut conf = String::from(
            "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\n\
             include /etc/ldap/schema/inetorgperson.schema\nmodulepath /usr/lib/ldap\nmoduleload back_mdb\n",
        );
        conf.push_str(&format!("pidfile {d}/slapd.pid\n"));
        for s in ["alpha", "beta"] {
            fs::create_dir_all(dir.path(&format!("db-{s}"))).unwrap();
            conf.push_str(&format!(
                "database mdb\nmaxsize 10485760\nsuffix \"dc={s},dc=test\"\nrootdn \"cn=admin,dc={s},dc=test\"\nrootpw secret\ndirectory {d}/db-{s}\n"
            ));
        }
        let conf_path = dir.path("slapd.conf");
        fs::write(&conf_path, conf).unwrap();
        let url = format!("ldap://127.0.0.1:{port}/");
        let proc = spawn(
            "slapd",
            Command::new(slapd)
                .arg("-f")
                .arg(&conf_path)
                .arg("-h")
                .arg(&url)
                .arg("-d")
                .arg("256"),
            dir.path("slapd.log"),
        );
        wait_port(SocketAddr::from(([127, 0, 0, 1], port)), &proc);
        for s in ["alpha", "beta"] {
            let ldif = dir.path(&format!("{s}.ldif"));
            let up = format!("{}{}", &s[..1].to_uppercase(), &s[1..]);
            fs::write(
                &ldif,
                format!(
                    "dn: dc={s},dc=test\nobjectClass: dcObject\nobjectClass: organization\no: {up}\ndc: {s}\n\n\
                     dn: cn=person,dc={s},dc=test\nobjectClass: person\ncn: person\nsn: {up}-Person\n"
                ),
            )
            .unwrap();
            let o = run(
                &ldapadd,
                &[
                    "-x",
                    "-H",
                    &url,
                    "-D",
                    &format!("cn=admin,dc={s},dc=test"),
                    "-w",
                    "secret",
                    "-f",
                    &ldif.display().to_string(),
                ],
                &[],
            );
            assert!(o.status.success(), "ldapadd: {}", text(&o));
        }
        Slapd { proc, port }
    }
}

/// Kamailio as a SIP registrar on TCP: REGISTER is challenged (digest, realm = From domain,
/// password `secret` for any user) and then answered `200 Registered`; INVITE gets `486 Busy
/// Here`. Every request it receives is logged as `kamailio got METHOD From DOMAIN CSeq N`.
pub struct Kamailio {
    pub proc: Proc,
    pub port: u16,
}

impl Kamailio {
    pub fn start(dir: &TempDir) -> Kamailio {
        let kamailio = program("kamailio", "kamailio");
        let port = free_port();
        let mpath = [
            "/usr/lib/x86_64-linux-gnu/kamailio/modules/",
            "/usr/lib/kamailio/modules/",
        ]
        .into_iter()
        .find(|p| Path::new(p).join("auth.so").exists())
        .expect("kamailio modules (sl, pv, auth) not found: install the Debian package kamailio");
        let cfg = format!(
            "#!KAMAILIO\ndebug=2\nlog_stderror=yes\nchildren=1\ntcp_children=2\nauto_aliases=no\n\
             listen=tcp:127.0.0.1:{port}\nmpath=\"{mpath}\"\n\
             loadmodule \"sl.so\"\nloadmodule \"pv.so\"\nloadmodule \"auth.so\"\nloadmodule \"xlog.so\"\nloadmodule \"textops.so\"\n\
             request_route {{\n\
               xlog(\"L_INFO\", \"kamailio got $rm From $fd CSeq $cs\\n\");\n\
               if (is_method(\"REGISTER\")) {{\n\
                 if (!pv_www_authenticate(\"$fd\", \"secret\", \"0\")) {{ www_challenge(\"$fd\", \"0\"); exit; }}\n\
                 sl_send_reply(\"200\", \"Registered\"); exit;\n\
               }}\n\
               if (is_method(\"INVITE\")) {{ sl_send_reply(\"486\", \"Busy Here\"); exit; }}\n\
               if (is_method(\"ACK\")) {{ exit; }}\n\
               sl_send_reply(\"405\", \"Method Not Allowed\");\n\
             }}\n"
        );
        let cfg_path = dir.path("kamailio.cfg");
        fs::write(&cfg_path, cfg).unwrap();
        let proc = spawn(
            "kamailio",
            Command::new(kamailio)
                .arg("-f")
                .arg(&cfg_path)
                .arg("-DD")
                .arg("-E")
                .arg("-w")
                .arg(&dir.0)
                .arg("-Y")
                .arg(&dir.0)
                .arg("-P")
                .arg(dir.path("kamailio.pid")),
            dir.path("kamailio.log"),
        );
        wait_port(SocketAddr::from(([127, 0, 0, 1], port)), &proc);
        Kamailio { proc, port }
    }
}

/// MD5 as hex, through openssl (the test needs it for SIP digest only).
pub fn md5_hex(s: &str) -> String {
    let mut c = Command::new(program("openssl", "openssl"))
        .arg("md5")
        .arg("-r")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// A SIP request from `user@domain` over TCP, empty body.
pub fn sip_request(
    method: &str,
    domain: &str,
    user: &str,
    call_id: &str,
    cseq: u32,
    extra: &str,
) -> String {
    format!(
        "{method} sip:{domain} SIP/2.0\r\n\
         Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-{method}-{cseq}\r\n\
         Max-Forwards: 70\r\n\
         From: \"{user}\" <sip:{user}@{domain}>;tag=a1\r\n\
         To: <sip:{user}@{domain}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} {method}\r\n\
         Contact: <sip:{user}@127.0.0.1:5999;transport=tcp>\r\n\
         {extra}Content-Length: 0\r\n\r\n"
    )
}

/// Reads one SIP message (head plus Content-Length body); what arrived before EOF, an error
/// or the socket's timeout otherwise (empty when the connection was closed).
pub fn read_sip(s: &mut impl Read) -> String {
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

/// The nonce of a digest challenge.
pub fn sip_nonce(challenge: &str) -> Option<String> {
    challenge
        .split("nonce=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .map(str::to_string)
}

/// An `Authorization` header line answering `nonce` for `user` with `password` (RFC 2617
/// digest, MD5, no qop; realm = the domain, as the Kamailio helper challenges).
pub fn sip_authorization(
    method: &str,
    domain: &str,
    user: &str,
    password: &str,
    nonce: &str,
) -> String {
    let uri = format!("sip:{domain}");
    let ha1 = md5_hex(&format!("{user}:{domain}:{password}"));
    let ha2 = md5_hex(&format!("{method}:{uri}"));
    let response = md5_hex(&format!("{ha1}:{nonce}:{ha2}"));
    format!(
        "Authorization: Digest username=\"{user}\", realm=\"{domain}\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{response}\", algorithm=MD5\r\n"
    )
}

/// A plain LDAP client over one TCP connection, from a chosen loopback source address.
pub struct LdapClient {
    pub s: TcpStream,
    buf: bytes::BytesMut,
}

impl LdapClient {
    pub fn connect(port: u16) -> LdapClient {
        LdapClient::from(connect_from([127, 0, 0, 1], port))
    }

    pub fn from(s: TcpStream) -> LdapClient {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        LdapClient {
            s,
            buf: bytes::BytesMut::new(),
        }
    }

    /// Sends one message; false when the connection is gone.
    pub fn send(&mut self, m: ldap3_proto::proto::LdapMsg) -> bool {
        use tokio_util::codec::Encoder;
        let mut out = bytes::BytesMut::new();
        ldap3_proto::LdapCodec::default()
            .encode(m, &mut out)
            .unwrap();
        self.s.write_all(&out).is_ok()
    }

    /// The next message; `None` at EOF, on an error or after the read timeout.
    pub fn recv(&mut self) -> Option<ldap3_proto::proto::LdapMsg> {
        use tokio_util::codec::Decoder;
        let mut codec = ldap3_proto::LdapCodec::default();
        loop {
            if let Some(m) = codec.decode(&mut self.buf).expect("LDAP from the proxy") {
                return Some(m);
            }
            let mut b = [0u8; 4096];
            match self.s.read(&mut b) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
            }
        }
    }

    pub fn bind_request(id: i32, dn: &str, password: &str) -> ldap3_proto::proto::LdapMsg {
        use ldap3_proto::proto::{LdapBindCred, LdapBindRequest, LdapOp};
        ldap3_proto::proto::LdapMsg::new(
            id,
            LdapOp::BindRequest(LdapBindRequest {
                dn: dn.into(),
                cred: LdapBindCred::Simple(password.into()),
            }),
        )
    }

    /// A simple bind: its result code and message, `None` when no answer came.
    pub fn bind(
        &mut self,
        id: i32,
        dn: &str,
        password: &str,
    ) -> Option<(ldap3_proto::proto::LdapResultCode, String)> {
        if !self.send(LdapClient::bind_request(id, dn, password)) {
            return None;
        }
        match self.recv()? {
            ldap3_proto::proto::LdapMsg {
                msgid,
                op: ldap3_proto::proto::LdapOp::BindResponse(r),
                ..
            } if msgid == id => Some((r.res.code, r.res.message)),
            other => panic!("not the answer to bind {id}: {other:?}"),
        }
    }
}
