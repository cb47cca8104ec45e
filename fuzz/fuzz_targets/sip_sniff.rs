//! The reverse proxy's SIP first-message sniffer, refusals and response monitor.
//! The entry point is `portico::fuzzing::sip_sniff`, which `controlplane/tests/proxy/fuzz_regressions.rs` also runs
//! on the committed corpus and crash inputs. Run with `scripts/fuzz.sh sip_sniff`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portico::fuzzing::sip_sniff(data));
