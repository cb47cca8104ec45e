//! Which peers a TURN allocation may talk to.
//!
//! A TURN server on the public internet is a proxy into whatever network it sits in. By
//! default Portico refuses every peer that is not a public unicast address: loopback, private
//! ranges, link-local (cloud metadata at 169.254.169.254), CGNAT, documentation, benchmarking,
//! multicast, reserved, and their IPv6 counterparts. An address is first turned back into the
//! IPv4 address it embeds (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo), so no
//! encoding slips a forbidden IPv4 peer past the list. `turn.allow_peers` punches exceptions
//! (a PBX's media range), `turn.deny_peers` adds blocks, and the server's own relayed
//! addresses are always allowed so two clients of one Portico can reach each other.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use portico_shared::addr::{Cidr, CidrList};

/// Why a peer was refused; each has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// In the built-in list of special-purpose ranges.
    SpecialPurpose,
    /// In `turn.deny_peers`.
    Configured,
}

/// IANA IPv4 and IPv6 special-purpose address registries (RFC 6890 and successors), less the
/// blocks that are globally reachable unicast. Kept as text so the list reads like the
/// registries it comes from.
const DEFAULT_DENY: &[&str] = &[
    // IPv4
    "0.0.0.0/8",       // "this network" (RFC 791)
    "10.0.0.0/8",      // private (RFC 1918)
    "100.64.0.0/10",   // shared address space / CGNAT (RFC 6598)
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local, cloud metadata
    "172.16.0.0/12",   // private
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // TEST-NET-1
    "192.31.196.0/24", // AS112-v4
    "192.52.193.0/24", // AMT
    "192.88.99.0/24",  // deprecated 6to4 relay anycast
    "192.168.0.0/16",  // private
    "192.175.48.0/24", // direct delegation AS112
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // TEST-NET-2
    "203.0.113.0/24",  // TEST-NET-3
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, and 255.255.255.255 broadcast
    // IPv6
    "::/128",         // unspecified
    "::1/128",        // loopback
    "::ffff:0:0/96",  // IPv4-mapped (only reached when the embedded address is itself odd)
    "64:ff9b:1::/48", // local-use NAT64
    "100::/64",       // discard-only
    "2001::/23",      // IETF protocol assignments (Teredo 2001::/32 is decoded first)
    "2001:db8::/32",  // documentation
    "2002::/16",      // 6to4 (decoded first; what is left is not a valid 6to4 peer)
    "3fff::/20",      // documentation (RFC 9637)
    "5f00::/16",      // SRv6 SIDs
    "fc00::/7",       // unique local
    "fe80::/10",      // link-local
    "fec0::/10",      // deprecated site-local
    "ff00::/8",       // multicast
];

/// Turns an IPv6 address that carries an IPv4 address back into that IPv4 address:
/// IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96` and
/// `64:ff9b:1::/48` (RFC 6052 /96 form), 6to4 `2002:AABB:CCDD::/48`, Teredo `2001:0::/32`
/// (client address is the last 32 bits inverted). Anything else is returned unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    let v6 = match ip {
        IpAddr::V4(_) => return ip,
        IpAddr::V6(v6) => v6,
    };
    let s = v6.segments();
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    // IPv4-compatible (deprecated): ::a.b.c.d, but not :: and ::1 themselves.
    if s[..6] == [0; 6] && u32::from(tail) > 1 {
        return IpAddr::V4(tail);
    }
    // NAT64 well-known prefix (RFC 6052) and local-use prefix (RFC 8215), /96 form.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || (s[..3] == [0x64, 0xff9b, 1] && s[3..6] == [0; 3]) {
        return IpAddr::V4(tail);
    }
    // 6to4 (RFC 3056): 2002:V4ADDR::/48.
    if s[0] == 0x2002 {
        return IpAddr::V4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    // Teredo (RFC 4380): 2001:0000:server:flags:port:client, client inverted.
    if s[0] == 0x2001 && s[1] == 0 {
        return IpAddr::V4(Ipv4Addr::from(!u32::from(tail)));
    }
    ip
}

#[derive(Clone, Debug)]
pub struct PeerPolicy {
    deny_default: CidrList,
    deny: CidrList,
    allow: CidrList,
    /// Addresses the server's own relays are advertised on and bound to.
    own: Vec<IpAddr>,
    /// Relay port range: a peer on an own address inside it is another allocation.
    ports: (u16, u16),
}

impl PeerPolicy {
    pub fn new(allow: CidrList, deny: CidrList, own: Vec<IpAddr>, ports: (u16, u16)) -> Self {
        let deny_default = CidrList::new(
            DEFAULT_DENY
                .iter()
                .filter_map(|s| s.parse::<Cidr>().ok())
                .collect(),
        );
        PeerPolicy {
            deny_default,
            deny,
            allow,
            own,
            ports,
        }
    }

    /// Checks a peer; `Ok` carries the canonical address the relay should use.
    pub fn check(&self, ip: IpAddr, port: u16) -> Result<IpAddr, Denied> {
        let c = canonical(ip);
        let own = self.own.iter().any(|o| canonical(*o) == c || *o == ip);
        if own && port >= self.ports.0 && port <= self.ports.1 {
            return Ok(c);
        }
        // An explicit deny wins over an allow: operators add deny entries to cut holes into
        // broad allow ranges.
        if self.deny.contains(c) || self.deny.contains(ip) {
            return Err(Denied::Configured);
        }
        if self.allow.contains(c) || self.allow.contains(ip) {
            return Ok(c);
        }
        // The built-in list is matched on the decoded form only: its IPv6 transition blocks
        // are there for what could not be decoded, not to refuse every mapped address.
        if self.deny_default.contains(c) {
            return Err(Denied::SpecialPurpose);
        }
        Ok(c)
    }
}

/// Helper for tests and config: every IPv6 way of writing an IPv4 address.
pub fn ipv6_encodings(v4: Ipv4Addr) -> Vec<Ipv6Addr> {
    let [a, b, c, d] = v4.octets();
    let w1 = u16::from_be_bytes([a, b]);
    let w2 = u16::from_be_bytes([c, d]);
    let inv = !u32::from(v4);
    let (i1, i2) = ((inv >> 16) as u16, inv as u16);
    vec![
        v4.to_ipv6_mapped(),
        Ipv6Addr::new(0, 0, 0, 0, 0, 0, w1, w2),
        Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, w1, w2),
        Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, w1, w2),
        Ipv6Addr::new(0x2002, w1, w2, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0x2001, 0, 0x4136, 0xe378, 0x8000, 0x63bf, i1, i2),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PeerPolicy {
        PeerPolicy::new(
            CidrList::default(),
            CidrList::default(),
            vec!["198.51.100.10".parse().unwrap()],
            (16384, 32767),
        )
    }

    /// One address inside each block the issue and the IANA registries name.
    const DENIED_SAMPLES: &[&str] = &[
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "10.255.255.255",
        "100.64.0.1",
        "100.127.255.254",
        "127.0.0.1",
        "127.255.255.254",
        "169.254.169.254",
        "172.16.0.1",
        "172.31.255.255",
        "192.0.0.8",
        "192.0.2.1",
        "192.31.196.1",
        "192.52.193.1",
        "192.88.99.1",
        "192.168.1.1",
        "192.175.48.1",
        "198.18.0.1",
        "198.19.255.255",
        "198.51.100.1",
        "203.0.113.1",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "100::1",
        "2001:db8::1",
        "2001:2::1",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "febf::1",
        "fec0::1",
        "ff02::1",
        "ff0e::1",
        "3fff::1",
        "5f00::1",
        "64:ff9b:1:ffff::1",
    ];

    /// The built-in list is text parsed when a policy is built; an entry that did not parse
    /// would be left out without a word.
    #[test]
    fn every_built_in_block_parses() {
        for s in DEFAULT_DENY {
            assert!(s.parse::<Cidr>().is_ok(), "{s}");
        }
        assert_eq!(policy().deny_default.blocks().len(), DEFAULT_DENY.len());
    }

    #[test]
    fn every_special_purpose_block_is_denied() {
        let p = policy();
        for s in DENIED_SAMPLES {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(p.check(ip, 5000), Err(Denied::SpecialPurpose), "{s}");
        }
    }

    #[test]
    fn every_ipv4_sample_is_denied_in_every_ipv6_encoding() {
        let p = policy();
        for s in DENIED_SAMPLES {
            let Ok(IpAddr::V4(v4)) = s.parse::<IpAddr>() else {
                continue;
            };
            for v6 in ipv6_encodings(v4) {
                // ::0.0.0.0 and ::0.0.0.1 are :: and ::1, which stay IPv6 (and are denied).
                if u32::from(v4) > 1 || v6.segments()[0] != 0 {
                    assert_eq!(canonical(IpAddr::V6(v6)), IpAddr::V4(v4), "{v6}");
                }
                assert_eq!(
                    p.check(IpAddr::V6(v6), 5000),
                    Err(Denied::SpecialPurpose),
                    "{s} as {v6}"
                );
            }
        }
    }

    #[test]
    fn public_peers_pass_in_every_encoding() {
        let p = policy();
        let v4: Ipv4Addr = "8.8.8.8".parse().unwrap();
        assert_eq!(p.check(IpAddr::V4(v4), 1), Ok(IpAddr::V4(v4)));
        for v6 in ipv6_encodings(v4) {
            assert_eq!(p.check(IpAddr::V6(v6), 1), Ok(IpAddr::V4(v4)), "{v6}");
        }
        let g: IpAddr = "2a00:1450::1".parse().unwrap();
        assert_eq!(p.check(g, 1), Ok(g));
    }

    #[test]
    fn allow_punches_holes_and_deny_wins() {
        let p = PeerPolicy::new(
            CidrList::new(vec!["10.1.0.0/16".parse().unwrap()]),
            CidrList::new(vec![
                "10.1.2.0/24".parse().unwrap(),
                "8.8.4.0/24".parse().unwrap(),
            ]),
            vec![],
            (16384, 32767),
        );
        assert!(p.check("10.1.9.9".parse().unwrap(), 1).is_ok());
        assert!(p
            .check(IpAddr::V6("::ffff:10.1.9.9".parse().unwrap()), 1)
            .is_ok());
        assert_eq!(
            p.check("10.1.2.3".parse().unwrap(), 1),
            Err(Denied::Configured)
        );
        assert_eq!(
            p.check("8.8.4.4".parse().unwrap(), 1),
            Err(Denied::Configured)
        );
        assert_eq!(
            p.check("10.2.0.1".parse().unwrap(), 1),
            Err(Denied::SpecialPurpose)
        );
    }

    #[test]
    fn own_relay_addresses_are_allowed_only_in_the_relay_range() {
        let p = PeerPolicy::new(
            CidrList::default(),
            CidrList::default(),
            vec!["127.0.0.1".parse().unwrap()],
            (16384, 32767),
        );
        assert!(p.check("127.0.0.1".parse().unwrap(), 20000).is_ok());
        assert!(p.check("::ffff:127.0.0.1".parse().unwrap(), 20000).is_ok());
        assert!(p.check("127.0.0.1".parse().unwrap(), 22).is_err());
        assert!(p.check("127.0.0.2".parse().unwrap(), 20000).is_err());
    }
}
