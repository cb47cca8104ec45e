//! SIP over TCP for the proxy's SIP side: requests, reading answers, and RFC 2617 digest
//! answers to the challenges of the [`Kamailio`](crate::fixtures::Kamailio) registrar.

use std::io::Read;

/// A SIP request from `user@domain` over TCP, empty body.
pub fn sip_request(
    method: &str,
    domain: &str,
    user: &str,
    call_id: &str,
    cseq: u32,
    extra: &str,
) -> String {
    format!(
        "{method} sip:{domain} SIP/2.0\r\n\
         Via: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-{method}-{cseq}\r\n\
         Max-Forwards: 70\r\n\
         From: \"{user}\" <sip:{user}@{domain}>;tag=a1\r\n\
         To: <sip:{user}@{domain}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} {method}\r\n\
         Contact: <sip:{user}@127.0.0.1:5999;transport=tcp>\r\n\
         {extra}Content-Length: 0\r\n\r\n"
    )
}

/// Reads one SIP message (head plus Content-Length body); what arrived before EOF, an error
/// or the socket's timeout otherwise (empty when the connection was closed).
pub fn read_sip(s: &mut impl Read) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => got.push(b[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&got).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("Content-Length:")
                .or_else(|| l.strip_prefix("l:"))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = s.read_exact(&mut body);
    head + &String::from_utf8_lossy(&body)
}

/// The nonce of a digest challenge.
pub fn sip_nonce(challenge: &str) -> Option<String> {
    challenge
        .split("nonce=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .map(str::to_string)
}

/// MD5 as lowercase hex.
pub fn md5_hex(s: &str) -> String {
    use md5::{Digest, Md5};
    Md5::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An `Authorization` header line answering `nonce` for `user` with `password` (RFC 2617
/// digest, MD5, no qop; realm = the domain, as the Kamailio fixture challenges).
pub fn sip_authorization(
    method: &str,
    domain: &str,
    user: &str,
    password: &str,
    nonce: &str,
) -> String {
    let uri = format!("sip:{domain}");
    let ha1 = md5_hex(&format!("{user}:{domain}:{password}"));
    let ha2 = md5_hex(&format!("{method}:{uri}"));
    let response = md5_hex(&format!("{ha1}:{nonce}:{ha2}"));
    format!(
        "Authorization: Digest username=\"{user}\", realm=\"{domain}\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{response}\", algorithm=MD5\r\n"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn md5_hex_matches_rfc_1321() {
        assert_eq!(super::md5_hex(""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(super::md5_hex("abc"), "900150983cd24fb0d6963f7d28e17f72");
    }
}
