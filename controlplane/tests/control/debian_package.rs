//! The Debian package (scripts/package.sh) built from the debug binaries, installed into this
//! system with dpkg, run, upgraded keeping a changed conffile, and purged.
//!
//! It changes the system (a package, a user, /etc/portico, /var/lib/portico), so it runs only
//! as root (CI runs as root on a throwaway machine; elsewhere it says it was skipped), holds a
//! lock so two runs cannot collide, refuses to touch a `portico` package it did not install,
//! and purges at the end, also when it fails. Where systemd is PID 1 the service is started
//! and stopped through systemctl; elsewhere `systemd-analyze verify` checks the unit and the
//! binary is started with the packaged configuration as the `portico` user (setpriv), the way
//! the unit would, then stopped: nothing is left running.

use std::fs;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use portico_testkit::http::http;
use portico_testkit::portico::portico_bin;
use portico_testkit::process::signal;
use portico_testkit::{wait_until, LOCAL4};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const CONF: &str = "/etc/portico/portico.toml";
/// The API address of the packaged configuration (portico.example.toml).
const API: SocketAddr = SocketAddr::new(LOCAL4, 8088);
/// Versions this test installs; a leftover of a killed run is recognised by them.
const V1: &str = "0.0.1~pkgtest1";
const V2: &str = "0.0.1~pkgtest2";

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: cannot start: {e}"));
    out
}

#[track_caller]
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn installed_version() -> Option<String> {
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${Status} ${Version}", "portico"]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && text.starts_with("install ok installed"))
        .then(|| text.rsplit(' ').next().unwrap_or_default().to_string())
}

fn user_exists(name: &str) -> bool {
    run(Command::new("getent").args(["passwd", name]))
        .status
        .success()
}

/// The status of `GET path` on the packaged API; `None` when nothing answers.
fn get_status(path: &str) -> Option<u16> {
    http(API, "GET", path, &[], b"").ok().map(|r| r.status)
}

/// The status of an authenticated JSON `PATCH path`; `None` when nothing answers.
fn patch(path: &str, token: &str, body: &str) -> Option<u16> {
    let headers = [
        ("Authorization".to_string(), format!("Bearer {token}")),
        ("Content-Type".to_string(), "application/json".to_string()),
    ];
    http(API, "PATCH", path, &headers, body.as_bytes())
        .ok()
        .map(|r| r.status)
}

/// Processes whose executable is the packaged binary.
fn packaged_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let exe = exe.to_string_lossy();
        if exe.starts_with("/usr/bin/portico") {
            pids.push(pid);
        }
    }
    pids
}

/// Purges the package (and kills the packaged binary by pid) when the test ends, also when
/// it fails; holds the lock while it lives.
struct Installed {
    _lock: fs::File,
    child: Option<Child>,
}

impl Installed {
    fn cleanup(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if run(Command::new("systemctl").args(["is-system-running"]))
            .status
            .code()
            .is_some()
            && Path::new("/run/systemd/system").exists()
        {
            let _ = run(Command::new("systemctl").args(["stop", "portico.service"]));
        }
        for pid in packaged_pids() {
            signal(pid, Signal::SIGKILL);
        }
        if installed_version().is_some_and(|v| v == V1 || v == V2) {
            let _ = run(Command::new("dpkg").args(["--purge", "portico"]));
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn lock() -> fs::File {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/lock/portico-package-test.lock")
        .or_else(|_| {
            fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(std::env::temp_dir().join("portico-package-test.lock"))
        })
        .unwrap_or_else(|e| panic!("lock file: {e}"));
    // SAFETY: flock(2) on a descriptor we own; it is released when the file closes.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock: {}", std::io::Error::last_os_error());
    f
}

fn build(dir: &Path, version: &str, config: Option<&Path>) -> PathBuf {
    let portico = portico_bin();
    let bin_dir = portico
        .parent()
        .unwrap_or_else(|| panic!("{} has no directory", portico.display()));
    assert!(
        bin_dir.join("portico-dataplane").is_file(),
        "{}/portico-dataplane is missing: run `cargo build --workspace` first",
        bin_dir.display()
    );
    let mut cmd = Command::new(Path::new(ROOT).join("scripts/package.sh"));
    cmd.arg("--bin-dir")
        .arg(bin_dir)
        .args(["--version", version, "--compress", "none", "--out"])
        .arg(dir);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = ok(&mut cmd);
    let deb = PathBuf::from(out.lines().last().unwrap_or_default());
    assert!(deb.is_file(), "package.sh printed {out:?}");
    deb
}

fn owner(path: &str) -> String {
    let uid = fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .uid();
    ok(Command::new("getent").args(["passwd", &uid.to_string()]))
        .split(':')
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_package_installs_runs_upgrades_keeping_a_changed_conffile_and_purges() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the Debian package test installs into the system and needs root");
        return;
    }
    let mut guard = Installed {
        _lock: lock(),
        child: None,
    };
    match installed_version() {
        None => {}
        Some(v) if v == V1 || v == V2 => guard.cleanup(),
        Some(v) => {
            panic!("a portico package {v} not installed by this test is present; not touching it")
        }
    }
    assert!(
        !user_exists("portico"),
        "a `portico` user exists without the package; not touching it"
    );
    let dir = std::env::temp_dir().join(format!("portico-it-deb-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));

    // Install.
    let deb1 = build(&dir, V1, None);
    ok(Command::new("dpkg").arg("-i").arg(&deb1));
    assert_eq!(installed_version().as_deref(), Some(V1));
    for f in [
        "/usr/bin/portico",
        "/usr/bin/portico-dataplane",
        "/lib/systemd/system/portico.service",
        "/usr/share/portico/grafana/portico-dashboard.json",
        CONF,
    ] {
        assert!(Path::new(f).is_file(), "{f} not installed");
    }
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "portico"]));
    assert!(conffiles.contains(CONF), "conffiles: {conffiles}");
    let pw = ok(Command::new("getent").args(["passwd", "portico"]));
    let fields: Vec<&str> = pw.trim().split(':').collect();
    let uid: u32 = fields[2].parse().unwrap_or(u32::MAX);
    assert!(uid < 1000, "portico is not a system user: {pw}");
    assert_eq!(fields[5], "/var/lib/portico", "{pw}");
    assert!(fields[6].ends_with("nologin"), "{pw}");
    assert_eq!(owner("/var/lib/portico"), "portico");
    assert_eq!(owner("/etc/portico"), "portico");
    let shipped = fs::read_to_string(CONF).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        shipped.contains("state_dir = \"/var/lib/portico\""),
        "{shipped}"
    );
    assert!(
        !shipped.contains("\n  { name = \"alice\""),
        "the example user is shipped"
    );
    ok(Command::new("/usr/bin/portico").args(["check", CONF]));

    // The unit.
    let verify = run(
        Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/portico.service"])
    );
    let verify_text = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success() && !verify_text.contains("portico.service:"),
        "systemd-analyze verify: {verify_text}"
    );
    let unit = fs::read_to_string("/lib/systemd/system/portico.service").unwrap_or_default();
    for line in [
        "User=portico",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/portico /etc/portico",
        "PrivateTmp=true",
        "NoNewPrivileges=true",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    // The checker can fail: a unit with a relative ExecStart is refused.
    let bad = dir.join("bad.service");
    fs::write(
        &bad,
        unit.replace("ExecStart=/usr/bin/portico", "ExecStart=portico-nowhere/x"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&bad));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("bad.service:"),
        "systemd-analyze verify accepted a bad unit: {out:?}"
    );

    // Start it: through systemd where it runs, else as the unit would (user portico).
    let systemd = Path::new("/run/systemd/system").exists();
    if systemd {
        ok(Command::new("systemctl").args(["restart", "portico.service"]));
    } else {
        let log = fs::File::create(dir.join("portico.log")).unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new("setpriv")
            .args(["--reuid=portico", "--regid=portico", "--clear-groups", "--"])
            .args(["/usr/bin/portico", "run", "--config", CONF])
            .current_dir("/")
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env_remove("PORTICO_DATAPLANE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("{e}")))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("setpriv: {e}"));
        guard.child = Some(child);
    }
    let log = || fs::read_to_string(dir.join("portico.log")).unwrap_or_default();
    let up = wait_until(Duration::from_secs(30), || {
        get_status("/healthz") == Some(200)
    });
    assert!(
        up,
        "the packaged portico did not answer /healthz on {API}; log:\n{}",
        log()
    );
    let token_path = "/var/lib/portico/admin.token";
    assert_eq!(owner(token_path), "portico");
    let token = fs::read_to_string(token_path)
        .unwrap_or_default()
        .trim()
        .to_string();
    // Its dataplane runs as portico too.
    let pids = packaged_pids();
    assert!(pids.len() >= 2, "portico and its dataplane: {pids:?}");
    for pid in &pids {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let uid_line = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .unwrap_or_default();
        assert!(
            uid_line.split_whitespace().nth(1) == Some(&uid.to_string()),
            "{pid}: {uid_line}"
        );
    }
    // An API change is written into /etc/portico by the portico user, comments kept.
    assert_eq!(
        patch(
            "/api/v1/config",
            &token,
            r#"{"turn": {"realm": "packaged.example.com"}}"#
        ),
        Some(200),
        "log:\n{}",
        log()
    );
    let edited = fs::read_to_string(CONF).unwrap_or_default();
    assert!(
        edited.contains("realm = \"packaged.example.com\""),
        "{edited}"
    );
    assert!(
        edited.contains("# Realm of the long-term credentials"),
        "{edited}"
    );
    // Stop: nothing stays running.
    if systemd {
        ok(Command::new("systemctl").args(["stop", "portico.service"]));
    } else if let Some(mut c) = guard.child.take() {
        signal(c.id(), Signal::SIGTERM);
        let exited = wait_until(Duration::from_secs(20), || {
            matches!(c.try_wait(), Ok(Some(_)))
        });
        assert!(exited, "portico did not stop on SIGTERM; log:\n{}", log());
    }
    assert!(
        wait_until(Duration::from_secs(10), || packaged_pids().is_empty()),
        "packaged processes left running: {:?}",
        packaged_pids()
    );

    // The operator edits the conffile; the next version ships a different one.
    let mine = format!("{edited}\n# operator: edge box 7, do not touch\n");
    fs::write(CONF, &mine).unwrap_or_else(|e| panic!("{e}"));
    let new_conf = dir.join("portico-v2.toml");
    fs::write(&new_conf, format!("{shipped}\n# shipped with {V2}\n"))
        .unwrap_or_else(|e| panic!("{e}"));
    let deb2 = build(&dir, V2, Some(&new_conf));
    ok(Command::new("dpkg")
        .args(["-i", "--force-confold"])
        .arg(&deb2)
        .stdin(Stdio::null()));
    assert_eq!(installed_version().as_deref(), Some(V2));
    assert_eq!(
        fs::read_to_string(CONF).unwrap_or_default(),
        mine,
        "the upgrade replaced the operator's configuration"
    );
    let dist = fs::read_to_string(format!("{CONF}.dpkg-dist")).unwrap_or_default();
    assert!(
        dist.contains(&format!("# shipped with {V2}")),
        "{CONF}.dpkg-dist: {dist:?}"
    );
    assert_eq!(owner(CONF), "portico");
    assert_eq!(
        fs::read_to_string(token_path).unwrap_or_default().trim(),
        token,
        "the upgrade lost the state"
    );
    assert!(user_exists("portico"));

    // Purge: nothing of it is left.
    ok(Command::new("dpkg").args(["--purge", "portico"]));
    assert_eq!(installed_version(), None);
    for p in [
        "/usr/bin/portico",
        "/usr/bin/portico-dataplane",
        "/lib/systemd/system/portico.service",
        "/etc/portico",
        "/var/lib/portico",
        "/etc/systemd/system/multi-user.target.wants/portico.service",
    ] {
        assert!(!Path::new(p).exists(), "{p} survived the purge");
    }
    assert!(
        !user_exists("portico"),
        "the portico user survived the purge"
    );
    assert!(
        !run(Command::new("getent").args(["group", "portico"]))
            .status
            .success(),
        "the portico group survived the purge"
    );
    let _ = fs::remove_dir_all(&dir);
}
