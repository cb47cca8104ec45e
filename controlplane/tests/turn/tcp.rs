//! TURN over TCP and TLS (RFC 8656 §3.1): coturn's `turnutils_uclient` over TCP (`-t`) and
//! TLS (`-t -S`; `-S` alone is DTLS) relays to `turnutils_peer` with no loss; Portico's own stream client checks
//! the framing (ChannelData padded to 4 bytes both ways), that an allocation ends with its
//! connection, and that bad input (a truncated frame, a frame over the limit, garbage after
//! a valid message, a TLS alert mid-stream) gets a clean close and a counter while a UDP
//! relay stream next to it loses nothing.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_shared::counters::Counter;
use portico_testkit::net::{expect_closed, tcp_connect};
use portico_testkit::process::{alone, run};
use portico_testkit::stun::{
    new_tid, Msg, ALLOCATE, BINDING, CHANNEL_BIND, CHANNEL_NUMBER, NONCE, REALM,
    XOR_MAPPED_ADDRESS, XOR_PEER_ADDRESS, XOR_RELAYED_ADDRESS,
};
use portico_testkit::turn::{
    decode_relayed, udp_transport, EchoPeer, Relayed, TurnClient, PASSWORD, USER,
};
use portico_testkit::{free_port, Portico, Spec, LOCAL4};

use crate::{coturn_peer, totals, turn_spec, uclient, CLIENTS, LIMIT, MESSAGES};

/// A TURN spec with a TLS listener on a free port of 127.0.0.1; returns it and the port.
pub(crate) fn tls_spec(io: &'static str) -> (Spec, u16) {
    let port = free_port();
    let spec = turn_spec(io, true).turn(&format!("listen_tls = [\"127.0.0.1:{port}\"]"));
    (spec, port)
}

/// `turnutils_uclient` with `flags` to `port`, relaying to a `turnutils_peer`: every
/// message comes back, and the traffic went through Portico's TCP thread.
/// Runs `turnutils_uclient` with `flags` against `port`, relaying to a `turnutils_peer`:
/// `CLIENTS` clients × `MESSAGES` messages of 172 bytes.
pub(crate) fn uclient_run(p: &Portico, port: u16, flags: &[&str]) -> portico_testkit::process::Run {
    let peer = coturn_peer(p);
    let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    let n = MESSAGES.to_string();
    let m = CLIENTS.to_string();
    let port = port.to_string();
    let peer_port = peer.addr.port().to_string();
    args.extend(
        [
            "-u",
            USER,
            "-w",
            PASSWORD,
            "-p",
            &port,
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port,
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
    run(&uclient(), &args, &[], LIMIT)
}

fn uclient_without_loss(p: &Portico, port: u16, flags: &[&str]) {
    let r = uclient_run(p, port, flags);
    let what = format!("turnutils_uclient {flags:?}");
    assert!(!r.timed_out, "{what} did not finish:\n{}", r.text);
    assert_eq!(r.code, Some(0), "{what} failed:\n{}", r.text);
    assert!(
        r.text.contains("Total lost packets 0 (0.000000%)"),
        "{what} lost packets:\n{}",
        r.text
    );
    let (sent, received) = totals(&r.text).unwrap_or_else(|| panic!("no totals:\n{}", r.text));
    assert_eq!(sent, MESSAGES * CLIENTS, "{what}:\n{}", r.text);
    assert_eq!(received, sent, "{what}:\n{}", r.text);
    assert!(p.counter(Counter::TcpAccepted) >= CLIENTS);
    // Each client is a pair of sessions (with RTCP, more: the odd-port allocations).
    assert!(p.counter(Counter::TurnAllocationsCreated) >= CLIENTS);
    assert!(p.counter(Counter::RelayClientToPeerPackets) >= sent);
    assert!(p.counter(Counter::RelayPeerToClientPackets) >= sent);
    assert_eq!(p.counter(Counter::DropStreamBacklog), 0);
}

#[test]
fn uclient_over_tcp_channel_data() {
    // uclient counts an echo that comes late as lost: under the CPU load of the browser
    // and ICE tests of this binary (2 cores) it did, with Portico relaying every packet.
    let _alone = alone();
    let p = Portico::start("turn-tcp", turn_spec("auto", true));
    uclient_without_loss(&p, p.port, &["-t"]);
    // The allocations end with their connections.
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.counter(Counter::TurnAllocationsActive) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(p.counter(Counter::TurnAllocationsActive), 0);
}

#[test]
fn uclient_over_tcp_send_indications_without_rtcp() {
    // uclient counts an echo that comes late as lost: under the CPU load of the browser
    // and ICE tests of this binary (2 cores) it did, with Portico relaying every packet.
    let _alone = alone();
    let p = Portico::start("turn-tcp-s", turn_spec("epoll", true));
    uclient_without_loss(&p, p.port, &["-t", "-s", "-c"]);
}

#[test]
fn uclient_over_tls_channel_data() {
    // uclient counts an echo that comes late as lost: under the CPU load of the browser
    // and ICE tests of this binary (2 cores) it did, with Portico relaying every packet.
    let _alone = alone();
    let (spec, port) = tls_spec("auto");
    let p = Portico::start("turn-tls", spec);
    uclient_without_loss(&p, port, &["-t", "-S"]);
    assert!(p.counter(Counter::TlsHandshakes) >= CLIENTS);
}

#[test]
fn uclient_over_tls_send_indications() {
    // uclient counts an echo that comes late as lost: under the CPU load of the browser
    // and ICE tests of this binary (2 cores) it did, with Portico relaying every packet.
    let _alone = alone();
    let (spec, port) = tls_spec("auto");
    let p = Portico::start("turn-tls-s", spec);
    uclient_without_loss(&p, port, &["-t", "-S", "-s"]);
}

/// A stream to the server: plain TCP or TLS (trusting the generated certificate).
pub(crate) enum Stream {
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

/// A TLS client for "localhost" over `tcp`, trusting the certificates in `cert` (PEM).
pub(crate) fn tls_client(
    cert: &Path,
    tcp: TcpStream,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .unwrap_or_else(|e| panic!("{}: {e}", cert.display()))
    {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

impl Stream {
    pub(crate) fn tls(to: SocketAddr, cert: &Path) -> Stream {
        Stream::Tls(Box::new(tls_client(cert, tcp_connect(to))))
    }

    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }

    pub(crate) fn write(&mut self, b: &[u8]) {
        let r = match self {
            Stream::Tcp(s) => s.write_all(b).and_then(|_| s.flush()),
            Stream::Tls(s) => s.write_all(b).and_then(|_| s.flush()),
        };
        r.unwrap_or_else(|e| panic!("write: {e}"));
    }

    pub(crate) fn read_exact(&mut self, b: &mut [u8]) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.read_exact(b),
            Stream::Tls(s) => s.read_exact(b),
        }
    }

    /// One frame: a STUN message or a ChannelData message with its padding, which must be
    /// there over a stream.
    pub(crate) fn read_frame(&mut self) -> Vec<u8> {
        let mut head = [0u8; 4];
        self.read_exact(&mut head)
            .unwrap_or_else(|e| panic!("reading a frame: {e}"));
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let rest = if head[0] & 0xC0 == 0x40 {
            len.div_ceil(4) * 4
        } else {
            16 + len
        };
        let mut all = head.to_vec();
        all.resize(4 + rest, 0xEE);
        self.read_exact(&mut all[4..])
            .unwrap_or_else(|e| panic!("reading a {rest}-byte frame body: {e}"));
        all
    }

    /// Sends a request and reads frames until its answer.
    fn transact(&mut self, req: &[u8]) -> Vec<u8> {
        self.write(req);
        for _ in 0..100 {
            let f = self.read_frame();
            if f[0] & 0xC0 == 0 && f.len() >= 20 && f[4..20] == req[4..20] {
                return f;
            }
        }
        panic!("no answer");
    }
}

/// Allocates over `s` (401 round trip first) and binds channel 0x4001 to `peer`.
pub(crate) fn allocate_and_bind(s: &mut Stream, peer: SocketAddr) -> SocketAddr {
    // The client only builds messages; its UDP socket is not used.
    let mut c = TurnClient::new(SocketAddr::new(LOCAL4, 9), USER, PASSWORD);
    let m = parse(&s.transact(&c.build(ALLOCATE, &new_tid(), &udp_transport)));
    assert_eq!(error_code(&m), Some(401));
    c.realm = m.get(REALM).map(<[u8]>::to_vec);
    c.nonce = m.get(NONCE).map(<[u8]>::to_vec);
    let m = parse(&s.transact(&c.build(ALLOCATE, &new_tid(), &udp_transport)));
    assert_eq!(error_code(&m), None, "Allocate over a stream succeeds");
    let relayed = m
        .xor_address(XOR_RELAYED_ADDRESS)
        .unwrap_or_else(|| panic!("no XOR-RELAYED-ADDRESS"));
    let mapped = m
        .xor_address(XOR_MAPPED_ADDRESS)
        .unwrap_or_else(|| panic!("no XOR-MAPPED-ADDRESS"));
    assert_eq!(
        mapped,
        s.tcp().local_addr().unwrap(),
        "mapped = the client's end"
    );
    let r = s.transact(&c.build(CHANNEL_BIND, &new_tid(), &|b| {
        b.attr(CHANNEL_NUMBER, &[0x40, 0x01, 0, 0])
            .xor_address(XOR_PEER_ADDRESS, peer)
    }));
    assert_eq!(error_code(&parse(&r)), None, "ChannelBind");
    relayed
}

pub(crate) fn parse(frame: &[u8]) -> Msg {
    Msg::parse(frame).unwrap_or_else(|e| panic!("not STUN ({e}): {frame:02x?}"))
}

pub(crate) fn error_code(m: &Msg) -> Option<u16> {
    m.error_code().map(|(code, _)| code)
}

fn channel_data(data: &[u8]) -> Vec<u8> {
    let mut m = vec![0x40, 0x01];
    m.extend_from_slice(&(data.len() as u16).to_be_bytes());
    m.extend_from_slice(data);
    m.resize(4 + data.len().div_ceil(4) * 4, 0);
    m
}

/// ChannelData both ways over the stream, with every length mod 4: the padding is there
/// on the wire and the peer gets exactly the data.
pub(crate) fn echo_over(s: &mut Stream, peer: &EchoPeer) {
    for n in [1usize, 2, 3, 4, 5, 7, 100, 1001] {
        let data: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
        s.write(&channel_data(&data));
        let f = s.read_frame();
        assert_eq!(f.len() % 4, 0, "a {n}-byte ChannelData is padded to 4");
        match decode_relayed(&f) {
            Relayed::Channel { number, data: d } => {
                assert_eq!(number, 0x4001);
                assert_eq!(d, data, "{n} bytes come back unchanged");
            }
            other => panic!("expected ChannelData, got {other:?}"),
        }
    }
    assert!(peer.count() >= 8);
}

/// A UDP client relaying to an echo peer through Portico the whole time; returns how many
/// of `n` datagrams came back (counted as they arrive, so no socket buffer overflows).
pub(crate) fn udp_stream_during(p: &Portico, n: usize, during: impl FnOnce()) -> usize {
    let peer = EchoPeer::start(LOCAL4);
    let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);
    c.allocate();
    assert!(c.bind(0x4002, peer.addr).is_success());
    let sock = c.sock.try_clone().unwrap();
    let server = c.server;
    let sender = std::thread::spawn(move || {
        for i in 0..n {
            let mut m = vec![0x40, 0x02, 0, 8];
            m.extend_from_slice(&(i as u64).to_be_bytes());
            sock.send_to(&m, server).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let receiver = std::thread::spawn(move || {
        let mut got = 0;
        while let Some(r) = c.recv_relayed(Duration::from_millis(3000)) {
            if let Relayed::Channel { number: 0x4002, .. } = r {
                got += 1;
            }
            if got == n {
                break;
            }
        }
        got
    });
    during();
    sender.join().unwrap();
    receiver.join().unwrap()
}

/// Waits (bounded) for the server to close: an alert may come first, nothing else.
fn expect_closed_after_alert(t: &mut TcpStream, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    t.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 256];
    loop {
        match t.read(&mut buf) {
            Ok(0) => return,
            // An alert: in the clear (0x15), or encrypted after a TLS 1.3 handshake (0x17).
            Ok(n) => assert!(
                matches!(buf[0], 0x15 | 0x17),
                "{what}: only an alert record, got {n} bytes {:02x?}",
                &buf[..n]
            ),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset) => return,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                assert!(Instant::now() < deadline, "{what}: connection left open")
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

pub(crate) fn cert_of(p: &Portico) -> PathBuf {
    p.state_dir.join("cert.pem")
}

#[test]
fn framing_over_tcp_and_bad_input_close_cleanly() {
    let p = Portico::start("turn-tcp-own", turn_spec("auto", true));
    let peer = EchoPeer::start(LOCAL4);
    let server = p.udp4();
    let got = udp_stream_during(&p, 400, || {
        // A good connection: allocate, bind, echo with padding; closing it ends the
        // allocation.
        let mut s = Stream::Tcp(tcp_connect(server));
        allocate_and_bind(&mut s, peer.addr);
        echo_over(&mut s, &peer);
        let deleted = p.counter(Counter::TurnAllocationsDeleted);
        drop(s);
        assert!(p.wait_counter(Counter::TurnAllocationsDeleted, deleted + 1) > deleted);

        // Garbage after a valid message: the message is answered, then the connection is
        // closed and counted.
        let framing = p.counter(Counter::DropTcpFraming);
        let mut s = tcp_connect(server);
        let mut b = TurnClient::new(server, USER, PASSWORD).build(BINDING, &new_tid(), &|b| b);
        b.extend_from_slice(b"\xff\xffGARBAGE!");
        s.write_all(&b).unwrap();
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        assert_eq!(
            &head[0..2],
            &[0x01, 0x01],
            "the Binding before it is answered"
        );
        let mut rest = vec![0u8; usize::from(u16::from_be_bytes([head[2], head[3]]))];
        s.read_exact(&mut rest).unwrap();
        expect_closed(&mut s, Duration::from_secs(5), "garbage after a message");
        assert!(p.wait_counter(Counter::DropTcpFraming, framing + 1) > framing);

        // A frame longer than the limit (a ChannelData claiming 60000 bytes): closed.
        let mut s = Stream::Tcp(tcp_connect(server));
        allocate_and_bind(&mut s, peer.addr);
        let deleted = p.counter(Counter::TurnAllocationsDeleted);
        let mut big = vec![0x40, 0x01, 0xEA, 0x60];
        big.extend_from_slice(&[0u8; 3000]);
        let Stream::Tcp(mut t) = s else {
            unreachable!()
        };
        let _ = t.write_all(&big);
        expect_closed(&mut t, Duration::from_secs(5), "an oversized frame");
        assert!(p.wait_counter(Counter::DropTcpFraming, framing + 2) >= framing + 2);
        // Its allocation went with it.
        assert!(p.wait_counter(Counter::TurnAllocationsDeleted, deleted + 1) > deleted);

        // A truncated frame, then the client goes away: its allocation ends.
        let mut s = Stream::Tcp(tcp_connect(server));
        allocate_and_bind(&mut s, peer.addr);
        let deleted = p.counter(Counter::TurnAllocationsDeleted);
        s.write(&channel_data(b"whole")[..6]);
        let Stream::Tcp(t) = s else { unreachable!() };
        t.shutdown(std::net::Shutdown::Both).unwrap();
        assert!(p.wait_counter(Counter::TurnAllocationsDeleted, deleted + 1) > deleted);
    });
    assert_eq!(got, 400, "the UDP relay stream lost datagrams meanwhile");
    assert_eq!(
        p.counter(Counter::TurnAllocationsActive),
        1,
        "only the UDP one"
    );
}

#[test]
fn framing_over_tls_and_an_alert_mid_stream() {
    let (spec, port) = tls_spec("auto");
    let p = Portico::start("turn-tls-own", spec);
    let peer = EchoPeer::start(LOCAL4);
    let tls_addr = SocketAddr::new(LOCAL4, port);
    let got = udp_stream_during(&p, 300, || {
        let mut s = Stream::tls(tls_addr, &cert_of(&p));
        allocate_and_bind(&mut s, peer.addr);
        echo_over(&mut s, &peer);
        assert!(p.counter(Counter::TlsHandshakes) >= 1);

        // A fatal alert record written raw into the session: the server closes, counts it,
        // and the allocation ends.
        let errors = p.counter(Counter::TcpClosedTlsError);
        let deleted = p.counter(Counter::TurnAllocationsDeleted);
        let Stream::Tls(mut t) = s else {
            unreachable!()
        };
        t.sock
            .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
            .unwrap();
        expect_closed_after_alert(&mut t.sock, "an alert mid-stream");
        assert!(p.wait_counter(Counter::TcpClosedTlsError, errors + 1) > errors);
        assert!(p.wait_counter(Counter::TurnAllocationsDeleted, deleted + 1) > deleted);

        // Plain STUN on the TLS port is not a handshake: closed and counted.
        let mut t = tcp_connect(tls_addr);
        let b = TurnClient::new(tls_addr, USER, PASSWORD).build(BINDING, &new_tid(), &|b| b);
        t.write_all(&b).unwrap();
        expect_closed_after_alert(&mut t, "plain STUN on the TLS port");
        assert!(p.wait_counter(Counter::TcpClosedTlsError, errors + 2) >= errors + 2);
    });
    assert_eq!(got, 300, "the UDP relay stream lost datagrams meanwhile");
}

/// A connection that never completes the TLS handshake is closed at the deadline... the
/// deadline is 10 s, so this checks only that a half-open connection does not block others.
#[test]
fn a_stalled_tls_handshake_does_not_block_others() {
    let (spec, port) = tls_spec("auto");
    let p = Portico::start("turn-tls-stall", spec);
    let tls_addr = SocketAddr::new(LOCAL4, port);
    let _stalled = tcp_connect(tls_addr);
    let peer = EchoPeer::start(LOCAL4);
    let mut s = Stream::tls(tls_addr, &cert_of(&p));
    allocate_and_bind(&mut s, peer.addr);
    echo_over(&mut s, &peer);
}
