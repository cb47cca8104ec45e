//! A static UDP NAT map (reference: "a static NAT map in your internet router", the
//! reverse proxy "like a smarter type of static NAT map"): Portico's box stands between the
//! internet and a LAN and does not route between them (no forwarding, no NAT). A caller on
//! the internet reaches an internal media endpoint (10.0.9.2) neither at its private
//! address nor at the box; once a map `public_ports -> internal` exists (added through the
//! API), RTP flows both ways, the internal endpoint's replies leaving from the public port,
//! on each port of the range; deleting the map stops it again.

use std::net::{Ipv4Addr, SocketAddr};

use crate::{sa, Boxed, Go, Lab, Rtp, To, BOX, NET};

const COUNT: u32 = 100;

fn internal() -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 9, 2)
}

fn caller() -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 30)
}

/// One RTP exchange: the caller sends from `from` to `to`; the internal endpoint on `inside`
/// answers whoever reaches it. Returns (caller's report, internal endpoint's report).
fn call(
    lab: &Lab,
    from: SocketAddr,
    to: SocketAddr,
    inside: SocketAddr,
) -> (crate::RtpReport, crate::RtpReport) {
    let go = Go::new(lab);
    let gw = Rtp::start(lab, "gw", inside, To::Reply, COUNT, &go);
    let c = Rtp::start(lab, "caller", from, To::Addr(to), COUNT, &go);
    go.fire();
    (c.report(), gw.report())
}

#[test]
fn static_nat_map_reaches_an_internal_endpoint() {
    let Some(lab) = Lab::new("natmap") else {
        return;
    };
    // The box: public side 198.18.0.10 (router 9's WAN would be .109: give it BOX instead).
    lab.sh(&["router", "box", &BOX.to_string(), "10.0.9", "none"]);
    lab.host("gw", "box", internal());
    lab.public("caller", &[caller()]);
    let b = Boxed::start(&lab, "box", BOX, None, &[NET], "");

    // Without a map: not at the private address (unroutable on the internet), not at the box.
    for to in [sa(internal(), 5004), sa(BOX, 5004)] {
        let (c, gw) = call(&lab, sa(caller(), 7000), to, sa(internal(), 5004));
        gw.expect_nothing(&format!("the internal endpoint, caller sending to {to}"));
        c.expect_nothing("the caller");
    }

    // The map, through the API.
    let body = format!(
        "{{\"public_ports\":\"5004-5005\",\"internal\":\"{}:5004\"}}",
        internal()
    );
    b.json("POST", "/api/v1/nat/maps", &body, 201);
    let maps = b.json("GET", "/api/v1/nat/maps", "", 200);
    assert!(
        maps.as_array()
            .is_some_and(|m| m.iter().any(|m| m["public_ports"] == "5004-5005"
                && m["internal"] == format!("{}:5004", internal()))),
        "GET /api/v1/nat/maps: {maps}"
    );
    // An overlapping map is refused.
    let (status, _) = b.call(
        "POST",
        "/api/v1/nat/maps",
        &format!(
            "{{\"public_ports\":\"5005\",\"internal\":\"{}:6000\"}}",
            internal()
        ),
    );
    assert_eq!(status, 409, "an overlapping map");

    for port in [5004, 5005] {
        let (c, gw) = call(
            &lab,
            sa(caller(), 7000 + port - 5004),
            sa(BOX, port),
            sa(internal(), port),
        );
        // The internal endpoint hears the caller through the box (a per-source binding on
        // the box, not the caller's address: the LAN has no route to the internet)...
        let sources = gw.sources();
        assert_eq!(
            sources.len(),
            1,
            "one source at the internal endpoint: {:?}",
            gw.0
        );
        assert_eq!(
            gw.unique(),
            u64::from(COUNT),
            "caller -> internal on {port}: {:?}",
            gw.0
        );
        assert_eq!(gw.0["lost"].as_u64(), Some(0), "{:?}", gw.0);
        // ...and the caller hears the internal endpoint from the public port: full cone.
        c.expect_all(
            u64::from(COUNT),
            sa(BOX, port),
            &format!("internal -> caller on {port}"),
        );
    }

    // Any external source reaches an existing map (full cone): a second caller.
    let other = Ipv4Addr::new(198, 18, 0, 31);
    lab.public("caller2", &[other]);
    let go = Go::new(&lab);
    let gw = Rtp::start(&lab, "gw", sa(internal(), 5004), To::Reply, COUNT, &go);
    let c = Rtp::start(
        &lab,
        "caller2",
        sa(other, 7100),
        To::Addr(sa(BOX, 5004)),
        COUNT,
        &go,
    );
    go.fire();
    c.report()
        .expect_all(u64::from(COUNT), sa(BOX, 5004), "internal -> second caller");
    assert_eq!(
        gw.report().unique(),
        u64::from(COUNT),
        "second caller -> internal"
    );

    // Deleted: nothing gets through any more.
    b.json("DELETE", "/api/v1/nat/maps/5004", "", 204);
    let (c, gw) = call(
        &lab,
        sa(caller(), 7000),
        sa(BOX, 5004),
        sa(internal(), 5004),
    );
    gw.expect_nothing("the internal endpoint after the map was deleted");
    c.expect_nothing("the caller after the map was deleted");
}
