//! The sans-IO request handler every driver runs: one datagram (or one framed TCP message)
//! in, at most one reply out, written over the request in the same buffer.
//!
//! The driver owns sockets, buffers, time and the seed of all randomness; this module owns
//! protocol decisions and counts them in its own [`Stats`], which the driver hands on to
//! shared memory. It never allocates on the packet path: the reply is built in the buffer the
//! request arrived in, after the few request fields it still needs (transaction id, requested
//! changes) were copied to the stack.

mod binding;
pub mod endpoints;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use portico_shared::config::Config;
use portico_shared::counters::Counter;
use portico_shared::shm::EventKind;

use crate::media::{Media, MediaControl, MediaCtx, MediaSettings};
use crate::stun::{self, Class, Message, ParseError};
use crate::turn::{
    ControlPlane, Ctx, Datagram, DefaultRoutes, RelayIo, TcpEvent, Turn, TurnSettings, TurnShared,
};
pub use endpoints::Endpoints;
pub use stats::Stats;

/// Free bytes a driver leaves in front of every received datagram: room to prepend a
/// ChannelData (4 bytes) or Data-indication header (up to 48 bytes) without moving the data.
/// The io_uring driver's kernel-written header and source address occupy exactly this space.
pub const HEADROOM: usize = 80;

/// How a message reached the server; some STUN attributes only mean something over UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The time, read once per loop turn by the driver (the core never reads a clock):
/// monotonic for timers, Unix seconds for nonces and REST credential expiry.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub mono: Instant,
    pub unix: u64,
}

/// One datagram (or one framed TCP message) handed to [`Server::handle`]: it lies in
/// `buf[start..start + len]`, received on socket `socket` from `from`. `buf[..start]` is
/// headroom and the rest of `buf` tailroom: a reply may be written anywhere in `buf`.
pub struct Received<'b> {
    pub transport: Transport,
    pub socket: usize,
    pub from: SocketAddr,
    pub buf: &'b mut [u8],
    pub start: usize,
    pub len: usize,
}

/// What the driver does with the buffer after [`Server::handle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to send; the buffer is free again.
    Drop,
    /// Send `buf[offset..offset + len]` from socket `socket` to `to` (over TCP: back on the
    /// connection, `socket` and `to` are then the connection's own).
    Send {
        offset: usize,
        len: usize,
        socket: usize,
        to: SocketAddr,
    },
}

/// Settings derived from one configuration generation, shared read-only by all workers.
pub struct Settings {
    pub endpoints: Endpoints,
    /// SOFTWARE attribute value; empty hides it.
    pub software: String,
    pub turn: TurnSettings,
    /// Requests per second per source above which a suspicious event is reported.
    pub request_rate: u32,
    /// Certificate chain and key for TURN over TLS: the proxy's (`proxy.tls.cert`/`key`),
    /// else the pair the control plane generates in `state_dir`.
    pub tls_files: (PathBuf, PathBuf),
    /// Media relay sessions and static NAT maps.
    pub media: MediaSettings,
}

impl Settings {
    /// `secret` keys the stateless nonces; it is drawn once per dataplane process. `routes`
    /// are the default routes' source addresses, which the runtime looks up.
    pub fn from_config(config: &Config, secret: &[u8; 32], routes: &DefaultRoutes) -> Settings {
        Settings {
            endpoints: Endpoints::from_config(config),
            software: config.stun.software.clone(),
            turn: TurnSettings::from_config(config, secret, routes),
            request_rate: config.fraud.request_rate,
            tls_files: tls_files(config),
            media: MediaSettings::from_config(config),
        }
    }
}

/// The certificate and key TURN over TLS presents: the same pair the proxy's TLS listeners
/// use. Relative paths resolve against the working directory the control plane gave the
/// dataplane (its own).
pub fn tls_files(config: &Config) -> (PathBuf, PathBuf) {
    let t = &config.proxy.tls;
    match (&t.cert, &t.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => (
            config.state_dir.join("cert.pem"),
            config.state_dir.join("key.pem"),
        ),
    }
}

/// One per worker thread.
pub struct Server {
    settings: Arc<Settings>,
    turn: Turn,
    media: Media,
    media_control: Box<dyn MediaControl>,
    stats: Stats,
}

impl Server {
    /// `seed` is the driver's draw for this worker: relay ports, reservation tokens, hash keys
    /// and indication transaction ids all come from it.
    pub fn new(
        settings: Arc<Settings>,
        shared: Arc<TurnShared>,
        seed: &[u8; 32],
        control: ControlPlane,
    ) -> Server {
        let first_relay = settings.endpoints.len();
        Server::with_first_relay(settings, shared, seed, control, first_relay)
    }

    /// A core whose relay socket indices start at `first_relay`: the stream driver names its
    /// connections by the indices between the listen sockets and `first_relay`.
    pub fn with_first_relay(
        settings: Arc<Settings>,
        shared: Arc<TurnShared>,
        seed: &[u8; 32],
        control: ControlPlane,
        first_relay: usize,
    ) -> Server {
        let mut media_seed = [0u8; 8];
        media_seed.copy_from_slice(&seed[24..]);
        Server {
            settings,
            turn: Turn::new(shared, first_relay, seed, control),
            media: Media::new(u64::from_le_bytes(media_seed)),
            media_control: Box::new(crate::media::Detached),
            stats: Stats::default(),
        }
    }

    /// Links the media core to the control plane (the dataplane's shared memory); without it
    /// no session is ever requested and no NAT map owned.
    pub fn set_media_control(&mut self, control: Box<dyn MediaControl>) {
        self.media_control = control;
        self.media.recheck = true;
    }

    pub fn media(&self) -> &Media {
        &self.media
    }

    /// The media core's record of changed kernel paths ([`crate::fastpath`]).
    pub fn media_offload(&mut self) -> &mut crate::media::offload::Offload {
        &mut self.media.offload
    }

    /// Credits what a kernel fast path relayed on a media or NAT map path.
    pub fn credit_media(
        &mut self,
        flow: &crate::media::offload::KernelFlow,
        packets: u64,
        bytes: u64,
        now: Instant,
    ) {
        self.media
            .credit(flow, packets, bytes, now, &mut self.stats);
    }

    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    pub fn turn(&self) -> &Turn {
        &self.turn
    }

    /// For the driver's kernel fast path: the change list and traffic credits.
    pub fn turn_mut(&mut self) -> &mut Turn {
        &mut self.turn
    }

    /// What this worker counted since the driver last drained it.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// For the driver: to count its own events (receives, sends, loop turns) with the core's,
    /// and to drain them into shared memory.
    pub fn stats_mut(&mut self) -> &mut Stats {
        &mut self.stats
    }

    /// Applies a new configuration; takes effect from the next packet.
    pub fn set_settings(&mut self, settings: Arc<Settings>) {
        self.settings = settings;
        // The peer policy may have narrowed: existing permissions and channels are checked
        // against it at the next tick.
        self.turn.recheck_peers = true;
        // NAT maps may have changed, and their bindings are checked against the new policy.
        self.media.recheck = true;
    }

    /// Timers: call once per loop turn.
    pub fn tick(&mut self, now: Now, io: &mut dyn RelayIo) {
        let settings: &Settings = &self.settings;
        self.turn.sweep(&mut Ctx {
            settings: &settings.turn,
            software: &settings.software,
            now,
            io,
            stats: &mut self.stats,
        });
        self.media.tick(
            &mut MediaCtx {
                settings: &settings.media,
                turn: &settings.turn,
                now,
                stats: &mut self.stats,
                io,
            },
            &mut *self.media_control,
        );
    }

    /// Ends every allocation (shutdown).
    pub fn shutdown(&mut self, now: Now, io: &mut dyn RelayIo) {
        let settings: &Settings = &self.settings;
        self.media.clear(
            &mut MediaCtx {
                settings: &settings.media,
                turn: &settings.turn,
                now,
                stats: &mut self.stats,
                io,
            },
            &mut *self.media_control,
        );
        self.turn.clear(&mut Ctx {
            settings: &settings.turn,
            software: &settings.software,
            now,
            io,
            stats: &mut self.stats,
        });
    }

    /// Handles one received datagram and says what to send, if anything (the reply is
    /// written in `rx.buf`).
    pub fn handle(&mut self, now: Now, io: &mut dyn RelayIo, rx: Received<'_>) -> Action {
        let socket = rx.socket;
        self.dispatch(now, io, rx, socket)
    }

    /// Handles one message framed from a stream connection (TCP or TLS). `rx.socket` is the
    /// listen socket (Binding answers as from it); `conn` is the index naming the connection
    /// itself, between the listen sockets and the first relay socket: allocations made over
    /// the connection are keyed by it, and relayed data for the client comes back as
    /// [`Action::Send`] with `socket: conn`.
    pub fn handle_stream(
        &mut self,
        now: Now,
        io: &mut dyn RelayIo,
        rx: Received<'_>,
        conn: usize,
    ) -> Action {
        self.dispatch(now, io, rx, conn)
    }

    /// A stream connection closed: its allocation ends with it (RFC 8656 §3.1).
    pub fn stream_closed(&mut self, now: Now, io: &mut dyn RelayIo, conn: usize, from: SocketAddr) {
        let settings: &Settings = &self.settings;
        self.turn.end_client(
            &mut Ctx {
                settings: &settings.turn,
                software: &settings.software,
                now,
                io,
                stats: &mut self.stats,
            },
            canonical(from),
            conn,
        );
    }

    /// RFC 6062: an outgoing data connection ended its handshake or failed (see
    /// [`Turn::tcp_connected`]).
    pub fn tcp_connected(&mut self, now: Now, io: &mut dyn RelayIo, socket: usize, ok: bool) {
        let settings: &Settings = &self.settings;
        let mut cx = Ctx {
            settings: &settings.turn,
            software: &settings.software,
            now,
            io,
            stats: &mut self.stats,
        };
        self.turn.tcp_connected(&mut cx, socket, ok);
    }

    /// RFC 6062: a peer connected to a TCP relay (see [`Turn::tcp_accepted`]); false: close
    /// it.
    pub fn tcp_accepted(
        &mut self,
        now: Now,
        io: &mut dyn RelayIo,
        listener: usize,
        peer: SocketAddr,
        socket: usize,
    ) -> bool {
        let settings: &Settings = &self.settings;
        let mut cx = Ctx {
            settings: &settings.turn,
            software: &settings.software,
            now,
            io,
            stats: &mut self.stats,
        };
        self.turn.tcp_accepted(&mut cx, listener, peer, socket)
    }

    /// RFC 6062: a data connection closed in the driver.
    pub fn tcp_closed(&mut self, now: Now, io: &mut dyn RelayIo, socket: usize) {
        let settings: &Settings = &self.settings;
        let mut cx = Ctx {
            settings: &settings.turn,
            software: &settings.software,
            now,
            io,
            stats: &mut self.stats,
        };
        self.turn.tcp_closed(&mut cx, socket);
    }

    /// RFC 6062: what the driver must send or do besides the replies (see [`TcpEvent`]).
    pub fn take_tcp_events(&mut self, out: &mut Vec<TcpEvent>) {
        self.turn.take_tcp_events(out);
    }

    fn dispatch(
        &mut self,
        now: Now,
        io: &mut dyn RelayIo,
        rx: Received<'_>,
        key_socket: usize,
    ) -> Action {
        let Received {
            transport,
            socket,
            from,
            buf,
            start,
            len,
        } = rx;
        let stats = &mut self.stats;
        let from = canonical(from);
        if from.port() == 0 || from.ip().is_unspecified() || from.ip().is_multicast() {
            stats.incr(Counter::DropBadSource);
            return Action::Drop;
        }
        if self.turn.control.blacklist.blocked(from.ip(), now.unix) {
            stats.incr(Counter::DropBlacklisted);
            return Action::Drop;
        }
        if start.checked_add(len).is_none_or(|end| end > buf.len()) {
            stats.incr(Counter::DropBadLength);
            return Action::Drop;
        }
        if self.media.owns(socket) {
            let settings: &Settings = &self.settings;
            return self.media.handle(
                &mut MediaCtx {
                    settings: &settings.media,
                    turn: &settings.turn,
                    now,
                    stats,
                    io,
                },
                &mut *self.turn.control.events,
                socket,
                from,
                buf,
                start,
                len,
            );
        }
        // Binding answers as from the listen socket; TURN keys the client by its connection.
        let binding_d = Datagram {
            socket,
            stream: transport == Transport::Tcp,
            from,
            start,
            len,
        };
        let d = Datagram {
            socket: key_socket,
            ..binding_d
        };
        // A plain borrow, not an Arc clone: a reference-count update per packet would bounce
        // one cache line between all workers.
        let settings: &Settings = &self.settings;
        let mut cx = Ctx {
            settings: &settings.turn,
            software: &settings.software,
            now,
            io,
            stats,
        };
        if self.turn.is_relay_socket(socket) {
            return self.turn.on_peer_data(&mut cx, d, buf);
        }
        // ChannelData starts with 0b01; STUN with 0b00 (RFC 8656 §12). Over a stream the
        // driver framed it with its padding to 4 bytes.
        if len >= 4 && buf[start] & 0xC0 == 0x40 {
            return self.turn.on_channel_data(&mut cx, d, buf);
        }
        let (class, method) = match Message::parse(&buf[start..start + len]) {
            Ok(m) => {
                // A UDP source address can be forged, and blacklisting whatever address a
                // flood claims would let anyone block anyone. Excess rate counts as
                // suspicious only from sources that proved they receive our answers: a TCP
                // connection, or a source holding an authenticated allocation.
                if m.class() == Class::Request
                    && self
                        .turn
                        .rate_over(from.ip(), now.unix, settings.request_rate)
                    && (transport == Transport::Tcp || self.turn.serves(from.ip()))
                {
                    self.turn
                        .control
                        .events
                        .report(EventKind::RateExceeded, from.ip(), now.unix);
                }
                if m.class() == Class::Indication && m.method() == stun::method::SEND {
                    return self.turn.on_send_indication(&mut cx, d, &m);
                }
                (m.class(), m.method())
            }
            Err(e) => {
                cx.stats.incr(drop_counter(e));
                return Action::Drop;
            }
        };
        match (class, method) {
            (Class::Request, stun::method::BINDING) => {
                let request = match Message::parse(&buf[start..start + len]) {
                    Ok(m) => binding::Request::read(&m, transport),
                    Err(_) => return Action::Drop,
                };
                binding::respond(settings, &request, binding_d, buf, cx.stats)
            }
            (Class::Indication, stun::method::BINDING) => {
                cx.stats.incr(Counter::StunBindingIndication);
                Action::Drop
            }
            (
                Class::Request,
                stun::method::ALLOCATE
                | stun::method::REFRESH
                | stun::method::CREATE_PERMISSION
                | stun::method::CHANNEL_BIND
                | stun::method::CONNECT
                | stun::method::CONNECTION_BIND,
            ) => self.turn.on_request(&mut cx, d, buf),
            (Class::Request | Class::Indication, _) => {
                cx.stats.incr(Counter::DropUnknownMethod);
                Action::Drop
            }
            (Class::SuccessResponse | Class::ErrorResponse, _) => {
                cx.stats.incr(Counter::DropUnexpectedClass);
                Action::Drop
            }
        }
    }
}

/// IPv4-mapped IPv6 sources are reported as the IPv4 address they are.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn drop_counter(e: ParseError) -> Counter {
    match e {
        ParseError::TooShort => Counter::DropTooShort,
        ParseError::NotStun => Counter::DropNotStun,
        ParseError::BadLength => Counter::DropBadLength,
        ParseError::BadFingerprint | ParseError::FingerprintNotLast => Counter::DropBadFingerprint,
        _ => Counter::DropBadAttribute,
    }
}

#[cfg(test)]
mod robustness;
#[cfg(test)]
mod tests;
