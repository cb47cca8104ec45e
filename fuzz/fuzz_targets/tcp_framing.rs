//! TURN over TCP/TLS (RFC 8656 §12.5, RFC 6062): STUN and ChannelData framing of a byte
//! stream read in chunks of any size, and the frames into the core as one stream connection.
//! The entry point is `portico_dataplane::fuzzing::tcp_framing`, which `dataplane/tests/fuzz_regressions.rs` also runs
//! on the committed corpus and crash inputs. Run with `scripts/fuzz.sh tcp_framing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portico_dataplane::fuzzing::tcp_framing(data));
