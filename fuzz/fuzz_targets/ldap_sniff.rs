//! The reverse proxy's LDAP first-message sniffer, refusals and response monitor.
//! The entry point is `portico::fuzzing::ldap_sniff`, which `controlplane/tests/proxy/fuzz_regressions.rs` also runs
//! on the committed corpus and crash inputs. Run with `scripts/fuzz.sh ldap_sniff`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portico::fuzzing::ldap_sniff(data));
