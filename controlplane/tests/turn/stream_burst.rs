//! A burst from a peer to a client over TCP (found with Chromium's data channel over
//! `turn:…?transport=tcp`): the TCP thread read up to a batch of datagrams from a relay
//! socket into the connection's output queue before writing any of it, so a burst of large
//! datagrams overflowed the queue's cap and was dropped as "stream_backlog" although the
//! client read everything at once. The queue is written out before anything is dropped
//! now: a reading client loses nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use portico_shared::counters::Counter;
use portico_testkit::net::tcp_connect;
use portico_testkit::stun::{
    new_tid, Msg, ALLOCATE, CHANNEL_BIND, CHANNEL_NUMBER, NONCE, REALM, XOR_PEER_ADDRESS,
    XOR_RELAYED_ADDRESS,
};
use portico_testkit::turn::{udp_transport, TurnClient, PASSWORD, USER};
use portico_testkit::{Portico, LOCAL4};

use crate::turn_spec;

/// Bursts of datagrams as large as a data channel's, each burst more than the output cap
/// (64 KiB) and less than the relay socket's receive buffer.
const BURSTS: usize = 40;
const PER_BURST: usize = 64;
const SIZE: usize = 1100;

/// One STUN message from the stream (no ChannelData expected here).
fn read_msg(s: &mut TcpStream) -> Msg {
    let mut head = [0u8; 20];
    s.read_exact(&mut head).unwrap_or_else(|e| panic!("{e}"));
    let mut all = head.to_vec();
    all.resize(20 + usize::from(u16::from_be_bytes([head[2], head[3]])), 0);
    s.read_exact(&mut all[20..])
        .unwrap_or_else(|e| panic!("{e}"));
    Msg::parse(&all).unwrap_or_else(|e| panic!("{e}"))
}

fn transact(s: &mut TcpStream, req: &[u8]) -> Msg {
    s.write_all(req).unwrap_or_else(|e| panic!("{e}"));
    read_msg(s)
}

#[test]
fn a_burst_to_a_reading_tcp_client_is_not_dropped() {
    let p = Portico::start("turn-tcp-burst", turn_spec("auto", true));
    let peer = UdpSocket::bind((LOCAL4, 0)).unwrap();
    let mut s = tcp_connect(p.udp4());
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut c = TurnClient::new(SocketAddr::new(LOCAL4, 9), USER, PASSWORD);
    let m = transact(&mut s, &c.build(ALLOCATE, &new_tid(), &udp_transport));
    c.realm = m.get(REALM).map(<[u8]>::to_vec);
    c.nonce = m.get(NONCE).map(<[u8]>::to_vec);
    let m = transact(&mut s, &c.build(ALLOCATE, &new_tid(), &udp_transport));
    let relayed = m
        .xor_address(XOR_RELAYED_ADDRESS)
        .unwrap_or_else(|| panic!("Allocate failed: {:?}", m.error_code()));
    let peer_addr = peer.local_addr().unwrap();
    let m = transact(
        &mut s,
        &c.build(CHANNEL_BIND, &new_tid(), &|b| {
            b.attr(CHANNEL_NUMBER, &[0x40, 0x01, 0, 0])
                .xor_address(XOR_PEER_ADDRESS, peer_addr)
        }),
    );
    assert!(
        m.error_code().is_none(),
        "ChannelBind: {:?}",
        m.error_code()
    );

    // The client reads everything as it comes, counting ChannelData frames.
    let mut reader = s.try_clone().unwrap();
    let counter = std::thread::spawn(move || {
        let mut frames = 0usize;
        let mut head = [0u8; 4];
        let mut body = vec![0u8; 4096];
        while reader.read_exact(&mut head).is_ok() {
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            assert_eq!(head[..2], [0x40, 0x01], "only ChannelData expected");
            if reader.read_exact(&mut body[..len.div_ceil(4) * 4]).is_err() {
                break;
            }
            frames += 1;
            if frames == BURSTS * PER_BURST {
                break;
            }
        }
        frames
    });
    let data = vec![0x5Au8; SIZE];
    for _ in 0..BURSTS {
        for _ in 0..PER_BURST {
            peer.send_to(&data, relayed).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let frames = counter.join().unwrap_or(0);
    let relayed_packets = p.counter(Counter::RelayPeerToClientPackets);
    assert_eq!(
        p.counter(Counter::DropStreamBacklog),
        0,
        "a client reading at once lost relayed data to the output cap ({frames} frames of {} \
         sent arrived)",
        BURSTS * PER_BURST
    );
    assert!(
        frames as u64 >= relayed_packets.min((BURSTS * PER_BURST) as u64),
        "{frames} frames arrived, {relayed_packets} relayed"
    );
}
