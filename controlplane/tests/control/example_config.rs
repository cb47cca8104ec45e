//! `portico.example.toml` as shipped: its TURN user relays media between two
//! `turnutils_uclient` clients, each talking to the other's relayed address (no `allow_peers`
//! needed: a server's own relays are always allowed peers). Only what a test must change is
//! changed: listen addresses (loopback, free ports) and the state dir.

use std::time::{Duration, Instant};

use portico_testkit::process::{require, run};
use portico_testkit::{Portico, Spec};

#[test]
fn example_user_relays_between_two_uclients() {
    let uclient = require("turnutils_uclient", "coturn");
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../portico.example.toml"
    ))
    .expect("portico.example.toml");
    // An installation for its directory, free ports and clean-up; its file is the example.
    let site = Portico::new("example-config", Spec::new());
    let (port, api) = (site.port, site.api.port());
    let text = example
        .replace(
            "state_dir = \"./portico-state\"",
            &format!("state_dir = \"{}\"", site.state_dir.display()),
        )
        .replace(
            "listen = [\"0.0.0.0:3478\", \"[::]:3478\"]",
            &format!("listen = [\"127.0.0.1:{port}\"]"),
        )
        .replace(
            "listen = \"127.0.0.1:8088\"",
            &format!("listen = \"127.0.0.1:{api}\""),
        );
    assert_ne!(text, example, "the example's keys moved; update this test");
    site.write_config(&text);
    let _portico = site.spawn();
    // Ready when the TURN port answers an Allocate with a 401 challenge (via the client's
    // own retry loop below, bounded); give the dataplane a moment to bind first.
    let deadline = Instant::now() + Duration::from_secs(10);
    let args: Vec<String> = [
        "-y",
        "-c",
        "-u",
        "alice",
        "-w",
        "change-me",
        "-p",
        &port.to_string(),
        "-n",
        "100",
        "-m",
        "2",
        "-l",
        "172",
        "127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    loop {
        let r = run(&uclient, &args, &[], Duration::from_secs(30));
        if r.text.contains("Total lost packets 0 (0.000000%)") {
            assert!(
                r.text.contains("tot_send_msgs=200, tot_recv_msgs=200"),
                "{}",
                r.text
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "turnutils_uclient did not relay through the example configuration:\n{}",
            r.text
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
