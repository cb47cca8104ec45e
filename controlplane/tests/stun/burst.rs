//! A small burst: 10,000 Binding requests from 8 sockets at once must get 10,000 correct
//! answers, on both drivers. Each socket keeps a bounded window of requests in flight (as a
//! busy NAT or a TURN client pool would), so nothing here depends on socket buffer sizes;
//! a lost, duplicated, misaddressed or corrupted answer fails the test.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portico_shared::counters::Counter;
use portico_testkit::net::{recv_within, udp_client};
use portico_testkit::stun::{Builder, Msg, BINDING_SUCCESS};
use portico_testkit::{Portico, Spec};

const SOCKETS: usize = 8;
const PER_SOCKET: usize = 1250;
const WINDOW: usize = 16;
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs one socket's share; returns the number of correct answers, or why it stopped.
fn one_socket(server: SocketAddr, started: Instant) -> Result<usize, String> {
    let s = udp_client(server);
    let me = s.local_addr().map_err(|e| e.to_string())?;
    let mut in_flight: HashSet<[u8; 12]> = HashSet::new();
    let mut sent = 0usize;
    let mut answered = 0usize;
    while answered < PER_SOCKET {
        while sent < PER_SOCKET && in_flight.len() < WINDOW {
            let req = Builder::binding().fingerprint();
            in_flight.insert(req.tid());
            s.send_to(&req.build(), server)
                .map_err(|e| format!("send: {e}"))?;
            sent += 1;
        }
        if started.elapsed() > DEADLINE {
            return Err(format!("deadline passed with {answered} answered"));
        }
        let Some((bytes, from)) = recv_within(&s, Duration::from_secs(3)) else {
            return Err(format!(
                "{} answers missing after 3 s of silence ({answered} answered, {sent} sent)",
                in_flight.len()
            ));
        };
        if from != server {
            return Err(format!("answer from {from}, not {server}"));
        }
        let m = Msg::parse(&bytes).map_err(|e| format!("bad answer: {e}"))?;
        if m.typ != BINDING_SUCCESS {
            return Err(format!("answer of type {:#06x}", m.typ));
        }
        if !in_flight.remove(&m.tid()) {
            return Err("an answer to no request in flight (duplicate or foreign)".into());
        }
        if m.xor_mapped() != Some(me) {
            return Err(format!("XOR-MAPPED-ADDRESS {:?}, not {me}", m.xor_mapped()));
        }
        m.check_fingerprint()?;
        answered += 1;
    }
    Ok(answered)
}

fn burst(io: &'static str) {
    let p = Portico::start("burst", Spec::new().ipv6().io(io).workers(2));
    let server = p.udp4();
    let before = p.counter(Counter::StunBindingSuccess);
    let started = Instant::now();
    let results: Vec<Result<usize, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..SOCKETS)
            .map(|_| scope.spawn(move || one_socket(server, started)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let elapsed = started.elapsed();
    let mut total = 0;
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(n) => total += n,
            Err(e) => panic!("{io}: socket {i}: {e}"),
        }
    }
    assert_eq!(total, SOCKETS * PER_SOCKET);
    let served = p.wait_counter(Counter::StunBindingSuccess, before + total as u64) - before;
    assert_eq!(served, total as u64, "success counter in shared memory");
    eprintln!(
        "{io}: {total} answers in {:.2} s ({:.0}/s)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
}

#[test]
fn ten_thousand_requests_io_uring() {
    burst("io_uring");
}

#[test]
fn ten_thousand_requests_epoll() {
    burst("epoll");
}
