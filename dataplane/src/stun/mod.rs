//! STUN message codec (RFC 8489, RFC 5389/3489 compatibility, RFC 5780 attributes, RFC 8656
//! TURN attributes).
//!
//! Sans-IO and allocation-free so it can sit on the packet path: [`Message::parse`] borrows
//! the received datagram and validates its framing (and FINGERPRINT) once, after which every
//! accessor is infallible; [`MessageWriter`] writes a response into a caller buffer (which
//! may be the one the request arrived in, once the caller has copied what it needs out of
//! the request). Decoders for individual attribute values live in [`attr`]; authentication
//! in [`integrity`].
//!
//! Nothing here panics on input: malformed data always comes back as a typed error whose
//! `reason()` is a stable label for metrics.

pub mod attr;
pub mod fingerprint;
mod header;
pub mod integrity;
mod message;
mod writer;

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod rfc_vectors;

pub use attr::{is_comprehension_required, AttrError};
pub use fingerprint::{crc32, FINGERPRINT_XOR};
pub use header::{
    message_len_from_header, message_type, method, split_message_type, Class, HEADER_LEN,
    MAGIC_COOKIE, MAX_METHOD,
};
pub use integrity::{
    long_term_key, long_term_key_md5, long_term_key_sha256, userhash, verify_message_integrity,
    verify_message_integrity_sha256, IntegrityError, LongTermKey,
};
pub use message::{Attribute, Attributes, Message, ParseError};
pub use writer::{MessageWriter, WriteError};
