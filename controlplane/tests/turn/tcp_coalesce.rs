//! Interrupt coalescing in the TCP/TLS thread (`turn.tcp_coalesce_us`): while packets come
//! faster than the interval, the thread lets the interval pass between loop turns and serves
//! what arrived meanwhile in one turn, so a turn carries many packets; every packet still
//! crosses, in order. With the interval at 0 the thread never waits between turns.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use portico_shared::counters::Counter;
use portico_testkit::net::tcp_connect;
use portico_testkit::turn::{decode_relayed, EchoPeer, Relayed};
use portico_testkit::{Portico, LOCAL4};

use crate::tcp::{allocate_and_bind, Stream};
use crate::turn_spec;

/// ChannelData messages the client sends, one write each, about 0.1-0.2 ms apart: faster
/// than a 2 ms interval, far slower than the thread can serve them one by one.
const PACKETS: u32 = 600;

/// The loop turns of the TCP thread so far: (woken, coalesced).
fn turns(p: &Portico) -> (u64, u64) {
    (
        p.counter(Counter::TcpTurnsWoken),
        p.counter(Counter::TcpTurnsCoalesced),
    )
}

/// Streams `PACKETS` numbered ChannelData messages to an echo peer and reads every echo
/// back: all arrive, in order. Returns the TCP thread's turns meanwhile (woken, coalesced).
fn stream_through(p: &Portico) -> (u64, u64) {
    let peer = EchoPeer::start(LOCAL4);
    let mut s = Stream::Tcp(tcp_connect(p.udp4()));
    allocate_and_bind(&mut s, peer.addr);
    let (woken, coalesced) = turns(p);
    let mut w: TcpStream = s.tcp().try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..PACKETS {
            let mut m = vec![0x40, 0x01, 0, 8];
            m.extend_from_slice(&u64::from(i).to_be_bytes());
            w.write_all(&m).unwrap_or_else(|e| panic!("write {i}: {e}"));
            std::thread::sleep(Duration::from_micros(100));
        }
    });
    s.tcp()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for i in 0..PACKETS {
        match decode_relayed(&s.read_frame()) {
            Relayed::Channel { number, data } => {
                assert_eq!(number, 0x4001);
                assert_eq!(data, u64::from(i).to_be_bytes(), "echo {i} in order");
            }
            other => panic!("expected ChannelData, got {other:?}"),
        }
    }
    writer.join().unwrap();
    let (w2, c2) = turns(p);
    assert_eq!(peer.count(), PACKETS as usize, "the peer got every packet");
    (w2 - woken, c2 - coalesced)
}

#[test]
fn a_busy_tcp_thread_serves_many_packets_per_turn() {
    let p = Portico::start(
        "turn-tcp-coalesce",
        turn_spec("auto", true).turn("tcp_coalesce_us = 2000"),
    );
    let (woken, coalesced) = stream_through(&p);
    // Each packet crosses the thread twice (client to peer, echo back): 1200 events. One
    // turn per event would be 1200 turns; 2 ms apart, the ~0.1-0.2 s of sending is ~100.
    assert!(coalesced > 0, "no turn waited out the interval");
    assert!(
        woken + coalesced < u64::from(PACKETS) / 4,
        "{woken} woken + {coalesced} coalesced turns for {PACKETS} packets each way"
    );
}

#[test]
fn without_an_interval_the_tcp_thread_never_waits() {
    let p = Portico::start(
        "turn-tcp-no-coalesce",
        turn_spec("auto", true).turn("tcp_coalesce_us = 0"),
    );
    let (woken, coalesced) = stream_through(&p);
    assert_eq!(coalesced, 0, "a turn waited with tcp_coalesce_us = 0");
    assert!(woken > 0);
}
