//! Values that used to be accepted and then silently broke a running Portico are refused,
//! naming the key, at every door: `portico check`, `portico run`, `SIGHUP` and the API.
//!
//! * `log_level = "verbose"` or `"nonsense=,,"`: `tracing` reads a bare word as a target, so
//!   the control plane logged nothing at all.
//! * a missing `proxy.tls.cert`, or a `proxy.tls.key` of another certificate: every TLS
//!   listener was left without a certificate.
//! * a missing or unusable `proxy.tls.client_ca_file`: only an error log when the proxy
//!   applied the configuration.
//!
//! And the generated default certificate never replaces an operator's file in the state dir.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use portico_testkit::portico::run_portico;
use portico_testkit::{free_port, wait_until, Portico};

use crate::site;

/// A self-signed pair written as `<tag>.crt` / `<tag>.key` in `dir`.
fn pair(dir: &Path, tag: &str) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec![format!("{tag}.test")]).unwrap();
    let c = dir.join(format!("{tag}.crt"));
    let k = dir.join(format!("{tag}.key"));
    fs::write(&c, ck.cert.pem()).unwrap();
    fs::write(&k, ck.key_pair.serialize_pem()).unwrap();
    (c, k)
}

fn tls_section(https: u16, cert: &Path, key: &Path) -> String {
    format!(
        "\n[proxy.listen]\nhttps = \"127.0.0.1:{https}\"\n\n[proxy.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

/// `portico check FILE`: (exit success, stderr).
fn check(file: &Path) -> (bool, String) {
    let cwd = file.parent().unwrap_or(Path::new("/"));
    let out = run_portico(
        &[OsStr::new("check"), file.as_os_str()],
        cwd,
        Duration::from_secs(10),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The bad values, each with the key its refusal must name.
fn bad_cases(site: &Portico, https: u16) -> Vec<(String, &'static str)> {
    let (c1, k1) = pair(&site.dir, "one");
    let (_, k2) = pair(&site.dir, "two");
    let base = site.config_text("");
    vec![
        (format!("log_level = \"verbose\"\n{base}"), "log_level: "),
        (
            format!("log_level = \"nonsense=,,\"\n{base}"),
            "log_level: ",
        ),
        (format!("log_level = \"info,\"\n{base}"), "log_level: "),
        (
            format!(
                "{base}{}",
                tls_section(https, &site.dir.join("missing.crt"), &k1)
            ),
            "proxy.tls.cert: ",
        ),
        (
            format!("{base}{}", tls_section(https, &c1, &k2)),
            "proxy.tls.key: ",
        ),
        (
            format!(
                "{base}{}client_ca_file = \"{}\"\n",
                tls_section(https, &c1, &k1),
                site.dir.join("missing-ca.pem").display()
            ),
            "proxy.tls.client_ca_file: ",
        ),
        // A key is no CA certificate.
        (
            format!(
                "{base}{}client_ca_file = \"{}\"\n",
                tls_section(https, &c1, &k1),
                k1.display()
            ),
            "proxy.tls.client_ca_file: ",
        ),
    ]
}

#[test]
fn check_and_run_refuse_bad_log_level_and_tls_files() {
    let site = site("cfg-check", "");
    let https = free_port();
    let (c1, k1) = pair(&site.dir, "good");
    let good = format!("{}{}", site.config_text(""), tls_section(https, &c1, &k1));
    let file = site.dir.join("candidate.toml");
    fs::write(&file, &good).unwrap();
    let (ok, err) = check(&file);
    assert!(ok, "a good file is refused: {err}");

    for (text, key) in bad_cases(&site, https) {
        fs::write(&file, &text).unwrap();
        let (ok, err) = check(&file);
        assert!(!ok, "portico check accepted:\n{text}");
        assert!(
            err.contains(&format!("{}: {key}", file.display())),
            "{key}: {err}"
        );
        // `portico run` refuses to start on it, with the same message.
        fs::write(&site.log_path, "").unwrap();
        let mut p = site.spawn_with(&file);
        let status = wait_until(Duration::from_secs(10), || {
            matches!(p.child.try_wait(), Ok(Some(_)))
        });
        assert!(status, "portico run started on:\n{text}");
        assert!(!p.child.wait().unwrap().success());
        assert!(site.log().contains(key), "{key}: {}", site.log());
        assert!(site.dataplane_pids().is_empty(), "a dataplane was started");
    }
}

#[test]
fn sighup_and_api_refuse_bad_log_level_and_tls_files() {
    let site = site("cfg-reload", "");
    let cp = site.launch();
    let g0 = site.config_generation();
    let https = free_port();
    let good = fs::read(&site.config_path).unwrap();

    for (i, (text, key)) in bad_cases(&site, https).into_iter().enumerate() {
        fs::write(&site.config_path, &text).unwrap();
        cp.signal(Signal::SIGHUP);
        assert!(
            wait_until(Duration::from_secs(5), || site
                .log()
                .matches("configuration not reloaded")
                .count()
                == i + 1),
            "SIGHUP accepted:\n{text}\nlog:\n{}",
            site.log()
        );
        assert!(site.log().contains(key), "{key}: {}", site.log());
        assert_eq!(site.config_generation(), g0, "a refused file was published");

        // The same document through the API: 400 naming the key, nothing written.
        fs::write(&site.config_path, &good).unwrap();
        let r = site.put_config_toml(&text);
        assert_eq!(r.status, 400, "PUT accepted:\n{text}\n{}", r.text());
        let e = r.json()["error"].as_str().unwrap().to_string();
        assert!(e.starts_with(key), "{key}: {e}");
        assert_eq!(fs::read(&site.config_path).unwrap(), good, "file changed");
    }
    let r = site.json(
        "PATCH",
        "/api/v1/config",
        r#"{"log_level": "verbose"}"#,
        400,
    );
    assert!(
        r["error"].as_str().unwrap().starts_with("log_level: "),
        "{r}"
    );
    assert_eq!(site.config_generation(), g0);
    // A good value is still taken.
    site.json(
        "PATCH",
        "/api/v1/config",
        r#"{"log_level": "info,portico=debug"}"#,
        200,
    );
}

/// An operator keeps the key in the state dir as `key.pem`, the certificate elsewhere, and
/// names both in `[proxy.tls]`. Starting Portico must leave the key alone (it used to write a
/// generated key over it) and serve TLS with the operator's pair.
#[test]
fn the_generated_certificate_never_replaces_an_operators_key() {
    let site = site("cfg-keep-key", "");
    let https = free_port();
    let (cert, key) = pair(&site.dir, "operator");
    let kept = site.state_dir.join("key.pem");
    fs::copy(&key, &kept).unwrap();
    let before = fs::read(&kept).unwrap();
    let text = format!(
        "{}{}",
        site.config_text(""),
        tls_section(https, &cert, &kept)
    );
    fs::write(&site.config_path, text).unwrap();
    let _cp = site.launch();
    assert_eq!(
        fs::read(&kept).unwrap(),
        before,
        "state_dir/key.pem replaced"
    );
    assert!(
        !site.state_dir.join("cert.pem").exists(),
        "half a generated pair was written beside the operator's key"
    );
    // The listener serves the operator's certificate.
    assert!(wait_until(Duration::from_secs(10), || site
        .log()
        .contains("proxy certificate loaded")));
    let out = Command::new("timeout")
        .args(["10", "openssl", "s_client", "-connect"])
        .arg(format!("127.0.0.1:{https}"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl (Debian package openssl) is needed");
    let served = String::from_utf8_lossy(&out.stdout);
    let pem_body = |t: &str| -> String {
        let start = t.find("-----BEGIN CERTIFICATE-----").unwrap_or(0);
        let end = t[start..]
            .find("-----END CERTIFICATE-----")
            .map(|e| start + e)
            .unwrap_or(start);
        t[start..end].split_whitespace().collect()
    };
    let want = pem_body(&fs::read_to_string(&cert).unwrap());
    assert!(want.len() > 100);
    assert_eq!(pem_body(&served), want, "served:\n{served}");
}
