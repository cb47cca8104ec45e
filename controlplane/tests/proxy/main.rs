//! The reverse proxy against the real `portico` and real peers: HTTP and HTTPS in front of
//! nginx (driven by curl, openssl and raw sockets), SIP in front of Kamailio, LDAP in front of
//! slapd, H.323 (H.225.0 with tunnelled RAS) in front of fake PBXs, Check Certificate for
//! H.323/TLS and SIPS registrations, and a proxy-only box without STUN/TURN.

use std::net::{IpAddr, SocketAddr, TcpStream};

use portico_testkit::net::tcp_from;
use portico_testkit::{Portico, Spec, LOCAL4};

mod check_certificate;
mod fuzz_regressions;
mod h323;
mod h323_support;
mod http;
mod ldap;
mod only;
mod sip;

/// A configuration with `proxy_toml` as its `[proxy...]` tables (the proxy logging at debug)
/// that is ready once every port in `ready` accepts.
pub fn proxy_spec(proxy_toml: &str, ready: &[u16]) -> Spec {
    ready.iter().fold(
        Spec::new()
            .log_level("info,portico::proxy=debug")
            .proxy(proxy_toml),
        |spec, port| spec.ready_port(*port),
    )
}

/// Portico with [`proxy_spec`] running; loopback is whitelisted for fraud detection, so
/// rejections never block the test's own client.
pub fn proxy_site(tag: &str, proxy_toml: &str, ready: &[u16]) -> Portico {
    Portico::start(tag, proxy_spec(proxy_toml, ready).whitelist("127.0.0.0/8"))
}

/// A TCP connection to 127.0.0.1:`port` from the loopback address `src` (each test source
/// gets its own address, so per-source limits can be exercised).
pub fn connect_from(src: [u8; 4], port: u16) -> TcpStream {
    let to = SocketAddr::new(LOCAL4, port);
    tcp_from(IpAddr::from(src), to).unwrap_or_else(|e| panic!("connect {to}: {e}"))
}
