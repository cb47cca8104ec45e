//! CIDR blocks and lists of them.
//!
//! Written by hand because the need is small (parse, contain, display) and the peer policy of
//! the TURN server must know exactly how an address is compared: IPv4 blocks only match IPv4
//! addresses and IPv6 blocks only IPv6 ones; turning IPv4-mapped and other embedded forms back
//! into IPv4 is the caller's job, done once, before the lookup.
//!
//! Both types are configuration values too: a [`Cidr`] is read from a string (`"10.0.0.0/8"`,
//! or a bare address for a host block) and written back as `address/prefix` with the host
//! bits cleared; a [`CidrList`] is a list of them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// An IP network: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Builds a block, clearing host bits so that `10.1.2.3/8` and `10.0.0.0/8` are one block.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, String> {
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than {max} bits"));
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix))),
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// Accepts `a.b.c.d/n`, `x::y/n`, and a bare address (a host block).
    fn from_str(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => {
                let p: u8 = p
                    .parse()
                    .map_err(|_| format!("\"{s}\" has a prefix length that is not a number"))?;
                (a, Some(p))
            }
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("\"{s}\" is not an IP address or CIDR block"))?;
        let prefix = prefix.unwrap_or(match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        });
        Cidr::new(addr, prefix).map_err(|e| format!("\"{s}\": {e}"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Cidr;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an IP address or a CIDR block such as \"10.0.0.0/8\"")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Cidr, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// A list of blocks searched linearly: lists are short (tens of entries), and a scan of a few
/// cache lines beats a trie at that size. In the configuration, a list of strings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CidrList {
    blocks: Vec<Cidr>,
}

impl CidrList {
    pub fn new(blocks: Vec<Cidr>) -> CidrList {
        CidrList { blocks }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.blocks.iter().any(|b| b.contains(ip))
    }

    pub fn blocks(&self) -> &[Cidr] {
        &self.blocks
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_contains() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains("10.255.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::ffff:10.0.0.1".parse().unwrap()));
        let h: Cidr = "192.0.2.7".parse().unwrap();
        assert_eq!(h.prefix(), 32);
        let v6: Cidr = "fe80::/10".parse().unwrap();
        assert!(v6.contains("febf::1".parse().unwrap()));
        assert!(!v6.contains("fec0::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn rejects_nonsense() {
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("::/129".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Doc {
        list: CidrList,
    }

    #[test]
    fn lists_read_strings_and_write_canonical_blocks() {
        let d: Doc =
            toml::from_str("list = [\"10.1.2.3/8\", \"192.0.2.7\", \"fd00::/8\"]").unwrap();
        assert!(d.list.contains("10.9.9.9".parse().unwrap()));
        assert!(d.list.contains("192.0.2.7".parse().unwrap()));
        assert!(!d.list.contains("192.0.2.8".parse().unwrap()));
        let text = toml::to_string(&d).unwrap();
        assert_eq!(
            text,
            "list = [\"10.0.0.0/8\", \"192.0.2.7/32\", \"fd00::/8\"]\n"
        );
        assert_eq!(toml::from_str::<Doc>(&text).unwrap(), d);
        let e = toml::from_str::<Doc>("list = [\"10.0.0.0/40\"]").unwrap_err();
        assert!(
            e.message()
                .contains("\"10.0.0.0/40\": prefix /40 is longer than 32 bits"),
            "{e}"
        );
        assert!(toml::from_str::<Doc>("list = [7]").is_err());
    }
}
