//! Hostile input into the whole protocol core: random bytes and mutations of valid STUN,
//! TURN and ChannelData messages, from many sources, on listen and relay sockets. Nothing may
//! panic, every reply must fit the buffer it was written in, and nothing that fails to parse
//! is answered (no reflection of garbage).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portico_shared::config::Config;

use super::{Action, Now, Received, Server, Settings, Transport, HEADROOM};
use crate::io::BUF_SIZE;
use crate::stun::{attr, integrity, method, Class, Message, MessageWriter};
use crate::turn::{ControlPlane, DefaultRoutes, RelayIo, Reserved, TurnShared};

struct Io {
    next: usize,
}

impl RelayIo for Io {
    fn open(&mut self, _: SocketAddr, _: bool) -> io::Result<usize> {
        self.next += 1;
        Ok(self.next)
    }
    fn reserve(&mut self, _: SocketAddr) -> io::Result<Reserved> {
        Err(io::Error::from(io::ErrorKind::AddrInUse))
    }
    fn adopt(&mut self, _: Reserved, _: bool) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn release(&mut self, _: Reserved) {}
    fn close(&mut self, _: usize) {}
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Valid messages to mutate: the shapes every TURN client sends.
fn seeds() -> Vec<Vec<u8>> {
    let key = integrity::long_term_key_md5(b"alice", b"example.org", b"secret");
    let mut out = Vec::new();
    for (m, extra) in [
        (method::BINDING, false),
        (method::ALLOCATE, true),
        (method::REFRESH, true),
        (method::CREATE_PERMISSION, true),
        (method::CHANNEL_BIND, true),
    ] {
        let mut buf = [0u8; 512];
        let mut w = MessageWriter::new(&mut buf, Class::Request, m, &[3; 12]).unwrap();
        if extra {
            w.add_attribute(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .unwrap();
            w.add_xor_address(attr::XOR_PEER_ADDRESS, "8.8.8.8:9".parse().unwrap())
                .unwrap();
            w.add_attribute(attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0])
                .unwrap();
            w.add_attribute(attr::USERNAME, b"alice").unwrap();
            w.add_attribute(attr::REALM, b"example.org").unwrap();
            w.add_attribute(
                attr::NONCE,
                b"obMatJos2wAAA0000000000000000000000000000000000",
            )
            .unwrap();
            w.add_message_integrity(&key).unwrap();
        }
        w.add_fingerprint().unwrap();
        let n = w.finish();
        out.push(buf[..n].to_vec());
    }
    let mut send = [0u8; 256];
    let mut w = MessageWriter::new(&mut send, Class::Indication, method::SEND, &[4; 12]).unwrap();
    w.add_xor_address(attr::XOR_PEER_ADDRESS, "8.8.8.8:9".parse().unwrap())
        .unwrap();
    w.add_attribute(attr::DATA, &[1, 2, 3, 4, 5]).unwrap();
    let n = w.finish();
    out.push(send[..n].to_vec());
    out.push(vec![0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4]);
    out
}

#[test]
fn hostile_datagrams_never_panic_and_garbage_is_never_answered() {
    let config = Config::from_toml(
        "[turn]\nlisten = [\"127.0.0.1:40001\"]\nrealm = \"example.org\"\nusers = [{ name = \"alice\", password = \"secret\" }]\nallow_peers = [\"0.0.0.0/0\"]\nerror_rate = 1000000\n",
    )
    .unwrap();
    let settings = Arc::new(Settings::from_config(
        &config,
        &[5u8; 32],
        &DefaultRoutes::default(),
    ));
    let mut server = Server::new(
        settings,
        Arc::new(TurnShared::new(11)),
        &[11; 32],
        ControlPlane::detached(),
    );
    let mut io = Io { next: 0 };
    let seeds = seeds();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let base = Instant::now();
    let mut buf = vec![0u8; BUF_SIZE];
    let mut answered = 0usize;
    for i in 0..120_000u64 {
        let now = Now {
            mono: base + Duration::from_millis(i / 10),
            unix: 1_700_000_000 + i / 10_000,
        };
        let data: Vec<u8> = match rng.below(3) {
            0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
            _ => {
                let mut d = seeds[rng.below(seeds.len())].clone();
                for _ in 0..1 + rng.below(4) {
                    if d.is_empty() {
                        break;
                    }
                    match rng.below(4) {
                        0 => {
                            let j = rng.below(d.len());
                            d[j] = rng.next() as u8;
                        }
                        1 => d.truncate(rng.below(d.len())),
                        2 => d.push(rng.next() as u8),
                        _ => {
                            let j = rng.below(d.len());
                            d[j] ^= 1 << rng.below(8);
                        }
                    }
                }
                d
            }
        };
        let from = SocketAddr::from(([198, 51, 100, (i % 7) as u8 + 1], 5000 + (i % 3) as u16));
        let socket = if rng.below(10) == 0 {
            1 + rng.below(3)
        } else {
            0
        };
        buf.fill(0xEE);
        buf[HEADROOM..HEADROOM + data.len()].copy_from_slice(&data);
        let rx = Received {
            transport: Transport::Udp,
            socket,
            from,
            buf: &mut buf,
            start: HEADROOM,
            len: data.len(),
        };
        let action = server.handle(now, &mut io, rx);
        if let Action::Send { offset, len, .. } = action {
            assert!(offset + len <= BUF_SIZE, "reply outside the buffer");
            answered += 1;
            let is_stun = Message::parse(&data).is_ok();
            let is_channel = data.first().is_some_and(|b| b & 0xC0 == 0x40);
            assert!(
                is_stun || is_channel || socket != 0,
                "answered a datagram that is neither STUN nor ChannelData: {data:02x?}"
            );
        }
        if i % 1000 == 0 {
            server.tick(now, &mut io);
        }
    }
    // Most mutations break the FINGERPRINT and are dropped; some must still get through to
    // the handlers, or the test would only exercise the parser.
    assert!(
        answered > 100,
        "too few datagrams reached a handler: {answered}"
    );
}
