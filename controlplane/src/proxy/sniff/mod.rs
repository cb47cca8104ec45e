//! Sniffers: what a protocol's first message names, and how that protocol says "no".
//!
//! HTTP is handled by the proxy's own request loop (every request on a keep-alive connection
//! is routed, see `proxy::http`); the other protocols route on their first message and are
//! then relayed as byte streams. Each of those is one [`Sniffer`]: adding a protocol (H.323:
//! Setup/GRQ/RRQ by gatekeeper id) is one module implementing it plus one line in
//! [`for_type`]. Sniffers are sans-IO: bytes in, a verdict out.

pub mod http;
pub mod ldap;
pub mod sip;

use portico_shared::proxy_config::ServiceType;

/// What the bytes received so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// The first message is not complete yet.
    NeedMore,
    /// The first message is complete and names this service.
    Name(String),
    /// The first message is complete but names nothing this protocol can route on.
    NoName(&'static str),
    /// Not this protocol, or broken.
    Invalid(&'static str),
    /// The first message is larger than allowed.
    TooLarge,
}

/// Why the proxy answers a request itself instead of forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No service by that name (or no name at all).
    UnknownName,
    /// The source or the request is not allowed.
    Forbidden,
    /// The target could not be reached.
    Unavailable,
    /// The request could not be parsed.
    BadRequest,
    TooLarge,
}

/// Watches what the target sends back, for rejections the fraud engine should count.
pub trait Monitor: Send {
    /// Feeds target-to-client bytes; returns a description per rejection seen.
    fn feed(&mut self, data: &[u8]) -> Vec<String>;
}

pub trait Sniffer: Send + Sync {
    /// Looks at everything received so far; `max` bounds the first message.
    fn sniff(&self, buf: &[u8], max: usize) -> Sniffed;
    /// The protocol's answer for a request not forwarded, built from that request; `None`
    /// when the protocol has nothing sensible to say (the connection is just closed).
    fn refuse(&self, buf: &[u8], why: Refusal) -> Option<Vec<u8>>;
    fn monitor(&self) -> Box<dyn Monitor>;
}

/// The sniffer for a stream-routed type; `None` for HTTP (own loop) and for types not
/// implemented yet.
pub fn for_type(t: ServiceType) -> Option<&'static dyn Sniffer> {
    match t {
        ServiceType::Sip | ServiceType::Sips => Some(&sip::Sip),
        ServiceType::Ldap | ServiceType::Ldaps => Some(&ldap::Ldap),
        ServiceType::Http | ServiceType::Https | ServiceType::H323 | ServiceType::H323Tls => None,
    }
}
