//! `portico-perf echo-server --turn`: the cheapest TURN relay that the generator accepts,
//! to measure the generator's own ceiling (like the echo server does for STUN).
//!
//! It answers Allocate, Refresh, CreatePermission and ChannelBind with success and no
//! authentication, gives every client the same relayed address (one relay socket per
//! thread), forwards ChannelData and Send indications to the peer from that socket, and maps
//! datagrams coming back from the peer to their client by the stream id in the generator's
//! payload stamp instead of by relay port. It checks nothing and keeps no timers: not a TURN
//! server, just the least work per relayed packet a userspace relay can do with batched
//! syscalls. A real server measured at the rate this reaches is limited by the box.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use portico_dataplane::stun::{attr, method, Class, Message, MessageWriter};
use socket2::Socket;

use crate::echo_server;
use crate::turn_msg;
use crate::udp::{MsgBatch, BATCH};

/// Highest stream id the stub remembers a client for.
const MAX_STREAMS: usize = 1 << 20;
const SLOT: usize = 2048;

#[derive(Clone, Copy, Default)]
struct Binding {
    peer: Option<SocketAddr>,
    channel: Option<u16>,
}

struct Stub {
    relay_addr: SocketAddr,
    clients: HashMap<SocketAddr, Binding>,
    /// Stream id -> (client, channel) learned from the client's own packets.
    streams: Vec<Option<(SocketAddr, Option<u16>)>>,
    to_clients: MsgBatch,
    to_clients_n: usize,
    to_peers: MsgBatch,
    to_peers_n: usize,
    relayed: u64,
}

fn stream_of(payload: &[u8]) -> Option<usize> {
    let b = payload.get(4..8)?;
    let id = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    (id < MAX_STREAMS).then_some(id)
}

/// Sends a batch completely (dropping a datagram the kernel refuses) and empties it.
fn flush(fd: i32, batch: &mut MsgBatch, n: &mut usize) {
    let mut at = 0;
    while at < *n {
        match batch.send(fd, at, *n) {
            Ok(k) if k > 0 => at += k,
            _ => at += 1,
        }
    }
    *n = 0;
}

impl Stub {
    fn learn(&mut self, payload: &[u8], client: SocketAddr, channel: Option<u16>) {
        if let Some(id) = stream_of(payload) {
            if self.streams.len() <= id {
                self.streams.resize(id + 1, None);
            }
            self.streams[id] = Some((client, channel));
        }
    }

    /// Queues `payload` to `peer` from the relay socket.
    fn forward(&mut self, relay_fd: i32, payload: &[u8], peer: SocketAddr) {
        if self.to_peers_n == self.to_peers.capacity() {
            flush(relay_fd, &mut self.to_peers, &mut self.to_peers_n);
        }
        let i = self.to_peers_n;
        let slot = self.to_peers.slot_mut(i);
        let Some(dst) = slot.get_mut(..payload.len()) else {
            return;
        };
        dst.copy_from_slice(payload);
        self.to_peers.set_len(i, payload.len());
        self.to_peers.set_peer(i, peer);
        self.to_peers_n += 1;
        self.relayed += 1;
    }

    /// A free slot towards the clients (flushing a full batch first).
    fn client_slot(&mut self, listen_fd: i32) -> usize {
        if self.to_clients_n == self.to_clients.capacity() {
            flush(listen_fd, &mut self.to_clients, &mut self.to_clients_n);
        }
        self.to_clients_n
    }

    fn commit_client(&mut self, i: usize, len: usize, to: SocketAddr) {
        self.to_clients.set_len(i, len);
        self.to_clients.set_peer(i, to);
        self.to_clients_n += 1;
    }

    fn on_client(&mut self, fds: (i32, i32), dg: &[u8], from: SocketAddr) {
        let (listen_fd, relay_fd) = fds;
        if turn_msg::is_channel_data(dg) {
            let number = u16::from_be_bytes([dg[0], dg.get(1).copied().unwrap_or(0)]);
            let Some(b) = self.clients.get(&from).copied() else {
                return;
            };
            if let (Some(peer), Some(data)) = (b.peer, turn_msg::channel_data(dg, number)) {
                self.learn(data, from, Some(number));
                self.forward(relay_fd, data, peer);
            }
            return;
        }
        let Ok(m) = Message::parse(dg) else { return };
        if m.class() == Class::Indication && m.method() == method::SEND {
            let tid = m.transaction_id();
            let peer = m
                .get(attr::XOR_PEER_ADDRESS)
                .and_then(|v| attr::decode_xor_address(v, &tid).ok());
            if let (Some(peer), Some(data)) = (peer, m.get(attr::DATA)) {
                self.learn(data, from, None);
                self.forward(relay_fd, data, peer);
            }
            return;
        }
        if m.class() != Class::Request {
            return;
        }
        let tid = m.transaction_id();
        let peer = m
            .get(attr::XOR_PEER_ADDRESS)
            .and_then(|v| attr::decode_xor_address(v, &tid).ok());
        let lifetime = m.get(attr::LIFETIME).and_then(|v| attr::decode_u32(v).ok());
        let i = self.client_slot(listen_fd);
        let relay_addr = self.relay_addr;
        let len = {
            let out = self.to_clients.slot_mut(i);
            if m.method() == method::BINDING {
                echo_server::answer(dg, from, out)
            } else {
                let Ok(mut w) = MessageWriter::new(out, Class::SuccessResponse, m.method(), &tid)
                else {
                    return;
                };
                let ok = match m.method() {
                    method::ALLOCATE => w
                        .add_xor_address(attr::XOR_RELAYED_ADDRESS, relay_addr)
                        .and_then(|()| w.add_xor_address(attr::XOR_MAPPED_ADDRESS, from))
                        .and_then(|()| w.add_u32(attr::LIFETIME, lifetime.unwrap_or(600))),
                    method::REFRESH => w.add_u32(attr::LIFETIME, lifetime.unwrap_or(600)),
                    method::CREATE_PERMISSION | method::CHANNEL_BIND => Ok(()),
                    _ => return,
                };
                ok.and_then(|()| w.add_fingerprint())
                    .ok()
                    .map(|()| w.finish())
            }
        };
        let Some(len) = len else { return };
        match m.method() {
            method::ALLOCATE => {
                self.clients.insert(from, Binding::default());
            }
            method::REFRESH if lifetime == Some(0) => {
                self.clients.remove(&from);
            }
            method::CREATE_PERMISSION => {
                if let Some(b) = self.clients.get_mut(&from) {
                    b.peer = b.peer.or(peer);
                }
            }
            method::CHANNEL_BIND => {
                let number = m
                    .get(attr::CHANNEL_NUMBER)
                    .and_then(|v| attr::decode_channel_number(v).ok());
                if let Some(b) = self.clients.get_mut(&from) {
                    b.peer = peer.or(b.peer);
                    b.channel = number;
                }
            }
            _ => {}
        }
        self.commit_client(i, len, from);
    }

    fn on_peer(&mut self, listen_fd: i32, dg: &[u8], from: SocketAddr) {
        let Some(Some((client, channel))) = stream_of(dg).and_then(|id| self.streams.get(id))
        else {
            return;
        };
        let (client, channel) = (*client, *channel);
        let i = self.client_slot(listen_fd);
        let len = {
            let out = self.to_clients.slot_mut(i);
            match channel {
                Some(number) => {
                    let end = 4 + dg.len();
                    if out.len() < end || !turn_msg::write_channel_header(out, number, dg.len()) {
                        return;
                    }
                    out[4..end].copy_from_slice(dg);
                    Some(end)
                }
                None => MessageWriter::new(out, Class::Indication, method::DATA, &[0x5A; 12])
                    .ok()
                    .and_then(|mut w| {
                        w.add_xor_address(attr::XOR_PEER_ADDRESS, from).ok()?;
                        w.add_attribute(attr::DATA, dg).ok()?;
                        Some(w.finish())
                    }),
            }
        };
        if let Some(len) = len {
            self.relayed += 1;
            self.commit_client(i, len, client);
        }
    }
}

/// Serves one thread's listen socket and relay socket until `stop` or `deadline`; returns
/// the datagrams relayed.
pub fn serve(
    listen: Socket,
    relay: Socket,
    stop: &AtomicBool,
    deadline: Instant,
) -> std::io::Result<u64> {
    let relay_addr = relay
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("relay socket has no address"))?;
    listen.set_nonblocking(true)?;
    relay.set_nonblocking(true)?;
    let fds = (listen.as_raw_fd(), relay.as_raw_fd());
    let mut stub = Stub {
        relay_addr,
        clients: HashMap::new(),
        streams: Vec::new(),
        to_clients: MsgBatch::new(BATCH, SLOT, true),
        to_clients_n: 0,
        to_peers: MsgBatch::new(BATCH, SLOT, true),
        to_peers_n: 0,
        relayed: 0,
    };
    let mut rx = MsgBatch::new(BATCH, SLOT, true);
    let mut pfds = [
        libc::pollfd {
            fd: fds.0,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: fds.1,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // SAFETY: a valid array of two pollfds.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), 2, 100) };
        if r <= 0 {
            continue;
        }
        for (k, fd) in [fds.0, fds.1].into_iter().enumerate() {
            // Bounded: at most 16 batches per socket per wakeup, then look at the other.
            for _ in 0..16 {
                let n = match rx.recv(fd, libc::MSG_DONTWAIT) {
                    Ok(n) => n,
                    Err(_) => break,
                };
                for i in 0..n {
                    let Some(from) = rx.peer(i) else { continue };
                    if k == 0 {
                        stub.on_client(fds, rx.datagram(i), from);
                    } else {
                        stub.on_peer(fds.0, rx.datagram(i), from);
                    }
                }
                if n < rx.capacity() {
                    break;
                }
            }
        }
        flush(fds.1, &mut stub.to_peers, &mut stub.to_peers_n);
        flush(fds.0, &mut stub.to_clients, &mut stub.to_clients_n);
    }
    Ok(stub.relayed)
}
