//! Replays the committed fuzz inputs through the entry points the fuzz targets call
//! (`portico_dataplane::fuzzing`): the seed corpora (`fuzz/corpus/TARGET/`) and every input
//! a fuzzer ever crashed on (`fuzz/regressions/TARGET/`), so a fixed crash stays fixed under
//! a plain `cargo test`. The seeds are written by the ignored test `write_seed_corpus`
//! below (real STUN/TURN messages and sessions); `scripts/fuzz.sh` runs the fuzzers.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use portico_dataplane::fuzzing;
use portico_dataplane::stun::integrity::{
    long_term_key_md5, long_term_key_sha256, ALGORITHM_SHA256, DEFAULT_PASSWORD_ALGORITHMS,
};
use portico_dataplane::stun::{attr, method, Class, Message, MessageWriter};

use portico_testkit::fuzz::{fuzz_dir, replay};

#[test]
fn stun_parse_inputs() {
    replay("stun_parse", fuzzing::stun_parse);
}

#[test]
fn server_handle_inputs() {
    replay("server_handle", fuzzing::server_handle);
}

#[test]
fn turn_auth_inputs() {
    replay("turn_auth", fuzzing::turn_auth);
}

/// The `turn_auth` target is only worth its name if its signed requests authenticate: the
/// session seed must get a success for every step, and the same steps signed for an
/// expired REST API name must not.
#[test]
fn turn_auth_gets_past_authentication() {
    let classes = |data: &[u8]| -> Vec<(u16, Class)> {
        fuzzing::turn_auth_replies(data)
            .iter()
            .map(|r| {
                let m = Message::parse(r).expect("reply parses");
                (m.method(), m.class())
            })
            .collect()
    };
    let ok = Class::SuccessResponse;
    assert_eq!(
        classes(&turn_auth_session()),
        [
            (method::ALLOCATE, ok),
            (method::CREATE_PERMISSION, ok),
            (method::CHANNEL_BIND, ok),
            (method::REFRESH, ok),
            (method::REFRESH, ok),
        ]
    );
    for flags in [0x01, 0x03, 0x04, 0x08, 0x10, 0x20] {
        assert_eq!(
            classes(&[0, 1, flags, 0, 1, 0, 17]),
            [(method::ALLOCATE, ok)],
            "flags {flags:#04x}"
        );
    }
    // Expired REST name; bob has no SHA-256 key.
    for flags in [0x18, 0x0a] {
        let c = classes(&[0, 1, flags, 0, 1, 0, 17]);
        assert_eq!(
            c,
            [(method::ALLOCATE, Class::ErrorResponse)],
            "flags {flags:#04x}"
        );
    }
}

#[test]
fn config_load_inputs() {
    replay("config_load", fuzzing::config_load);
}

#[test]
fn handoff_header_inputs() {
    replay("handoff_header", fuzzing::handoff_header);
}

#[test]
fn tcp_framing_inputs() {
    replay("tcp_framing", fuzzing::tcp_framing);
}

#[test]
fn media_srtp_inputs() {
    replay("media_srtp", fuzzing::media_srtp);
}

/// The `tcp_framing` seeds reach the core frame by frame: a session's seven messages read
/// one byte at a time, the largest ChannelData a connection takes, and the refusals.
#[test]
fn tcp_framing_cuts_the_seed_streams() {
    let seeds = tcp_framing_seeds(&stun_messages());
    let get = |n: &str| &seeds.iter().find(|(name, _)| name == n).unwrap().1;
    let (frames, bad) = fuzzing::tcp_framing_frames(get("session-reads-1"));
    assert_eq!((frames.len(), bad), (7, false));
    assert_eq!(frames[5..], [12, 68]);
    assert_eq!(
        fuzzing::tcp_framing_frames(get("channel-data-largest")),
        (vec![1968], false)
    );
    for refused in [
        "channel-data-too-large",
        "http-on-turn-port",
        "rfc3489-no-cookie",
    ] {
        assert_eq!(
            fuzzing::tcp_framing_frames(get(refused)),
            (Vec::new(), true),
            "{refused}"
        );
    }
    let (frames, bad) = fuzzing::tcp_framing_frames(get("binding-then-partial"));
    assert_eq!((frames.len(), bad), (1, false), "a partial message waits");
}

/// The `media_srtp` target is only worth its name if a packet with the right tag gets past
/// the SRTP check: the real SRTP packet latches leg 0 and is forwarded, the same packet
/// without its tag is not, and the session seed goes as `fuzzing::media_srtp` describes.
#[test]
fn media_srtp_gets_past_the_srtp_check() {
    let seeds = media_srtp_seeds();
    let get = |n: &str| &seeds.iter().find(|(name, _)| name == n).unwrap().1;
    assert_eq!(fuzzing::media_srtp_forwarded(get("srtp-valid")), [true]);
    assert_eq!(
        fuzzing::media_srtp_forwarded(get("srtp-plain-rtp")),
        [false]
    );
    assert_eq!(fuzzing::media_srtp_forwarded(get("srtcp-signed")), [true]);
    assert_eq!(
        fuzzing::media_srtp_forwarded(get("srtp-denied-source")),
        [false]
    );
    assert_eq!(
        fuzzing::media_srtp_forwarded(get("session")),
        [true, true, true, false, false, false, true]
    );
}

// ---- Seed corpus -------------------------------------------------------------------------

/// Named seed inputs of one target.
type Seeds = Vec<(String, Vec<u8>)>;

fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

/// RFC 5769 §2.1-2.4: the published sample request, responses and long-term request.
const RFC5769: [&str; 4] = [
    "00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae 80 22 00 10 53 54 55 4e
     20 74 65 73 74 20 63 6c 69 65 6e 74 00 24 00 04 6e 00 01 ff 80 29 00 08 93 2f f9 b1
     51 26 3b 36 00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20 00 08 00 14 9a ea a7 0c
     bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2 80 28 00 04 e5 7a 3b cf",
    "01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae 80 22 00 0b 74 65 73 74
     20 76 65 63 74 6f 72 20 00 20 00 08 00 01 a1 47 e1 12 a6 43 00 08 00 14 2b 91 f5 99
     fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7 80 28 00 04 c0 7d 4c 96",
    "01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae 80 22 00 0b 74 65 73 74
     20 76 65 63 74 6f 72 20 00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5
     be d2 b9 d9 00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
     80 28 00 04 c8 fb 0b 4c",
    "00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e 00 06 00 12 e3 83 9e e3
     83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00 00 15 00 1c 66 2f 2f 34 39 39 6b 39
     35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41 00 14 00 0b 65 78 61 6d
     70 6c 65 2e 6f 72 67 00 00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2
     8c a8 96 66",
];

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// Builds one message; `add` writes its attributes.
fn msg(class: Class, m: u16, add: impl FnOnce(&mut MessageWriter<'_>)) -> Vec<u8> {
    let mut buf = vec![0u8; 1024];
    let mut w = MessageWriter::new(&mut buf, class, m, &[0x5a; 12]).expect("writer");
    add(&mut w);
    let n = w.finish();
    buf.truncate(n);
    buf
}

/// STUN and TURN messages as clients and servers send them.
fn stun_messages() -> Vec<(&'static str, Vec<u8>)> {
    let md5 = long_term_key_md5(b"alice", b"example.org", b"secret");
    let sha = long_term_key_sha256(b"alice", b"example.org", b"secret");
    let nonce = b"obMatJos2wAAA65a6c0c0aabbccddeeff00112233445566";
    let creds = |w: &mut MessageWriter<'_>| {
        w.add_attribute(attr::USERNAME, b"alice").unwrap();
        w.add_attribute(attr::REALM, b"example.org").unwrap();
        w.add_attribute(attr::NONCE, nonce).unwrap();
    };
    let mut out: Vec<(&'static str, Vec<u8>)> = vec![
        ("rfc5769-request", hex(RFC5769[0])),
        ("rfc5769-response-v4", hex(RFC5769[1])),
        ("rfc5769-response-v6", hex(RFC5769[2])),
        ("rfc5769-long-term", hex(RFC5769[3])),
    ];
    out.push((
        "binding-request",
        msg(Class::Request, method::BINDING, |w| {
            w.add_fingerprint().unwrap()
        }),
    ));
    out.push((
        "binding-rfc5780",
        msg(Class::Request, method::BINDING, |w| {
            w.add_attribute(attr::CHANGE_REQUEST, &[0, 0, 0, 6])
                .unwrap();
            w.add_attribute(attr::RESPONSE_PORT, &[0x13, 0x88, 0, 0])
                .unwrap();
            w.add_attribute(attr::PADDING, &[0; 16]).unwrap();
        }),
    ));
    let mut legacy = vec![0u8; 64];
    let mut w =
        MessageWriter::new_legacy(&mut legacy, Class::Request, method::BINDING, &[7; 16]).unwrap();
    w.add_attribute(attr::CHANGE_REQUEST, &[0, 0, 0, 4])
        .unwrap();
    let n = w.finish();
    legacy.truncate(n);
    out.push(("binding-rfc3489", legacy));
    out.push((
        "binding-success",
        msg(Class::SuccessResponse, method::BINDING, |w| {
            w.add_xor_address(attr::XOR_MAPPED_ADDRESS, sa("198.51.100.7:5000"))
                .unwrap();
            w.add_address(attr::MAPPED_ADDRESS, sa("198.51.100.7:5000"))
                .unwrap();
            w.add_address(attr::OTHER_ADDRESS, sa("[2001:db8::2]:3479"))
                .unwrap();
            w.add_attribute(attr::SOFTWARE, b"Portico").unwrap();
            w.add_fingerprint().unwrap();
        }),
    ));
    out.push((
        "allocate-unauthenticated",
        msg(Class::Request, method::ALLOCATE, |w| {
            w.add_attribute(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .unwrap();
            w.add_fingerprint().unwrap();
        }),
    ));
    out.push((
        "allocate-401",
        msg(Class::ErrorResponse, method::ALLOCATE, |w| {
            w.add_error_code(401, "Unauthorized").unwrap();
            w.add_attribute(attr::REALM, b"example.org").unwrap();
            w.add_attribute(attr::NONCE, nonce).unwrap();
            w.add_password_algorithms(&[ALGORITHM_SHA256, 1]).unwrap();
            w.add_fingerprint().unwrap();
        }),
    ));
    out.push((
        "allocate-md5",
        msg(Class::Request, method::ALLOCATE, |w| {
            w.add_attribute(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .unwrap();
            w.add_attribute(attr::EVEN_PORT, &[0x80, 0, 0, 0]).unwrap();
            w.add_attribute(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0])
                .unwrap();
            creds(w);
            w.add_message_integrity(&md5).unwrap();
            w.add_fingerprint().unwrap();
        }),
    ));
    out.push((
        "allocate-sha256",
        msg(Class::Request, method::ALLOCATE, |w| {
            w.add_attribute(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .unwrap();
            w.add_attribute(attr::LIFETIME, &[0, 0, 0x0e, 0x10])
                .unwrap();
            creds(w);
            w.add_attribute(attr::PASSWORD_ALGORITHMS, &DEFAULT_PASSWORD_ALGORITHMS)
                .unwrap();
            w.add_password_algorithm(ALGORITHM_SHA256).unwrap();
            w.add_message_integrity_sha256(&sha).unwrap();
            w.add_fingerprint().unwrap();
        }),
    ));
    out.push((
        "allocate-success",
        msg(Class::SuccessResponse, method::ALLOCATE, |w| {
            w.add_xor_address(attr::XOR_RELAYED_ADDRESS, sa("127.0.0.1:49152"))
                .unwrap();
            w.add_attribute(attr::LIFETIME, &[0, 0, 2, 0x58]).unwrap();
            w.add_attribute(attr::RESERVATION_TOKEN, &[1; 8]).unwrap();
            w.add_xor_address(attr::XOR_MAPPED_ADDRESS, sa("198.51.100.7:5000"))
                .unwrap();
            w.add_message_integrity(&md5).unwrap();
            w.add_fingerprint().unwrap();
        }),
    ));
    out.push((
        "create-permission",
        msg(Class::Request, method::CREATE_PERMISSION, |w| {
            w.add_xor_address(attr::XOR_PEER_ADDRESS, sa("8.8.8.8:9"))
                .unwrap();
            w.add_xor_address(attr::XOR_PEER_ADDRESS, sa("[2001:db8::9]:7"))
                .unwrap();
            creds(w);
            w.add_message_integrity(&md5).unwrap();
        }),
    ));
    out.push((
        "channel-bind",
        msg(Class::Request, method::CHANNEL_BIND, |w| {
            w.add_attribute(attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0])
                .unwrap();
            w.add_xor_address(attr::XOR_PEER_ADDRESS, sa("8.8.8.8:9"))
                .unwrap();
            creds(w);
            w.add_message_integrity(&md5).unwrap();
            w.add_fingerprint().unwrap();
        }),
    ));
    out.push((
        "refresh-delete",
        msg(Class::Request, method::REFRESH, |w| {
            w.add_attribute(attr::LIFETIME, &[0; 4]).unwrap();
            creds(w);
            w.add_message_integrity(&md5).unwrap();
        }),
    ));
    out.push((
        "send-indication",
        msg(Class::Indication, method::SEND, |w| {
            w.add_xor_address(attr::XOR_PEER_ADDRESS, sa("8.8.8.8:9"))
                .unwrap();
            w.add_attribute(attr::DONT_FRAGMENT, &[]).unwrap();
            w.add_attribute(attr::DATA, b"hello peer").unwrap();
        }),
    ));
    out.push((
        "data-indication",
        msg(Class::Indication, method::DATA, |w| {
            w.add_xor_address(attr::XOR_PEER_ADDRESS, sa("8.8.8.8:9"))
                .unwrap();
            w.add_attribute(attr::DATA, b"hello client").unwrap();
            w.add_attribute(attr::ICMP, &[0, 0, 3, 1, 0, 0, 0, 0])
                .unwrap();
        }),
    ));
    out.push((
        "unknown-attributes-420",
        msg(Class::ErrorResponse, method::ALLOCATE, |w| {
            w.add_error_code(420, "Unknown Attribute").unwrap();
            w.add_unknown_attributes(&[0x0031, 0x7fff]).unwrap();
            w.add_fingerprint().unwrap();
        }),
    ));
    out
}

/// One `server_handle` record: control byte, 16-bit length, bytes.
fn record(ctl: u8, data: &[u8]) -> Vec<u8> {
    let mut v = vec![ctl];
    v.extend_from_slice(&(data.len() as u16).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn server_handle_seeds(messages: &[(&'static str, Vec<u8>)]) -> Seeds {
    let mut out: Seeds = messages
        .iter()
        .map(|(name, m)| (name.to_string(), record(0, m)))
        .collect();
    let get = |n: &str| &messages.iter().find(|(name, _)| *name == n).unwrap().1;
    let mut session = Vec::new();
    for n in [
        "allocate-unauthenticated",
        "allocate-md5",
        "create-permission",
        "channel-bind",
        "send-indication",
    ] {
        session.extend(record(0, get(n)));
    }
    session.extend(record(0, &[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4]));
    // Peer data on the first relay socket, then over TCP, then time passes.
    session.extend(record(0x04, b"from the peer"));
    session.extend(record(0x08, get("binding-request")));
    session.extend(record(0x10 | 0xe0, get("refresh-delete")));
    out.push(("session".into(), session));
    out.push((
        "channel-data".into(),
        record(0, &[0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0]),
    ));
    out
}

// `turn_auth` operations (see `portico_dataplane::fuzzing::turn_auth`). A signed request:
// op 0, method index, flags, source/tid byte, attribute count, attributes.
fn allocate(flags: u8, s: u8) -> Vec<u8> {
    vec![0, 1, flags, s, 1, 0, 17]
}
fn permission(s: u8, peer: u8) -> Vec<u8> {
    vec![0, 3, 0, s, 1, 1, peer]
}
fn channel(s: u8, lo: u8, peer: u8) -> Vec<u8> {
    vec![0, 4, 0, s, 2, 2, lo, 1, peer]
}
fn send(s: u8, peer: u8) -> Vec<u8> {
    let mut v = vec![0, 5, 0, s, 2, 1, peer, 4, 5];
    v.extend_from_slice(b"hello");
    v
}
fn refresh(s: u8, secs: u32) -> Vec<u8> {
    let mut v = vec![0, 2, 0, s, 1, 3];
    v.extend_from_slice(&secs.to_be_bytes());
    v
}
fn channel_data(s: u8) -> Vec<u8> {
    vec![6, s, 0, 4, 9, 9, 9, 9]
}
fn peer_data(s: u8) -> Vec<u8> {
    let mut v = vec![5, s, 6];
    v.extend_from_slice(b"answer");
    v
}
fn later(t: u8) -> Vec<u8> {
    vec![7, t]
}

/// Allocate, permission, channel, data both ways, refresh, time, delete.
fn turn_auth_session() -> Vec<u8> {
    let mut session = allocate(0, 0);
    session.extend(permission(0, 0));
    session.extend(channel(0, 0, 0));
    session.extend(send(0, 1));
    session.extend(channel_data(0));
    session.extend(peer_data(0));
    session.extend(refresh(0, 1200));
    session.extend(later(100));
    session.extend(channel_data(0));
    session.extend(refresh(0, 0));
    session
}

fn turn_auth_seeds() -> Seeds {
    let mut out: Seeds = Vec::new();
    // flags: bit 0 MI-SHA256, bit 1 SHA-256 key, bit 2 USERHASH, bits 3-4 user, bit 6 TCP.
    for (name, flags) in [
        ("allocate-md5", 0x00),
        ("allocate-mi-sha256", 0x01),
        ("allocate-sha256-key", 0x03),
        ("allocate-userhash", 0x04),
        ("allocate-bob", 0x08),
        ("allocate-rest", 0x10),
        ("allocate-rest-expired", 0x18),
        ("allocate-tcp", 0x40),
        ("allocate-no-fingerprint", 0x20),
    ] {
        out.push((name.into(), allocate(flags, 0)));
    }
    out.push(("session".into(), turn_auth_session()));
    let mut two = allocate(0x03, 1);
    two.extend(allocate(0x10, 2));
    two.extend(permission(1, 5));
    two.extend(permission(2, 2));
    two.extend(channel(2, 1, 3));
    two.extend(later(80));
    two.extend(peer_data(1));
    out.push(("two-clients".into(), two));
    // An Allocate from an IPv6 client asking for both families, and a Binding.
    out.push((
        "allocate-dual".into(),
        vec![0, 1, 0, 5, 2, 0, 17, 8, 4, 2, 0, 0, 0],
    ));
    out.push(("binding".into(), vec![0, 0, 0, 0, 0]));
    out.push((
        "allocate-lifetime-max".into(),
        vec![0, 1, 0, 0, 2, 0, 17, 3, 0xff, 0xff, 0xff, 0xff],
    ));
    // Raw datagram: an unauthenticated Allocate.
    let mut raw = vec![4, 0, 0];
    let m = msg(Class::Request, method::ALLOCATE, |w| {
        w.add_attribute(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .unwrap();
    });
    raw[2] = m.len() as u8;
    raw.extend_from_slice(&m);
    out.push(("raw-allocate".into(), raw));
    out
}

fn config_seeds() -> Seeds {
    let example = fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../portico.example.toml"))
        .expect("portico.example.toml");
    vec![
        ("example".into(), example),
        (
            "turn-users".into(),
            b"[turn]\nlisten = [\"127.0.0.1:3478\", \"[::1]:3478\"]\nrealm = \"example.org\"\nusers = [{ name = \"alice\", password = \"secret\" }, { name = \"bob\", key = \"ab2c0f6cfd5c3af30450d4729d97bf17\" }]\nshared_secret = [\"s\"]\nallow_peers = [\"0.0.0.0/0\"]\ndeny_peers = [\"10.0.0.0/8\", \"::1/128\"]\nrelay_ports = \"49152-65535\"\nmax_bandwidth = 1000000\n".to_vec(),
        ),
        (
            "api-fraud".into(),
            b"log_level = \"debug\"\n[api]\nlisten = \"127.0.0.1:8080\"\n[fraud]\nrequest_rate = 50\n[stun]\nsoftware = \"x\"\nalternate_ip = \"127.0.0.2\"\nalternate_port = 3479\n".to_vec(),
        ),
        (
            "proxy".into(),
            b"[proxy]\n[[proxy.listen]]\naddress = \"127.0.0.1:8443\"\ntype = \"https\"\n[[proxy.services]]\nname = \"pbx.example.com\"\ntype = \"https\"\ntarget = \"127.0.0.1:443\"\n[proxy.limits]\nmax_header_bytes = 16384\n".to_vec(),
        ),
        ("empty".into(), Vec::new()),
    ]
}

fn handoff_seeds() -> Seeds {
    use portico_shared::handoff::{header, KIND_PLAIN, KIND_TLS};
    let tls = header(KIND_TLS, sa("198.51.100.7:40123"));
    let plain = header(KIND_PLAIN, sa("[2001:db8::7]:443"));
    let mapped = header(KIND_PLAIN, sa("[::ffff:192.0.2.1]:5000"));
    let mut unknown_family = tls;
    unknown_family[5] = 5;
    vec![
        ("tls-v4".into(), tls.to_vec()),
        ("plain-v6".into(), plain.to_vec()),
        ("plain-v4-mapped".into(), mapped.to_vec()),
        ("unknown-family".into(), unknown_family.to_vec()),
        ("short".into(), tls[..12].to_vec()),
        (
            "port-zero".into(),
            header(KIND_TLS, sa("192.0.2.1:0")).to_vec(),
        ),
    ]
}

/// ChannelData as a client sends it over a stream: padded to 4 bytes.
fn channel_data_padded(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut v = channel.to_be_bytes().to_vec();
    v.extend_from_slice(&(data.len() as u16).to_be_bytes());
    v.extend_from_slice(data);
    v.resize(4 + data.len().div_ceil(4) * 4, 0);
    v
}

/// `tcp_framing`: a read-size selector byte, then a client's stream.
fn tcp_framing_seeds(messages: &[(&'static str, Vec<u8>)]) -> Seeds {
    let get = |n: &str| {
        messages
            .iter()
            .find(|(name, _)| *name == n)
            .unwrap()
            .1
            .clone()
    };
    let with = |sel: u8, parts: &[Vec<u8>]| {
        let mut v = vec![sel];
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    };
    let allocate_tcp = msg(Class::Request, method::ALLOCATE, |w| {
        w.add_attribute(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0])
            .unwrap();
        w.add_fingerprint().unwrap();
    });
    let connect = msg(Class::Request, method::CONNECT, |w| {
        w.add_xor_address(attr::XOR_PEER_ADDRESS, sa("8.8.8.8:80"))
            .unwrap();
    });
    let connection_bind = msg(Class::Request, method::CONNECTION_BIND, |w| {
        w.add_attribute(attr::CONNECTION_ID, &[0, 0, 0, 1]).unwrap();
    });
    let session = [
        get("allocate-unauthenticated"),
        get("allocate-md5"),
        get("create-permission"),
        get("channel-bind"),
        get("send-indication"),
        channel_data_padded(0x4000, b"hello"),
        channel_data_padded(0x4000, &[7; 64]),
    ];
    vec![
        ("session-reads-1".into(), with(0x00, &session)),
        ("session-reads-13".into(), with(0x17, &session)),
        ("session-at-once".into(), with(0x0f, &session)),
        (
            "rfc6062-connect".into(),
            with(0x29, &[allocate_tcp, connect.clone()]),
        ),
        (
            "rfc6062-connection-bind".into(),
            with(0x33, &[connection_bind, b"peer bytes".to_vec()]),
        ),
        (
            "binding-then-partial".into(),
            with(
                0x05,
                &[get("binding-request"), get("allocate-md5")[..30].to_vec()],
            ),
        ),
        (
            "channel-data-largest".into(),
            with(0x0e, &[channel_data_padded(0x7fff, &[1; 1964])]),
        ),
        (
            "channel-data-too-large".into(),
            with(0x0b, &[channel_data_padded(0x4001, &[2; 2000])]),
        ),
        (
            "http-on-turn-port".into(),
            with(0x03, &[b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()]),
        ),
        (
            "rfc3489-no-cookie".into(),
            with(0x02, &[get("binding-rfc3489"), connect]),
        ),
    ]
}

/// The SRTP authentication key of RFC 3711 B.3's master key (label 0x01), which the
/// `media_srtp` target gives leg 0.
const RFC3711_RTP_AUTH: &str = "CE BE 32 1F 6F F7 71 6B 6F D4 AB 49 AF 25 6A 15 6D 38 BA A4";

/// `media_srtp` records: control byte, length byte, bytes (see `fuzzing::media_srtp`).
fn media_record(ctl: u8, packet: &[u8]) -> Vec<u8> {
    let mut v = vec![ctl, packet.len() as u8];
    v.extend_from_slice(packet);
    v
}

fn media_srtp_seeds() -> Seeds {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &hex(RFC3711_RTP_AUTH));
    // A complete SRTP packet (PCMU, 160 bytes of payload) with its tag, as a client with
    // the key sends it: RTP header, payload, HMAC-SHA1-80 over packet and ROC 0.
    let mut rtp = vec![
        0x80, 0x00, 0x12, 0x34, 0, 0, 0x0f, 0xa0, 0xde, 0xad, 0xbe, 0xef,
    ];
    rtp.extend([0xd5; 160]);
    let mut signed = rtp.clone();
    signed.extend([0, 0, 0, 0]);
    let mut srtp = rtp.clone();
    srtp.extend(&hmac::sign(&key, &signed).as_ref()[..10]);
    let rr = vec![0x80, 201, 0, 1, 0xde, 0xad, 0xbe, 0xef, 0x80, 0, 0, 1];
    let mut session = Vec::new();
    // Leg 0 from its signalled address: a real SRTP packet, latched.
    session.extend(media_record(0x00, &srtp));
    // Leg 1 (no key) answers with plain RTP.
    session.extend(media_record(0x02 | (1 << 2), &rtp));
    // Leg 0 RTCP, tagged by the harness; then a forged tag from another source.
    session.extend(media_record(0x21, &rr));
    session.extend(media_record(0x08, &srtp[..srtp.len() - 1]));
    // Time passes past the learn window; a foreign source; a bit flipped.
    session.extend(media_record(0x80 | 0x3f, &[]));
    session.extend(media_record(0x0c, &srtp));
    session.extend(media_record(0x60, &rtp[..100]));
    session.push(77);
    vec![
        ("srtp-valid".into(), media_record(0x00, &srtp)),
        ("srtp-plain-rtp".into(), media_record(0x00, &rtp)),
        ("srtcp-signed".into(), media_record(0x21, &rr)),
        ("srtp-denied-source".into(), media_record(0x1c, &srtp)),
        ("session".into(), session),
    ]
}

/// Writes the seed corpora under `fuzz/corpus/`:
/// `cargo test -p portico-dataplane --test fuzz_regressions -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes files; run by hand when the seeds change"]
fn write_seed_corpus() {
    let messages = stun_messages();
    let mut sets: Vec<(&str, Seeds)> = vec![(
        "stun_parse",
        messages
            .iter()
            .map(|(n, m)| (n.to_string(), m.clone()))
            .collect(),
    )];
    sets.push(("server_handle", server_handle_seeds(&messages)));
    sets.push(("turn_auth", turn_auth_seeds()));
    sets.push(("config_load", config_seeds()));
    sets.push(("handoff_header", handoff_seeds()));
    sets.push(("tcp_framing", tcp_framing_seeds(&messages)));
    sets.push(("media_srtp", media_srtp_seeds()));
    for (target, seeds) in sets {
        let dir = fuzz_dir().join("corpus").join(target);
        fs::create_dir_all(&dir).unwrap();
        for (name, data) in seeds {
            fs::write(dir.join(format!("seed-{name}")), data).unwrap();
        }
    }
}
