//! The reverse proxy for H.323 (H.225.0 call signalling with RAS tunnelled per H.460.17):
//! routing by gatekeeper identifier and by the called party's domain, checked at two fake
//! PBX targets (plain TCP listeners of this test that record what reaches them). The
//! messages come from an encoder that is not Portico's (pycrate's H.225.0 module, see
//! tests/proxy/h225gen.py), and tshark, an independent decoder, must decode what the
//! targets received without errors.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use portico_testkit::{free_port, Portico, TempDir};

use crate::h323_support::*;
use crate::proxy_site;

struct Env {
    dir: TempDir,
    master: FakePbx,
    standby: FakePbx,
    portico: Portico,
    h323: u16,
}

fn env_with(limits: &str) -> Env {
    let dir = TempDir::new("h323");
    let master = FakePbx::start(None);
    let standby = FakePbx::start(None);
    let h323 = free_port();
    let dead = free_port();
    let toml = format!(
        "[proxy.listen]\nh323 = \"127.0.0.1:{h323}\"\n{limits}\n\
         [[proxy.services]]\nname = \"example.com\"\nhost = \"127.0.0.1\"\nh323 = {m}\n\
         [[proxy.services]]\nname = \"example.com/branch\"\nhost = \"127.0.0.1\"\nh323 = {s}\n\
         [[proxy.services]]\nname = \"example.com/master\"\nhost = \"127.0.0.1\"\nh323 = {m}\n\
         [[proxy.services]]\nname = \"example.com/standby\"\nhost = \"127.0.0.1\"\nh323 = {s}\n\
         [[proxy.services]]\nname = \"failover.test/down\"\nhost = \"127.0.0.1\"\nh323 = {dead}\n\
         [[proxy.services]]\nname = \"failover.test/up\"\nhost = \"127.0.0.1\"\nh323 = {s}\n\
         [[proxy.services]]\nname = \"calls.test\"\nhost = \"127.0.0.1\"\nh323 = {s}\n",
        m = master.port,
        s = standby.port,
    );
    let portico = proxy_site("h323", &toml, &[h323]);
    Env {
        dir,
        master,
        standby,
        portico,
        h323,
    }
}

fn env() -> Env {
    env_with("")
}

/// Sends `m` on a new connection and keeps it open (the relay is two-way).
fn send(port: u16, m: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(m).unwrap();
    s
}

/// Waits until the proxy closed `s` (EOF or reset) within the time bound.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
    }
    false
}

#[test]
fn registrations_route_by_gatekeeper_id_and_calls_by_domain() {
    let e = env();
    let cases: Vec<(Vec<u8>, &FakePbx)> = vec![
        // GRQ by the plain gatekeeper id.
        (msg(&["grq", "example.com", "alice"]), &e.master),
        // location@gkid/regloc: the location is ignored, /branch picks the slave.
        (msg(&["rrq", "hq@example.com/branch", "alice"]), &e.standby),
        (msg(&["rrq", "hq@example.com", "alice"]), &e.master),
        // The standby form as the endpoint sends it to its primary and secondary gatekeeper.
        (msg(&["rrq", "example.com/master", "bob"]), &e.master),
        (msg(&["rrq", "example.com/standby", "bob"]), &e.standby),
        // The configured form unchanged: the master's service first...
        (
            msg(&["rrq", "example.com/master:standby", "bob"]),
            &e.master,
        ),
        // ...and the standby's when the master's target does not answer.
        (msg(&["grq", "failover.test/down:up", "bob"]), &e.standby),
        // A call without registration, by the domain of the called alias.
        (msg(&["setup", "carol@calls.test"]), &e.standby),
        (
            msg(&["setup", "12345", "email:carol@Calls.Test"]),
            &e.standby,
        ),
        // RAS in a FACILITY whose body is a facility (not empty).
        (msg(&["facility-body", "example.com"]), &e.master),
    ];
    let mut open = Vec::new();
    for (m, target) in &cases {
        let before = (e.master.all().len(), e.standby.all().len());
        open.push(send(e.h323, m));
        let n = if std::ptr::eq(*target, &e.master) {
            before.0
        } else {
            before.1
        };
        let got = target.wait(n + 1, m.len());
        assert_eq!(got[n], *m, "the target must receive the message unchanged");
    }
    // Nothing went astray: every connection reached exactly the target expected.
    let to_master = cases
        .iter()
        .filter(|(_, t)| std::ptr::eq(*t, &e.master))
        .count();
    assert_eq!(e.master.all().len(), to_master);
    assert_eq!(e.standby.all().len(), cases.len() - to_master);

    // tshark reads what the targets got as H.225.0 with the tunnelled RAS and aliases.
    let mut all = e.master.all();
    all.extend(e.standby.all());
    let out = tshark_decode(&e.dir, "targets", &all);
    assert!(out.contains("RasMessage: gatekeeperRequest (0)"), "{out}");
    assert!(out.contains("RasMessage: registrationRequest (3)"), "{out}");
    assert!(
        out.contains("gatekeeperIdentifier: hq@example.com/branch"),
        "{out}"
    );
    assert!(out.contains("h323-message-body: setup (0)"), "{out}");
    assert!(out.contains("email-ID: carol@Calls.Test"), "{out}");
    assert_eq!(e.portico.log().matches("suspicious request").count(), 0);
}

#[test]
fn unknown_ids_and_other_services_later_on_are_refused() {
    let e = env();
    // Unknown gatekeeper id: closed, nothing forwarded, counted.
    let mut s = send(e.h323, &msg(&["grq", "nowhere.test", "alice"]));
    assert!(closed(&mut s));
    e.portico
        .wait_log("suspicious request: unknown service name \"nowhere.test\"");
    // A GRQ without a gatekeeper id, and a Setup to an alias without a domain.
    let mut s = send(e.h323, &msg(&["grq", "-"]));
    assert!(closed(&mut s));
    let mut s = send(e.h323, &msg(&["setup", "12345", "bob"]));
    assert!(closed(&mut s));
    assert!(e.master.all().is_empty() && e.standby.all().is_empty());

    // A connection routed to the master, then an RRQ naming the slave: refused, closed.
    let grq = msg(&["grq", "example.com", "alice"]);
    let mut s = send(e.h323, &grq);
    e.master.wait(1, grq.len());
    let rrq_same = msg(&["rrq", "hq@example.com", "alice"]);
    s.write_all(&rrq_same).unwrap();
    e.master.wait(1, grq.len() + rrq_same.len());
    s.write_all(&msg(&["rrq", "example.com/branch", "alice"]))
        .unwrap();
    assert!(closed(&mut s));
    e.portico
        .wait_log("a later request names another service than the connection's");
    std::thread::sleep(Duration::from_millis(200));
    let got = e.master.all();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0], [grq.clone(), rrq_same].concat());
    assert!(e.standby.all().is_empty());
    tshark_decode(&e.dir, "later", &got);
}

#[test]
fn target_rejections_count_as_suspicious() {
    let dir = TempDir::new("h323-rrj");
    let pbx = FakePbx::start(Some(msg(&["rrj"])));
    let h323 = free_port();
    let toml = format!(
        "[proxy.listen]\nh323 = \"127.0.0.1:{h323}\"\n\
         [[proxy.services]]\nname = \"example.com\"\nhost = \"127.0.0.1\"\nh323 = {}\n",
        pbx.port
    );
    let p = proxy_site("h323-rrj", &toml, &[h323]);
    let mut s = send(h323, &msg(&["rrq", "example.com", "alice"]));
    let mut answer = vec![0u8; 4];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(answer[0], 3, "the RRJ reaches the client");
    p.wait_log("suspicious request: target rejected the request: H.323 RegistrationReject");
    drop(dir);
}

#[test]
fn bad_input_is_closed_and_counted() {
    let e = env_with("[proxy.limits]\nmax_header_bytes = 60000\nfirst_message_timeout = 2\n");
    let grq = msg(&["grq", "example.com", "alice"]);
    // A PER length running past the end: the BMPString of the gatekeeper id says it is
    // longer than the message. Found by its encoding: length-1 (0x0a for 11 characters)
    // before "e\0x\0a..." in UTF-16.
    let gk = "example.com"
        .encode_utf16()
        .flat_map(u16::to_be_bytes)
        .collect::<Vec<_>>();
    let at = grq
        .windows(gk.len())
        .position(|w| w == gk.as_slice())
        .expect("the gatekeeper id in the GRQ");
    let mut past_end = grq.clone();
    past_end[at - 1] = 0x7f;
    let mut truncated_uu = grq.clone();
    truncated_uu.truncate(grq.len() - 10);
    let len = truncated_uu.len() as u16;
    truncated_uu[2..4].copy_from_slice(&len.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "tpkt length 0",
            vec![3, 0, 0, 0, 8, 2, 0, 0],
            "TPKT length below its header",
        ),
        ("not tpkt", b"GET / HTTP/1.1\r\n\r\n".to_vec(), "not TPKT"),
        ("per length past the end", past_end, "malformed request"),
        ("uu truncated", truncated_uu, "malformed request"),
        (
            "deep nesting",
            msg(&["nested", "20"]),
            "too deeply nested or too many elements",
        ),
        // 10k aliases take an open type longer than 16K octets: a fragmented length.
        (
            "10k elements",
            msg(&["manyaliases", "10000"]),
            "fragmented length",
        ),
        (
            "2k elements",
            msg(&["manyaliases", "2000"]),
            "too deeply nested or too many elements",
        ),
    ];
    for (what, m, log) in &cases {
        let before = e.portico.log().matches("suspicious request").count();
        let seen = e.portico.log().matches(log).count();
        let mut s = send(e.h323, m);
        assert!(closed(&mut s), "{what}: not closed");
        let t0 = Instant::now();
        while e.portico.log().matches("suspicious request").count() <= before {
            assert!(t0.elapsed() < Duration::from_secs(5), "{what}: not counted");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            e.portico.log().matches(log).count() > seen,
            "{what}: {}",
            e.portico.log()
        );
    }
    // A packet longer than the limit, and a truncated one (the first-message timeout).
    let mut s = send(e.h323, &[3, 0, 0xff, 0xff, 8]);
    assert!(closed(&mut s));
    e.portico.wait_log("request head too large");
    let mut s = send(e.h323, &grq[..grq.len() - 3]);
    assert!(
        closed(&mut s),
        "a truncated packet waits for the timeout only"
    );
    // The same messages later on a routed connection end it too.
    let mut s = send(e.h323, &grq);
    e.master.wait(1, grq.len());
    s.write_all(&msg(&["nested", "20"])).unwrap();
    assert!(closed(&mut s));
    assert_eq!(e.master.all(), vec![grq.clone()]);
    // Moderate nesting and 500 parameters are fine.
    let ok = msg(&["nested", "5"]);
    let _s = send(e.h323, &ok);
    e.master.wait(2, ok.len());
    let many = msg(&["manyparams", "500"]);
    let _s2 = send(e.h323, &many);
    e.master.wait(3, many.len());
    let mut p = e.portico;
    assert!(p.alive(), "portico must survive all of it");
}
