//! One port for HTTPS and TURN over TLS (`proxy.turn_on_https`): on the proxy's HTTPS
//! listener, curl is still routed by Host to nginx while `turnutils_uclient -t -S` and a
//! client of our own offering ALPN `stun.turn` (both: the socket handed to the dataplane,
//! which terminates TLS) and clients without ALPN (recognised by their first decrypted
//! bytes, relayed to the dataplane in plaintext) allocate and relay on the same port. Switched off, TURN bytes there get the HTTP
//! answer they always got. A blacklisted source is refused on the hand-off path too, and the
//! dataplane serves a handed-over connection as the real client's address.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_shared::counters::Counter;
use portico_shared::handoff::{header, socket_path, KIND_PLAIN};
use portico_testkit::fixtures::Nginx;
use portico_testkit::http::curl;
use portico_testkit::net::{expect_closed, tcp_connect, tcp_from};
use portico_testkit::stun::{
    new_tid, Builder, Msg, ALLOCATE, CHANNEL_BIND, CHANNEL_NUMBER, NONCE, REALM,
    XOR_MAPPED_ADDRESS, XOR_PEER_ADDRESS,
};
use portico_testkit::turn::{
    decode_relayed, udp_transport, EchoPeer, Relayed, TurnClient, PASSWORD, USER,
};
use portico_testkit::{free_port, Portico, LOCAL4};

use crate::{totals, turn_spec, CLIENTS, MESSAGES};

/// TURN with loopback peers plus the proxy's HTTPS listener on a free port, routing
/// `alpha.test` to nginx; returns the installation and the HTTPS port.
fn start(tag: &str, turn_on_https: bool, nginx: &Nginx) -> (Portico, u16) {
    let https = free_port();
    let spec = turn_spec("auto", true)
        .proxy(&format!(
            "[proxy]\nturn_on_https = {turn_on_https}\n\n\
             [proxy.listen]\nhttps = \"127.0.0.1:{https}\"\n\n\
             [proxy.limits]\nfirst_message_timeout = 3\n\n\
             [[proxy.services]]\nname = \"alpha.test\"\nhost = \"127.0.0.1\"\nhttp = {}\n",
            nginx.alpha
        ))
        .ready_port(https);
    (Portico::start(tag, spec), https)
}

/// `GET /` for alpha.test over HTTPS on `port`: nginx's answer, routed by Host.
fn assert_https_routed(port: u16) {
    let (code, body) = curl("https", "alpha.test", port, "/", &["-k"]);
    assert_eq!(code, 200, "curl https://alpha.test:{port}/: {body}");
    assert!(body.starts_with("alpha "), "routed to alpha: {body}");
}

fn tls_client(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AnyCert(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls_pki_types::CertificateDer<'_>,
            _: &[rustls_pki_types::CertificateDer<'_>],
            _: &rustls_pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls_pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls_pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(c)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_connect(to: SocketAddr, alpn: &[&[u8]]) -> Tls {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(tls_client(alpn), name).unwrap();
    rustls::StreamOwned::new(conn, tcp_connect(to))
}

/// One frame off a stream: STUN, or ChannelData with its padding.
fn read_frame(s: &mut impl Read) -> Vec<u8> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head)
        .unwrap_or_else(|e| panic!("reading a frame: {e}"));
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let rest = if head[0] & 0xC0 == 0x40 {
        len.div_ceil(4) * 4
    } else {
        16 + len
    };
    let mut all = head.to_vec();
    all.resize(4 + rest, 0);
    s.read_exact(&mut all[4..])
        .unwrap_or_else(|e| panic!("reading a frame body: {e}"));
    all
}

fn transact(s: &mut (impl Read + Write), req: &[u8]) -> Msg {
    s.write_all(req).unwrap();
    s.flush().unwrap();
    for _ in 0..100 {
        let f = read_frame(s);
        if f[0] & 0xC0 == 0 && f[4..20] == req[4..20] {
            return Msg::parse(&f).unwrap_or_else(|e| panic!("not STUN ({e})"));
        }
    }
    panic!("no answer");
}

/// Allocates over `s` and binds channel 0x4001 to `peer`; returns XOR-MAPPED-ADDRESS.
fn allocate_and_bind(s: &mut (impl Read + Write), peer: SocketAddr) -> SocketAddr {
    let mut c = TurnClient::new(SocketAddr::new(LOCAL4, 9), USER, PASSWORD);
    let m = transact(s, &c.build(ALLOCATE, &new_tid(), &udp_transport));
    assert_eq!(m.error_code().map(|e| e.0), Some(401));
    c.realm = m.get(REALM).map(<[u8]>::to_vec);
    c.nonce = m.get(NONCE).map(<[u8]>::to_vec);
    let m = transact(s, &c.build(ALLOCATE, &new_tid(), &udp_transport));
    assert_eq!(m.error_code(), None, "Allocate over the HTTPS port");
    let mapped = m
        .xor_address(XOR_MAPPED_ADDRESS)
        .expect("XOR-MAPPED-ADDRESS");
    let m = transact(
        s,
        &c.build(CHANNEL_BIND, &new_tid(), &|b| {
            b.attr(CHANNEL_NUMBER, &[0x40, 0x01, 0, 0])
                .xor_address(XOR_PEER_ADDRESS, peer)
        }),
    );
    assert_eq!(m.error_code(), None, "ChannelBind");
    mapped
}

/// ChannelData to the echo peer and back, several lengths.
fn echo(s: &mut (impl Read + Write)) {
    for n in [1usize, 3, 4, 100, 1001] {
        let data: Vec<u8> = (0..n).map(|i| (i * 5 + n) as u8).collect();
        let mut m = vec![0x40, 0x01];
        m.extend_from_slice(&(n as u16).to_be_bytes());
        m.extend_from_slice(&data);
        m.resize(4 + n.div_ceil(4) * 4, 0);
        s.write_all(&m).unwrap();
        s.flush().unwrap();
        match decode_relayed(&read_frame(s)) {
            Relayed::Channel { number, data: d } => {
                assert_eq!((number, d), (0x4001, data), "{n} bytes echoed");
            }
            other => panic!("expected ChannelData, got {other:?}"),
        }
    }
}

/// `turnutils_uclient -t -S` (TLS; coturn's client offers ALPN `stun.turn`) to `port`, relaying to a `turnutils_peer`.
fn uclient_tls_without_loss(p: &Portico, port: u16) {
    let r = crate::tcp::uclient_run(p, port, &["-t", "-S"]);
    assert!(!r.timed_out, "uclient did not finish:\n{}", r.text);
    assert_eq!(r.code, Some(0), "uclient failed:\n{}", r.text);
    assert!(
        r.text.contains("Total lost packets 0 (0.000000%)"),
        "uclient lost packets (hand-offs alpn {} plaintext {}, stream backlog drops {}, send \
         errors {}, relayed {}/{}):\n{}",
        handoffs(p, "alpn"),
        handoffs(p, "plaintext"),
        p.counter(Counter::DropStreamBacklog),
        p.counter(Counter::SendErrors),
        p.counter(Counter::RelayClientToPeerPackets),
        p.counter(Counter::RelayPeerToClientPackets),
        r.text
    );
    let (sent, received) = totals(&r.text).unwrap_or_else(|| panic!("no totals:\n{}", r.text));
    assert_eq!((sent, received), (MESSAGES * CLIENTS, MESSAGES * CLIENTS));
}

fn handoffs(p: &Portico, how: &str) -> f64 {
    p.metric("portico_proxy_turn_handoffs_total", &[("result", how)])
}

#[test]
fn https_and_turn_over_tls_share_the_port() {
    let nginx = Nginx::start("port443");
    let (p, https) = start("turn-443", true, &nginx);
    let to = SocketAddr::new(LOCAL4, https);
    assert_https_routed(https);

    // uclient (no ALPN) while curl goes on on the same port.
    let uclient_done = std::thread::scope(|s| {
        let u = s.spawn(|| uclient_tls_without_loss(&p, https));
        // A few requests spread over the run: concurrent, without starving uclient of the
        // box's two cores (its loss counts what is late at its end).
        let mut curls = 0;
        while !u.is_finished() && curls < 10 {
            assert_https_routed(https);
            curls += 1;
            std::thread::sleep(Duration::from_millis(300));
        }
        u.join().is_ok()
    });
    assert!(uclient_done, "uclient through the HTTPS port");
    // coturn's client offers ALPN `stun.turn`: its sockets went over whole.
    assert!(handoffs(&p, "alpn") >= CLIENTS as f64);
    assert!(p.counter(Counter::TurnAllocationsCreated) >= CLIENTS);
    assert!(p.counter(Counter::RelayPeerToClientPackets) >= MESSAGES * CLIENTS);

    // A client that says `stun.turn` in its ClientHello: the dataplane terminates its TLS.
    let peer = EchoPeer::start(LOCAL4);
    let alpn = handoffs(&p, "alpn");
    let mut s = tls_connect(to, &[b"stun.turn"]);
    let mapped = allocate_and_bind(&mut s, peer.addr);
    assert_eq!(
        s.conn.alpn_protocol(),
        Some(&b"stun.turn"[..]),
        "ALPN confirmed"
    );
    assert_eq!(
        mapped,
        s.sock.local_addr().unwrap(),
        "the real client address"
    );
    echo(&mut s);
    assert_eq!(handoffs(&p, "alpn"), alpn + 1.0);
    // One without ALPN: recognised by its first decrypted bytes (a STUN header), relayed
    // in plaintext; the dataplane still sees the real client address.
    let mut plain = tls_connect(to, &[]);
    let mapped = allocate_and_bind(&mut plain, peer.addr);
    assert_eq!(plain.conn.alpn_protocol(), None);
    assert_eq!(
        mapped,
        plain.sock.local_addr().unwrap(),
        "the real client address"
    );
    echo(&mut plain);
    assert_eq!(handoffs(&p, "plaintext"), 1.0);
    // Another one whose first message is ChannelData (no channel yet: dropped by the
    // engine, but it went there), then a Binding on the same connection.
    let mut cd = tls_connect(to, &[]);
    cd.write_all(&[0x40, 0x01, 0x00, 0x04, 1, 2, 3, 4]).unwrap();
    let m = transact(&mut cd, &Builder::binding().build());
    assert_eq!(m.xor_mapped(), Some(cd.sock.local_addr().unwrap()));
    assert_eq!(handoffs(&p, "plaintext"), 2.0);
    drop(plain);
    drop(cd);
    // HTTPS with ALPN http/1.1 on the same port next to it.
    let mut h = tls_connect(to, &[b"http/1.1"]);
    h.write_all(b"GET / HTTP/1.1\r\nHost: alpha.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = h.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("alpha "), "{answer}");
    assert_https_routed(https);
    // The allocation ends with its connection.
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.counter(Counter::TurnAllocationsActive) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(p.counter(Counter::TurnAllocationsActive), 0);
    assert_eq!(handoffs(&p, "failed"), 0.0);
}

#[test]
fn switched_off_turn_bytes_get_the_http_answer() {
    let nginx = Nginx::start("port443-off");
    let (p, https) = start("turn-443-off", false, &nginx);
    let to = SocketAddr::new(LOCAL4, https);
    assert_https_routed(https);
    // A STUN Binding after the handshake: the HTTP loop's 400, then the close.
    let mut s = tls_connect(to, &[]);
    s.write_all(&Builder::binding().build()).unwrap();
    s.flush().unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
    // ALPN stun.turn alone: the HTTPS listener does not speak it, the handshake fails.
    let mut s = tls_connect(to, &[b"stun.turn"]);
    let r = s
        .write_all(&Builder::binding().build())
        .and_then(|_| s.flush());
    let mut buf = [0u8; 64];
    assert!(
        r.is_err() || !matches!(s.read(&mut buf), Ok(n) if n > 0),
        "no TURN answer with the switch off"
    );
    assert_eq!(
        p.counter(Counter::TcpAccepted),
        0,
        "nothing reached the dataplane"
    );
    assert_eq!(handoffs(&p, "plaintext") + handoffs(&p, "alpn"), 0.0);
}

/// Hands a unix stream to the dataplane as the proxy does, with `datagram` as the header;
/// returns our end.
fn hand_over(p: &Portico, datagram: &[u8]) -> UnixStream {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let (mine, theirs) = UnixStream::pair().unwrap();
    let path = socket_path(&p.state_dir);
    let sock = UnixDatagram::unbound().unwrap();
    let to = UnixAddr::new(&path).unwrap();
    sendmsg(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(datagram)],
        &[ControlMessage::ScmRights(&[theirs.as_fd().as_raw_fd()])],
        MsgFlags::empty(),
        Some(&to),
    )
    .unwrap_or_else(|e| panic!("sendmsg to {}: {e}", path.display()));
    mine.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    mine
}

#[test]
fn the_handoff_path_uses_the_real_client_and_refuses_blacklisted_ones() {
    let nginx = Nginx::start("port443-bl");
    let (p, https) = start("turn-443-bl", true, &nginx);
    let path = socket_path(&p.state_dir);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{} is owner-only", path.display());

    // Served as the client the header names: XOR-MAPPED-ADDRESS is that address.
    let claimed: SocketAddr = "127.0.0.77:40077".parse().unwrap();
    let mut s = hand_over(&p, &header(KIND_PLAIN, claimed));
    let m = transact(&mut s, &Builder::binding().build());
    assert_eq!(m.xor_mapped(), Some(claimed));

    // A malformed hand-off is refused: its descriptor is closed, and counted.
    let rejected = p.counter(Counter::TcpRejected);
    let mut bad = header(KIND_PLAIN, claimed);
    bad[0] = b'X';
    let mut s2 = hand_over(&p, &bad);
    let mut buf = [0u8; 16];
    assert!(matches!(s2.read(&mut buf), Ok(0)), "closed");
    assert_eq!(p.counter(Counter::TcpRejected), rejected + 1);

    // Blacklist 127.0.0.66.
    let (code, body) = p.call(
        "POST",
        "/api/v1/fraud/entries",
        r#"{"ip": "127.0.0.66", "kind": "black", "note": "port443 test"}"#,
    );
    assert_eq!(code, 201, "{body}");
    let bad_ip: IpAddr = "127.0.0.66".parse().unwrap();
    // The dataplane refuses a hand-off for it (the proxy never sends one, see below).
    let blocked = p.counter(Counter::DropBlacklisted);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut s3 = hand_over(&p, &header(KIND_PLAIN, SocketAddr::new(bad_ip, 4066)));
        if matches!(s3.read(&mut buf), Ok(0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hand-off for a blacklisted client served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(p.counter(Counter::DropBlacklisted) > blocked);
    // On the HTTPS port, a TURN client from it is closed before any byte is read.
    let before = handoffs(&p, "plaintext") + handoffs(&p, "alpn");
    let mut t = tcp_from(bad_ip, SocketAddr::new(LOCAL4, https)).unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(tls_client(&[b"stun.turn"]), name).unwrap();
    let _ = conn.write_tls(&mut t);
    expect_closed(
        &mut t,
        Duration::from_secs(5),
        "blacklisted TURN client on HTTPS",
    );
    let _ = t.shutdown(Shutdown::Both);
    assert_eq!(handoffs(&p, "plaintext") + handoffs(&p, "alpn"), before);
    // Everyone else is still served on both paths.
    assert_https_routed(https);
    let mut s = tls_connect(SocketAddr::new(LOCAL4, https), &[b"stun.turn"]);
    let m = transact(&mut s, &Builder::binding().build());
    assert_eq!(m.xor_mapped(), Some(s.sock.local_addr().unwrap()));
}
