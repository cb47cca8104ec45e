//! `portico.example.toml` as shipped: its TURN user relays media between two
//! `turnutils_uclient` clients, each talking to the other's relayed address (no `allow_peers`
//! needed: a server's own relays are always allowed peers). Only what a test must change is
//! changed: listen addresses (loopback, free ports) and the state dir.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::ports::free_port;
use common::server::{portico_bin, temp_dir};
use common::tools::{require, run};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

#[test]
fn example_user_relays_between_two_uclients() {
    let uclient = require("turnutils_uclient", "coturn");
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../portico.example.toml"
    ))
    .expect("portico.example.toml");
    let lo = "127.0.0.1".parse().unwrap();
    let port = free_port(&[lo]);
    let api = free_port(&[lo]);
    let dir = temp_dir("example-config");
    let text = example
        .replace(
            "state_dir = \"./portico-state\"",
            &format!("state_dir = \"{}\"", dir.join("state").display()),
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
    let file = dir.join("portico.toml");
    std::fs::write(&file, &text).unwrap();
    let child = Command::new(portico_bin())
        .args(["run", "--config"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start portico");
    let _guard = Running(child);
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
        let r = run(&uclient, &args, Duration::from_secs(30));
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
