//! ICE (reference: "ICE", "The full picture", "Troubleshooting ICE"): two agents (aioice,
//! `scripts/lab/ice.py`) in two private networks gather host, server-reflexive and relayed
//! candidates from Portico, swap them and check every pair. Behind two port-restricted NATs
//! STUN suffices: they connect directly, no relay in the selected pair. Behind two
//! symmetric NATs with STUN alone the checks fail ("Conclusion FAILED"); with Portico's TURN
//! too, they connect through a relay ("Conclusion SUCCESS"). RTP then flows without loss.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use portico_testkit::process::require;
use portico_testkit::turn::{PASSWORD, USER};

use crate::{join, Boxed, Lab, Nat, BOX, NET};

fn ice_py() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lab/ice.py")
}

/// One call between phone `a` (controlling) and phone `c` (controlled), with `servers`
/// (ice.py's --stun/--turn arguments): both agents' reports.
fn call(lab: &Lab, a: u8, c: u8, servers: &[String], tag: &str) -> [serde_json::Value; 2] {
    let dir = lab.dir.join(format!("ice-{tag}"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let python = require("python3", "python3");
    let agents: Vec<_> = [(a, "controlling"), (c, "controlled")]
        .into_iter()
        .map(|(n, role)| {
            let mut cmd = Command::new("timeout");
            cmd.args([
                "-k",
                "2",
                "60",
                "ip",
                "netns",
                "exec",
                &lab.ns(&format!("phone{n}")),
            ])
            .arg(&python)
            .arg(ice_py())
            .args(["--role", role, "--timeout", "10", "--dir"])
            .arg(&dir)
            .args(servers)
            .stdin(Stdio::null());
            std::thread::spawn(move || {
                let out = cmd.output().unwrap_or_else(|e| panic!("ice.py: {e}"));
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                assert!(
                    out.status.success(),
                    "ice.py {role} failed ({}):\n{text}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
                serde_json::from_str::<serde_json::Value>(text.trim())
                    .unwrap_or_else(|e| panic!("ice.py {role}: not JSON ({e}):\n{text}"))
            })
        })
        .collect();
    let mut reports = agents.into_iter().map(join);
    let first = reports.next().unwrap_or_default();
    let second = reports.next().unwrap_or_default();
    [first, second]
}

#[test]
fn ice_connects_directly_where_stun_suffices_and_through_turn_where_not() {
    let python = require("python3", "python3");
    let aioice = Command::new(&python)
        .args(["-c", "import aioice"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        aioice,
        "the Python package aioice is missing: pip install aioice (scripts/test.sh installs it)"
    );
    let Some(lab) = Lab::new("ice") else {
        return;
    };
    lab.public("box", &[BOX]);
    lab.nat_phone(1, Nat::PortRestricted);
    lab.nat_phone(2, Nat::PortRestricted);
    lab.nat_phone(3, Nat::Symmetric);
    lab.nat_phone(4, Nat::Symmetric);
    let _box = Boxed::start(&lab, "box", BOX, None, &[NET], "");
    let stun = vec!["--stun".to_string(), format!("{BOX}:3478")];
    let mut turn = stun.clone();
    turn.extend([
        "--turn".to_string(),
        format!("{BOX}:3478"),
        "--user".into(),
        USER.into(),
        "--password".into(),
        PASSWORD.into(),
    ]);
    let types = |r: &serde_json::Value| {
        (
            r["local_type"].as_str().unwrap_or("").to_string(),
            r["remote_type"].as_str().unwrap_or("").to_string(),
        )
    };

    // Two port-restricted NATs, STUN only: a direct pair (host or reflexive), all RTP.
    for r in call(&lab, 1, 2, &stun, "pr-stun") {
        assert_eq!(r["conclusion"], "SUCCESS", "port-restricted, STUN: {r}");
        assert_eq!(r["received"], 20, "{r}");
        let (l, rm) = types(&r);
        assert!(
            l != "relay" && rm != "relay",
            "no relay was offered, yet: {r}"
        );
        assert!(
            rm == "srflx" || rm == "prflx",
            "reached through the NAT's mapping: {r}"
        );
    }

    // Two symmetric NATs, STUN only: no pair works.
    for r in call(&lab, 3, 4, &stun, "sym-stun") {
        assert_eq!(r["connected"], false, "symmetric, STUN only: {r}");
        assert_eq!(r["conclusion"], "FAILED", "{r}");
    }

    // The same with Portico's TURN: a relayed pair, all RTP.
    for r in call(&lab, 3, 4, &turn, "sym-turn") {
        assert_eq!(r["conclusion"], "SUCCESS", "symmetric, STUN and TURN: {r}");
        assert_eq!(r["received"], 20, "{r}");
        let candidates = r["candidates"].to_string();
        assert!(
            candidates.contains(&format!("relay {BOX}:")),
            "a relayed candidate on Portico: {r}"
        );
        let (l, rm) = types(&r);
        assert!(
            l == "relay" || rm == "relay",
            "the selected pair goes through a relay: {r}"
        );
    }
}
