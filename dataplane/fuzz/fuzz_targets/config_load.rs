//! `cargo +nightly fuzz run config_load`: the configuration loader must turn any text into a
//! configuration or an error that names the problem, never a panic; a loaded configuration
//! must survive its own round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portico_shared::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = Config::from_toml(text) {
        let again = Config::from_toml(&c.to_toml()).expect("round trip of a valid config");
        assert_eq!(again, c);
    }
});
