//! Long-term credentials for TURN (RFC 8489 §9.2, RFC 8656 §5): static users, TURN REST API
//! ephemeral credentials, stateless nonces.
//!
//! Nonces carry their own expiry and a MAC over it and the client's address, keyed by a
//! secret drawn at start: any worker can check any nonce without shared state, and a nonce
//! is useless from another address. They start with RFC 8489's "nonce cookie" announcing
//! password algorithms and username anonymity, so RFC 8489 clients may pick SHA-256 and send
//! USERHASH, while RFC 5389 clients, which ignore the cookie, keep using MD5.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use aws_lc_rs::hmac;
use portico_shared::config::Config;

#[cfg(test)]
use crate::stun::integrity::ALGORITHM_MD5;
use crate::stun::integrity::{self, ALGORITHM_SHA256, DEFAULT_PASSWORD_ALGORITHMS};
use crate::stun::{attr, Message};

/// RFC 8489 §9.2: "obMatJos2" then the 24-bit security feature set in base64. Bits 0
/// (password algorithms) and 1 (username anonymity) set: 0xC00000 -> "wAAA".
const NONCE_COOKIE: &str = "obMatJos2wAAA";
const NONCE_LEN: usize = NONCE_COOKIE.len() + 8 + 24;

/// A long-term key, by password algorithm.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Md5([u8; 16]),
    Sha256([u8; 32]),
}

impl Key {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Key::Md5(k) => k,
            Key::Sha256(k) => k,
        }
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Which integrity attribute the client used; the response uses the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Integrity {
    Sha1,
    Sha256,
}

#[derive(Clone, Debug)]
struct StaticUser {
    md5: [u8; 16],
    /// Only when the password itself is configured (an MD5 HA1 cannot give SHA-256).
    sha256: Option<[u8; 32]>,
}

/// The credential store of one configuration generation; shared read-only by all workers.
pub struct Credentials {
    realm: String,
    users: BTreeMap<Vec<u8>, StaticUser>,
    /// USERHASH -> user name.
    hashes: BTreeMap<[u8; 32], Vec<u8>>,
    secrets: Vec<Vec<u8>>,
    nonce_key: hmac::Key,
    pub nonce_lifetime_secs: u64,
}

/// An authenticated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authed {
    pub username: Box<str>,
    pub key: Key,
    pub integrity: Integrity,
}

/// Why a request was not authenticated, with the response it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials at all: 401 with REALM and NONCE (the normal first round trip).
    Challenge,
    /// Nonce expired or not ours: 438 with a fresh nonce.
    StaleNonce,
    /// USERNAME/USERHASH not known: 401.
    UnknownUser,
    /// REST API credential past its expiry timestamp: 401.
    Expired,
    /// MESSAGE-INTEGRITY does not verify: 401.
    BadIntegrity,
    /// Malformed or bid-down PASSWORD-ALGORITHM(S), or missing attributes next to
    /// MESSAGE-INTEGRITY: 400.
    BadRequest,
}

impl AuthError {
    pub fn code(self) -> u16 {
        match self {
            AuthError::StaleNonce => 438,
            AuthError::BadRequest => 400,
            _ => 401,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Challenge => "Unauthorized",
            AuthError::StaleNonce => "Stale Nonce",
            AuthError::UnknownUser | AuthError::Expired | AuthError::BadIntegrity => "Unauthorized",
            AuthError::BadRequest => "Bad Request",
        }
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = hex_val(b[2 * i])? << 4 | hex_val(b[2 * i + 1])?;
    }
    Some(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl Credentials {
    pub fn from_config(config: &Config, nonce_secret: &[u8; 32]) -> Credentials {
        let realm = config.turn.realm.clone();
        let mut users = BTreeMap::new();
        let mut hashes = BTreeMap::new();
        for u in &config.turn.users {
            let name = u.name.as_bytes();
            let user = match (&u.password, &u.key) {
                (Some(p), _) => StaticUser {
                    md5: integrity::long_term_key_md5(name, realm.as_bytes(), p.as_bytes()),
                    sha256: Some(integrity::long_term_key_sha256(
                        name,
                        realm.as_bytes(),
                        p.as_bytes(),
                    )),
                },
                (None, Some(k)) => match parse_hex16(k) {
                    Some(md5) => StaticUser { md5, sha256: None },
                    None => continue,
                },
                (None, None) => continue,
            };
            hashes.insert(integrity::userhash(name, realm.as_bytes()), name.to_vec());
            users.insert(name.to_vec(), user);
        }
        Credentials {
            realm,
            users,
            hashes,
            secrets: config
                .turn
                .shared_secret
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect(),
            nonce_key: hmac::Key::new(hmac::HMAC_SHA256, nonce_secret),
            nonce_lifetime_secs: config.turn.nonce_lifetime.as_secs(),
        }
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    pub fn password_algorithms(&self) -> &'static [u8] {
        &DEFAULT_PASSWORD_ALGORITHMS
    }

    /// Writes a fresh nonce for `client`, valid until `now_unix + lifetime`.
    pub fn nonce(&self, client: SocketAddr, now_unix: u64, out: &mut [u8; NONCE_LEN]) {
        let expiry = (now_unix + self.nonce_lifetime_secs) as u32;
        let mut pos = 0;
        out[..NONCE_COOKIE.len()].copy_from_slice(NONCE_COOKIE.as_bytes());
        pos += NONCE_COOKIE.len();
        for b in expiry.to_be_bytes() {
            out[pos] = HEX[usize::from(b >> 4)];
            out[pos + 1] = HEX[usize::from(b & 15)];
            pos += 2;
        }
        let mac = self.nonce_mac(&out[NONCE_COOKIE.len()..pos], client.ip());
        for b in &mac.as_ref()[..12] {
            out[pos] = HEX[usize::from(b >> 4)];
            out[pos + 1] = HEX[usize::from(b & 15)];
            pos += 2;
        }
    }

    fn nonce_mac(&self, expiry_hex: &[u8], ip: IpAddr) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.nonce_key);
        ctx.update(expiry_hex);
        match ip.to_canonical() {
            IpAddr::V4(v4) => ctx.update(&v4.octets()),
            IpAddr::V6(v6) => ctx.update(&v6.octets()),
        }
        ctx.sign()
    }

    /// Whether a nonce is one of ours, for this client, and still fresh.
    pub fn nonce_valid(&self, nonce: &[u8], client: SocketAddr, now_unix: u64) -> bool {
        if nonce.len() != NONCE_LEN || !nonce.starts_with(NONCE_COOKIE.as_bytes()) {
            return false;
        }
        let exp_hex = &nonce[NONCE_COOKIE.len()..NONCE_COOKIE.len() + 8];
        let mut expiry = 0u32;
        for c in exp_hex {
            match hex_val(*c) {
                Some(v) => expiry = expiry << 4 | u32::from(v),
                None => return false,
            }
        }
        let mac = self.nonce_mac(exp_hex, client.ip());
        let mut expected = [0u8; 24];
        for (i, b) in mac.as_ref()[..12].iter().enumerate() {
            expected[2 * i] = HEX[usize::from(b >> 4)];
            expected[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        let got = &nonce[NONCE_COOKIE.len() + 8..];
        aws_lc_rs::constant_time::verify_slices_are_equal(&expected, got).is_ok()
            && u64::from(expiry) >= now_unix
    }

    /// Authenticates a request (RFC 8489 §9.2.4 server side).
    pub fn authenticate(
        &self,
        msg: &Message<'_>,
        client: SocketAddr,
        now_unix: u64,
    ) -> Result<Authed, AuthError> {
        let has_mi = msg.message_integrity_offset().is_some();
        let has_mi256 = msg.message_integrity_sha256_offset().is_some();
        if !has_mi && !has_mi256 {
            return Err(AuthError::Challenge);
        }
        let (Some(realm), Some(nonce)) = (msg.get(attr::REALM), msg.get(attr::NONCE)) else {
            return Err(AuthError::BadRequest);
        };
        let username = msg.get(attr::USERNAME);
        let userhash = msg.get(attr::USERHASH);
        if username.is_none() && userhash.is_none() {
            return Err(AuthError::BadRequest);
        }
        if !self.nonce_valid(nonce, client, now_unix) {
            return Err(AuthError::StaleNonce);
        }
        if realm != self.realm.as_bytes() {
            return Err(AuthError::BadIntegrity);
        }
        let algorithm = integrity::negotiated_algorithm(msg, self.password_algorithms())
            .map_err(|_| AuthError::BadRequest)?;
        let name: &[u8] = match (username, userhash) {
            (Some(u), _) => u,
            (None, Some(h)) => {
                let h: [u8; 32] = h.try_into().map_err(|_| AuthError::BadRequest)?;
                self.hashes.get(&h).ok_or(AuthError::UnknownUser)?
            }
            (None, None) => return Err(AuthError::BadRequest),
        };
        let integrity = if has_mi256 {
            Integrity::Sha256
        } else {
            Integrity::Sha1
        };
        let verify = |key: &Key| match integrity {
            Integrity::Sha256 => integrity::verify_message_integrity_sha256(msg, key.bytes()),
            Integrity::Sha1 => integrity::verify_message_integrity(msg, key.bytes()),
        };
        let username: Box<str> = String::from_utf8_lossy(name).into();
        if let Some(user) = self.users.get(name) {
            let key = match algorithm {
                ALGORITHM_SHA256 => Key::Sha256(user.sha256.ok_or(AuthError::BadIntegrity)?),
                _ => Key::Md5(user.md5),
            };
            return match verify(&key) {
                Ok(()) => Ok(Authed {
                    username,
                    key,
                    integrity,
                }),
                Err(_) => Err(AuthError::BadIntegrity),
            };
        }
        // TURN REST API: "expiry:name", password = base64(HMAC-SHA1(secret, username)).
        if self.secrets.is_empty() {
            return Err(AuthError::UnknownUser);
        }
        let expiry = rest_expiry(name).ok_or(AuthError::UnknownUser)?;
        for secret in &self.secrets {
            let key = rest_key(secret, name, self.realm.as_bytes(), algorithm);
            if verify(&key).is_ok() {
                if expiry < now_unix {
                    return Err(AuthError::Expired);
                }
                return Ok(Authed {
                    username,
                    key,
                    integrity,
                });
            }
        }
        Err(AuthError::BadIntegrity)
    }
}

/// The expiry of a REST API username: the number before the first ':' (the usual
/// "timestamp:name" form), or a bare number.
fn rest_expiry(name: &[u8]) -> Option<u64> {
    let ts = name.split(|c| *c == b':').next()?;
    if ts.is_empty() || ts.len() > 12 || !ts.iter().all(|c| c.is_ascii_digit()) {
        return None;
    }
    std::str::from_utf8(ts).ok()?.parse().ok()
}

/// The long-term key of a REST API credential under one shared secret.
pub fn rest_key(secret: &[u8], username: &[u8], realm: &[u8], algorithm: u16) -> Key {
    let password = rest_password(secret, username);
    let pw = password.as_bytes();
    match algorithm {
        ALGORITHM_SHA256 => Key::Sha256(integrity::long_term_key_sha256(username, realm, pw)),
        _ => Key::Md5(integrity::long_term_key_md5(username, realm, pw)),
    }
}

/// The password of a TURN REST API credential (draft-uberti-behave-turn-rest):
/// base64(HMAC-SHA1(secret, username)), standard base64 with padding (RFC 4648 §4), 28
/// characters. The one place it is computed: the dataplane checks credentials with it, the
/// API's `POST /api/v1/turn/credentials` hands them out with it, and the load generator
/// makes its own.
pub fn rest_password(secret: &[u8], username: &[u8]) -> String {
    use base64::Engine as _;
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret),
        username,
    );
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

pub const NONCE_BYTES: usize = NONCE_LEN;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::{method, Class, MessageWriter};
    const MD5: u16 = ALGORITHM_MD5;

    fn creds() -> Credentials {
        let c = Config::from_toml(
            "[turn]\nrealm = \"example.org\"\nshared_secret = [\"new\", \"old\"]\nusers = [{ name = \"alice\", password = \"secret\" }, { name = \"bob\", key = \"0123456789abcdef0123456789abcdef\" }]\n",
        )
        .unwrap();
        Credentials::from_config(&c, &[7u8; 32])
    }

    fn client() -> SocketAddr {
        "198.51.100.7:5000".parse().unwrap()
    }

    fn request(
        c: &Credentials,
        user: &str,
        key: &[u8],
        now: u64,
        sha256_attr: bool,
        buf: &mut [u8],
    ) -> usize {
        let mut nonce = [0u8; NONCE_LEN];
        c.nonce(client(), now, &mut nonce);
        let mut w = MessageWriter::new(buf, Class::Request, method::ALLOCATE, &[1; 12]).unwrap();
        w.add_attribute(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .unwrap();
        w.add_attribute(attr::USERNAME, user.as_bytes()).unwrap();
        w.add_attribute(attr::REALM, c.realm().as_bytes()).unwrap();
        w.add_attribute(attr::NONCE, &nonce).unwrap();
        if sha256_attr {
            w.add_message_integrity_sha256(key).unwrap();
        } else {
            w.add_message_integrity(key).unwrap();
        }
        w.finish()
    }

    #[test]
    fn rest_password_matches_the_turn_rest_api_draft_form() {
        // python3 -c 'import hmac,hashlib,base64;print(base64.b64encode(hmac.new(b"north",b"1700000000:alice",hashlib.sha1).digest()))'
        assert_eq!(
            rest_password(b"north", b"1700000000:alice"),
            "Cd/49soE35ICqcJF/bCTn8Z4OyE="
        );
        // RFC 2202 test case 2: HMAC-SHA1("Jefe", "what do ya want for nothing?") is
        // effcdf6ae5eb2fa2d27416d5f184df9c259a7c79; its base64 (python3 as above):
        assert_eq!(
            rest_password(b"Jefe", b"what do ya want for nothing?"),
            "7/zfauXrL6LSdBbV8YTfnCWafHk="
        );
    }

    #[test]
    fn nonces_are_bound_to_client_and_time() {
        let c = creds();
        let mut n = [0u8; NONCE_LEN];
        c.nonce(client(), 1000, &mut n);
        assert!(n.starts_with(b"obMatJos2"));
        assert!(c.nonce_valid(&n, client(), 1000));
        assert!(c.nonce_valid(&n, client(), 1000 + c.nonce_lifetime_secs));
        assert!(!c.nonce_valid(&n, client(), 1001 + c.nonce_lifetime_secs));
        assert!(!c.nonce_valid(&n, "198.51.100.8:5000".parse().unwrap(), 1000));
        let mut forged = n;
        forged[NONCE_COOKIE.len()] = b'f';
        assert!(!c.nonce_valid(&forged, client(), 1000));
        assert!(!c.nonce_valid(b"short", client(), 1000));
    }

    #[test]
    fn static_user_md5_and_sha256_integrity() {
        let c = creds();
        let mut buf = [0u8; 512];
        let key = integrity::long_term_key_md5(b"alice", b"example.org", b"secret");
        for sha in [false, true] {
            let n = request(&c, "alice", &key, 1000, sha, &mut buf);
            let m = Message::parse(&buf[..n]).unwrap();
            let a = c.authenticate(&m, client(), 1000).unwrap();
            assert_eq!(&*a.username, "alice");
            assert_eq!(a.key, Key::Md5(key));
        }
        let n = request(&c, "alice", b"wrong", 1000, false, &mut buf);
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(
            c.authenticate(&m, client(), 1000),
            Err(AuthError::BadIntegrity)
        );
        let n = request(&c, "mallory", &key, 1000, false, &mut buf);
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(
            c.authenticate(&m, client(), 1000),
            Err(AuthError::UnknownUser)
        );
        // The nonce was made at 1000; far later it is stale.
        let n = request(&c, "alice", &key, 1000, false, &mut buf);
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(
            c.authenticate(&m, client(), 1_000_000),
            Err(AuthError::StaleNonce)
        );
    }

    #[test]
    fn configured_ha1_key_works() {
        let c = creds();
        let mut buf = [0u8; 512];
        let key = parse_hex16("0123456789abcdef0123456789abcdef").unwrap();
        let n = request(&c, "bob", &key, 1000, false, &mut buf);
        let m = Message::parse(&buf[..n]).unwrap();
        assert!(c.authenticate(&m, client(), 1000).is_ok());
    }

    #[test]
    fn rest_credentials_with_rollover_and_expiry() {
        let c = creds();
        let mut buf = [0u8; 512];
        for secret in [&b"new"[..], b"old"] {
            let user = "5000:carol";
            let Key::Md5(key) = rest_key(secret, user.as_bytes(), b"example.org", MD5) else {
                unreachable!()
            };
            let n = request(&c, user, &key, 1000, false, &mut buf);
            let m = Message::parse(&buf[..n]).unwrap();
            assert!(c.authenticate(&m, client(), 1000).is_ok());
            // Same credential after its expiry timestamp (nonce still fresh).
            let n = request(&c, user, &key, 4999 + 1, false, &mut buf);
            let m = Message::parse(&buf[..n]).unwrap();
            assert_eq!(c.authenticate(&m, client(), 5001), Err(AuthError::Expired));
        }
        let Key::Md5(key) = rest_key(b"other", b"5000:carol", b"example.org", MD5) else {
            unreachable!()
        };
        let n = request(&c, "5000:carol", &key, 1000, false, &mut buf);
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(
            c.authenticate(&m, client(), 1000),
            Err(AuthError::BadIntegrity)
        );
    }

    #[test]
    fn no_credentials_is_a_challenge() {
        let c = creds();
        let mut buf = [0u8; 128];
        let w = MessageWriter::new(&mut buf, Class::Request, method::ALLOCATE, &[1; 12]).unwrap();
        let n = w.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(c.authenticate(&m, client(), 0), Err(AuthError::Challenge));
    }
}
