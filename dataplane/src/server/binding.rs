//! The Binding method (RFC 8489 §3, RFC 5780 §6–7, RFC 3489 compatibility).
//!
//! A client that sends the magic cookie gets XOR-MAPPED-ADDRESS; an RFC 3489 client (no cookie)
//! gets MAPPED-ADDRESS, because it cannot decode the XOR form. With an alternate address
//! configured, responses carry RESPONSE-ORIGIN and OTHER-ADDRESS (SOURCE-ADDRESS and
//! CHANGED-ADDRESS for RFC 3489 clients), and CHANGE-REQUEST / RESPONSE-PORT are honoured, so
//! a client can classify its NAT's mapping and filtering.

use std::net::SocketAddr;

use portico_shared::counters::Counter;

use super::{Action, Settings, Stats, Transport};
use crate::stun::{self, attr, Class, Message, MessageWriter};
use crate::turn::Datagram;

/// ICE attributes (RFC 8445) a client may leave in a check it also sends to the server.
const ICE_PRIORITY: u16 = 0x0024;
const ICE_USE_CANDIDATE: u16 = 0x0025;

/// Everything the response needs from the request, copied out so the buffer can be reused.
pub(super) struct Request {
    legacy: bool,
    tid16: [u8; 16],
    change_ip: bool,
    change_port: bool,
    response_port: Option<u16>,
    unknown: attr::UnknownList,
    bad: Option<&'static str>,
    transport: Transport,
}

impl Request {
    pub(super) fn read(msg: &Message<'_>, transport: Transport) -> Request {
        let tid16 = msg.legacy_transaction_id();
        let mut r = Request {
            legacy: !msg.has_magic_cookie(),
            tid16,
            change_ip: false,
            change_port: false,
            response_port: None,
            unknown: attr::UnknownList::default(),
            bad: None,
            transport,
        };
        for a in msg.attributes() {
            match a.typ {
                attr::CHANGE_REQUEST => match attr::decode_change_request(a.value) {
                    Ok((ip, port)) => {
                        r.change_ip = ip;
                        r.change_port = port;
                    }
                    Err(_) => r.bad = Some("Malformed CHANGE-REQUEST"),
                },
                attr::RESPONSE_PORT => match attr::decode_response_port(a.value) {
                    Ok(0) | Err(_) => r.bad = Some("Malformed RESPONSE-PORT"),
                    Ok(p) => r.response_port = Some(p),
                },
                // Understood and deliberately ignored: credentials (Binding needs none here),
                // ICE attributes, and PADDING (honouring it would let a client make the
                // response larger than its request).
                attr::USERNAME
                | attr::MESSAGE_INTEGRITY
                | attr::MESSAGE_INTEGRITY_SHA256
                | attr::USERHASH
                | attr::PASSWORD_ALGORITHM
                | attr::REALM
                | attr::NONCE
                | attr::PADDING
                | ICE_PRIORITY
                | ICE_USE_CANDIDATE => {}
                t if attr::is_comprehension_required(t) => r.unknown.note(t),
                _ => {}
            }
        }
        r
    }

    fn tid12(&self) -> [u8; 12] {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.tid16[4..]);
        t
    }

    fn writer<'b>(&self, buf: &'b mut [u8], class: Class) -> Result<MessageWriter<'b>, ()> {
        if self.legacy {
            MessageWriter::new_legacy(buf, class, stun::method::BINDING, &self.tid16)
        } else {
            MessageWriter::new(buf, class, stun::method::BINDING, &self.tid12())
        }
        .map_err(|_| ())
    }
}

/// An error response's code, reason phrase and UNKNOWN-ATTRIBUTES.
struct Refusal<'r> {
    code: u16,
    reason: &'r str,
    unknown: &'r [u16],
}

pub(super) fn respond(
    settings: &Settings,
    req: &Request,
    d: Datagram,
    buf: &mut [u8],
    stats: &mut Stats,
) -> Action {
    let (socket, from) = (d.socket, d.from);
    let fail = |buf: &mut [u8], code: u16, reason: &str, unknown: &[u16]| {
        let refusal = Refusal {
            code,
            reason,
            unknown,
        };
        build_error(settings, req, d, buf, &refusal)
    };
    if !req.unknown.is_empty() {
        stats.incr(Counter::StunBindingUnknownAttribute);
        return fail(buf, 420, "Unknown Attribute", req.unknown.as_slice());
    }
    if let Some(reason) = req.bad {
        stats.incr(Counter::StunBindingBadRequest);
        return fail(buf, 400, reason, &[]);
    }
    let siblings = settings.endpoints.siblings(socket);
    let send_socket = match (req.change_ip, req.change_port, siblings) {
        (false, false, _) => socket,
        // RFC 5780 §6.1: a server without an alternate address treats CHANGE-REQUEST as
        // unknown. A request asking for no change at all is still answered (RFC 3489 clients
        // send that in their first test).
        (_, _, None) => {
            stats.incr(Counter::StunBindingUnknownAttribute);
            return fail(buf, 420, "Unknown Attribute", &[attr::CHANGE_REQUEST]);
        }
        (_, _, Some(_)) if req.transport == Transport::Tcp => {
            stats.incr(Counter::StunBindingBadRequest);
            return fail(buf, 400, "CHANGE-REQUEST needs UDP", &[]);
        }
        (true, true, Some(s)) => s.change_both,
        (true, false, Some(s)) => s.change_ip,
        (false, true, Some(s)) => s.change_port,
    };
    let to = match (req.response_port, req.transport) {
        (Some(p), Transport::Udp) => SocketAddr::new(from.ip(), p),
        _ => from,
    };
    match success(settings, req, socket, send_socket, from, buf) {
        Ok(len) => {
            stats.incr(Counter::StunBindingSuccess);
            Action::Send {
                offset: 0,
                len,
                socket: send_socket,
                to,
            }
        }
        Err(()) => {
            stats.incr(Counter::DropTruncated);
            Action::Drop
        }
    }
}

fn success(
    settings: &Settings,
    req: &Request,
    socket: usize,
    send_socket: usize,
    from: SocketAddr,
    buf: &mut [u8],
) -> Result<usize, ()> {
    let endpoints = &settings.endpoints;
    // RESPONSE-ORIGIN/OTHER-ADDRESS only where RFC 5780 is configured: on a wildcard socket
    // the origin address is not known, and OTHER-ADDRESS would promise what is not there.
    let rfc5780 = endpoints.siblings(socket).is_some();
    let origin = endpoints.addr(send_socket).filter(|_| rfc5780);
    let other = endpoints.other_address(socket);
    let mut w = req.writer(buf, Class::SuccessResponse)?;
    if req.legacy {
        w.add_address(attr::MAPPED_ADDRESS, from).map_err(drop)?;
        if let Some(o) = origin {
            w.add_address(attr::SOURCE_ADDRESS, o).map_err(drop)?;
        }
        if let Some(o) = other {
            w.add_address(attr::CHANGED_ADDRESS, o).map_err(drop)?;
        }
    } else {
        w.add_xor_address(attr::XOR_MAPPED_ADDRESS, from)
            .map_err(drop)?;
        if let Some(o) = origin {
            w.add_address(attr::RESPONSE_ORIGIN, o).map_err(drop)?;
        }
        if let Some(o) = other {
            w.add_address(attr::OTHER_ADDRESS, o).map_err(drop)?;
        }
    }
    finish(settings, req, w)
}

fn finish(settings: &Settings, req: &Request, mut w: MessageWriter<'_>) -> Result<usize, ()> {
    let software = settings.software.as_bytes();
    if req.legacy && !software.is_empty() {
        // RFC 3489 required string lengths to be multiples of four, and its clients reject
        // anything else: pad with spaces inside the value.
        let mut padded = [b' '; 768];
        let n = software.len().min(764);
        padded[..n].copy_from_slice(&software[..n]);
        w.add_attribute(attr::SOFTWARE, &padded[..n.div_ceil(4) * 4])
            .map_err(drop)?;
    } else if !software.is_empty() {
        w.add_attribute(attr::SOFTWARE, software).map_err(drop)?;
    }
    if !req.legacy {
        w.add_fingerprint().map_err(drop)?;
    }
    Ok(w.finish())
}

fn build_error(
    settings: &Settings,
    req: &Request,
    d: Datagram,
    buf: &mut [u8],
    refusal: &Refusal<'_>,
) -> Action {
    let Refusal {
        code,
        reason,
        unknown,
    } = *refusal;
    let built = (|| {
        let mut w = req.writer(buf, Class::ErrorResponse)?;
        if req.legacy {
            // RFC 3489 §11.2.9: the reason phrase is a multiple of four bytes; its clients
            // step over attributes by the unpadded length.
            let mut padded = [b' '; 128];
            let n = reason.len().min(124);
            padded[..n].copy_from_slice(&reason.as_bytes()[..n]);
            let text = std::str::from_utf8(&padded[..n.div_ceil(4) * 4]).map_err(drop)?;
            w.add_error_code(code, text).map_err(drop)?;
        } else {
            w.add_error_code(code, reason).map_err(drop)?;
        }
        if !unknown.is_empty() {
            w.add_unknown_attributes(unknown).map_err(drop)?;
        }
        finish(settings, req, w)
    })();
    match built {
        Ok(len) => Action::Send {
            offset: 0,
            len,
            socket: d.socket,
            to: d.from,
        },
        Err(()) => Action::Drop,
    }
}
