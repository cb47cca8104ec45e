//! The sans-IO request handler every driver runs: one datagram (or one framed TCP message)
//! in, at most one reply out, written over the request in the same buffer.
//!
//! The driver owns sockets, buffers and time; this module owns protocol decisions. It never
//! allocates on the packet path: the reply is built in the buffer the request arrived in, after
//! the few request fields it still needs (transaction id, requested changes) were copied to
//! the stack.

mod binding;
pub mod endpoints;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use portico_shared::config::Config;
use portico_shared::counters::Counter;
use portico_shared::shm::WorkerCounters;

use crate::stun::{self, Class, Message, ParseError};
pub use endpoints::Endpoints;

/// How a message reached the server; some STUN attributes only mean something over UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What the driver does with the buffer after [`Server::handle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to send; the buffer is free again.
    Drop,
    /// Send `buf[..len]` from the worker's socket `socket` to `to` (over TCP: back on the
    /// connection, `socket` and `to` are then the connection's own).
    Reply {
        len: usize,
        socket: usize,
        to: SocketAddr,
    },
}

/// Settings derived from the configuration, shared read-only by all workers.
#[derive(Debug)]
pub struct Settings {
    pub endpoints: Endpoints,
    /// SOFTWARE attribute value; empty hides it.
    pub software: String,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            endpoints: Endpoints::from_config(config),
            software: config.stun.software.clone(),
        }
    }
}

/// One per worker thread.
pub struct Server {
    settings: Arc<Settings>,
}

impl Server {
    pub fn new(settings: Arc<Settings>) -> Server {
        Server { settings }
    }

    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    /// Applies a new configuration; takes effect from the next packet.
    pub fn set_settings(&mut self, settings: Arc<Settings>) {
        self.settings = settings;
    }

    /// Handles the message in `buf[..len]`, received on socket `socket` from `from`.
    /// `buf` is the whole buffer: a reply may be longer than the request.
    pub fn handle(
        &mut self,
        _now: Instant,
        transport: Transport,
        socket: usize,
        from: SocketAddr,
        buf: &mut [u8],
        len: usize,
        stats: &WorkerCounters,
    ) -> Action {
        let from = canonical(from);
        if from.port() == 0 || from.ip().is_unspecified() || from.ip().is_multicast() {
            stats.incr(Counter::DropBadSource);
            return Action::Drop;
        }
        let Some(data) = buf.get(..len) else {
            stats.incr(Counter::DropBadLength);
            return Action::Drop;
        };
        let msg = match Message::parse(data) {
            Ok(m) => m,
            Err(e) => {
                stats.incr(drop_counter(e));
                return Action::Drop;
            }
        };
        match (msg.class(), msg.method()) {
            (Class::Request, stun::method::BINDING) => {
                let request = binding::Request::read(&msg, transport);
                binding::respond(&self.settings, &request, socket, from, buf, stats)
            }
            (Class::Indication, stun::method::BINDING) => {
                stats.incr(Counter::StunBindingIndication);
                Action::Drop
            }
            (Class::Request | Class::Indication, _) => {
                stats.incr(Counter::DropUnknownMethod);
                Action::Drop
            }
            (Class::SuccessResponse | Class::ErrorResponse, _) => {
                stats.incr(Counter::DropUnexpectedClass);
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
mod tests;
