//! Real peers for the reverse proxy, started as the test's own processes on free loopback
//! ports with their configuration in a temporary directory of their own: nginx, slapd and
//! Kamailio; and a private CA for certificates. A missing program fails the test with the
//! package to install; nothing is skipped.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::dirs::TempDir;
use crate::ports::free_port;
use crate::process::{require, run, wait_port, Proc};

/// A private CA and certificates it signs, written as PEM files.
pub struct Pki {
    pub ca_path: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path, name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        let ca_key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let ca = p.self_signed(&ca_key).unwrap_or_else(|e| panic!("{e}"));
        let ca_path = dir.join(format!("{name}-ca.pem"));
        fs::write(&ca_path, ca.pem()).unwrap_or_else(|e| panic!("{}: {e}", ca_path.display()));
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
        let mut p = CertificateParams::new(names.clone()).unwrap_or_else(|e| panic!("{e}"));
        p.distinguished_name
            .push(DnType::CommonName, names[0].clone());
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = p
            .signed_by(&key, &self.ca, &self.ca_key)
            .unwrap_or_else(|e| panic!("{e}"));
        let c = self.dir.join(format!("{file}.crt"));
        let k = self.dir.join(format!("{file}.key"));
        write(&c, &cert.pem());
        write(&k, &key.serialize_pem());
        (c, k)
    }
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// `Authorization` with a wrong password for [`Nginx`]'s `/private` (`alice:wrong`).
pub const WRONG_LOGIN: &str = "Authorization: Basic YWxpY2U6d3Jvbmc=";
/// `Authorization` with the right password for [`Nginx`]'s `/private` (`alice:secret`).
pub const RIGHT_LOGIN: &str = "Authorization: Basic YWxpY2U6c2VjcmV0";

/// nginx with virtual hosts that say who they are and echo the forwarding headers, each
/// with the same locations: `/` answers 200 with `WHO PORT METHOD URI xff=[..] proto=[..]`,
/// `/deny` 401 whatever the request carries, `/files/` takes PUT (WebDAV), `/private` is HTTP
/// Basic (`alice`/`secret`): 401 without or with wrong credentials, 200 with the right ones.
pub struct Nginx {
    pub proc: Proc,
    /// alpha.test, plain.
    pub alpha: u16,
    /// alpha.test over TLS with a certificate from [`Nginx::pki`] for `alpha.internal`.
    pub alpha_tls: u16,
    /// beta.test, plain.
    pub beta: u16,
    /// A TLS server whose self-signed certificate no one trusts.
    pub untrusted_tls: u16,
    /// The root of `/files/`.
    pub www: PathBuf,
    /// The CA of alpha's certificate ("test").
    pub pki: Pki,
    /// Its configuration, logs (`nginx-error.log`) and files.
    pub dir: TempDir,
}

impl Nginx {
    pub fn start(tag: &str) -> Nginx {
        let nginx = require("nginx", "nginx");
        let dir = TempDir::new(&format!("nginx-{tag}"));
        let pki = Pki::new(dir.path(), "test");
        let (alpha, alpha_tls, beta, untrusted_tls) =
            (free_port(), free_port(), free_port(), free_port());
        let (ac, ak) = pki.leaf("alpha-internal", &["alpha.internal", "127.0.0.1"]);
        let rogue = Pki::new(dir.path(), "rogue");
        let (uc, uk) = rogue.leaf("untrusted", &["alpha.internal", "127.0.0.1"]);
        let www = dir.join("www");
        fs::create_dir_all(www.join("files")).unwrap_or_else(|e| panic!("{e}"));
        let d = dir.path().display();
        write(&dir.join("htpasswd"), "alice:{PLAIN}secret\n");
        // A file, not `return`: nginx answers `return` before access checks run.
        write(&dir.join("private.txt"), "private\n");
        let echo = "$server_port $request_method $request_uri xff=[$http_x_forwarded_for] proto=[$http_x_forwarded_proto]";
        let locations = |who: &str| {
            format!(
                "location / {{ return 200 \"{who} {echo}\\n\"; }}\n\
                 location /deny {{ return 401 \"denied\\n\"; }}\n\
                 location /files/ {{ root {}; dav_methods PUT; create_full_put_path on; }}\n\
                 location = /private {{ auth_basic \"portico-test\"; auth_basic_user_file {d}/htpasswd; alias {d}/private.txt; }}\n",
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
        let conf_path = dir.join("nginx.conf");
        write(&conf_path, &conf);
        let proc = Proc::spawn(
            "nginx",
            Command::new(nginx)
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.join("nginx-error.log"))
                .arg("-c")
                .arg(&conf_path),
            &dir.join("nginx.log"),
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
            pki,
            dir,
        }
    }
}

/// slapd with two suffixes, `dc=alpha,dc=test` and `dc=beta,dc=test`, each with an admin
/// (`cn=admin,...`, password `secret`) and one person whose `sn` names the suffix. It logs
/// its operations (`-d 256`: `conn=N op=M BIND dn="..."` and the like) to `slapd.log`.
pub struct Slapd {
    pub proc: Proc,
    pub port: u16,
    pub dir: TempDir,
}

impl Slapd {
    pub fn start(tag: &str) -> Slapd {
        let slapd = require("slapd", "slapd");
        let ldapadd = require("ldapadd", "ldap-utils");
        let dir = TempDir::new(&format!("slapd-{tag}"));
        let port = free_port();
        let d = dir.path().display();
        let mut conf = String::from(
            "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\n\
             include /etc/ldap/schema/inetorgperson.schema\nmodulepath /usr/lib/ldap\nmoduleload back_mdb\n",
        );
        conf.push_str(&format!("pidfile {d}/slapd.pid\n"));
        for s in ["alpha", "beta"] {
            fs::create_dir_all(dir.join(format!("db-{s}"))).unwrap_or_else(|e| panic!("{e}"));
            conf.push_str(&format!(
                "database mdb\nmaxsize 10485760\nsuffix \"dc={s},dc=test\"\nrootdn \"cn=admin,dc={s},dc=test\"\nrootpw secret\ndirectory {d}/db-{s}\n"
            ));
        }
        let conf_path = dir.join("slapd.conf");
        write(&conf_path, &conf);
        let url = format!("ldap://127.0.0.1:{port}/");
        let proc = Proc::spawn(
            "slapd",
            Command::new(slapd)
                .arg("-f")
                .arg(&conf_path)
                .arg("-h")
                .arg(&url)
                .arg("-d")
                .arg("256"),
            &dir.join("slapd.log"),
        );
        wait_port(SocketAddr::from(([127, 0, 0, 1], port)), &proc);
        for s in ["alpha", "beta"] {
            let ldif = dir.join(format!("{s}.ldif"));
            let up = format!("{}{}", &s[..1].to_uppercase(), &s[1..]);
            write(
                &ldif,
                &format!(
                    "dn: dc={s},dc=test\nobjectClass: dcObject\nobjectClass: organization\no: {up}\ndc: {s}\n\n\
                     dn: cn=person,dc={s},dc=test\nobjectClass: person\ncn: person\nsn: {up}-Person\n"
                ),
            );
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
                std::time::Duration::from_secs(30),
            );
            assert!(o.success(), "ldapadd: {}", o.text);
        }
        Slapd { proc, port, dir }
    }
}

/// Kamailio as a SIP registrar on TCP: REGISTER is challenged (digest, realm = From domain,
/// password `secret` for any user) and then answered `200 Registered`; INVITE gets `486 Busy
/// Here`. Every request it receives is logged as `kamailio got METHOD From DOMAIN CSeq N`.
pub struct Kamailio {
    pub proc: Proc,
    pub port: u16,
    pub dir: TempDir,
}

impl Kamailio {
    pub fn start(tag: &str) -> Kamailio {
        let kamailio = require("kamailio", "kamailio");
        let dir = TempDir::new(&format!("kamailio-{tag}"));
        let port = free_port();
        let mpath = [
            "/usr/lib/x86_64-linux-gnu/kamailio/modules/",
            "/usr/lib/kamailio/modules/",
        ]
        .into_iter()
        .find(|p| Path::new(p).join("auth.so").exists())
        .unwrap_or_else(|| {
            panic!("kamailio modules (sl, pv, auth) not found: install the Debian package kamailio")
        });
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
        let cfg_path = dir.join("kamailio.cfg");
        write(&cfg_path, &cfg);
        let proc = Proc::spawn(
            "kamailio",
            Command::new(kamailio)
                .arg("-f")
                .arg(&cfg_path)
                .arg("-DD")
                .arg("-E")
                .arg("-w")
                .arg(dir.path())
                .arg("-Y")
                .arg(dir.path())
                .arg("-P")
                .arg(dir.join("kamailio.pid")),
            &dir.join("kamailio.log"),
        );
        wait_port(SocketAddr::from(([127, 0, 0, 1], port)), &proc);
        Kamailio { proc, port, dir }
    }
}
