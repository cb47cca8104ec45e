//! RFC 5766 channel numbers over a real socket: 0x4000 through 0x7FFF are channels (RFC 8656
//! narrowed the range to 0x4FFF, but RFC 5766 clients such as coturn's `turnutils_uclient`
//! pick numbers anywhere in the old range). A ChannelBind of the top number succeeds and
//! ChannelData on it is relayed both ways, on both packet drivers.

use std::time::Duration;

use portico_testkit::turn::{udp_transport, EchoPeer, Relayed, TurnClient, PASSWORD, USER};
use portico_testkit::{Portico, LOCAL4};

use crate::turn_spec;

fn top_channel_relays(io: &'static str) {
    let p = Portico::start("turn-chan-range", turn_spec(io, true));
    // One peer per channel: RFC 8656 §12.2 binds a peer to one number.
    let top = EchoPeer::start(LOCAL4);
    let mid = EchoPeer::start(LOCAL4);
    let mut c = TurnClient::new(p.udp4(), USER, PASSWORD);
    let r = c.allocate_with(&udp_transport);
    assert!(r.is_success(), "Allocate: {:?}", r.code());

    // Out of range on either side stays refused.
    c.bind(0x8000, top.addr).expect_error(400);
    c.bind(0x3FFF, top.addr).expect_error(400);

    for (number, peer, data) in [
        (0x7FFFu16, &top, &b"top of RFC 5766"[..]),
        (0x5000, &mid, b"above 0x4FFF"),
    ] {
        let r = c.bind(number, peer.addr);
        assert!(
            r.is_success(),
            "ChannelBind {number:#06x}: {:?}; log:\n{}",
            r.code(),
            p.log()
        );
        c.channel_data(number, data, true);
        match c.recv_relayed(Duration::from_secs(5)) {
            Some(Relayed::Channel { number: n, data: d }) => {
                assert_eq!(n, number, "the echo comes back on the same channel");
                assert_eq!(d, data);
            }
            other => panic!("expected ChannelData on {number:#06x}, got {other:?}"),
        }
        assert_eq!(peer.count(), 1, "the peer saw the ChannelData payload");
    }
}

#[test]
fn channel_0x7fff_relays_over_io_uring() {
    top_channel_relays("io_uring");
}

#[test]
fn channel_0x7fff_relays_over_epoll() {
    top_channel_relays("epoll");
}
