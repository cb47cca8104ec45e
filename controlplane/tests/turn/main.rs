//! TURN over UDP against the real `portico`: the kit's TURN client relaying to echo peers on
//! both packet drivers, coturn's `turnutils_uclient` relaying through Portico, the API's
//! view of allocations, and the RFC 5766 channel number range.

use portico_testkit::Spec;

mod api;
mod channel_range;
mod interop;
mod relay;

/// A server on driver `io` (listening on 127.0.0.1 and [::1]) with the kit's TURN users and
/// REST API secrets; with `loopback_peers` the test's own loopback peers are allowed (they
/// are denied by default).
pub fn turn_spec(io: &'static str, loopback_peers: bool) -> Spec {
    let spec = Spec::new().ipv6().io(io).turn_users();
    if loopback_peers {
        spec.loopback_peers()
    } else {
        spec
    }
}
