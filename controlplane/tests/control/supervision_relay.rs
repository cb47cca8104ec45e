//! Relayed media survives the control plane: with a TURN channel carrying traffic in
//! lockstep (each packet sent after the previous one came back through the relay), `portico`
//! is killed with SIGKILL and started again. The dataplane keeps relaying throughout, the new
//! control plane adopts it and sees the allocation, and not one packet is lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use portico_testkit::process::alive;
use portico_testkit::turn::{EchoPeer, Relayed, TurnClient, PASSWORD, USER};
use portico_testkit::{wait_until, Portico, LOCAL4};

#[test]
fn relayed_media_survives_a_control_plane_kill_and_restart() {
    let site = Portico::new(
        "supervision-relay",
        crate::spec().turn_users().loopback_peers(),
    );
    let mut cp1 = site.launch();
    let dp = site.status()["dataplane"]["pid"].as_u64().unwrap() as u32;
    let echo = EchoPeer::start(LOCAL4);
    let mut client = TurnClient::new(site.udp4(), USER, PASSWORD);
    client.allocate();
    assert!(client.bind(0x4000, echo.addr).is_success());

    let stop = Arc::new(AtomicBool::new(false));
    let relayed = Arc::new(AtomicU64::new(0));
    let (st, count) = (Arc::clone(&stop), Arc::clone(&relayed));
    let media = thread::spawn(move || {
        let mut lost = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut n = 0u32;
        while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
            let payload = n.to_be_bytes();
            client.channel_data(0x4000, &payload, false);
            match client.recv_relayed(Duration::from_secs(2)) {
                Some(Relayed::Channel {
                    number: 0x4000,
                    data,
                }) if data == payload => {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                _ => lost.push(n),
            }
            n += 1;
            thread::sleep(Duration::from_millis(2));
        }
        (n, lost)
    });
    assert!(
        wait_until(Duration::from_secs(5), || relayed.load(Ordering::Relaxed)
            >= 100),
        "no media relayed before the kill"
    );

    cp1.kill9();
    let at_kill = relayed.load(Ordering::Relaxed);
    assert!(
        wait_until(Duration::from_secs(5), || relayed.load(Ordering::Relaxed)
            >= at_kill + 200),
        "media stopped when the control plane died"
    );
    assert!(alive(dp), "the dataplane died with the control plane");

    let mut cp2 = site.launch();
    assert_eq!(
        site.status()["dataplane"]["pid"].as_u64(),
        Some(u64::from(dp))
    );
    let listed = site.json("GET", "/api/v1/turn/allocations", "", 200);
    assert_eq!(
        listed["allocations"].as_array().map(|a| a.len()),
        Some(1),
        "the adopted dataplane's allocation is listed: {listed}"
    );
    let after = relayed.load(Ordering::Relaxed);
    assert!(
        wait_until(Duration::from_secs(5), || relayed.load(Ordering::Relaxed)
            >= after + 200),
        "media stopped after the restart"
    );

    stop.store(true, Ordering::Relaxed);
    let (sent, lost) = media.join().unwrap();
    assert!(
        lost.is_empty(),
        "lost {} of {sent} packets: {lost:?}",
        lost.len()
    );
    assert_eq!(u64::from(sent), relayed.load(Ordering::Relaxed));
    let status = cp2
        .terminate(Duration::from_secs(15))
        .expect("portico stopped");
    assert!(status.success(), "{status}");
}
