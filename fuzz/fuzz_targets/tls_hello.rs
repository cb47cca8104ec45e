//! TURN on the HTTPS port: the ClientHello ALPN peek (`stun.turn`) and the first-bytes check,
//! peeked at any length and checked against rustls.
//! The entry point is `portico::fuzzing::tls_hello`, which `controlplane/tests/proxy/fuzz_regressions.rs` also runs
//! on the committed corpus and crash inputs. Run with `scripts/fuzz.sh tls_hello`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portico::fuzzing::tls_hello(data));
