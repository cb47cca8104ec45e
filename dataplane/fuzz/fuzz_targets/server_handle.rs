//! `cargo +nightly fuzz run server_handle`: whole datagrams into the protocol core (STUN,
//! TURN requests, Send indications, ChannelData, peer data on relay sockets). It must never
//! panic and every reply must fit its buffer. The first two input bytes pick the socket and
//! the source, the rest is the datagram. The same property runs on stable in
//! `dataplane/src/server/robustness.rs`.
#![no_main]

use std::io;
use std::net::SocketAddr;
use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use portico_dataplane::server::{Action, Now, Received, Server, Settings, Transport, HEADROOM};
use portico_dataplane::turn::{ControlPlane, DefaultRoutes, RelayIo, Reserved, TurnShared};
use portico_shared::config::Config;

struct Io(usize);

impl RelayIo for Io {
    fn open(&mut self, _: SocketAddr, _: bool) -> io::Result<usize> {
        self.0 += 1;
        Ok(self.0)
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

struct State {
    server: Server,
    io: Io,
    start: Instant,
}

fn new_state() -> State {
    let config = Config::from_toml(
        "[turn]\nlisten = [\"127.0.0.1:40001\"]\nrealm = \"example.org\"\nusers = [{ name = \"alice\", password = \"secret\" }]\nallow_peers = [\"0.0.0.0/0\"]\n",
    )
    .expect("config");
    let routes = DefaultRoutes::default();
    let settings = Arc::new(Settings::from_config(&config, &[5u8; 32], &routes));
    let shared = Arc::new(TurnShared::new(1));
    let server = Server::new(settings, shared, &[1; 32], ControlPlane::detached());
    State { server, io: Io(0), start: Instant::now() }
}

thread_local! {
    // libFuzzer runs the target on one thread; the core keeps its state between inputs, as
    // a worker does between datagrams.
    static STATE: RefCell<State> = RefCell::new(new_state());
}

fuzz_target!(|data: &[u8]| {
    let [sel, src, payload @ ..] = data else { return };
    STATE.with_borrow_mut(|st| run(st, *sel, *src, payload));
});

fn run(st: &mut State, sel: u8, src: u8, payload: &[u8]) {
    let State { server, io, start } = st;
    let mut buf = vec![0u8; 2048];
    let n = payload.len().min(2048 - HEADROOM);
    buf[HEADROOM..HEADROOM + n].copy_from_slice(&payload[..n]);
    let now = Now { mono: Instant::now(), unix: 1_700_000_000 + start.elapsed().as_secs() };
    let socket = usize::from(sel % 4);
    let from = SocketAddr::from(([198, 51, 100, src % 8 + 1], 5000));
    let rx = Received {
        transport: Transport::Udp,
        socket,
        from,
        buf: &mut buf,
        start: HEADROOM,
        len: n,
    };
    let action = server.handle(now, io, rx);
    if let Action::Send { offset, len, .. } = action {
        assert!(offset + len <= buf.len());
    }
}
