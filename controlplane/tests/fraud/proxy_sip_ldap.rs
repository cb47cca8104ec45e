//! Fraud detection on the SIP and LDAP sides of the reverse proxy, in front of a real
//! registrar (Kamailio with digest authentication) and a real directory (slapd): failed
//! logins count, the challenge that starts every SIP login does not, so a crowd of phones
//! behind one address is never blocked while a brute force is cut within a few attempts of
//! the threshold, on the connection it holds and at accept.
//!
//! The brute-force tests print how many wrong passwords were answered before the cut.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use ldap3_proto::proto::LdapResultCode;
use portico_testkit::fixtures::{Kamailio, Slapd};
use portico_testkit::ldap::LdapClient;
use portico_testkit::process::{require, run};
use portico_testkit::sip::{read_sip, sip_authorization, sip_nonce, sip_request};

use crate::prelude::*;

/// A site whose proxy listens for `stype` on a free port in front of `port` as service
/// `alpha.test`; the start waits until the listener accepts (from the whitelisted probe
/// address: a connection closed unused is no event anyway).
fn site(tag: &str, fraud: &[&str], stype: &str, port: u16) -> (Portico, SocketAddr) {
    let listen = free_port();
    let spec = spec()
        .proxy(&format!(
            "[proxy.listen]\n{stype} = \"127.0.0.1:{listen}\"\n\n\
             [[proxy.services]]\nname = \"alpha.test\"\nhost = \"127.0.0.1\"\n{stype} = {port}\n"
        ))
        .ready_port(listen);
    let site = Portico::start(tag, fraud.iter().fold(spec, |s, f| s.fraud(f)));
    (site, SocketAddr::new(LOCAL4, listen))
}

/// One phone: connects from `src` and registers twice as phones do, each time challenged
/// first and then accepted. Returns how many registrations got 200, or what went wrong
/// (never panics: the other phones' threads must not wait on it).
fn phone(src: IpAddr, proxy: SocketAddr, i: usize) -> Result<usize, String> {
    let mut s = tcp_from(src, proxy).map_err(|e| format!("phone {i}: connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let user = format!("phone{i}");
    let call_id = format!("register-{i}@127.0.10.1");
    let mut registered = 0;
    let mut cseq = 0;
    for round in 1..=2 {
        cseq += 1;
        let req = sip_request("REGISTER", "alpha.test", &user, &call_id, cseq, "");
        s.write_all(req.as_bytes())
            .map_err(|e| format!("phone {i} round {round}: {e}"))?;
        let challenge = read_sip(&mut s);
        let nonce = sip_nonce(&challenge)
            .filter(|_| challenge.starts_with("SIP/2.0 401 "))
            .ok_or_else(|| format!("phone {i} round {round}: no challenge: {challenge:?}"))?;
        cseq += 1;
        let auth = sip_authorization("REGISTER", "alpha.test", &user, "secret", &nonce);
        let req = sip_request("REGISTER", "alpha.test", &user, &call_id, cseq, &auth);
        s.write_all(req.as_bytes())
            .map_err(|e| format!("phone {i} round {round}: {e}"))?;
        let answer = read_sip(&mut s);
        if !answer.starts_with("SIP/2.0 200 Registered") {
            return Err(format!("phone {i} round {round}: {answer:?}"));
        }
        registered += 1;
    }
    Ok(registered)
}

/// 50 phones behind one address (one NAT: one source IP, 50 TCP connections) register
/// twice within a minute with the default settings (20 suspicious events a minute): 100
/// challenges, none of them a failure, so the address is never blocked.
#[test]
fn fifty_phones_behind_one_address_register_twice_and_are_never_blocked() {
    const PHONES: usize = 50;
    let kamailio = Kamailio::start("fraud-phones");
    let (site, proxy) = site("fraud-phones", &[], "sip", kamailio.port);
    let nat = v4(127, 0, 10, 1);
    let start = Arc::new(Barrier::new(PHONES));
    let phones: Vec<_> = (0..PHONES)
        .map(|i| {
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                phone(nat, proxy, i)
            })
        })
        .collect();
    let mut registered = 0;
    let mut failures = Vec::new();
    for p in phones {
        match p.join() {
            Ok(Ok(n)) => registered += n,
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push("a phone's thread panicked".to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {PHONES} phones failed, first: {}; fraud entries {:?}",
        failures.len(),
        failures[0],
        site.entries()
    );
    assert_eq!(registered, 2 * PHONES, "registrations answered 200");
    assert!(
        site.entry("127.0.10.1").is_none(),
        "the phones' address was listed: {:?}",
        site.entries()
    );
    assert_eq!(
        site.metric("portico_fraud_blocked_connections_total", &[]),
        0.0
    );
    // The engine does count on this site: one wrong password is one event, and it is the
    // only one (events are handled in order, so the 100 challenges would be counted by now).
    let mut s = tcp_from(nat, proxy).unwrap_or_else(|e| panic!("{e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{e}"));
    let call_id = "wrong@127.0.10.1";
    s.write_all(sip_request("REGISTER", "alpha.test", "phone0", call_id, 1, "").as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    let nonce = sip_nonce(&read_sip(&mut s)).expect("a challenge");
    let wrong = sip_authorization("REGISTER", "alpha.test", "phone0", "guess", &nonce);
    s.write_all(sip_request("REGISTER", "alpha.test", "phone0", call_id, 2, &wrong).as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(read_sip(&mut s).starts_with("SIP/2.0 401 "));
    let events = site.wait_metric(
        "portico_fraud_suspicious_events_total",
        &[("origin", "proxy")],
        1.0,
        Duration::from_secs(5),
    );
    assert_eq!(events, 1.0, "suspicious events from the proxy");
    assert!(site.entry("127.0.10.1").is_none());
}

/// How a brute force went: wrong passwords answered before the proxy cut it off.
fn report(what: &str, threshold: usize, answered: usize) {
    eprintln!("{what}, threshold {threshold}: {answered} wrong passwords answered before the cut");
    assert!(
        answered >= threshold,
        "{what}: cut after {answered} wrong passwords, below the threshold {threshold}"
    );
    assert!(
        // Exactly threshold + 1 on an idle machine; a loaded one may let the decision
        // trail the next guesses a little.
        answered <= threshold + 10,
        "{what}: {answered} wrong passwords answered with a threshold of {threshold}"
    );
}

/// Wrong digest responses (Authorization present, the registrar answers 401) are cut within
/// a few attempts of the threshold: over one connection, and over a new connection each.
#[test]
fn a_sip_brute_force_is_cut_within_a_few_attempts_of_the_threshold() {
    // A reaction-time measurement: alone (see fraud::turn).
    let _alone = alone();
    let kamailio = Kamailio::start("fraud-sip-brute");
    for threshold in [5, 20] {
        let (site, proxy) = site(
            &format!("fraud-sip-brute-{threshold}"),
            &[
                &format!("suspicious_per_minute = {threshold}"),
                "blacklist_minutes = \"1m\"",
            ],
            "sip",
            kamailio.port,
        );
        let tries = threshold + 50;

        // One connection: a challenge first (not counted), then guesses as fast as the
        // answers come.
        let attacker = v4(127, 0, 10, 7);
        let mut s = tcp_from(attacker, proxy).unwrap_or_else(|e| panic!("{e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{e}"));
        let call_id = "brute@127.0.10.7";
        s.write_all(sip_request("REGISTER", "alpha.test", "alice", call_id, 1, "").as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let nonce = sip_nonce(&read_sip(&mut s)).expect("a challenge");
        let guesses: Vec<String> = (0..tries)
            .map(|i| {
                let auth =
                    sip_authorization("REGISTER", "alpha.test", "alice", &format!("g{i}"), &nonce);
                sip_request(
                    "REGISTER",
                    "alpha.test",
                    "alice",
                    call_id,
                    2 + i as u32,
                    &auth,
                )
            })
            .collect();
        let mut answered = 0;
        for g in &guesses {
            if s.write_all(g.as_bytes()).is_err() {
                break;
            }
            let r = read_sip(&mut s);
            if r.is_empty() {
                break;
            }
            assert!(r.starts_with("SIP/2.0 401 "), "{r}");
            answered += 1;
        }
        report("SIP brute force over one connection", threshold, answered);
        assert_blacklisted(&site, &attacker.to_string());
        assert!(
            read_sip(&mut tcp_from(attacker, proxy).unwrap_or_else(|e| panic!("{e}"))).is_empty(),
            "a new connection of the blacklisted source was served"
        );

        // A new connection per guess; the nonce comes from a challenge, as before.
        let attacker = v4(127, 0, 10, 8);
        let mut s = tcp_from(attacker, proxy).unwrap_or_else(|e| panic!("{e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{e}"));
        let call_id = "brute@127.0.10.8";
        s.write_all(sip_request("REGISTER", "alpha.test", "bob", call_id, 1, "").as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let nonce = sip_nonce(&read_sip(&mut s)).expect("a challenge");
        drop(s);
        let guesses: Vec<String> = (0..tries)
            .map(|i| {
                let auth =
                    sip_authorization("REGISTER", "alpha.test", "bob", &format!("g{i}"), &nonce);
                sip_request(
                    "REGISTER",
                    "alpha.test",
                    "bob",
                    call_id,
                    2 + i as u32,
                    &auth,
                )
            })
            .collect();
        let mut answered = 0;
        for g in &guesses {
            let Ok(mut s) = tcp_from(attacker, proxy) else {
                break;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            if s.write_all(g.as_bytes()).is_err() {
                break;
            }
            let r = read_sip(&mut s);
            if r.is_empty() {
                break;
            }
            assert!(r.starts_with("SIP/2.0 401 "), "{r}");
            answered += 1;
        }
        report(
            "SIP brute force, a connection per guess",
            threshold,
            answered,
        );
        assert_blacklisted(&site, &attacker.to_string());
        assert!(
            proxy_events_counted(&site) <= (2 * (threshold + 3)) as f64,
            "{} events",
            proxy_events_counted(&site)
        );
    }
}

/// Wrong bind passwords against slapd (invalidCredentials) are cut within a few attempts of
/// the threshold: over one connection (a raw client), and with `ldapsearch` per guess.
#[test]
fn an_ldap_brute_force_is_cut_within_a_few_attempts_of_the_threshold() {
    // A reaction-time measurement: alone (see fraud::turn).
    let _alone = alone();
    let slapd = Slapd::start("fraud-ldap-brute");
    let ldapsearch = require("ldapsearch", "ldap-utils");
    for threshold in [5, 20] {
        let (site, proxy) = site(
            &format!("fraud-ldap-brute-{threshold}"),
            &[
                &format!("suspicious_per_minute = {threshold}"),
                "blacklist_minutes = \"1m\"",
            ],
            "ldap",
            slapd.port,
        );
        let tries = threshold + 50;

        let attacker = v4(127, 0, 10, 9);
        let mut c = LdapClient::from(tcp_from(attacker, proxy).unwrap_or_else(|e| panic!("{e}")));
        let mut answered = 0;
        for i in 0..tries {
            match c.bind(i as i32 + 1, "cn=admin,dc=alpha,dc=test", &format!("g{i}")) {
                Some((LdapResultCode::InvalidCredentials, _)) => answered += 1,
                None => break,
                Some(other) => panic!("bind {i}: {other:?}"),
            }
        }
        report("LDAP brute force over one connection", threshold, answered);
        assert_blacklisted(&site, &attacker.to_string());

        // ldapsearch binds from 127.0.0.1 (it cannot choose), a connection per guess.
        let url = format!("ldap://{proxy}");
        let mut answered = 0;
        for i in 0..tries {
            let o = run(
                &ldapsearch,
                &[
                    "-x",
                    "-LLL",
                    "-o",
                    "nettimeout=10",
                    "-H",
                    &url,
                    "-D",
                    "cn=admin,dc=alpha,dc=test",
                    "-w",
                    &format!("g{i}"),
                    "-b",
                    "dc=alpha,dc=test",
                    "(cn=person)",
                ],
                &[],
                Duration::from_secs(30),
            );
            let out = o.text;
            if !out.contains("Invalid credentials (49)") {
                assert!(out.contains("Can't contact LDAP server"), "{out}");
                break;
            }
            answered += 1;
        }
        report(
            "LDAP brute force with ldapsearch per guess",
            threshold,
            answered,
        );
        assert_blacklisted(&site, "127.0.0.1");
    }
}
