//! H.323 call signalling (H.225.0 over TCP or TLS, reference: "Supported Services",
//! "Using the Gatekeeper ID", "Gatekeeper-ID and Standby PBX").
//!
//! A connection is a stream of TPKT packets (RFC 1006), each one Q.931 message whose
//! user-user information element holds an H323-UserInformation in aligned PER. RAS travels
//! inside the signalling connection per H.460.17: a Q.931 FACILITY whose H323-UU-PDU carries
//! `genericData` with feature id `standard 17` and a parameter `standard 1` whose `raw`
//! content is the PER encoding of a RasMessage (this is also how Wireshark's H.460 dissector
//! reads it).
//!
//! Routing: a GatekeeperRequest or RegistrationRequest by its gatekeeper identifier, a Setup
//! (a call without registration) by the domain of a destination alias `user@domain`. The
//! gatekeeper identifier has the form `[location@]gkid[/registration-location]`: the location
//! is ignored, the service name is `gkid` or `gkid/registration-location`; the standby form
//! `gkid/primary:secondary` names `gkid/primary` (the master PBX) first and `gkid/secondary`
//! (its standby) second, see [`candidates`].
//!
//! Every later message of a connection is looked at: a GRQ/RRQ naming another service is
//! refused (and the connection closed), a Setup on a connection that never registered must
//! name the connection's service. The decoder is [`per`] + [`h225`]: a walker over the types
//! it needs, bounded in work, depth and memory (see there for why it is not generated code).

pub mod h225;
pub mod per;

use std::cell::Cell;

use super::{Check, Guard, Monitor, Refusal, Sniffed, Sniffer, Step};
use h225::Ras;

pub struct H323;

/// The TPKT header (RFC 1006): version 3, reserved, length including the header.
const TPKT_HEADER: usize = 4;
/// Q.931 protocol discriminator, and H.225.0's user-user IE and its protocol discriminator.
const Q931_PD: u8 = 0x08;
const IE_USER_USER: u8 = 0x7e;
const UU_PD_X208: u8 = 0x05;

pub const MSG_SETUP: u8 = 0x05;

/// How a TPKT stream starts.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Partial,
    Broken(&'static str),
    /// A whole packet of `total` bytes (header included).
    Whole(usize),
}

/// The packet at the start of `buf`, bounded by `max`.
pub fn frame(buf: &[u8], max: usize) -> Frame {
    if buf.is_empty() {
        return Frame::Partial;
    }
    if buf[0] != 3 {
        return Frame::Broken("not TPKT (version is not 3)");
    }
    if buf.len() < TPKT_HEADER {
        return Frame::Partial;
    }
    let total = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    if total < TPKT_HEADER {
        return Frame::Broken("TPKT length below its header");
    }
    if total > max {
        return Frame::Broken("TPKT packet larger than allowed");
    }
    if buf.len() < total {
        return Frame::Partial;
    }
    Frame::Whole(total)
}

/// A Q.931 message: its type and its user-user IE contents (after the protocol discriminator).
#[derive(Debug, PartialEq, Eq)]
pub struct Q931<'a> {
    pub msg_type: u8,
    pub uu: Option<&'a [u8]>,
}

/// Parses one Q.931 message (the payload of a TPKT packet).
pub fn q931(p: &[u8]) -> Result<Q931<'_>, &'static str> {
    if p.len() < 3 || p[0] != Q931_PD {
        return Err("not Q.931");
    }
    if p[1] & 0xf0 != 0 || p[1] & 0x0f > 4 {
        return Err("Q.931 call reference length");
    }
    let at = 2 + usize::from(p[1] & 0x0f);
    let msg_type = *p.get(at).ok_or("Q.931 message truncated")?;
    if msg_type & 0x80 != 0 {
        return Err("Q.931 message type");
    }
    let mut i = at + 1;
    let mut uu = None;
    while i < p.len() {
        let id = p[i];
        if id & 0x80 != 0 {
            // Single-octet information element.
            i += 1;
            continue;
        }
        let (len, head) = if id == IE_USER_USER {
            // H.225.0: the user-user IE has a two-octet length.
            let l = p.get(i + 1..i + 3).ok_or("Q.931 IE truncated")?;
            (usize::from(u16::from_be_bytes([l[0], l[1]])), 3)
        } else {
            (usize::from(*p.get(i + 1).ok_or("Q.931 IE truncated")?), 2)
        };
        let body = p
            .get(i + head..i + head + len)
            .ok_or("Q.931 IE length past the end")?;
        if id == IE_USER_USER {
            if uu.is_some() {
                return Err("two user-user IEs");
            }
            match body.split_first() {
                Some((&UU_PD_X208, rest)) => uu = Some(rest),
                _ => return Err("user-user IE is not H.225.0"),
            }
        }
        i += head + len;
    }
    Ok(Q931 { msg_type, uu })
}

/// What one H.225.0 message says, as far as routing goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Says {
    /// A GRQ or RRQ: its gatekeeper identifier (if any) and aliases.
    Registration {
        gkid: Option<String>,
        aliases: Vec<String>,
    },
    /// A Setup: the domains of its destination aliases `user@domain`.
    Setup { domain: Option<String> },
    /// A RAS reject (GRJ, RRJ) sent back by the gatekeeper.
    Reject(&'static str),
    /// Anything else.
    Other,
}

/// Decodes one TPKT packet (`pkt` includes the header).
pub fn decode(pkt: &[u8]) -> Result<Says, &'static str> {
    let q = q931(pkt.get(TPKT_HEADER..).ok_or("TPKT truncated")?)?;
    let Some(uu) = q.uu else {
        return Ok(Says::Other);
    };
    let budget = Cell::new(per::STEP_BUDGET);
    let info = h225::user_information(&mut per::Reader::new(uu, &budget)).map_err(per_error)?;
    for raw in &info.ras {
        let ras = h225::ras_message(&mut per::Reader::new(raw, &budget)).map_err(per_error)?;
        match ras {
            Ras::Grq { gkid, aliases } | Ras::Rrq { gkid, aliases } => {
                return Ok(Says::Registration { gkid, aliases })
            }
            Ras::GatekeeperReject => return Ok(Says::Reject("H.323 GatekeeperReject")),
            Ras::RegistrationReject => return Ok(Says::Reject("H.323 RegistrationReject")),
            Ras::Other(_) => {}
        }
    }
    if info.body == h225::BODY_SETUP && q.msg_type == MSG_SETUP {
        let domain = info.destination.iter().find_map(|a| alias_domain(a));
        return Ok(Says::Setup { domain });
    }
    Ok(Says::Other)
}

fn per_error(e: per::PerError) -> &'static str {
    match e {
        per::PerError::Truncated => "H.225.0 PER: a length runs past the end",
        per::PerError::Invalid(m) => m,
        per::PerError::TooComplex => "H.225.0 PER: too deeply nested or too many elements",
    }
}

/// The domain of an alias `user@domain` (also `h323:user@domain` and the like), lower case.
pub fn alias_domain(alias: &str) -> Option<String> {
    let (_, domain) = alias.rsplit_once('@')?;
    let domain = domain
        .split([';', '?', '>'])
        .next()
        .unwrap_or(domain)
        .trim()
        .trim_end_matches('.');
    let host = match domain.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => domain.split(':').next().unwrap_or(domain),
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// The service name a gatekeeper identifier routes to: `[location@]gkid[/regloc]` without
/// its location, lower case. The standby form `gkid/primary:secondary` is kept whole here;
/// [`candidates`] expands it.
pub fn gkid_service(gkid: &str) -> Option<String> {
    let gkid = gkid.trim();
    let (head, regloc) = match gkid.split_once('/') {
        Some((h, r)) => (h, Some(r)),
        None => (gkid, None),
    };
    let head = head.rsplit_once('@').map_or(head, |(_, g)| g).trim();
    if head.is_empty() {
        return None;
    }
    let head = head.trim_end_matches('.').to_ascii_lowercase();
    Some(match regloc.map(str::trim).filter(|r| !r.is_empty()) {
        Some(r) => format!("{head}/{}", r.to_ascii_lowercase()),
        None => head,
    })
}

/// The service names a routing name may go to, in order: `gkid/primary:secondary` gives
/// `gkid/primary` (the master PBX) then `gkid/secondary` (the standby); any other name is
/// itself. An endpoint configured with the standby form sends `gkid/primary` to its primary
/// gatekeeper and `gkid/secondary` to its secondary one (reference: "Gatekeeper-ID and
/// Standby PBX"), which are plain names; a request carrying the configured form unchanged
/// goes to the master's service, or to the standby's when the master's is unknown or its
/// target cannot be reached.
pub fn candidates(name: &str) -> Vec<String> {
    if let Some((gk, regloc)) = name.split_once('/') {
        if let Some((p, s)) = regloc.split_once(':') {
            let named = |l: &str| {
                if l.is_empty() {
                    gk.to_string()
                } else {
                    format!("{gk}/{l}")
                }
            };
            let mut out = vec![named(p)];
            if named(s) != out[0] {
                out.push(named(s));
            }
            return out;
        }
    }
    vec![name.to_string()]
}

/// Skips empty TPKT packets (keep-alives) at the start of `buf`.
fn skip_keepalives(buf: &[u8]) -> usize {
    let mut at = 0;
    while buf.len() >= at + TPKT_HEADER
        && buf[at] == 3
        && u16::from_be_bytes([buf[at + 2], buf[at + 3]]) as usize == TPKT_HEADER
    {
        at += TPKT_HEADER;
    }
    at
}

impl Sniffer for H323 {
    fn sniff(&self, whole: &[u8], max: usize) -> Sniffed {
        let skip = skip_keepalives(whole);
        let buf = &whole[skip..];
        let total = match frame(buf, max.saturating_sub(skip)) {
            Frame::Partial => return Sniffed::NeedMore,
            Frame::Broken("TPKT packet larger than allowed") => return Sniffed::TooLarge,
            Frame::Broken(e) => return Sniffed::Invalid(e),
            Frame::Whole(t) => t,
        };
        match decode(&buf[..total]) {
            Err(e) => Sniffed::Invalid(e),
            Ok(Says::Registration { gkid: Some(g), .. }) => match gkid_service(&g) {
                Some(name) => Sniffed::Name(name),
                None => Sniffed::NoName("empty gatekeeper identifier"),
            },
            Ok(Says::Registration { gkid: None, .. }) => {
                Sniffed::NoName("registration without a gatekeeper identifier")
            }
            Ok(Says::Setup { domain: Some(d) }) => Sniffed::Name(d),
            Ok(Says::Setup { domain: None }) => {
                Sniffed::NoName("Setup without a destination alias user@domain")
            }
            Ok(Says::Reject(_) | Says::Other) => {
                Sniffed::NoName("first message is neither GRQ/RRQ (H.460.17) nor Setup")
            }
        }
    }

    fn refuse(&self, _buf: &[u8], _why: Refusal) -> Option<Vec<u8>> {
        // The connection is closed: an endpoint retries its gatekeeper discovery, and a
        // reject of our own would tell a scanner which gatekeeper ids exist.
        None
    }

    fn session(&self, max: usize) -> (Box<dyn Guard>, Box<dyn Monitor>) {
        let guard = H323Guard {
            max: max.min(u16::MAX as usize),
            ..H323Guard::default()
        };
        (Box::new(guard), Box::new(H323Monitor::default()))
    }

    fn candidates(&self, name: &str) -> Vec<String> {
        candidates(name)
    }

    fn registration(&self, msg: &[u8]) -> Option<Vec<String>> {
        let msg = &msg[skip_keepalives(msg)..];
        let Frame::Whole(total) = frame(msg, u16::MAX as usize) else {
            return None;
        };
        match decode(&msg[..total]) {
            Ok(Says::Registration { aliases, .. }) => Some(aliases),
            _ => None,
        }
    }
}

/// Follows the client's TPKT packets: each is decoded whole; GRQ/RRQ are named by their
/// gatekeeper identifier, a Setup on a connection that has not registered by its
/// destination's domain. A refused message ends the connection.
#[derive(Default)]
pub struct H323Guard {
    buf: Vec<u8>,
    max: usize,
    registered: bool,
    /// A message is waiting for [`Guard::decide`].
    pending: bool,
    /// A message was refused: the connection ends.
    refused: bool,
    broken: bool,
}

impl Guard for H323Guard {
    fn push(&mut self, data: &[u8]) {
        if !self.broken && !self.refused {
            self.buf.extend_from_slice(data);
        }
    }

    fn next(&mut self) -> Step {
        if self.refused {
            return Step::End;
        }
        if self.pending || self.broken {
            return Step::Idle;
        }
        let total = match frame(&self.buf, self.max) {
            Frame::Partial => {
                return if self.buf.len() > self.max {
                    self.broken = true;
                    Step::TooLarge
                } else {
                    Step::Idle
                }
            }
            Frame::Broken("TPKT packet larger than allowed") => {
                self.broken = true;
                self.buf = Vec::new();
                return Step::TooLarge;
            }
            Frame::Broken(e) => {
                self.broken = true;
                self.buf = Vec::new();
                return Step::Broken(e);
            }
            Frame::Whole(t) => t,
        };
        let pkt: Vec<u8> = self.buf.drain(..total).collect();
        if total == TPKT_HEADER {
            return Step::Forward(pkt);
        }
        let check = match decode(&pkt) {
            Err(e) => {
                self.broken = true;
                self.buf = Vec::new();
                return Step::Broken(e);
            }
            Ok(Says::Registration { gkid, .. }) => {
                self.registered = true;
                // A registration refreshed without a gatekeeper id cannot name another
                // service: it goes where the connection goes.
                match gkid.as_deref().map(gkid_service) {
                    Some(Some(name)) => Check::Name(name),
                    Some(None) => Check::NoName("empty gatekeeper identifier"),
                    None => Check::Pass,
                }
            }
            Ok(Says::Setup { domain }) if !self.registered => match domain {
                Some(d) => Check::Name(d),
                None => Check::NoName("Setup without a destination alias user@domain"),
            },
            Ok(_) => Check::Pass,
        };
        self.pending = true;
        Step::Message { check, bytes: pkt }
    }

    fn decide(&mut self, forward: bool) {
        self.pending = false;
        if !forward {
            self.refused = true;
            self.buf = Vec::new();
        }
    }
}

/// Watches the gatekeeper's answers for GatekeeperReject and RegistrationReject.
#[derive(Default)]
pub struct H323Monitor {
    buf: Vec<u8>,
    lost: bool,
}

impl Monitor for H323Monitor {
    fn feed(&mut self, data: &[u8]) -> Vec<String> {
        let mut found = Vec::new();
        if self.lost {
            return found;
        }
        self.buf.extend_from_slice(data);
        loop {
            match frame(&self.buf, u16::MAX as usize) {
                Frame::Partial => break,
                Frame::Broken(_) => {
                    self.lost = true;
                    self.buf = Vec::new();
                    break;
                }
                Frame::Whole(total) => {
                    if let Ok(Says::Reject(what)) = decode(&self.buf[..total]) {
                        found.push(what.to_string());
                    }
                    self.buf.drain(..total);
                }
            }
        }
        found
    }

    fn at_boundary(&self) -> bool {
        self.lost || self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG_FACILITY: u8 = 0x62;

    /// Messages from pycrate (tests/proxy/h225gen.py): `(command line, TPKT bytes)`.
    fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        include_str!("../../../tests/proxy/seeds.txt")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (label, hex) = l.split_once('|').unwrap();
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect();
                (label, bytes)
            })
            .collect()
    }

    fn seed(label: &str) -> Vec<u8> {
        seeds()
            .into_iter()
            .find(|(l, _)| *l == label)
            .unwrap_or_else(|| panic!("no seed {label}"))
            .1
    }

    #[test]
    fn decodes_what_pycrate_encodes() {
        let reg = |gkid: Option<&str>, aliases: &[&str]| Says::Registration {
            gkid: gkid.map(String::from),
            aliases: aliases.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            decode(&seed("grq example.com alice")),
            Ok(reg(Some("example.com"), &["alice"]))
        );
        assert_eq!(
            decode(&seed(
                "rrq hq@example.com/branch alice email:alice@example.com url:h323:alice@example.com 12345"
            )),
            Ok(reg(
                Some("hq@example.com/branch"),
                &["alice", "alice@example.com", "h323:alice@example.com"]
            ))
        );
        assert_eq!(decode(&seed("rrq - alice")), Ok(reg(None, &["alice"])));
        assert_eq!(
            decode(&seed("grj")),
            Ok(Says::Reject("H.323 GatekeeperReject"))
        );
        assert_eq!(
            decode(&seed("rrj")),
            Ok(Says::Reject("H.323 RegistrationReject"))
        );
        assert_eq!(
            decode(&seed("setup bob@example.com")),
            Ok(Says::Setup {
                domain: Some("example.com".into())
            })
        );
        assert_eq!(
            decode(&seed("setup 12345 email:carol@calls.test")),
            Ok(Says::Setup {
                domain: Some("calls.test".into())
            })
        );
        assert_eq!(decode(&seed("release")), Ok(Says::Other));
        // A RegistrationConfirm is no rejection: the monitor lets it pass uncounted.
        assert_eq!(decode(&seed("rcf")), Ok(Says::Other));
        let mut mon = H323Monitor::default();
        assert_eq!(
            mon.feed(&[seed("rcf"), seed("rrj")].concat()),
            vec!["H.323 RegistrationReject".to_string()]
        );
        assert_eq!(
            decode(&seed("facility-body example.com")),
            Ok(reg(Some("example.com"), &[]))
        );
        // GenericData nested three deep before the H.460.17 one, and 20 parameters.
        assert_eq!(decode(&seed("nested 3")), Ok(reg(Some("example.com"), &[])));
        assert_eq!(
            decode(&seed("manyparams 20")),
            Ok(reg(Some("example.com"), &[]))
        );
        assert_eq!(
            H323.sniff(&seed("grq example.com alice"), 16384),
            Sniffed::Name("example.com".into())
        );
        assert_eq!(
            H323.sniff(&seed("setup bob@example.com"), 16384),
            Sniffed::Name("example.com".into())
        );
        // Every strict prefix is incomplete, never an error.
        let grq = seed("grq example.com alice");
        for n in 0..grq.len() {
            assert_eq!(
                H323.sniff(&grq[..n], 16384),
                Sniffed::NeedMore,
                "prefix {n}"
            );
        }
        assert_eq!(H323.registration(&grq), Some(vec!["alice".to_string()]));
    }

    /// A tiny deterministic generator (xorshift), so a failure can be replayed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// The fuzz target: random mutations of the seeds (bit flips, byte changes, cuts,
    /// insertions, duplicated spans) through the sniffer, the guard and the monitor. Nothing
    /// may panic, and each decode stays within the step budget (so within bounded time).
    #[test]
    fn mutation_fuzz() {
        let seeds: Vec<Vec<u8>> = seeds().into_iter().map(|(_, b)| b).collect();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let rounds = std::env::var("H323_FUZZ_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000usize);
        let mut decoded = 0;
        for _ in 0..rounds {
            let mut m = seeds[rng.below(seeds.len())].clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(m.len());
                match rng.below(6) {
                    0 => m[at] ^= 1 << rng.below(8),
                    1 => m[at] = rng.next() as u8,
                    2 => m.truncate(at),
                    3 => m.insert(at, rng.next() as u8),
                    4 => {
                        let end = (at + rng.below(16)).min(m.len());
                        let span = m[at..end].to_vec();
                        m.splice(at..at, span);
                    }
                    _ => m[at] = [0x00, 0x7f, 0x80, 0xff][rng.below(4)],
                }
                if m.is_empty() {
                    m.push(3);
                }
            }
            // Keep the TPKT length right half of the time, so the mutation reaches the PER.
            if m.len() >= 4 && rng.below(2) == 0 {
                let n = (m.len() as u16).to_be_bytes();
                m[0] = 3;
                m[2..4].copy_from_slice(&n);
            }
            if decode(&m).is_ok() {
                decoded += 1;
            }
            let _ = H323.sniff(&m, 16384);
            let _ = H323.registration(&m);
            let (mut g, mut mon) = H323.session(16384);
            g.push(&m);
            for _ in 0..8 {
                match g.next() {
                    Step::Message { .. } => g.decide(rng.below(2) == 0),
                    Step::Idle | Step::End => break,
                    _ => {}
                }
            }
            mon.feed(&m);
        }
        // The mutations must not all be rejected at the TPKT header.
        assert!(decoded > rounds / 20, "only {decoded} of {rounds} decoded");
    }

    #[test]
    fn gatekeeper_ids_name_services() {
        assert_eq!(gkid_service("Example.COM").as_deref(), Some("example.com"));
        assert_eq!(
            gkid_service("hq@example.com/branch").as_deref(),
            Some("example.com/branch")
        );
        assert_eq!(
            gkid_service("hq@example.com").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            gkid_service("example.com/master:standby").as_deref(),
            Some("example.com/master:standby")
        );
        assert_eq!(gkid_service("hq@"), None);
        assert_eq!(gkid_service("example.com/"), Some("example.com".into()));
        assert_eq!(
            candidates("example.com/master:standby"),
            vec!["example.com/master", "example.com/standby"]
        );
        assert_eq!(
            candidates("example.com/:standby"),
            vec!["example.com", "example.com/standby"]
        );
        assert_eq!(candidates("example.com/branch"), vec!["example.com/branch"]);
    }

    #[test]
    fn alias_domains() {
        assert_eq!(
            alias_domain("alice@Example.com").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            alias_domain("h323:bob@example.com;x=y").as_deref(),
            Some("example.com")
        );
        assert_eq!(alias_domain("alice"), None);
        assert_eq!(alias_domain("alice@"), None);
    }

    #[test]
    fn tpkt_framing() {
        assert_eq!(frame(&[3, 0, 0], 100), Frame::Partial);
        assert!(matches!(frame(&[4, 0, 0, 8], 100), Frame::Broken(_)));
        assert!(matches!(frame(&[3, 0, 0, 0], 100), Frame::Broken(_)));
        assert!(matches!(frame(&[3, 0, 0, 3], 100), Frame::Broken(_)));
        assert!(matches!(frame(&[3, 0, 0x10, 0], 100), Frame::Broken(_)));
        assert_eq!(frame(&[3, 0, 0, 4], 100), Frame::Whole(4));
        assert_eq!(frame(&[3, 0, 0, 6, 1], 100), Frame::Partial);
    }

    #[test]
    fn q931_information_elements() {
        // Facility, call reference 2 octets, a bearer IE, a shift (single octet), UU.
        let mut m = vec![0x08, 0x02, 0x00, 0x01, MSG_FACILITY, 0x04, 0x01, 0x88, 0x96];
        m.extend_from_slice(&[0x7e, 0x00, 0x03, 0x05, 0xAA, 0xBB]);
        let q = q931(&m).unwrap();
        assert_eq!(q.msg_type, MSG_FACILITY);
        assert_eq!(q.uu, Some(&[0xAA, 0xBB][..]));
        // Length past the end.
        let bad = [0x08, 0x00, MSG_SETUP, 0x7e, 0x00, 0x09, 0x05];
        assert!(q931(&bad).is_err());
        assert!(q931(&[0x09, 0, 5]).is_err());
    }

    #[test]
    fn guard_ends_the_connection_after_a_refusal() {
        let (mut g, _) = H323.session(65535);
        g.push(&[3, 0, 0, 4, 3, 0]);
        assert_eq!(g.next(), Step::Forward(vec![3, 0, 0, 4]));
        assert_eq!(g.next(), Step::Idle);
        g.push(&[0, 5, 0]);
        // A packet of one octet that is not Q.931: the stream cannot be followed.
        assert!(matches!(g.next(), Step::Broken(_)));
        assert_eq!(g.next(), Step::Idle);
        // A refused message ends the connection, whatever follows it.
        let (mut g, _) = H323.session(65535);
        g.push(&[3, 0, 0, 7, 0x08, 0x00, MSG_FACILITY, 3, 0, 0, 4]);
        assert!(matches!(
            g.next(),
            Step::Message {
                check: Check::Pass,
                ..
            }
        ));
        g.decide(false);
        assert_eq!(g.next(), Step::End);
    }
}
