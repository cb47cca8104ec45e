//! The media relay: the SRTP/SRTCP authentication check a new source must pass before a leg
//! latches it, and the legs' learning and forwarding.
//! The entry point is `portico_dataplane::fuzzing::media_srtp`, which `dataplane/tests/fuzz_regressions.rs` also runs
//! on the committed corpus and crash inputs. Run with `scripts/fuzz.sh media_srtp`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portico_dataplane::fuzzing::media_srtp(data));
