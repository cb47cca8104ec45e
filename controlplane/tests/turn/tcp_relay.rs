//! RFC 6062 TCP relays: coturn's `turnutils_uclient -T` (TCP relays between pairs of its
//! clients: Connect on one side, ConnectionAttempt on the other, ConnectionBind on both)
//! over TCP and over TLS with no loss; and the kit's own stream client doing Connect to a
//! TCP echo peer and ConnectionBind, a peer connecting to the relayed address
//! (ConnectionAttempt), bytes both ways through the pipe with a small buffer (back-pressure),
//! the refusals (no permission 403, special-purpose peer 403 also IPv4-mapped, unknown
//! CONNECTION-ID 400, a TCP relay asked over UDP 400, an unpermitted peer closed) and the
//! end of every data connection with the control connection.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use portico_shared::counters::Counter;
use portico_testkit::net::{expect_closed, tcp_connect, tcp_from};
use portico_testkit::process::run;
use portico_testkit::stun::{
    new_tid, Builder, Class, Msg, ALLOCATE, CONNECT, CONNECTION_ATTEMPT, CONNECTION_BIND,
    CONNECTION_ID, CREATE_PERMISSION, NONCE, REALM, REQUESTED_TRANSPORT, XOR_PEER_ADDRESS,
    XOR_RELAYED_ADDRESS,
};
use portico_testkit::turn::{TcpEchoPeer, TurnClient, PASSWORD, USER};
use portico_testkit::{free_port, Portico, LOCAL4};

use crate::tcp::{error_code, parse, tls_spec, Stream};
use crate::{totals, turn_spec, uclient, LIMIT};

fn tcp_transport(b: Builder) -> Builder {
    b.attr(REQUESTED_TRANSPORT, &[6, 0, 0, 0])
}

/// One connection of the kit's client to the server: requests signed after the 401 round
/// trip of this connection (the nonce is tied to the client's address), and the
/// indications that arrive meanwhile kept for the test.
struct Conn {
    s: Stream,
    c: TurnClient,
    indications: Vec<Msg>,
}

impl Conn {
    fn new(s: Stream) -> Conn {
        Conn {
            s,
            // The client only builds messages; its UDP socket is not used.
            c: TurnClient::new(SocketAddr::new(LOCAL4, 9), USER, PASSWORD),
            indications: Vec::new(),
        }
    }

    fn transact(&mut self, req: &[u8]) -> Msg {
        self.s.write(req);
        for _ in 0..100 {
            let m = parse(&self.s.read_frame());
            if m.class() == Class::Indication {
                self.indications.push(m);
                continue;
            }
            if m.tid()[..] == req[8..20] {
                return m;
            }
        }
        panic!("no answer");
    }

    /// A signed request; the 401 (or 438) round trip first when needed.
    fn request(&mut self, method: u16, attrs: &dyn Fn(Builder) -> Builder) -> Msg {
        for _ in 0..3 {
            let m = self.transact(&self.c.build(method, &new_tid(), attrs));
            match error_code(&m) {
                Some(401 | 438) => {
                    self.c.realm = m.get(REALM).map(<[u8]>::to_vec);
                    self.c.nonce = m.get(NONCE).map(<[u8]>::to_vec);
                }
                _ => return m,
            }
        }
        panic!("no final answer to {method:#x}");
    }

    /// Allocates a TCP relay; returns the relayed address.
    fn allocate_tcp(&mut self) -> SocketAddr {
        let m = self.request(ALLOCATE, &tcp_transport);
        assert_eq!(error_code(&m), None, "a TCP allocation over TCP");
        m.xor_address(XOR_RELAYED_ADDRESS)
            .unwrap_or_else(|| panic!("no XOR-RELAYED-ADDRESS"))
    }

    fn permit(&mut self, peer: SocketAddr) {
        let m = self.request(CREATE_PERMISSION, &|b| {
            b.xor_address(XOR_PEER_ADDRESS, peer)
        });
        assert_eq!(error_code(&m), None, "CreatePermission {peer}");
    }

    /// Connect to `peer`: the answer (success with CONNECTION-ID, or an error).
    fn connect(&mut self, peer: SocketAddr) -> Msg {
        self.request(CONNECT, &|b| b.xor_address(XOR_PEER_ADDRESS, peer))
    }

    fn bind(&mut self, id: u32) -> Msg {
        self.request(CONNECTION_BIND, &|b| b.u32(CONNECTION_ID, id))
    }

    /// The next ConnectionAttempt indication: (CONNECTION-ID, XOR-PEER-ADDRESS).
    fn connection_attempt(&mut self) -> (u32, SocketAddr) {
        let m = match self.indications.pop() {
            Some(m) => m,
            None => parse(&self.s.read_frame()),
        };
        assert_eq!(m.class(), Class::Indication);
        assert_eq!(m.method(), CONNECTION_ATTEMPT);
        (
            m.u32(CONNECTION_ID).expect("CONNECTION-ID"),
            m.xor_address(XOR_PEER_ADDRESS).expect("XOR-PEER-ADDRESS"),
        )
    }
}

fn connection_id(m: &Msg) -> u32 {
    assert_eq!(error_code(m), None, "Connect succeeds");
    m.u32(CONNECTION_ID)
        .expect("a Connect success carries CONNECTION-ID")
}

/// `n` bytes written on one thread and read back on this one through an echo: they come back
/// in order and whole.
fn echo_bulk(s: &TcpStream, n: usize) {
    let mut w = s.try_clone().unwrap();
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let expected = data.clone();
    let writer = std::thread::spawn(move || {
        for chunk in data.chunks(7001) {
            w.write_all(chunk).unwrap();
        }
    });
    let mut r = s.try_clone().unwrap();
    r.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = vec![0u8; n];
    r.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("reading {n} echoed bytes: {e}"));
    writer.join().unwrap();
    assert!(got == expected, "the {n} bytes came back changed");
}

fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)
        .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    b
}

#[test]
fn connect_connection_attempt_bind_refusals_and_the_end_with_the_allocation() {
    // A small pipe buffer, so the bulk transfer goes through back-pressure.
    let p = Portico::start(
        "turn-tcp-relay",
        turn_spec("auto", true).turn("tcp_output_buffer = 8192"),
    );
    let server = p.udp4();
    let echo = TcpEchoPeer::start(LOCAL4);

    let mut ctl = Conn::new(Stream::Tcp(tcp_connect(server)));
    let relayed = ctl.allocate_tcp();
    assert_eq!(relayed.ip(), LOCAL4);

    // RFC 6062 §5.1: a TCP relay asked over UDP is a 400.
    let mut u = TurnClient::new(server, USER, PASSWORD);
    assert_eq!(u.allocate_with(&tcp_transport).code(), Some(400));

    // No permission for the peer yet: 403, and no connection is made.
    let m = ctl.connect(echo.addr);
    assert_eq!(error_code(&m), Some(403), "Connect without a permission");
    assert!(echo.sources.lock().unwrap().is_empty());

    // Special-purpose peers are refused by the policy, in the IPv4-mapped IPv6 form too.
    let special = p.counter(Counter::TurnPeerDeniedSpecial);
    let metadata = Ipv4Addr::new(169, 254, 169, 254);
    for peer in [
        SocketAddr::new(IpAddr::V4(metadata), 80),
        SocketAddr::new(IpAddr::V6(metadata.to_ipv6_mapped()), 80),
    ] {
        let m = ctl.connect(peer);
        assert_eq!(error_code(&m), Some(403), "Connect to {peer}");
    }
    assert_eq!(p.counter(Counter::TurnPeerDeniedSpecial), special + 2);

    // With a permission: Connect, then ConnectionBind on a new connection, then bytes.
    ctl.permit(echo.addr);
    // A permitted address where nothing listens: 447 once the connection is refused.
    let nobody = SocketAddr::new(LOCAL4, free_port());
    assert_eq!(
        error_code(&ctl.connect(nobody)),
        Some(447),
        "Connect to {nobody}"
    );
    let id = connection_id(&ctl.connect(echo.addr));
    assert_eq!(
        error_code(&ctl.connect(echo.addr)),
        Some(446),
        "a second Connect to the same peer"
    );
    assert_eq!(
        error_code(&ctl.bind(id)),
        Some(400),
        "the control connection cannot become a data connection"
    );
    let mut data = Conn::new(Stream::Tcp(tcp_connect(server)));
    assert_eq!(
        error_code(&data.bind(id ^ 0x5a5a_5a5a)),
        Some(400),
        "unknown id"
    );
    assert_eq!(error_code(&data.bind(id)), None, "ConnectionBind");
    let Stream::Tcp(d1) = data.s else {
        unreachable!()
    };
    echo_bulk(&d1, 1 << 20);
    assert!(echo.echoed.load(std::sync::atomic::Ordering::SeqCst) >= 1 << 20);
    assert!(p.counter(Counter::TcpRelayConnected) >= 1);
    // Counted as the bytes move (folded to shared memory at the end of the loop turn).
    let want = 1 << 20;
    assert!(
        p.wait_counter(Counter::RelayClientToPeerBytes, want) >= want,
        "RelayClientToPeerBytes did not reach {want}"
    );
    let want = 1 << 20;
    assert!(
        p.wait_counter(Counter::RelayPeerToClientBytes, want) >= want,
        "RelayPeerToClientBytes did not reach {want}"
    );

    // A peer connecting to the relayed address (it has a permission: 127.0.0.1): the
    // client is told, binds, and bytes go both ways, those sent before the bind included.
    let mut incoming = tcp_connect(relayed);
    incoming.write_all(b"early bytes").unwrap();
    let (id2, from) = ctl.connection_attempt();
    assert_eq!(from, incoming.local_addr().unwrap());
    let mut data2 = Conn::new(Stream::Tcp(tcp_connect(server)));
    assert_eq!(error_code(&data2.bind(id2)), None, "ConnectionBind");
    let mut again = Conn::new(Stream::Tcp(tcp_connect(server)));
    assert_eq!(
        error_code(&again.bind(id2)),
        Some(400),
        "a data connection is bound once"
    );
    drop(again);
    let Stream::Tcp(mut d2) = data2.s else {
        unreachable!()
    };
    assert_eq!(read_exactly(&mut d2, 11), b"early bytes");
    d2.write_all(b"to the peer").unwrap();
    assert_eq!(read_exactly(&mut incoming, 11), b"to the peer");
    echo_bulk_reverse(&mut incoming, &d2);

    // A peer without a permission (127.0.0.2) is closed, and counted.
    let refused = p.counter(Counter::TcpRelayRefused);
    let mut stranger = tcp_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), relayed).unwrap();
    expect_closed(&mut stranger, Duration::from_secs(5), "an unpermitted peer");
    let want = refused + 1;
    assert!(
        p.wait_counter(Counter::TcpRelayRefused, want) >= want,
        "TcpRelayRefused did not reach {want}"
    );

    // The control connection closes: the allocation ends, and every data connection with
    // it, on both sides.
    let ended = p.counter(Counter::TcpRelayClosedAllocation);
    drop(ctl);
    let (mut d1, mut d2) = (d1, d2);
    expect_closed(&mut d1, Duration::from_secs(5), "data connection 1");
    expect_closed(&mut d2, Duration::from_secs(5), "data connection 2");
    expect_closed(&mut incoming, Duration::from_secs(5), "the incoming peer");
    let want = ended + 2;
    assert!(
        p.wait_counter(Counter::TcpRelayClosedAllocation, want) >= want,
        "TcpRelayClosedAllocation did not reach {want}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while echo.closed() < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(echo.closed(), 1, "the echo peer's connection was closed");
    assert_eq!(p.counter(Counter::TurnAllocationsActive), 0);
    // The relayed address is closed too.
    assert!(TcpStream::connect_timeout(&relayed, Duration::from_secs(2)).is_err());
}

/// Bytes from the peer side (`peer`) to the client's data connection and back: the client
/// echoes what it reads.
fn echo_bulk_reverse(peer: &mut TcpStream, client: &TcpStream) {
    let n = 256 * 1024;
    let mut c = client.try_clone().unwrap();
    let echoer = std::thread::spawn(move || {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4096];
        let mut left = n;
        while left > 0 {
            let k = c.read(&mut buf[..left.min(4096)]).unwrap();
            assert!(k > 0, "the data connection closed early");
            c.write_all(&buf[..k]).unwrap();
            left -= k;
        }
    });
    echo_bulk(peer, n);
    echoer.join().unwrap();
}

/// `turnutils_uclient -T`: pairs of clients each allocate a TCP relay; one connects to the
/// other's relayed address, both bind data connections, and every message comes back.
fn uclient_tcp_relays(p: &Portico, port: u16, flags: &[&str]) {
    const MESSAGES: u64 = 50;
    const CLIENTS: u64 = 4;
    let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    let (n, m, port) = (MESSAGES.to_string(), CLIENTS.to_string(), port.to_string());
    args.extend(
        [
            "-T",
            "-u",
            USER,
            "-w",
            PASSWORD,
            "-p",
            &port,
            "-n",
            &n,
            "-m",
            &m,
            "-l",
            "172",
            "127.0.0.1",
        ]
        .map(String::from),
    );
    let r = run(&uclient(), &args, &[], LIMIT);
    let what = format!("turnutils_uclient -T {flags:?}");
    assert!(!r.timed_out, "{what} did not finish:\n{}", r.text);
    assert_eq!(r.code, Some(0), "{what} failed:\n{}", r.text);
    assert!(
        r.text.contains("Total lost packets 0 (0.000000%)"),
        "{what} lost packets:\n{}",
        r.text
    );
    let (sent, received) = totals(&r.text).unwrap_or_else(|| panic!("no totals:\n{}", r.text));
    assert!(sent >= MESSAGES * CLIENTS, "{what}:\n{}", r.text);
    assert_eq!(received, sent, "{what}:\n{}", r.text);
    // The traffic went through Portico's TCP relays.
    assert!(p.counter(Counter::TcpRelayBound) >= CLIENTS, "{what}");
    assert!(
        p.counter(Counter::TcpRelayConnected) >= CLIENTS / 2,
        "{what}"
    );
    assert!(p.counter(Counter::TcpRelayAttempt) >= CLIENTS / 2, "{what}");
    assert!(p.counter(Counter::RelayClientToPeerBytes) >= sent * 172);
}

#[test]
fn uclient_tcp_relays_over_tcp() {
    let p = Portico::start("turn-tcp-relay-uc", turn_spec("auto", true));
    uclient_tcp_relays(&p, p.port, &[]);
    // Everything ends with the control connections.
    let want = p.counter(Counter::TurnAllocationsCreated);
    assert!(
        p.wait_counter(Counter::TurnAllocationsDeleted, want) >= want,
        "TurnAllocationsDeleted did not reach {want}"
    );
    assert_eq!(p.counter(Counter::TurnAllocationsActive), 0);
}

#[test]
fn uclient_tcp_relays_over_tls() {
    let (spec, port) = tls_spec("auto");
    let p = Portico::start("turn-tls-relay-uc", spec);
    uclient_tcp_relays(&p, port, &["-S"]);
    assert!(p.counter(Counter::TlsHandshakes) >= 4);
}
