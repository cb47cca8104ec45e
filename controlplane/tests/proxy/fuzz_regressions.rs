//! Replays the committed fuzz inputs of the reverse proxy's sniffers through the entry points
//! the fuzz targets call (`portico::fuzzing`): the seed corpora (`fuzz/corpus/TARGET/`) and
//! every input a fuzzer ever crashed on (`fuzz/regressions/TARGET/`), so a fixed crash stays
//! fixed under a plain `cargo test`. The seeds are written by the ignored test
//! `write_seed_corpus` below (real HTTP, SIP and LDAP messages, and the H.323 messages of
//! `seeds.txt`); `scripts/fuzz.sh` runs the
//! fuzzers.

use std::fs;
use std::path::Path;

use bytes::BytesMut;
use ldap3_proto::proto::{
    LdapBindCred, LdapBindRequest, LdapBindResponse, LdapMsg, LdapOp, LdapPartialAttribute,
    LdapResult, LdapResultCode, LdapSearchResultEntry, SaslCredentials,
};
use ldap3_proto::LdapCodec;
use portico::fuzzing;
use portico::proxy::sniff::turn::Verdict;
use tokio_util::codec::Encoder;

use portico_testkit::fuzz::{fuzz_dir, replay};

#[test]
fn http_sniff_inputs() {
    replay("http_sniff", fuzzing::http_sniff);
}

#[test]
fn sip_sniff_inputs() {
    replay("sip_sniff", fuzzing::sip_sniff);
}

#[test]
fn ldap_sniff_inputs() {
    replay("ldap_sniff", fuzzing::ldap_sniff);
}

#[test]
fn h323_sniff_inputs() {
    replay("h323_sniff", fuzzing::h323_sniff);
}

#[test]
fn tls_hello_inputs() {
    replay("tls_hello", fuzzing::tls_hello);
}

/// The seeds are what the target needs: the ClientHellos offering `stun.turn` (openssl's,
/// captured, and rustls') are TURN, the others not.
#[test]
fn tls_hello_seeds_are_real_hellos() {
    use portico::proxy::sniff::turn::client_hello;
    let dir = fuzz_dir().join("corpus/tls_hello");
    for (name, want) in [
        ("seed-openssl-alpn-stun-turn", Verdict::Turn),
        ("seed-rustls-alpn-stun-turn", Verdict::Turn),
        ("seed-rustls-alpn-h2-stun-turn", Verdict::Turn),
        ("seed-rustls-alpn-http11", Verdict::NotTurn),
        ("seed-rustls-no-alpn", Verdict::NotTurn),
    ] {
        let seed = fs::read(dir.join(name)).expect(name);
        assert_eq!(client_hello(&seed[1..]), want, "{name}");
    }
}

// ---- Seed corpus -------------------------------------------------------------------------

/// Named seed inputs of one target.
type Seeds = Vec<(String, Vec<u8>)>;

/// The selector byte: limit 16 KiB (bit 7) and reads of `read` bytes (1-16).
fn sel(read: u8) -> u8 {
    0x80 | (read - 1)
}

fn with_sel(s: u8, data: &[u8]) -> Vec<u8> {
    let mut v = vec![s];
    v.extend_from_slice(data);
    v
}

fn http_seeds() -> Seeds {
    let messages: [(&str, &[u8]); 12] = [
        ("get", b"GET /index.html?x=1 HTTP/1.1\r\nHost: pbx.example.com\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n"),
        ("get-http10", b"GET / HTTP/1.0\r\nHost: pbx.example.com:8080\r\n\r\n"),
        ("post-length", b"POST /api/login HTTP/1.1\r\nHost: pbx.example.com\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"user\":\"a\",\"password\":\"b\"}GET /next HTTP/1.1\r\nHost: pbx.example.com\r\n\r\n"),
        ("post-chunked", b"POST /upload HTTP/1.1\r\nHost: pbx.example.com\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\n\r\n"),
        ("absolute-form", b"GET http://user@pbx.example.com:81/a/b?c HTTP/1.1\r\nHost: pbx.example.com:81\r\n\r\n"),
        ("websocket", b"GET /ws HTTP/1.1\r\nHost: [2001:db8::1]:443\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"),
        ("response-length", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 204 No Content\r\n\r\n"),
        ("response-401-chunked", b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Digest realm=\"pbx\", nonce=\"abc\"\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nauth\r\n0\r\n\r\n"),
        ("response-until-close", b"HTTP/1.0 403 Forbidden\r\nServer: x\r\n\r\nforbidden"),
        ("response-gzip-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
        ("chunked-body", b"10\r\n0123456789abcdef\r\n0\r\n\r\n"),
        ("response-101", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
    ];
    let mut out = Vec::new();
    for (i, (name, m)) in messages.iter().enumerate() {
        out.push((name.to_string(), with_sel(sel(1 + (i as u8 % 16)), m)));
    }
    // A small limit: the head is too large.
    out.push(("too-large".into(), with_sel(0x02, messages[0].1)));
    out
}

fn sip_request(method: &str, domain: &str, extra: &str, body: &str) -> String {
    format!(
        "{method} sip:{domain} SIP/2.0\r\n\
         Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-{method}\r\n\
         Max-Forwards: 70\r\n\
         From: \"Alice\" <sip:alice@{domain}>;tag=a1\r\n\
         To: <sip:alice@{domain}>\r\n\
         Call-ID: call-{method}@127.0.0.1\r\n\
         CSeq: 1 {method}\r\n\
         Contact: <sip:alice@127.0.0.1:5999;transport=tcp>\r\n\
         {extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn sip_seeds() -> Seeds {
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    let responses = "SIP/2.0 100 Trying\r\nVia: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-INVITE\r\nContent-Length: 0\r\n\r\n\
         SIP/2.0 401 Unauthorized\r\nWWW-Authenticate: Digest realm=\"alpha.test\", nonce=\"n\"\r\nl: 4\r\n\r\nabcd\
         \r\n\r\nSIP/2.0 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n\
         SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n";
    let messages: Vec<(&str, String)> = vec![
        ("register", sip_request("REGISTER", "alpha.test", "Expires: 3600\r\n", "")),
        ("register-auth", sip_request("REGISTER", "alpha.test", "Authorization: Digest username=\"alice\", realm=\"alpha.test\", nonce=\"n\", uri=\"sip:alpha.test\", response=\"0123456789abcdef0123456789abcdef\"\r\n", "")),
        ("invite-sdp", sip_request("INVITE", "pbx.example.com", "Content-Type: application/sdp\r\n", sdp)),
        ("options-compact", "OPTIONS sip:b@x SIP/2.0\r\nv: SIP/2.0/TCP h\r\nf: <sips:bob@[2001:db8::1]:5061;transport=tls>;tag=1\r\nt: <sip:b@x>\r\ni: 1@h\r\nCSeq: 1 OPTIONS\r\nl: 0\r\n\r\n".into()),
        ("folded-from", "INVITE sip:b@x SIP/2.0\r\nFrom:\r\n  \"Quoted <name>\"\r\n\t<sip:a@folded.example>;tag=2\r\n\r\n".into()),
        ("keepalive-then-ack", format!("\r\n\r\n{}", sip_request("ACK", "alpha.test", "", ""))),
        ("bare-lf", "BYE sip:b@x SIP/2.0\nFrom: sip:a@lf.example;tag=1\nCall-ID: 2\n\n".into()),
        ("responses", responses.into()),
    ];
    messages
        .into_iter()
        .enumerate()
        .map(|(i, (name, m))| {
            (
                name.to_string(),
                with_sel(sel(1 + (i as u8 % 16)), m.as_bytes()),
            )
        })
        .collect()
}

fn encode(m: LdapMsg) -> Vec<u8> {
    let mut b = BytesMut::new();
    LdapCodec::default().encode(m, &mut b).expect("encode");
    b.to_vec()
}

fn bind(id: i32, dn: &str, cred: LdapBindCred) -> Vec<u8> {
    encode(LdapMsg::new(
        id,
        LdapOp::BindRequest(LdapBindRequest {
            dn: dn.into(),
            cred,
        }),
    ))
}

fn bind_response(id: i32, code: LdapResultCode) -> Vec<u8> {
    encode(LdapMsg::new(
        id,
        LdapOp::BindResponse(LdapBindResponse {
            res: LdapResult {
                code,
                matcheddn: String::new(),
                message: "message".into(),
                referral: Vec::new(),
            },
            saslcreds: None,
        }),
    ))
}

fn ldap_seeds() -> Seeds {
    let mut responses = bind_response(1, LdapResultCode::Success);
    responses.extend(encode(LdapMsg::new(
        2,
        LdapOp::SearchResultEntry(LdapSearchResultEntry {
            dn: "cn=alice,dc=example,dc=com".into(),
            attributes: vec![LdapPartialAttribute {
                atype: "mail".into(),
                vals: vec![b"alice@example.com".to_vec()],
            }],
        }),
    )));
    responses.extend(bind_response(3, LdapResultCode::InvalidCredentials));
    let messages: Vec<(&str, Vec<u8>)> = vec![
        (
            "bind-domain-user",
            bind(
                1,
                "PBX.example.com\\ldap-guest",
                LdapBindCred::Simple("pw".into()),
            ),
        ),
        (
            "bind-dn",
            bind(
                7,
                "CN=ckl, DC=innovaphone, DC=com",
                LdapBindCred::Simple("secret".into()),
            ),
        ),
        (
            "bind-anonymous",
            bind(2, "", LdapBindCred::Simple(String::new())),
        ),
        (
            "bind-sasl",
            bind(
                4,
                "dc=example,dc=org",
                LdapBindCred::SASL(SaslCredentials {
                    mechanism: "EXTERNAL".into(),
                    credentials: b"dn:cn=a".to_vec(),
                }),
            ),
        ),
        ("unbind", encode(LdapMsg::new(3, LdapOp::UnbindRequest))),
        (
            "bind-invalid-credentials",
            bind_response(1, LdapResultCode::InvalidCredentials),
        ),
        ("responses", responses),
    ];
    messages
        .into_iter()
        .enumerate()
        .map(|(i, (name, m))| (name.to_string(), with_sel(sel(1 + (i as u8 % 16)), &m)))
        .collect()
}

/// The pycrate-made H.225.0 messages of `seeds.txt` (`label|hex` lines), one seed each, and
/// a stream of a Setup behind a registration.
fn h323_seeds() -> Seeds {
    let text =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/proxy/seeds.txt"))
            .expect("seeds.txt");
    let mut out = Seeds::new();
    let mut all = Vec::new();
    for (i, line) in text.lines().filter(|l| !l.starts_with('#')).enumerate() {
        let Some((label, hex)) = line.split_once('|') else {
            continue;
        };
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|j| u8::from_str_radix(&hex[2 * j..2 * j + 2], 16).expect("hex"))
            .collect();
        let name: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        out.push((
            format!("{i:02}-{name}"),
            with_sel(sel(1 + (i as u8 % 16)), &bytes),
        ));
        all.push((label.to_string(), bytes));
    }
    let mut stream = Vec::new();
    for (label, bytes) in &all {
        if label.starts_with("rrq") || label.starts_with("setup") {
            stream.extend_from_slice(bytes);
        }
    }
    out.push(("stream".into(), with_sel(sel(7), &stream)));
    out
}

/// A real ClientHello from rustls offering `alpn`, for `server_name`.
fn client_hello(alpn: &[&[u8]], server_name: &str) -> Vec<u8> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(c), name).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("hello");
    out
}

/// `tls_hello`: the selector byte (peek sizes), then what a client sends on port 443.
/// `seed-openssl-alpn-stun-turn` (captured from `openssl s_client -alpn stun.turn`) is
/// committed as it is and not written here.
fn tls_hello_seeds() -> Seeds {
    let hellos: Vec<(&str, Vec<u8>)> = vec![
        (
            "rustls-alpn-stun-turn",
            client_hello(&[b"stun.turn"], "turn.example.com"),
        ),
        (
            "rustls-alpn-h2-stun-turn",
            client_hello(&[b"h2", b"stun.turn"], "pbx.example.com"),
        ),
        (
            "rustls-alpn-http11",
            client_hello(&[b"http/1.1"], "pbx.example.com"),
        ),
        ("rustls-no-alpn", client_hello(&[], "pbx.example.com")),
        (
            "stun-binding",
            vec![
                0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
            ],
        ),
        ("channel-data", vec![0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4]),
        (
            "http-get",
            b"GET / HTTP/1.1\r\nHost: pbx.example.com\r\n\r\n".to_vec(),
        ),
    ];
    let mut out: Seeds = hellos
        .into_iter()
        .enumerate()
        .map(|(i, (name, m))| (name.to_string(), with_sel(sel(1 + (i as u8 * 5 % 16)), &m)))
        .collect();
    out.extend(
        built_hellos()
            .into_iter()
            .map(|(name, spec, _)| (name.to_string(), spec)),
    );
    out
}

/// `tls_hello` seeds in its building mode (selector bit 6: the harness builds the
/// ClientHello from extension items, see `portico::fuzzing::tls_hello`), with the verdict
/// rustls and the peek must agree on.
fn built_hellos() -> Vec<(&'static str, Vec<u8>, bool)> {
    let item = |t: u8, body: &[u8]| {
        let mut v = vec![t, body.len() as u8];
        v.extend_from_slice(body);
        v
    };
    // server_name "turn.example.com", supported_versions TLS 1.3 and 1.2,
    // signature_algorithms rsa_pss_rsae_sha256 (rustls accepts no hello without it).
    let mut sni = vec![0, 19, 0, 0, 16];
    sni.extend_from_slice(b"turn.example.com");
    let versions = [4, 3, 4, 3, 3];
    let sigalgs = [0, 2, 8, 4];
    let spec = |sel: u8, items: &[Vec<u8>]| {
        let mut v = vec![0x40 | sel];
        for i in items {
            v.extend_from_slice(i);
        }
        v
    };
    vec![
        (
            "built-sni-alpn-h2-stun-turn",
            spec(
                0x03,
                &[
                    item(0x80, &sni),
                    item(0, b"h2,stun.turn"),
                    item(0x80 | 43, &versions),
                    item(0x80 | 13, &sigalgs),
                ],
            ),
            true,
        ),
        (
            "built-alpn-stun-turn-first",
            spec(
                0x00,
                &[item(0, b"stun.turn,http/1.1"), item(0x80 | 13, &sigalgs)],
            ),
            true,
        ),
        (
            "built-alpn-near-miss",
            spec(
                0x07,
                &[
                    item(0x80, &sni),
                    item(0, b"stun.tur,stun.turn2,h2"),
                    item(0x80 | 13, &sigalgs),
                ],
            ),
            false,
        ),
        (
            "built-no-alpn",
            spec(0x0f, &[item(0x80 | 13, &sigalgs)]),
            false,
        ),
    ]
}

/// The building mode reaches rustls: it accepts every built seed, and the peek agrees.
#[test]
fn tls_hello_built_seeds_reach_rustls() {
    for (name, spec, turn) in built_hellos() {
        let want = if turn {
            Verdict::Turn
        } else {
            Verdict::NotTurn
        };
        let (verdict, rustls) = fuzzing::tls_hello_verdicts(&spec);
        assert_eq!((verdict, rustls), (want, Some(turn)), "{name}");
    }
}

/// Writes the seed corpora under `fuzz/corpus/`:
/// `cargo test -p portico --test proxy -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes files; run by hand when the seeds change"]
fn write_seed_corpus() {
    for (target, seeds) in [
        ("http_sniff", http_seeds()),
        ("sip_sniff", sip_seeds()),
        ("ldap_sniff", ldap_seeds()),
        ("h323_sniff", h323_seeds()),
        ("tls_hello", tls_hello_seeds()),
    ] {
        let dir = fuzz_dir().join("corpus").join(target);
        fs::create_dir_all(&dir).unwrap();
        for (name, data) in seeds {
            fs::write(dir.join(format!("seed-{name}")), data).unwrap();
        }
    }
}
