//! A burst from a peer to a client over TCP or TLS (found with Chromium's data channel over
//! `turn:…?transport=tcp`): the TCP thread read up to a batch of datagrams from a relay
//! socket into the connection's output queue before writing any of it, so a burst of large
//! datagrams overflowed the queue's cap and was dropped as "stream_backlog" although the
//! client read everything at once. The queue is written out before anything is dropped
//! now: a reading client loses nothing, and a client that does not read still loses data
//! (counted) without disturbing the one that reads. The same held for answers: a client
//! that pipelined requests in one write was closed as "not reading its answers" once they
//! passed the cap within one read, although it read them all.

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use portico_shared::counters::Counter;
use portico_testkit::net::tcp_connect;
use portico_testkit::stun::{
    new_tid, Msg, ALLOCATE, CHANNEL_BIND, CHANNEL_NUMBER, NONCE, REALM, XOR_PEER_ADDRESS,
    XOR_RELAYED_ADDRESS,
};
use portico_testkit::turn::{udp_transport, TurnClient, PASSWORD, USER};
use portico_testkit::{free_port, Portico, LOCAL4};

use crate::turn_spec;

/// Bursts of datagrams as large as a data channel's, each burst more than the output cap
/// (64 KiB) and less than the relay socket's receive buffer.
const BURSTS: usize = 40;
const PER_BURST: usize = 64;
const SIZE: usize = 1100;

/// One STUN message from the stream (no ChannelData expected yet).
fn read_msg(s: &mut impl Read) -> Msg {
    let mut head = [0u8; 20];
    s.read_exact(&mut head).unwrap_or_else(|e| panic!("{e}"));
    let mut all = head.to_vec();
    all.resize(20 + usize::from(u16::from_be_bytes([head[2], head[3]])), 0);
    s.read_exact(&mut all[20..])
        .unwrap_or_else(|e| panic!("{e}"));
    Msg::parse(&all).unwrap_or_else(|e| panic!("{e}"))
}

fn transact(s: &mut (impl Read + Write), req: &[u8]) -> Msg {
    s.write_all(req).unwrap_or_else(|e| panic!("{e}"));
    s.flush().unwrap_or_else(|e| panic!("{e}"));
    read_msg(s)
}

/// Allocates over `s` and binds channel 0x4001 to `peer`; returns the relayed address.
fn allocate_and_bind(s: &mut (impl Read + Write), peer: SocketAddr) -> SocketAddr {
    let mut c = TurnClient::new(SocketAddr::new(LOCAL4, 9), USER, PASSWORD);
    let m = transact(s, &c.build(ALLOCATE, &new_tid(), &udp_transport));
    c.realm = m.get(REALM).map(<[u8]>::to_vec);
    c.nonce = m.get(NONCE).map(<[u8]>::to_vec);
    let m = transact(s, &c.build(ALLOCATE, &new_tid(), &udp_transport));
    let relayed = m
        .xor_address(XOR_RELAYED_ADDRESS)
        .unwrap_or_else(|| panic!("Allocate failed: {:?}", m.error_code()));
    let m = transact(
        s,
        &c.build(CHANNEL_BIND, &new_tid(), &|b| {
            b.attr(CHANNEL_NUMBER, &[0x40, 0x01, 0, 0])
                .xor_address(XOR_PEER_ADDRESS, peer)
        }),
    );
    assert!(
        m.error_code().is_none(),
        "ChannelBind: {:?}",
        m.error_code()
    );
    relayed
}

/// Sends the bursts from `peer` to `relayed` on a thread of its own.
fn bursts_to(peer: &UdpSocket, relayed: SocketAddr) -> std::thread::JoinHandle<()> {
    let peer = peer.try_clone().unwrap();
    std::thread::spawn(move || {
        let data = vec![0x5Au8; SIZE];
        for _ in 0..BURSTS {
            for _ in 0..PER_BURST {
                peer.send_to(&data, relayed).unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// Reads ChannelData frames from `s` until all bursts came or nothing came for 3 s.
fn count_frames(s: &mut impl Read) -> usize {
    let mut frames = 0usize;
    let mut head = [0u8; 4];
    let mut body = vec![0u8; 4096];
    while frames < BURSTS * PER_BURST && s.read_exact(&mut head).is_ok() {
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        assert_eq!(head[..2], [0x40, 0x01], "only ChannelData expected");
        if s.read_exact(&mut body[..len.div_ceil(4) * 4]).is_err() {
            break;
        }
        frames += 1;
    }
    frames
}

/// A client on `s` reading everything as it comes gets every datagram of the bursts.
fn burst_to_a_reading_client(p: &Portico, s: &mut (impl Read + Write)) {
    let peer = UdpSocket::bind((LOCAL4, 0)).unwrap();
    let relayed = allocate_and_bind(s, peer.local_addr().unwrap());
    let sender = bursts_to(&peer, relayed);
    let frames = count_frames(s);
    sender.join().unwrap();
    assert_eq!(
        p.counter(Counter::DropStreamBacklog),
        0,
        "a client reading at once lost relayed data to the output cap ({frames} frames of {} \
         sent arrived)",
        BURSTS * PER_BURST
    );
    let relayed_packets = p.counter(Counter::RelayPeerToClientPackets);
    assert!(
        frames as u64 >= relayed_packets.min((BURSTS * PER_BURST) as u64),
        "{frames} frames arrived, {relayed_packets} relayed"
    );
}

#[test]
fn a_burst_to_a_reading_tcp_client_is_not_dropped() {
    let p = Portico::start("turn-tcp-burst", turn_spec("auto", true));
    let mut s = tcp_connect(p.udp4());
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    burst_to_a_reading_client(&p, &mut s);
}

#[test]
fn a_burst_to_a_reading_tls_client_is_not_dropped() {
    let port = free_port();
    let p = Portico::start(
        "turn-tls-burst",
        turn_spec("auto", true).turn(&format!("listen_tls = [\"127.0.0.1:{port}\"]")),
    );
    let tcp = tcp_connect(SocketAddr::new(LOCAL4, port));
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut s = tls_client(&p, tcp);
    burst_to_a_reading_client(&p, &mut s);
}

/// A client that never reads loses data (counted) once its kernel buffers and its queue are
/// full, and the server neither blocks on it nor lets it disturb a client that reads.
#[test]
fn a_client_that_does_not_read_loses_data_alone() {
    let p = Portico::start("turn-tcp-stall", turn_spec("auto", true));
    let peer = UdpSocket::bind((LOCAL4, 0)).unwrap();
    let mut stalled = tcp_connect(p.udp4());
    stalled
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let stalled_relay = allocate_and_bind(&mut stalled, peer.local_addr().unwrap());
    let data = vec![0xA5u8; SIZE];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0usize;
    while p.counter(Counter::DropStreamBacklog) == 0 {
        assert!(
            Instant::now() < deadline,
            "{sent} datagrams to a client that does not read, none dropped"
        );
        for _ in 0..64 {
            peer.send_to(&data, stalled_relay).unwrap();
        }
        sent += 64;
        std::thread::sleep(Duration::from_millis(2));
    }
    // Meanwhile a reading client loses nothing.
    let drops = p.counter(Counter::DropStreamBacklog);
    let mut s = tcp_connect(p.udp4());
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let peer2 = UdpSocket::bind((LOCAL4, 0)).unwrap();
    let relayed = allocate_and_bind(&mut s, peer2.local_addr().unwrap());
    let sender = bursts_to(&peer2, relayed);
    let frames = count_frames(&mut s);
    sender.join().unwrap();
    assert!(frames > 0, "the reading client got nothing");
    assert_eq!(
        p.counter(Counter::DropStreamBacklog),
        drops,
        "only the stalled client's data is dropped"
    );
    drop(stalled);
}

/// A client that pipelines many requests in one write and then reads: the answers to all of
/// them (more than the output cap together) arrive, the connection stays open.
#[test]
fn pipelined_requests_are_all_answered() {
    use portico_testkit::stun::BINDING;
    const N: usize = 3000;
    let p = Portico::start("turn-tcp-pipeline", turn_spec("auto", true));
    let mut s = tcp_connect(p.udp4());
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let c = TurnClient::new(p.udp4(), USER, PASSWORD);
    let mut all = Vec::new();
    for _ in 0..N {
        all.extend_from_slice(&c.build(BINDING, &new_tid(), &|b| b));
    }
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&all).is_ok());
    let mut answered = 0;
    while answered < N {
        let mut head = [0u8; 20];
        if s.read_exact(&mut head).is_err() {
            break;
        }
        let mut rest = vec![0u8; usize::from(u16::from_be_bytes([head[2], head[3]]))];
        if s.read_exact(&mut rest).is_err() {
            break;
        }
        assert_eq!(head[..2], [0x01, 0x01], "a Binding success");
        answered += 1;
    }
    assert!(writer.join().unwrap(), "the server stopped reading");
    assert_eq!(
        p.counter(Counter::TcpClosedBacklog),
        0,
        "closed for not reading its answers, after {answered} of {N}"
    );
    assert_eq!(answered, N);
}

/// Numbered datagrams from a peer, many per loop turn of the TCP thread (read several per
/// system call and written to the connection once per turn): the client gets every one, in
/// the order the peer sent them.
#[test]
fn relayed_data_keeps_its_order() {
    const N: u32 = 2000;
    let p = Portico::start("turn-tcp-order", turn_spec("auto", true));
    let mut s = tcp_connect(p.udp4());
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let peer = UdpSocket::bind((LOCAL4, 0)).unwrap();
    let relayed = allocate_and_bind(&mut s, peer.local_addr().unwrap());
    let sender = {
        let peer = peer.try_clone().unwrap();
        std::thread::spawn(move || {
            for i in 0..N {
                // 5..8 bytes: the padding to 4 bytes varies from frame to frame.
                let mut d = i.to_be_bytes().to_vec();
                d.resize(5 + (i % 4) as usize, 0xEE);
                peer.send_to(&d, relayed).unwrap();
                if i % 100 == 99 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
    };
    let mut next = 0u32;
    let mut head = [0u8; 4];
    let mut body = [0u8; 16];
    while next < N && s.read_exact(&mut head).is_ok() {
        assert_eq!(head[..2], [0x40, 0x01], "only ChannelData expected");
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        assert_eq!(len, 5 + (next % 4) as usize, "datagram {next}: its length");
        s.read_exact(&mut body[..len.div_ceil(4) * 4])
            .unwrap_or_else(|e| panic!("datagram {next}: {e}"));
        let got = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        assert_eq!(got, next, "datagrams out of order");
        next += 1;
    }
    sender.join().unwrap();
    assert_eq!(
        next,
        N,
        "datagrams lost (none dropped: {})",
        p.counter(Counter::DropStreamBacklog)
    );
}

/// Partial frames on several connections at once: each connection keeps its own bytes
/// until the frame is whole (a connection holds an input buffer only while it has a partial
/// frame), whatever the other connections send in between.
#[test]
fn partial_frames_on_many_connections_at_once() {
    const CONNS: usize = 6;
    let p = Portico::start("turn-tcp-partial", turn_spec("auto", true));
    let peer = UdpSocket::bind((LOCAL4, 0)).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut clients: Vec<_> = (0..CONNS)
        .map(|_| {
            let mut s = tcp_connect(p.udp4());
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.set_nodelay(true).unwrap();
            allocate_and_bind(&mut s, peer.local_addr().unwrap());
            s
        })
        .collect();
    let frame = |k: usize, round: usize| {
        let payload = vec![(k * 16 + round) as u8; 300 + k];
        let mut f = vec![0x40, 0x01];
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        f.extend_from_slice(&payload);
        f.resize(f.len().div_ceil(4) * 4, 0);
        f
    };
    let mut buf = [0u8; 2048];
    for round in 0..4 {
        // Every connection sends the first part of a frame (cut at a different place
        // each round, the header itself included), then the rest in reverse order.
        let cut = [2, 3, 150, 301][round];
        for (k, s) in clients.iter_mut().enumerate() {
            s.write_all(&frame(k, round)[..cut]).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        for (k, s) in clients.iter_mut().enumerate().rev() {
            s.write_all(&frame(k, round)[cut..]).unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..CONNS {
            let (n, _) = peer
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            got.push(buf[..n].to_vec());
        }
        got.sort_by_key(Vec::len);
        for (k, d) in got.iter().enumerate() {
            assert_eq!(d.len(), 300 + k, "round {round}: a datagram's length");
            assert!(
                d.iter().all(|b| *b == (k * 16 + round) as u8),
                "round {round}: connection {k}'s bytes mixed with another's"
            );
        }
    }
    assert_eq!(p.counter(Counter::DropTcpFraming), 0);
}

/// The TCP thread's writes through io_uring (`turn.io = "io_uring"`: a loop turn's datagrams
/// to peers and writes to clients in one submission) and without (`"epoll"`: a system call
/// each), over TCP and TLS: a client that stops reading fills its socket and its queue (short
/// and refused writes, then drops, counted), and when it reads again it gets whole frames
/// (over TLS, records that decrypt) in the order the peer sent them, and everything sent
/// after it caught up; what it sends reaches the peer in order.
#[test]
fn writes_keep_their_order_through_full_sockets_with_and_without_io_uring() {
    for io in ["io_uring", "epoll"] {
        for tls in [false, true] {
            late_reader_gets_every_byte_in_order(io, tls);
        }
    }
}

fn late_reader_gets_every_byte_in_order(io: &'static str, tls: bool) {
    let what = format!("io = {io}, {}", if tls { "TLS" } else { "TCP" });
    let port = free_port();
    let p = Portico::start(
        "turn-tcp-late",
        turn_spec(io, true).turn(&format!("listen_tls = [\"127.0.0.1:{port}\"]")),
    );
    let batched = p.log().contains("TCP thread: writes through io_uring");
    assert_eq!(batched, io == "io_uring", "{what}: {}", p.log());
    let tcp = if tls {
        tcp_connect(SocketAddr::new(LOCAL4, port))
    } else {
        tcp_connect(p.udp4())
    };
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut s: Box<dyn ReadWrite> = if tls {
        Box::new(tls_client(&p, tcp))
    } else {
        Box::new(tcp)
    };
    let peer = UdpSocket::bind((LOCAL4, 0)).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let relayed = allocate_and_bind(&mut s, peer.local_addr().unwrap());
    // Numbered datagrams while the client does not read, until the server drops some.
    let mut data = vec![0xC3u8; SIZE];
    let mut sent = 0u32;
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.counter(Counter::DropStreamBacklog) == 0 {
        assert!(
            Instant::now() < deadline,
            "{what}: nothing dropped after {sent}"
        );
        for _ in 0..32 {
            data[..4].copy_from_slice(&sent.to_be_bytes());
            peer.send_to(&data, relayed).unwrap();
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let stalled = sent;
    // Then 200 more, paced, while the client reads.
    let sender = {
        let peer = peer.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut data = vec![0xC3u8; SIZE];
            for i in stalled..stalled + 200 {
                data[..4].copy_from_slice(&i.to_be_bytes());
                peer.send_to(&data, relayed).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut last: Option<u32> = None;
    let mut head = [0u8; 4];
    let mut body = vec![0u8; 2048];
    let mut after = 0;
    while last.is_none_or(|l| l + 1 < stalled + 200) {
        s.read_exact(&mut head).unwrap_or_else(|e| {
            panic!(
                "{what}: after {last:?} (stalled at {stalled}; drops {}, to clients {}): {e}",
                p.counter(Counter::DropStreamBacklog),
                p.counter(Counter::RelayPeerToClientPackets)
            )
        });
        assert_eq!(
            head[..2],
            [0x40, 0x01],
            "{what}: after {last:?}: not ChannelData"
        );
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        assert_eq!(len, SIZE, "{what}: after {last:?}: a frame's length");
        s.read_exact(&mut body[..len.div_ceil(4) * 4])
            .unwrap_or_else(|e| panic!("{what}: after {last:?}: {e}"));
        assert!(
            body[4..len].iter().all(|&b| b == 0xC3),
            "{what}: bytes changed"
        );
        let n = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        assert!(last.is_none_or(|l| n > l), "{what}: {n} after {last:?}");
        // The first of them may still meet the full queue; the last 100 come when the
        // client has long caught up.
        if n >= stalled + 100 {
            assert_eq!(last, Some(n - 1), "{what}: lost after the client caught up");
            after += 1;
        }
        last = Some(n);
    }
    sender.join().unwrap();
    assert_eq!(after, 100, "{what}");
    // The client's own data still reaches the peer, in order.
    for i in 0u32..50 {
        let mut frame = vec![0x40, 0x01, 0, 8];
        frame.extend_from_slice(&i.to_be_bytes());
        frame.extend_from_slice(&[0x77; 4]);
        s.write_all(&frame).unwrap();
    }
    s.flush().unwrap();
    let mut buf = [0u8; 64];
    for i in 0u32..50 {
        let (n, _) = peer
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("{what}: datagram {i} to the peer: {e}"));
        assert_eq!(
            &buf[..n],
            &[&i.to_be_bytes()[..], &[0x77; 4]].concat(),
            "{what}"
        );
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn tls_client(
    p: &Portico,
    tcp: std::net::TcpStream,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    crate::tcp::tls_client(&p.state_dir.join("cert.pem"), tcp)
}
