//! The dataplane outlives the control plane, and the control plane restarts a dataplane that
//! died: tested with STUN Binding traffic flowing, counting every request answered.

use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use portico_testkit::net::{binding, bindings};
use portico_testkit::portico::portico_bin;
use portico_testkit::process::{alive, signal};
use portico_testkit::{free_port, wait_until};

use crate::site;

/// Binding requests in lockstep from a background thread until stopped: each is sent only
/// after the previous one was answered or given up on (2 s), so "lost" means exactly that.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<Vec<u64>>>,
}

impl Traffic {
    fn start(server: std::net::SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let (s, a, st) = (Arc::clone(&sent), Arc::clone(&answered), Arc::clone(&stop));
        let handle = thread::spawn(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut lost = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut n = 0u64;
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                s.fetch_add(1, Ordering::Relaxed);
                if binding(&sock, server, Duration::from_secs(2)).is_some() {
                    a.fetch_add(1, Ordering::Relaxed);
                } else {
                    lost.push(n);
                }
                n += 1;
                thread::sleep(Duration::from_millis(1));
            }
            lost
        });
        Traffic {
            stop,
            sent,
            answered,
            handle: Some(handle),
        }
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Stops and returns (sent, answered, the numbers of the requests lost).
    fn finish(mut self) -> (u64, u64, Vec<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        let lost = self.handle.take().unwrap().join().unwrap();
        (
            self.sent.load(Ordering::Relaxed),
            self.answered.load(Ordering::Relaxed),
            lost,
        )
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn pid_of(v: &serde_json::Value) -> u32 {
    v["dataplane"]["pid"].as_u64().unwrap() as u32
}

#[test]
fn control_plane_kill_loses_no_packet_and_dataplane_death_is_repaired() {
    let site = site("supervision", "");
    let mut cp1 = site.launch();
    let dp = pid_of(&site.status());
    assert!(alive(dp));
    assert_eq!(site.dataplane_pids(), vec![dp]);

    let traffic = Traffic::start(site.udp4());
    assert!(
        wait_until(Duration::from_secs(5), || traffic.answered() >= 100),
        "STUN not answered before the kill"
    );

    // A second control plane on the same state dir (its own API port) refuses to start
    // instead of fighting the first one over the dataplane.
    let second = site.dir.join("second.toml");
    let other_api = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &second,
        site.config_text("")
            .replace(&site.api.to_string(), &other_api),
    )
    .unwrap();
    let mut cp_second = site.spawn_with(&second);
    let exit = cp_second.child.wait().unwrap();
    assert!(!exit.success());
    assert!(
        site.log().contains("already runs on this state dir"),
        "{}",
        site.log()
    );
    assert_eq!(site.dataplane_pids(), vec![dp]);
    assert_eq!(site.status()["controlplane"]["pid"], cp1.pid());

    // kill -9 of the control plane: the dataplane goes on answering on its own.
    cp1.kill9();
    let before = traffic.answered();
    thread::sleep(Duration::from_millis(700));
    assert!(alive(dp), "the dataplane died with the control plane");
    assert!(
        traffic.answered() >= before + 100,
        "STUN stopped while the control plane was away: {} -> {}",
        before,
        traffic.answered()
    );
    assert!(
        site.get("/healthz", false).is_none(),
        "the old API still answers"
    );

    // A new control plane re-attaches to the running dataplane instead of starting another.
    let mut cp2 = site.launch();
    let st = site.status();
    assert_eq!(pid_of(&st), dp, "a second dataplane was started: {st}");
    assert_eq!(st["dataplane"]["restarts"], 0);
    assert_eq!(st["dataplane"]["running"], true);
    assert_eq!(site.dataplane_pids(), vec![dp], "exactly one dataplane");
    assert!(site.log().contains("re-attached to the running dataplane"));
    let before = traffic.answered();
    assert!(wait_until(Duration::from_secs(5), || traffic.answered()
        >= before + 100));

    let (sent, answered, lost) = traffic.finish();
    assert!(lost.is_empty(), "lost requests {lost:?} of {sent}");
    assert_eq!(sent, answered);
    assert!(sent >= 300, "too little traffic to prove anything: {sent}");
    eprintln!("{sent} Binding requests across a control-plane kill and restart, all answered");

    // The dataplane dies: restarted within 1 s, counted, and answering again.
    signal(dp, Signal::SIGKILL);
    let killed = Instant::now();
    let mut new_pid = 0;
    let back = wait_until(Duration::from_secs(5), || {
        let st = site.status();
        new_pid = pid_of(&st);
        new_pid != dp && st["dataplane"]["running"] == true
    });
    let took = killed.elapsed();
    assert!(back, "dataplane not restarted; log:\n{}", site.log());
    assert!(took <= Duration::from_secs(1), "restart took {took:?}");
    eprintln!("dataplane restarted in {took:?}");
    let st = site.status();
    assert_eq!(st["dataplane"]["restarts"], 1);
    assert!(site
        .metrics()
        .lines()
        .any(|l| l == "portico_dataplane_restarts_total 1"));
    assert_eq!(bindings(site.udp4(), 20), 20);
    assert_eq!(site.dataplane_pids(), vec![new_pid]);
    // The supervisor logs the restart after the new dataplane reports running: wait for it.
    site.wait_log("dataplane restarted");

    // SIGTERM stops both processes and removes the segment.
    let status = cp2
        .terminate(Duration::from_secs(15))
        .expect("portico stopped");
    assert!(status.success(), "{status}");
    assert!(wait_until(Duration::from_secs(5), || !alive(new_pid)));
    assert!(portico_shared::shm::SharedMemory::attach(&site.shm_name).is_err());
}

/// A dataplane that keeps failing to start is retried with growing delays, and comes back as
/// soon as it can start again.
#[test]
fn crash_loop_backs_off_and_recovers() {
    let mut site = site("backoff", "");
    let script = site.dir.join("dataplane.sh");
    let write_script = |body: &str| {
        let tmp = script.with_extension("tmp");
        std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &script).unwrap();
    };
    write_script(&format!(
        "exec {} dataplane \"$@\"",
        portico_bin().display()
    ));
    site.dataplane_program = script.clone();
    let _cp = site.launch();
    let dp = pid_of(&site.status());

    write_script("exit 3");
    signal(dp, Signal::SIGKILL);
    let failures = |log: &str| {
        log.lines()
            .filter(|l| l.contains("dataplane restart failed"))
            .map(|l| l.rsplit("retrying in ").next().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(10), || failures(&site.log()).len() >= 3),
        "no repeated restart attempts; log:\n{}",
        site.log()
    );
    assert_eq!(
        failures(&site.log())[..3],
        ["400ms", "800ms", "1.6s"],
        "delays must double"
    );
    let r = site.get("/healthz", false).unwrap();
    assert_eq!(r.status, 503, "healthz while the dataplane is down");

    write_script(&format!(
        "exec {} dataplane \"$@\"",
        portico_bin().display()
    ));
    assert!(
        wait_until(Duration::from_secs(15), || site
            .get("/healthz", false)
            .map(|r| r.status)
            == Some(200)),
        "dataplane did not come back; log:\n{}",
        site.log()
    );
    assert_eq!(bindings(site.udp4(), 10), 10);
    assert_eq!(site.status()["dataplane"]["restarts"], 1);
}
