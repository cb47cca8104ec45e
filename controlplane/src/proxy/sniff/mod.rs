//! Sniffers: what a protocol's first message names, and how that protocol says "no".
//!
//! HTTP is handled by the proxy's own request loop (every request on a keep-alive connection
//! is routed, see `proxy::http`); the other protocols route on their first message, then
//! follow the connection message by message: a [`Guard`] splits what the client sends into
//! messages and names the ones that must be routed again (SIP REGISTER/INVITE, LDAP binds),
//! a [`Monitor`] watches the target's answers for rejections. Each protocol is one
//! [`Sniffer`]: adding one is one module implementing it plus one line in [`for_type`]
//! (H.323: Setup/GRQ/RRQ by gatekeeper id, in [`h323`]). Everything here is sans-IO: bytes in, verdicts out.

pub mod h323;
pub mod http;
pub mod ldap;
pub mod sip;
pub mod turn;

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
    /// Whether everything fed so far ends on a message boundary, so the proxy may put an
    /// answer of its own into the client's stream here. A monitor that lost track of the
    /// stream says yes: it cannot know better, and holding answers back forever would stall
    /// the client.
    fn at_boundary(&self) -> bool;
}

/// Follows what the client sends after its first message (which is fed again, so that
/// pipelined messages behind it are seen too). Sans-IO: [`Guard::push`] bytes, then take
/// [`Guard::next`] steps until [`Step::Idle`]. Its buffer is bounded: a message that must be
/// looked at whole may not exceed the `max` it was made with.
/// What a [`Guard`] has read and not handed out yet: the buffered bytes, the part of the
/// current message still to pass on (`forward`) or drop, and whether the stream could no
/// longer be followed. The SIP and LDAP guards differ only in how they frame a message.
#[derive(Debug, Default)]
pub struct Backlog {
    pub buf: Vec<u8>,
    /// Bytes of the current message still to hand out (`forward`) or drop.
    pub rest: usize,
    pub forward: bool,
    pub broken: bool,
}

impl Backlog {
    pub fn push(&mut self, data: &[u8]) {
        if !self.broken {
            self.buf.extend_from_slice(data);
        }
    }

    /// Stops following the stream; `step` says why.
    pub fn fail(&mut self, step: Step) -> Step {
        self.broken = true;
        self.buf = Vec::new();
        step
    }

    /// Takes what is buffered of the current message's rest: `Some` step to return when it
    /// is forwarded, `None` when it was dropped (the caller goes on with what follows).
    pub fn take_rest(&mut self) -> Option<Step> {
        let n = self.rest.min(self.buf.len());
        self.rest -= n;
        let bytes: Vec<u8> = self.buf.drain(..n).collect();
        self.forward.then_some(Step::Forward(bytes))
    }
}

pub trait Guard: Send {
    /// Adds bytes read from the client.
    fn push(&mut self, data: &[u8]);
    /// What to do next with the bytes pushed so far.
    fn next(&mut self) -> Step;
    /// The verdict on the message of the last [`Step::Message`]: `true` forwards it and the
    /// rest of it (which later steps hand out), `false` drops it, rest included.
    fn decide(&mut self, forward: bool);
}

/// What a client's message asks of the proxy besides forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Nothing: it goes to the connection's target (SIP ACK, BYE, responses, LDAP searches).
    Pass,
    /// It names a service that must be the connection's own (SIP REGISTER and INVITE by
    /// their From domain, LDAP binds by their name).
    Name(String),
    /// It must name a service but names none.
    NoName(&'static str),
}

/// One step of a [`Guard`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Everything pushed so far is handled.
    Idle,
    /// Bytes of a message already let through (body, rest of an LDAP message) or between
    /// messages (SIP keep-alive CRLFs): forward them.
    Forward(Vec<u8>),
    /// The start of a new message: its head (SIP) or, for one that is checked, all of it
    /// (LDAP bind). Answer with [`Guard::decide`] before the next step; the bytes are what
    /// to forward, or what [`Sniffer::refuse`] builds the refusal from.
    Message { check: Check, bytes: Vec<u8> },
    /// The client's stream cannot be followed any more: the connection must end.
    Broken(&'static str),
    /// A message that must be looked at whole exceeds the limit.
    TooLarge,
    /// A message was refused and the protocol has no way to say so in the stream (H.323):
    /// the connection ends here, quietly (the refusal was reported already).
    End,
}

pub trait Sniffer: Send + Sync {
    /// Looks at everything received so far; `max` bounds the first message.
    fn sniff(&self, buf: &[u8], max: usize) -> Sniffed;
    /// The protocol's answer for a request not forwarded, built from that request; `None`
    /// when the protocol has nothing sensible to say (the connection is just closed).
    fn refuse(&self, buf: &[u8], why: Refusal) -> Option<Vec<u8>>;
    /// The guard and monitor of one relayed connection, sharing what they need to know
    /// (SIP: which requests carried credentials). `max` bounds a message the guard must
    /// look at whole.
    fn session(&self, max: usize) -> (Box<dyn Guard>, Box<dyn Monitor>);
    /// The service names a routing name may go to, in the order tried (H.323's standby
    /// form names a master and a standby); most protocols: just the name.
    fn candidates(&self, name: &str) -> Vec<String> {
        vec![name.to_string()]
    }
    /// The names a registration message registers (H.323 GRQ/RRQ aliases, a SIP REGISTER's
    /// From `user@host`), for Check Certificate; `None` when `msg` (a whole first message, or
    /// a guard's [`Step::Message`] bytes) is no registration.
    fn registration(&self, _msg: &[u8]) -> Option<Vec<String>> {
        None
    }
}

/// The sniffer for a stream-routed type; `None` for HTTP (own loop).
pub fn for_type(t: ServiceType) -> Option<&'static dyn Sniffer> {
    match t {
        ServiceType::Sip | ServiceType::Sips => Some(&sip::Sip),
        ServiceType::Ldap | ServiceType::Ldaps => Some(&ldap::Ldap),
        ServiceType::H323 | ServiceType::H323Tls => Some(&h323::H323),
        ServiceType::Http | ServiceType::Https => None,
    }
}
