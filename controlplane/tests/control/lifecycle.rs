//! Process life of `portico`: clean stops on SIGTERM and SIGINT (dataplane gone, shared
//! memory removed, exit status 0), configuration errors that name the key, `portico check`,
//! SIGHUP reloads without a restart, and the supervisor restarting a dead dataplane.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use portico_shared::shm::SharedMemory;
use portico_testkit::net::{expect_silence, recv_within, udp_client};
use portico_testkit::portico::run_portico;
use portico_testkit::process::{alive as pid_alive, signal};
use portico_testkit::stun::Builder;
use portico_testkit::{Portico, Spec};

fn shm_exists(name: &str) -> bool {
    Path::new("/dev/shm")
        .join(name.trim_start_matches('/'))
        .exists()
        || SharedMemory::attach(name).is_ok()
}

fn stops_cleanly_on(sig: Signal) {
    let mut p = Portico::start("stop", Spec::new().ipv6().workers(2));
    let portico = p.pid();
    let dataplane = p.dataplane_pid();
    assert_ne!(dataplane, 0, "dataplane pid published in shared memory");
    assert_ne!(dataplane, portico, "the dataplane is its own process");
    assert!(pid_alive(dataplane));
    assert!(shm_exists(&p.shm_name));
    let status = p.stop_with(sig);
    assert!(
        status.success(),
        "portico exited with {status} on {sig}; log:\n{}",
        p.log()
    );
    // portico waits for its dataplane before it exits, so it must already be gone.
    assert!(
        !pid_alive(dataplane),
        "dataplane {dataplane} still runs after portico exited on {sig}"
    );
    assert!(
        !shm_exists(&p.shm_name),
        "shared memory {} still exists after {sig}",
        p.shm_name
    );
    // And nothing answers on the port any more.
    let s = udp_client(p.udp4());
    s.send_to(&Builder::binding().build(), p.udp4()).unwrap();
    expect_silence(&s, Duration::from_millis(300), "after the stop");
}

#[test]
fn sigterm_stops_portico_and_its_dataplane() {
    stops_cleanly_on(Signal::SIGTERM);
}

#[test]
fn sigint_stops_portico_and_its_dataplane() {
    stops_cleanly_on(Signal::SIGINT);
}

/// A valid configuration with the given text added, on free ports, in a temp dir.
fn config_with(tag: &str, extra_top: &str, extra_turn: &str) -> (Portico, String) {
    let site = Portico::new(tag, Spec::new().ipv6().turn(extra_turn));
    let text = format!("{extra_top}{}", site.render());
    (site, text)
}

fn run_config(site: &Portico, text: &str) -> (bool, String) {
    site.write_config(text);
    let out = run_portico(
        &[
            OsStr::new("run"),
            OsStr::new("--config"),
            site.config_path.as_os_str(),
        ],
        &site.dir,
        Duration::from_secs(10),
    );
    let stderr =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), stderr)
}

fn check_config(site: &Portico, text: &str) -> (bool, String) {
    site.write_config(text);
    let out = run_portico(
        &[OsStr::new("check"), site.config_path.as_os_str()],
        &site.dir,
        Duration::from_secs(10),
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let (site, text) = config_with("unknown-key", "", "listen_on = [\"127.0.0.1:9\"]\n");
    let (ok, msg) = run_config(&site, &text);
    assert!(!ok, "portico run accepted an unknown key:\n{msg}");
    assert!(
        msg.contains("listen_on"),
        "message does not name the key: {msg}"
    );
    assert!(!shm_exists(&site.shm_name), "nothing may be started");
    let (ok, msg) = check_config(&site, &text);
    assert!(!ok, "portico check accepted an unknown key");
    assert!(msg.contains("listen_on"), "{msg}");
    drop(site);

    let (site, text) = config_with("unknown-top", "bogus_setting = 1\n", "");
    let (ok, msg) = run_config(&site, &text);
    assert!(!ok);
    assert!(msg.contains("bogus_setting"), "{msg}");
    drop(site);
}

#[test]
fn a_bad_relay_port_range_is_refused_naming_the_key() {
    let (site, text) = config_with("relay-ports", "", "relay_ports = \"70000-80000\"\n");
    let (ok, msg) = run_config(&site, &text);
    assert!(!ok, "portico run accepted relay_ports 70000-80000:\n{msg}");
    assert!(
        msg.contains("turn.relay_ports"),
        "message does not name turn.relay_ports: {msg}"
    );
    assert!(
        msg.contains("70000-80000"),
        "message does not show the value: {msg}"
    );
    let (ok, msg) = check_config(&site, &text);
    assert!(!ok);
    assert!(msg.contains("turn.relay_ports"), "{msg}");
    drop(site);
}

#[test]
fn check_accepts_a_valid_file_without_starting_anything() {
    let (site, text) = config_with("check-ok", "", "");
    let (ok, msg) = check_config(&site, &text);
    assert!(ok, "portico check refused a valid file: {msg}");
    assert!(msg.contains("ok"), "{msg}");
    assert!(
        !shm_exists(&site.shm_name),
        "check must not start the server"
    );
    // RFC 5780 needs both halves of the alternate address.
    let half = text.replace("[stun]\n", "[stun]\nalternate_port = 40000\n");
    let (ok, msg) = check_config(&site, &half);
    assert!(!ok, "alternate_port without alternate_ip was accepted");
    assert!(msg.contains("stun.alternate"), "{msg}");
    // A missing file is an error naming the file.
    let missing = site.dir.join("nope.toml");
    let out = run_portico(
        &[OsStr::new("check"), missing.as_os_str()],
        &site.dir,
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml"));
    drop(site);
}

/// SIGHUP re-reads the file: a new SOFTWARE shows in later answers, with the same
/// dataplane process (no restart, so no packet lost).
#[test]
fn sighup_applies_an_edited_file_without_restart() {
    let mut p = Portico::start("sighup", Spec::new().ipv6().software("before-reload"));
    let dataplane = p.dataplane_pid();
    assert_eq!(p.software_now().as_deref(), Some("before-reload"));

    p.rewrite_config(p.spec.clone().software("after-reload"));
    p.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sw = p.software_now();
        if sw.as_deref() == Some("after-reload") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SOFTWARE still {sw:?} 10 s after SIGHUP; log:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(p.dataplane_pid(), dataplane, "the dataplane was restarted");
    assert!(pid_alive(dataplane));

    // Hiding it works the same way.
    p.rewrite_config(p.spec.clone().software(""));
    p.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.software_now().is_some() {
        assert!(
            Instant::now() < deadline,
            "SOFTWARE not hidden after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A broken file is refused and the running configuration stays.
    p.rewrite_config(p.spec.clone().software("never-applied"));
    let broken = fs::read_to_string(&p.config_path).unwrap() + "\nnot_a_key = 1\n";
    fs::write(&p.config_path, broken).unwrap();
    p.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(p.software_now(), None, "a broken file must not be applied");
    assert_eq!(p.dataplane_pid(), dataplane);
    assert!(pid_alive(p.pid()), "portico died on a broken file");
    assert!(
        p.log().contains("not_a_key"),
        "the refusal is logged with the key"
    );
}

/// The dataplane dying is not the end: portico starts a new one, which answers again.
#[test]
fn a_killed_dataplane_is_restarted() {
    let p = Portico::start("dataplane-restart", Spec::new().ipv6());
    let first = p.dataplane_pid();
    signal(first, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = p.dataplane_pid();
        if now != 0 && now != first && pid_alive(now) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new dataplane 15 s after killing {first}; log:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = udp_client(p.udp4());
        s.send_to(&Builder::binding().build(), p.udp4()).unwrap();
        if recv_within(&s, Duration::from_millis(300)).is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted dataplane does not answer"
        );
    }
    assert!(pid_alive(p.pid()));
}
