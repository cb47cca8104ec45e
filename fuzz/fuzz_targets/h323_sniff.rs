//! The reverse proxy's H.323 (H.225.0 over TPKT) first-message sniffer, per-message guard
//! and monitor. The entry point is `portico::fuzzing::h323_sniff`, which
//! `controlplane/tests/proxy/fuzz_regressions.rs` also runs on the committed corpus and crash
//! inputs. Run with `scripts/fuzz.sh h323_sniff`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portico::fuzzing::h323_sniff(data));
