//! 10,000 idle TCP connections from one source against the configured stream limits
//! (`turn.tcp_*`): the per-source cap refuses the excess with a clean close and a counter
//! (checked on `/metrics`), the accepted ones that never send a message are closed at the
//! (short, test-configured) handshake/first-message deadline and those that went quiet at
//! the idle timeout, each counted; meanwhile a UDP relay stream loses nothing and a TURN
//! client over TCP from another source allocates and relays.
//!
//! It holds 10,000 descriptors in the test process (the soft RLIMIT_NOFILE is raised to the
//! hard limit; too low a hard limit fails the test) and runs alone.

use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use portico_shared::counters::Counter;
use portico_testkit::metrics::metric;
use portico_testkit::net::{expect_closed, tcp_from, TcpStun};
use portico_testkit::process::alone;
use portico_testkit::turn::EchoPeer;
use portico_testkit::{Portico, LOCAL4};

use crate::tcp::{allocate_and_bind, echo_over, udp_stream_during, Stream};
use crate::turn_spec;

const IDLE_CONNECTIONS: usize = 10_000;
const PER_SOURCE: usize = 200;

/// Raises this process's soft descriptor limit to the hard limit; fails when that cannot
/// hold `need` descriptors.
fn raise_nofile(need: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limits into the struct we own.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    assert_eq!(got, 0, "getrlimit: {}", std::io::Error::last_os_error());
    assert!(
        r.rlim_max >= need,
        "the hard RLIMIT_NOFILE ({}) is below the {need} descriptors this test holds",
        r.rlim_max
    );
    r.rlim_cur = r.rlim_max;
    // SAFETY: setrlimit reads the struct we own.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    assert_eq!(set, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

fn metric_of(p: &Portico, name: &str, labels: &[(&str, &str)]) -> u64 {
    metric(&p.metrics(), name, labels) as u64
}

/// Whether the server closed `s` (EOF or reset) rather than leaving it open.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

#[test]
fn ten_thousand_idle_connections_from_one_source() {
    let _alone = alone();
    raise_nofile(IDLE_CONNECTIONS as u64 + 1000);
    let p = Portico::start(
        "turn-tcp-10k",
        turn_spec("auto", true).turn(&format!(
            "tcp_max_connections = 4096\ntcp_max_connections_per_source = {PER_SOURCE}\n\
             tcp_handshake_timeout = 3\ntcp_idle_timeout = 4"
        )),
    );
    let server = p.udp4();
    let peer = EchoPeer::start(LOCAL4);
    let rejected0 = p.counter(Counter::TcpRejected);
    let accepted0 = p.counter(Counter::TcpAccepted);
    let mut idle: Vec<TcpStream> = Vec::with_capacity(IDLE_CONNECTIONS);
    let got = udp_stream_during(&p, 1500, || {
        let started = Instant::now();
        for i in 0..IDLE_CONNECTIONS {
            let s = TcpStream::connect_timeout(&server, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            idle.push(s);
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "connecting took too long"
            );
        }
        // The excess is refused at once and counted; exactly the cap stays open.
        let want = (IDLE_CONNECTIONS - PER_SOURCE) as u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.counter(Counter::TcpRejected) - rejected0 < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(p.counter(Counter::TcpRejected) - rejected0, want);

        // Meanwhile a TURN client over TCP from another source is served.
        let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let t = tcp_from(other, server).unwrap_or_else(|e| panic!("connect from {other}: {e}"));
        t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut s = Stream::Tcp(t);
        allocate_and_bind(&mut s, peer.addr);
        echo_over(&mut s, &peer);
        drop(s);
    });
    assert_eq!(got, 1500, "the UDP relay stream lost datagrams meanwhile");
    let want_rejected = (IDLE_CONNECTIONS - PER_SOURCE) as u64;
    assert_eq!(
        metric_of(
            &p,
            "portico_dataplane_tcp_connections_total",
            &[("result", "rejected")]
        ),
        want_rejected + rejected0,
        "the refusals on /metrics"
    );
    assert_eq!(
        p.counter(Counter::TcpAccepted) - accepted0,
        PER_SOURCE as u64 + 1,
        "the cap from 127.0.0.1 and the client from 127.0.0.2"
    );

    // Idle connections that sent a message are closed at the idle timeout.
    let idle_closed0 = p.counter(Counter::TcpClosedIdle);
    let quiet = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    let mut talked: Vec<TcpStun> = (0..5)
        .map(|_| TcpStun::connect(quiet, server).unwrap())
        .collect();
    for t in &mut talked {
        assert!(t.binding(Duration::from_secs(5)), "a Binding over TCP");
    }

    // Every connection ends closed by the server: the refused ones at once, the accepted
    // ones at the first-message deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
    }
    let mut open: Vec<usize> = (0..idle.len()).collect();
    while !open.is_empty() && Instant::now() < deadline {
        open.retain(|&i| !closed(&mut idle[i]));
    }
    assert!(open.is_empty(), "{} connections left open", open.len());
    let timed_out = p.wait_counter(Counter::TcpClosedHandshakeTimeout, PER_SOURCE as u64);
    assert_eq!(timed_out, PER_SOURCE as u64);
    assert_eq!(
        metric_of(
            &p,
            "portico_dataplane_tcp_closed_total",
            &[("reason", "handshake_timeout")]
        ),
        PER_SOURCE as u64
    );
    drop(idle);
    let talked: Vec<TcpStream> = talked.into_iter().map(TcpStun::into_stream).collect();
    for mut s in talked {
        expect_closed(&mut s, Duration::from_secs(15), "an idle connection");
    }
    let want = idle_closed0 + 5;
    assert!(
        p.wait_counter(Counter::TcpClosedIdle, want) >= want,
        "TcpClosedIdle did not reach {want}"
    );
    assert_eq!(
        metric_of(
            &p,
            "portico_dataplane_tcp_closed_total",
            &[("reason", "idle")]
        ),
        idle_closed0 + 5
    );
    assert_eq!(p.counter(Counter::TurnAllocationsActive), 1, "the UDP one");
}
