//! `portico probe` (the reference's "Troubleshooting ICE" conclusion, from the command line)
//! run from a phone behind each NAT type against Portico with RFC 5780 on: it must conclude
//! SUCCESS (TURN relays media behind every NAT type: turn.rs, ice.rs) and name the NAT's
//! mapping and filtering as the lab built them (coturn's natdiscovery and the lab's own
//! classifier agree with the lab: stun.rs).
//!
//! Found two defects of the probe, fixed since: behind the symmetric NAT (phone4) the round
//! trip timed out (the relay sent to the peer socket's STUN-mapped address, which a
//! symmetric NAT does not use towards the relay; the probe now takes the peer's address from
//! the Data indication of the peer's own packet to the relayed address), and behind the
//! restricted cone (phone2) it reported endpoint-independent filtering (the filtering tests
//! ran on a binding that had already sent to the alternate address; they now use a fresh
//! one, RFC 5780 §4.4). Reproduce by hand with `scripts/lab/lab.sh up X zoo` and
//! `lab.sh exec X phoneN portico probe 198.18.0.10 --user alice --password secret`.

use std::time::Duration;

use portico_testkit::process::run;
use portico_testkit::turn::{PASSWORD, USER};

use crate::{join, Boxed, Lab, Nat, ALL_NATS, BOX, BOX_ALT, NET};

#[test]
fn portico_probe_behind_each_nat_type() {
    let Some(lab) = Lab::new("probe") else {
        return;
    };
    lab.public("box", &[BOX, BOX_ALT]);
    for (i, nat) in ALL_NATS.iter().enumerate() {
        lab.nat_phone(i as u8 + 1, *nat);
    }
    let _box = Boxed::start(&lab, "box", BOX, Some(BOX_ALT), &[NET], "");
    let bin = portico_testkit::portico::portico_bin()
        .display()
        .to_string();
    let runs: Vec<_> = ALL_NATS
        .iter()
        .enumerate()
        .map(|(i, nat)| {
            let ns = lab.ns(&format!("phone{}", i + 1));
            let bin = bin.clone();
            let h = std::thread::spawn(move || {
                let args: Vec<String> = [
                    "netns",
                    "exec",
                    &ns,
                    &bin,
                    "probe",
                    &BOX.to_string(),
                    "--user",
                    USER,
                    "--password",
                    PASSWORD,
                    "--transports",
                    "udp,tcp",
                ]
                .map(String::from)
                .to_vec();
                run(
                    std::path::Path::new("ip"),
                    &args,
                    &[],
                    Duration::from_secs(60),
                )
            });
            (*nat, h)
        })
        .collect();
    for (nat, h) in runs {
        let r = join(h);
        let (mapping, filtering) = match nat {
            Nat::FullCone => ("endpoint-independent", "endpoint-independent"),
            Nat::Restricted => ("endpoint-independent", "address-dependent"),
            Nat::PortRestricted => ("endpoint-independent", "address-and-port-dependent"),
            Nat::Symmetric => ("address-and-port-dependent", "address-and-port-dependent"),
        };
        let want = format!("NAT with {mapping} mapping; {filtering} filtering");
        assert!(
            r.text.contains(&want),
            "behind {nat:?}: missing {want:?}:\n{}",
            r.text
        );
        // Behind the symmetric NAT the relay reaches the peer at the address it saw the
        // peer's own packet come from, not at the peer's STUN-mapped address.
        let learnt = r.text.contains("not at its STUN-mapped address");
        assert_eq!(
            learnt,
            !nat.endpoint_independent_mapping(),
            "behind {nat:?}:\n{}",
            r.text
        );
        assert!(
            r.text.contains("Conclusion SUCCESS"),
            "behind {nat:?}:\n{}",
            r.text
        );
        assert_eq!(r.code, Some(0), "behind {nat:?}:\n{}", r.text);
    }
}
