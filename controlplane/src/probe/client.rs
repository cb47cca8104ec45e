//! STUN/TURN transactions over a [`Conn`], written and read with the dataplane's codec:
//! Binding, Allocate with the long-term credential challenge (401, then 438 retries),
//! CreatePermission, ChannelBind, Refresh, and ChannelData/Data indications.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use portico_dataplane::stun::{
    attr, long_term_key_md5, method, verify_message_integrity, Class, Message, MessageWriter,
};

use super::conn::{Conn, WireError};

/// First retransmission timeout over UDP (doubled after each try, RFC 8489 §6.2.1 with a
/// shorter start: the probe's whole budget is a few seconds).
const FIRST_RTO: Duration = Duration::from_millis(250);
/// 438 Stale Nonce answers followed before giving up.
const MAX_STALE_RETRIES: usize = 2;
/// The channel the probe binds (the first of RFC 8656's range).
pub const CHANNEL: u16 = 0x4000;
/// REQUESTED-TRANSPORT: UDP.
const PROTO_UDP: u8 = 17;

/// Why a step failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// No answer before the deadline (`what` was sent).
    Timeout { what: &'static str, secs: f64 },
    /// The connection or socket failed.
    Wire(String),
    /// An error response.
    Error {
        code: u16,
        reason: String,
        hint: String,
    },
    /// An answer that makes no sense.
    Protocol(String),
    /// The probe cannot run this step (no credentials, ...).
    Unable(String),
    /// Relayed data did not arrive before the deadline.
    Lost(String),
    /// The TLS handshake failed.
    Tls(String),
}

impl Failure {
    /// Stable label for `--json`.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Timeout { .. } => "timeout",
            Failure::Wire(_) => "connection",
            Failure::Error { .. } => "error_response",
            Failure::Protocol(_) => "protocol",
            Failure::Unable(_) => "unable",
            Failure::Lost(_) => "timeout",
            Failure::Tls(_) => "tls",
        }
    }

    pub fn wire(e: WireError, what: &'static str, secs: f64) -> Failure {
        match e {
            WireError::Timeout => Failure::Timeout { what, secs },
            WireError::Closed(s) | WireError::Io(s) | WireError::Garbage(s) => Failure::Wire(s),
            WireError::Tls(s) => Failure::Tls(s),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout { what, secs } => {
                write!(
                    f,
                    "timeout: no answer to {what} within {} s",
                    secs_text(*secs)
                )
            }
            Failure::Wire(s)
            | Failure::Protocol(s)
            | Failure::Unable(s)
            | Failure::Lost(s)
            | Failure::Tls(s) => f.write_str(s),
            Failure::Error { code, reason, hint } => {
                write!(f, "{code} {}", standard_reason(*code))?;
                if !hint.is_empty() {
                    write!(f, ": {hint}")?;
                }
                if !reason.is_empty() && !reason.eq_ignore_ascii_case(standard_reason(*code)) {
                    write!(f, " (server says \"{reason}\")")?;
                }
                Ok(())
            }
        }
    }
}

/// "2", "0.5": seconds without trailing zeros.
pub fn secs_text(secs: f64) -> String {
    let s = format!("{secs:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// RFC 8489 / RFC 8656 reason phrases.
pub fn standard_reason(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        405 => "Mobility Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        486 => "Allocation Quota Reached",
        500 => "Server Error",
        508 => "Insufficient Capacity",
        _ => "Error",
    }
}

/// Long-term credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// The realm the user expects (`--realm`); the server's is used when unset.
    pub realm: Option<String>,
}

/// A parsed response, copied out of the receive buffer.
pub struct Response {
    pub raw: Vec<u8>,
}

impl Response {
    pub fn message(&self) -> Result<Message<'_>, Failure> {
        Message::parse(&self.raw)
            .map_err(|e| Failure::Protocol(format!("unparsable response: {}", e.reason())))
    }

    pub fn xor_address(&self, typ: u16) -> Result<Option<SocketAddr>, Failure> {
        let m = self.message()?;
        match m.get(typ) {
            None => Ok(None),
            Some(v) => attr::decode_xor_address(v, &m.transaction_id())
                .map(Some)
                .map_err(|e| Failure::Protocol(format!("bad address attribute: {}", e.reason()))),
        }
    }

    pub fn address(&self, typ: u16) -> Result<Option<SocketAddr>, Failure> {
        let m = self.message()?;
        match m.get(typ) {
            None => Ok(None),
            Some(v) => attr::decode_address(v)
                .map(Some)
                .map_err(|e| Failure::Protocol(format!("bad address attribute: {}", e.reason()))),
        }
    }
}

/// What the long-term credential mechanism learnt from the server.
struct Session {
    username: String,
    realm: Vec<u8>,
    nonce: Vec<u8>,
    key: [u8; 16],
}

/// Something received on the control connection that is not a response.
pub enum Inbound {
    /// Data from a peer: the data, and for a Data indication the peer's address as the
    /// relay saw it (XOR-PEER-ADDRESS; ChannelData does not carry one).
    Data(Vec<u8>, Option<SocketAddr>),
    Other,
}

/// Peer data and, from a Data indication, the peer's address as the relay saw it.
pub type PeerData = (Vec<u8>, Option<SocketAddr>);

/// A STUN/TURN client on one connection.
pub struct Client {
    pub conn: Conn,
    timeout: Duration,
    rng: SystemRandom,
    session: Option<Session>,
    /// Frames with data that arrived while a transaction waited.
    pending: Vec<Vec<u8>>,
}

/// A request in the making: its method and attributes (besides integrity and fingerprint).
pub struct Request {
    method: u16,
    attrs: Vec<(u16, AttrValue)>,
}

enum AttrValue {
    Raw(Vec<u8>),
    XorAddr(SocketAddr),
}

impl Request {
    pub fn new(method: u16) -> Request {
        Request {
            method,
            attrs: Vec::new(),
        }
    }

    pub fn raw(mut self, typ: u16, value: &[u8]) -> Request {
        self.attrs.push((typ, AttrValue::Raw(value.to_vec())));
        self
    }

    pub fn xor_addr(mut self, typ: u16, addr: SocketAddr) -> Request {
        self.attrs.push((typ, AttrValue::XorAddr(addr)));
        self
    }

    fn name(&self) -> &'static str {
        match self.method {
            method::BINDING => "Binding",
            method::ALLOCATE => "Allocate",
            method::REFRESH => "Refresh",
            method::CREATE_PERMISSION => "CreatePermission",
            method::CHANNEL_BIND => "ChannelBind",
            _ => "the request",
        }
    }
}

impl Client {
    pub fn new(conn: Conn, timeout: Duration) -> Client {
        Client {
            conn,
            timeout,
            rng: SystemRandom::new(),
            session: None,
            pending: Vec::new(),
        }
    }

    fn secs(&self) -> f64 {
        self.timeout.as_secs_f64()
    }

    fn tid(&self) -> [u8; 12] {
        let mut t = [0u8; 12];
        // A failing system RNG leaves a zero id: still a valid request, only predictable.
        let _ = self.rng.fill(&mut t);
        t
    }

    fn encode(&self, req: &Request, tid: &[u8; 12], auth: bool) -> Result<Vec<u8>, Failure> {
        let mut buf = vec![0u8; 1500];
        let bad = |e: portico_dataplane::stun::WriteError| {
            Failure::Protocol(format!("building {}: {e}", req.name()))
        };
        let mut w = MessageWriter::new(&mut buf, Class::Request, req.method, tid).map_err(bad)?;
        for (typ, v) in &req.attrs {
            match v {
                AttrValue::Raw(b) => w.add_attribute(*typ, b).map_err(bad)?,
                AttrValue::XorAddr(a) => w.add_xor_address(*typ, *a).map_err(bad)?,
            }
        }
        if auth {
            if let Some(s) = &self.session {
                w.add_attribute(attr::USERNAME, s.username.as_bytes())
                    .map_err(bad)?;
                w.add_attribute(attr::REALM, &s.realm).map_err(bad)?;
                w.add_attribute(attr::NONCE, &s.nonce).map_err(bad)?;
                w.add_message_integrity(&s.key).map_err(bad)?;
            }
        }
        w.add_fingerprint().map_err(bad)?;
        let n = w.finish();
        buf.truncate(n);
        Ok(buf)
    }

    /// Sends `bytes` (retransmitted over UDP) to `to` and waits for the response with `tid`.
    /// Data arriving meanwhile is kept for [`Client::recv_data`].
    fn exchange(
        &mut self,
        bytes: &[u8],
        tid: [u8; 12],
        to: SocketAddr,
        what: &'static str,
    ) -> Result<Response, Failure> {
        let secs = self.secs();
        let deadline = Instant::now() + self.timeout;
        let udp = self.conn.is_udp();
        let mut rto = FIRST_RTO;
        let mut next_send = Instant::now();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Failure::Timeout { what, secs });
            }
            if now >= next_send {
                self.conn
                    .send_to(bytes, to)
                    .map_err(|e| Failure::wire(e, what, secs))?;
                next_send = if udp { now + rto } else { deadline };
                rto *= 2;
            }
            let wait_until = next_send.min(deadline);
            let Some((frame, _from)) = self
                .conn
                .recv(wait_until)
                .map_err(|e| Failure::wire(e, what, secs))?
            else {
                continue;
            };
            match Message::parse(&frame) {
                Ok(m)
                    if m.transaction_id() == tid
                        && matches!(m.class(), Class::SuccessResponse | Class::ErrorResponse) =>
                {
                    return Ok(Response { raw: frame });
                }
                Ok(m) if m.class() == Class::Indication && m.method() == method::DATA => {
                    self.keep(frame);
                }
                Ok(_) => {}
                Err(_) => {
                    if frame.first().is_some_and(|b| b & 0xC0 == 0x40) {
                        self.keep(frame);
                    }
                }
            }
        }
    }

    fn keep(&mut self, frame: Vec<u8>) {
        if self.pending.len() < 64 {
            self.pending.push(frame);
        }
    }

    /// One transaction to the server: an error response becomes [`Failure::Error`].
    pub fn transact(&mut self, req: &Request, auth: bool) -> Result<Response, Failure> {
        let to = self.conn.server;
        self.transact_to(req, auth, to)
    }

    /// A request to `to` (UDP: any server address, for RFC 5780).
    pub fn transact_to(
        &mut self,
        req: &Request,
        auth: bool,
        to: SocketAddr,
    ) -> Result<Response, Failure> {
        let resp = self.answer(req, auth, to)?;
        match error_of(&resp, req.name())? {
            None => Ok(resp),
            Some(e) => Err(e),
        }
    }

    /// The final answer to a request, success or error (after following 438 Stale Nonce).
    fn answer(&mut self, req: &Request, auth: bool, to: SocketAddr) -> Result<Response, Failure> {
        let mut stale = 0;
        loop {
            let tid = self.tid();
            let bytes = self.encode(req, &tid, auth)?;
            let resp = self.exchange(&bytes, tid, to, req.name())?;
            let m = resp.message()?;
            if m.class() == Class::SuccessResponse {
                if auth {
                    self.check_integrity(&m)?;
                }
                return Ok(resp);
            }
            if let (true, Some(Ok((438, _))), Some(n)) = (
                auth && stale < MAX_STALE_RETRIES,
                m.get(attr::ERROR_CODE).map(attr::decode_error_code),
                m.get(attr::NONCE),
            ) {
                if let Some(s) = self.session.as_mut() {
                    s.nonce = n.to_vec();
                    stale += 1;
                    continue;
                }
            }
            return Ok(resp);
        }
    }

    fn check_integrity(&self, m: &Message<'_>) -> Result<(), Failure> {
        let Some(s) = &self.session else {
            return Ok(());
        };
        if m.message_integrity_offset().is_none() {
            // coturn and others may omit it on some responses; nothing to check.
            return Ok(());
        }
        verify_message_integrity(m, &s.key).map_err(|e| {
            Failure::Protocol(format!(
                "the response's MESSAGE-INTEGRITY does not verify ({}): the server's key for \
                 this user differs",
                e.reason()
            ))
        })
    }

    /// Allocate a UDP relay, answering the 401 challenge with `creds`. Returns the response.
    pub fn allocate(&mut self, creds: Option<&Credentials>) -> Result<Response, Failure> {
        let mut req =
            Request::new(method::ALLOCATE).raw(attr::REQUESTED_TRANSPORT, &[PROTO_UDP, 0, 0, 0]);
        // The relay must reach the probe's own peer socket, of the family used to reach the
        // server; IPv4 is the default (RFC 8656 §7.2), IPv6 is asked for.
        if self.conn.server.is_ipv6() {
            req = req.raw(
                attr::REQUESTED_ADDRESS_FAMILY,
                &[attr::FAMILY_IPV6, 0, 0, 0],
            );
        }
        let server = self.conn.server;
        let first = self.answer(&req, false, server)?;
        let (realm_raw, nonce) = match error_of(&first, "Allocate")? {
            None => return Ok(first),
            Some(Failure::Error {
                code: 401, reason, ..
            }) => {
                // The challenge: its realm and nonce sign the next try.
                let m = first.message()?;
                match (m.get(attr::REALM), m.get(attr::NONCE)) {
                    (Some(r), Some(n)) => (r.to_vec(), n.to_vec()),
                    _ => {
                        return Err(Failure::Error {
                            code: 401,
                            reason,
                            hint: "the challenge has no REALM or NONCE".into(),
                        })
                    }
                }
            }
            Some(e) => return Err(e),
        };
        // The key is made from the realm's bytes as sent; people see it made printable.
        let realm = printable(&String::from_utf8_lossy(&realm_raw));
        let Some(creds) = creds else {
            return Err(Failure::Error {
                code: 401,
                reason: String::new(),
                hint: format!(
                    "the server wants credentials (realm \"{realm}\"): give --user and --password, or --secret"
                ),
            });
        };
        if let Some(want) = &creds.realm {
            if want.as_bytes() != realm_raw {
                return Err(Failure::Unable(format!(
                    "the server's realm is \"{realm}\", not \"{want}\" (--realm)"
                )));
            }
        }
        let key = long_term_key_md5(
            creds.username.as_bytes(),
            &realm_raw,
            creds.password.as_bytes(),
        );
        self.session = Some(Session {
            username: creds.username.clone(),
            realm: realm_raw,
            nonce,
            key,
        });
        self.transact(&req, true).map_err(|e| match e {
            Failure::Error {
                code: 401, reason, ..
            } => Failure::Error {
                code: 401,
                reason,
                hint: format!(
                    "wrong user or password (user \"{}\", realm \"{realm}\")",
                    creds.username
                ),
            },
            Failure::Error {
                code: 441, reason, ..
            } => Failure::Error {
                code: 441,
                reason,
                hint: "the credentials do not match this allocation".into(),
            },
            Failure::Error {
                code: 440, reason, ..
            } => Failure::Error {
                code: 440,
                reason,
                hint: "the server has no relay address of this family".into(),
            },
            Failure::Error {
                code: 486, reason, ..
            } => Failure::Error {
                code: 486,
                reason,
                hint: "this user has too many allocations".into(),
            },
            Failure::Error {
                code: 508, reason, ..
            } => Failure::Error {
                code: 508,
                reason,
                hint: "the server has no relay port free".into(),
            },
            other => other,
        })
    }

    /// CreatePermission for `peer`.
    pub fn create_permission(&mut self, peer: SocketAddr) -> Result<(), Failure> {
        let req = Request::new(method::CREATE_PERMISSION).xor_addr(attr::XOR_PEER_ADDRESS, peer);
        self.transact(&req, true)
            .map(|_| ())
            .map_err(|e| peer_refusal(e, peer))
    }

    /// ChannelBind [`CHANNEL`] to `peer`.
    pub fn channel_bind(&mut self, peer: SocketAddr) -> Result<(), Failure> {
        let req = Request::new(method::CHANNEL_BIND)
            .raw(
                attr::CHANNEL_NUMBER,
                &[(CHANNEL >> 8) as u8, CHANNEL as u8, 0, 0],
            )
            .xor_addr(attr::XOR_PEER_ADDRESS, peer);
        self.transact(&req, true)
            .map(|_| ())
            .map_err(|e| peer_refusal(e, peer))
    }

    /// Refresh with LIFETIME 0: releases the allocation (best effort, not waited for long).
    pub fn release(&mut self) {
        if self.session.is_some() {
            let req = Request::new(method::REFRESH).raw(attr::LIFETIME, &0u32.to_be_bytes());
            let _ = self.transact(&req, true);
        }
        self.conn.close();
    }

    /// Sends `data` on [`CHANNEL`].
    pub fn send_channel(&mut self, data: &[u8]) -> Result<(), Failure> {
        let mut frame = Vec::with_capacity(4 + data.len());
        frame.extend_from_slice(&CHANNEL.to_be_bytes());
        let len = u16::try_from(data.len())
            .map_err(|_| Failure::Protocol("ChannelData too long".into()))?;
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(data);
        let secs = self.secs();
        self.conn
            .send(&frame)
            .map_err(|e| Failure::wire(e, "ChannelData", secs))
    }

    /// The next peer data (ChannelData on [`CHANNEL`] or a Data indication) before
    /// `deadline`; `Ok(None)` when the time is up.
    pub fn recv_data(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, Failure> {
        Ok(self.recv_peer_data(deadline)?.map(|(d, _)| d))
    }

    /// As [`Client::recv_data`], with the peer's address as the relay saw it when the data
    /// came in a Data indication.
    pub fn recv_peer_data(&mut self, deadline: Instant) -> Result<Option<PeerData>, Failure> {
        loop {
            let frame = if self.pending.is_empty() {
                match self
                    .conn
                    .recv(deadline)
                    .map_err(|e| Failure::wire(e, "ChannelData", self.timeout.as_secs_f64()))?
                {
                    Some((f, from)) if from == self.conn.server => f,
                    Some(_) => continue,
                    None => return Ok(None),
                }
            } else {
                self.pending.remove(0)
            };
            if let Inbound::Data(d, peer) = decode_inbound(&frame) {
                return Ok(Some((d, peer)));
            }
        }
    }
}

/// The failure an error response stands for; `None` for a success response.
fn error_of(resp: &Response, name: &str) -> Result<Option<Failure>, Failure> {
    let m = resp.message()?;
    if m.class() == Class::SuccessResponse {
        return Ok(None);
    }
    match m.get(attr::ERROR_CODE).map(attr::decode_error_code) {
        Some(Ok((code, reason))) => {
            let hint = match m.get(attr::ALTERNATE_SERVER).map(attr::decode_address) {
                Some(Ok(alt)) if code == 300 => format!("the server sends clients to {alt}"),
                _ => String::new(),
            };
            Ok(Some(Failure::Error {
                code,
                reason: printable(reason),
                hint,
            }))
        }
        _ => Err(Failure::Protocol(format!(
            "{name} error response without a valid ERROR-CODE"
        ))),
    }
}

/// Text from the server made safe to print: control characters (terminal escapes) replaced,
/// at most 128 characters.
pub fn printable(s: &str) -> String {
    s.chars()
        .take(128)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Reads peer data out of a frame from the server.
pub fn decode_inbound(frame: &[u8]) -> Inbound {
    if let Some(&[c0, c1, l0, l1]) = frame.get(..4) {
        if c0 & 0xC0 == 0x40 {
            let len = usize::from(u16::from_be_bytes([l0, l1]));
            if u16::from_be_bytes([c0, c1]) == CHANNEL {
                if let Some(d) = frame.get(4..4 + len) {
                    return Inbound::Data(d.to_vec(), None);
                }
            }
            return Inbound::Other;
        }
    }
    match Message::parse(frame) {
        Ok(m) if m.class() == Class::Indication && m.method() == method::DATA => {
            let peer = m
                .get(attr::XOR_PEER_ADDRESS)
                .and_then(|v| attr::decode_xor_address(v, &m.transaction_id()).ok());
            match m.get(attr::DATA) {
                Some(d) => Inbound::Data(d.to_vec(), peer),
                None => Inbound::Other,
            }
        }
        _ => Inbound::Other,
    }
}

/// 403 at CreatePermission or ChannelBind: the relay's peer policy.
fn peer_refusal(e: Failure, peer: SocketAddr) -> Failure {
    match e {
        Failure::Error {
            code: 403, reason, ..
        } => Failure::Error {
            code: 403,
            reason,
            hint: format!("peer {} refused by the relay's peer policy", peer.ip()),
        },
        Failure::Error {
            code: 443, reason, ..
        } => Failure::Error {
            code: 443,
            reason,
            hint: format!("the relay cannot reach the family of peer {}", peer.ip()),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_indication(peer: Option<SocketAddr>, data: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        let mut w =
            MessageWriter::new(&mut buf, Class::Indication, method::DATA, &[7; 12]).unwrap();
        if let Some(p) = peer {
            w.add_xor_address(attr::XOR_PEER_ADDRESS, p).unwrap();
        }
        w.add_attribute(attr::DATA, data).unwrap();
        let n = w.finish();
        buf.truncate(n);
        buf
    }

    #[test]
    fn data_indications_name_the_peer_channel_data_does_not() {
        let peer: SocketAddr = "198.18.0.104:42450".parse().unwrap();
        match decode_inbound(&data_indication(Some(peer), b"hi")) {
            Inbound::Data(d, p) => assert_eq!((d.as_slice(), p), (&b"hi"[..], Some(peer))),
            Inbound::Other => panic!("not data"),
        }
        let v6: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
        match decode_inbound(&data_indication(Some(v6), b"x")) {
            Inbound::Data(_, p) => assert_eq!(p, Some(v6)),
            Inbound::Other => panic!("not data"),
        }
        match decode_inbound(&data_indication(None, b"x")) {
            Inbound::Data(_, p) => assert_eq!(p, None),
            Inbound::Other => panic!("not data"),
        }
        let mut cd = CHANNEL.to_be_bytes().to_vec();
        cd.extend_from_slice(&[0, 2, b'o', b'k']);
        match decode_inbound(&cd) {
            Inbound::Data(d, p) => assert_eq!((d.as_slice(), p), (&b"ok"[..], None)),
            Inbound::Other => panic!("not data"),
        }
        // Another channel's data is not the probe's.
        assert!(matches!(
            decode_inbound(&[0x40, 0x01, 0, 1, 9]),
            Inbound::Other
        ));
    }
}
