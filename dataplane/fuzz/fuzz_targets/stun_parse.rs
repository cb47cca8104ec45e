//! `cargo +nightly fuzz run stun_parse`: the parser, every attribute decoder and the
//! integrity checks must never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portico_dataplane::stun::{attr, integrity, message_len_from_header, Message};

fuzz_target!(|data: &[u8]| {
    let _ = message_len_from_header(data);
    let Ok(m) = Message::parse(data) else { return };
    let tid = m.transaction_id();
    for a in m.attributes() {
        let v = a.value;
        let _ = attr::decode_address(v);
        let _ = attr::decode_xor_address(v, &tid);
        let _ = attr::decode_error_code(v);
        let _ = attr::decode_unknown_attributes(v).map(|it| it.count());
        let _ = attr::decode_change_request(v);
        let _ = attr::decode_u32(v);
        let _ = attr::decode_response_port(v);
        let _ = attr::decode_requested_transport(v);
        let _ = attr::decode_channel_number(v);
        let _ = attr::decode_even_port(v);
        let _ = attr::decode_address_family(v);
        let _ = attr::decode_password_algorithms(v).map(|it| it.count());
        let _ = attr::decode_password_algorithm(v);
    }
    let _ = integrity::verify_message_integrity(&m, b"key");
    let _ = integrity::verify_message_integrity_sha256(&m, b"key");
    let _ = integrity::negotiated_algorithm(&m, &integrity::DEFAULT_PASSWORD_ALGORITHMS);
});
