//! The reverse proxy's HTTP/1 request and response heads and body framing.
//! The entry point is `portico::fuzzing::http_sniff`, which `controlplane/tests/proxy/fuzz_regressions.rs` also runs
//! on the committed corpus and crash inputs. Run with `scripts/fuzz.sh http_sniff`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portico::fuzzing::http_sniff(data));
