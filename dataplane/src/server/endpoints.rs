//! The table of local addresses a worker listens on, and how they relate under RFC 5780.
//!
//! Every worker opens one socket per entry, in the same order, so a socket is named by its
//! index everywhere (the server's replies say "send from socket 3"). With an alternate address
//! and port configured, the primary address of that family gets three siblings: same IP with
//! the alternate port, alternate IP with the same port, and both changed. CHANGE-REQUEST then
//! picks the sibling a reply leaves from.

use std::net::{IpAddr, SocketAddr};

use portico_shared::config::Config;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Siblings {
    pub change_ip: usize,
    pub change_port: usize,
    pub change_both: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    addrs: Vec<SocketAddr>,
    siblings: Vec<Option<Siblings>>,
}

impl Endpoints {
    pub fn from_config(config: &Config) -> Endpoints {
        let mut e = Endpoints::default();
        for a in &config.turn.listen {
            e.push(*a);
        }
        if let (Some(alt_ip), Some(alt_port)) =
            (config.stun.alternate_ip, config.stun.alternate_port)
        {
            // Validation guarantees a specific primary address of this family exists.
            if let Some(primary) = config
                .turn
                .listen
                .iter()
                .copied()
                .find(|a| a.is_ipv4() == alt_ip.is_ipv4())
            {
                e.add_rfc5780_quad(primary, alt_ip, alt_port);
            }
        }
        e
    }

    fn push(&mut self, a: SocketAddr) -> usize {
        if let Some(i) = self.addrs.iter().position(|x| *x == a) {
            return i;
        }
        self.addrs.push(a);
        self.siblings.push(None);
        self.addrs.len() - 1
    }

    fn add_rfc5780_quad(&mut self, primary: SocketAddr, alt_ip: IpAddr, alt_port: u16) {
        let pp = self.push(primary);
        let pa = self.push(SocketAddr::new(primary.ip(), alt_port));
        let ap = self.push(SocketAddr::new(alt_ip, primary.port()));
        let aa = self.push(SocketAddr::new(alt_ip, alt_port));
        let quad = [
            (pp, ap, pa, aa),
            (pa, aa, pp, ap),
            (ap, pp, aa, pa),
            (aa, pa, ap, pp),
        ];
        for (me, change_ip, change_port, change_both) in quad {
            self.siblings[me] = Some(Siblings {
                change_ip,
                change_port,
                change_both,
            });
        }
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    pub fn addr(&self, socket: usize) -> Option<SocketAddr> {
        self.addrs.get(socket).copied()
    }

    pub fn siblings(&self, socket: usize) -> Option<Siblings> {
        self.siblings.get(socket).copied().flatten()
    }

    /// RFC 5780 OTHER-ADDRESS of a socket: the sibling with both IP and port changed.
    pub fn other_address(&self, socket: usize) -> Option<SocketAddr> {
        self.siblings(socket)
            .and_then(|s| self.addrs.get(s.change_both).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quad_is_built_for_the_primary_of_the_family() {
        let c = Config::from_toml(
            "[turn]\nlisten = [\"127.0.0.1:3478\", \"[::1]:3478\"]\n[stun]\nalternate_ip = \"127.0.0.2\"\nalternate_port = 3479\n",
        )
        .unwrap();
        let e = Endpoints::from_config(&c);
        let s = |x: &str| x.parse::<SocketAddr>().unwrap();
        assert_eq!(
            e.addrs(),
            &[
                s("127.0.0.1:3478"),
                s("[::1]:3478"),
                s("127.0.0.1:3479"),
                s("127.0.0.2:3478"),
                s("127.0.0.2:3479")
            ]
        );
        assert_eq!(e.other_address(0), Some(s("127.0.0.2:3479")));
        assert_eq!(e.other_address(4), Some(s("127.0.0.1:3478")));
        assert_eq!(e.other_address(1), None);
        let sib = e.siblings(0).unwrap();
        assert_eq!(e.addr(sib.change_ip), Some(s("127.0.0.2:3478")));
        assert_eq!(e.addr(sib.change_port), Some(s("127.0.0.1:3479")));
        let sib = e.siblings(3).unwrap();
        assert_eq!(e.addr(sib.change_ip), Some(s("127.0.0.1:3478")));
        assert_eq!(e.addr(sib.change_port), Some(s("127.0.0.2:3479")));
    }
}
