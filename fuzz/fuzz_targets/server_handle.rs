//! Whole datagrams into the protocol core, several per input, on listen and relay sockets.
//! The entry point is `portico_dataplane::fuzzing::server_handle`, which `dataplane/tests/fuzz_regressions.rs` also runs
//! on the committed corpus and crash inputs. Run with `scripts/fuzz.sh server_handle`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portico_dataplane::fuzzing::server_handle(data));
