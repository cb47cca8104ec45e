//! The media core without sockets: a fake driver hands out socket indices, a fake control
//! plane queues requests; latching, the learn window, hijack drops and NAT bindings are
//! checked on the actions the core returns.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use portico_shared::config::Config;
use portico_shared::counters::Counter;
use portico_shared::shm::{EventKind, MediaFailure, MediaRequest};

use super::*;
use crate::fuzzing::MediaIo;
use crate::server::{Action, Now, Settings, Stats};
use crate::turn::{DefaultRoutes, Events, RelayIo};

#[derive(Default)]
struct FakeControl {
    queue: Vec<Command>,
    created: Vec<(usize, [SocketAddr; 2])>,
    failed: Vec<(usize, MediaFailure)>,
    published: Vec<(usize, PublishedLegs)>,
    ended: Vec<usize>,
}

impl MediaControl for FakeControl {
    fn worker(&self) -> (usize, usize) {
        (0, 1)
    }
    fn commands(&mut self, out: &mut Vec<Command>) {
        out.append(&mut self.queue);
    }
    fn created(&mut self, r: usize, l: [SocketAddr; 2]) {
        self.created.push((r, l));
    }
    fn failed(&mut self, r: usize, w: MediaFailure) {
        self.failed.push((r, w));
    }
    fn publish(&mut self, r: usize, l: PublishedLegs) {
        self.published.push((r, l));
    }
    fn ended(&mut self, r: usize) {
        self.ended.push(r);
    }
}

#[derive(Default)]
struct FakeEvents(Vec<(EventKind, IpAddr)>);

impl Events for FakeEvents {
    fn report(&mut self, kind: EventKind, ip: IpAddr, _: u64) {
        self.0.push((kind, ip));
    }
}

fn settings(extra: &str) -> Settings {
    let c = Config::from_toml(&format!(
        "[turn]\nrelay_ip = \"127.0.0.1\"\nallow_peers = [\"127.0.0.0/8\"]\n{extra}"
    ))
    .unwrap();
    Settings::from_config(&c, &[0; 32], &DefaultRoutes { v4: None, v6: None })
}

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct Rig {
    media: Media,
    settings: Settings,
    io: MediaIo,
    control: FakeControl,
    events: FakeEvents,
    stats: Stats,
    t0: Instant,
}

impl Rig {
    fn new(extra: &str) -> Rig {
        Rig {
            media: Media::new(0),
            settings: settings(extra),
            io: MediaIo::default(),
            control: FakeControl::default(),
            events: FakeEvents::default(),
            stats: Stats::default(),
            t0: Instant::now(),
        }
    }

    fn now(&self, ms: u64) -> Now {
        Now {
            mono: self.t0 + Duration::from_millis(ms),
            unix: 1000,
        }
    }

    fn tick(&mut self, ms: u64) {
        let now = self.now(ms);
        let mut cx = MediaCtx {
            settings: &self.settings.media,
            turn: &self.settings.turn,
            now,
            stats: &mut self.stats,
            io: &mut self.io,
        };
        self.media.tick(&mut cx, &mut self.control);
    }

    fn packet(&mut self, ms: u64, socket: usize, from: &str) -> Action {
        let now = self.now(ms);
        let mut cx = MediaCtx {
            settings: &self.settings.media,
            turn: &self.settings.turn,
            now,
            stats: &mut self.stats,
            io: &mut self.io,
        };
        self.media.handle(
            &mut cx,
            &mut self.events,
            socket,
            a(from),
            &[0; 252],
            80,
            172,
        )
    }

    /// A datagram of `bytes` (at offset 0).
    fn datagram(&mut self, ms: u64, socket: usize, from: &str, bytes: &[u8]) -> Action {
        let now = self.now(ms);
        let mut cx = MediaCtx {
            settings: &self.settings.media,
            turn: &self.settings.turn,
            now,
            stats: &mut self.stats,
            io: &mut self.io,
        };
        self.media.handle(
            &mut cx,
            &mut self.events,
            socket,
            a(from),
            bytes,
            0,
            bytes.len(),
        )
    }

    fn socket_of(&self, addr: SocketAddr) -> usize {
        self.io
            .open
            .iter()
            .find(|(_, x)| *x == addr)
            .map(|(i, _)| *i)
            .expect("socket open")
    }
}

const MEDIA: &str =
    "[media]\nports = \"40000-40009\"\nlearn_window = \"2s\"\nidle_timeout = \"10s\"\n";

#[test]
fn latching_follows_within_the_window_then_drops_and_reports_foreign_sources() {
    let mut r = Rig::new(MEDIA);
    r.control.queue.push(Command::Create(MediaRequest {
        index: 7,
        id: 1,
        addresses: [Some(a("127.0.0.1:5000")), Some(a("127.0.0.2:6000"))],
        srtp: [None, None],
    }));
    r.tick(0);
    let (record, locals) = r.control.created[0];
    assert_eq!(record, 7);
    assert_eq!(locals[0].port() % 2, 0);
    assert_eq!(r.io.open.len(), 4, "two RTP/RTCP pairs");
    let leg0 = r.socket_of(locals[0]);
    let leg1 = r.socket_of(locals[1]);
    // First packet from another port than signalled: latched, forwarded to leg 1's address.
    assert_eq!(
        r.packet(10, leg0, "127.0.0.1:5555"),
        Action::Send {
            offset: 80,
            len: 172,
            socket: leg1,
            to: a("127.0.0.2:6000")
        }
    );
    // Leg 1's answer goes to leg 0's latched source, not its signalled address.
    assert_eq!(
        r.packet(20, leg1, "127.0.0.2:6000"),
        Action::Send {
            offset: 80,
            len: 172,
            socket: leg0,
            to: a("127.0.0.1:5555")
        }
    );
    // Within the window a new source is followed.
    assert!(matches!(
        r.packet(1500, leg0, "127.0.0.1:5556"),
        Action::Send { .. }
    ));
    assert_eq!(
        r.packet(1600, leg1, "127.0.0.2:6000"),
        Action::Send {
            offset: 80,
            len: 172,
            socket: leg0,
            to: a("127.0.0.1:5556")
        }
    );
    // After it: strict. Dropped, counted, reported once per second.
    for ms in [2100, 2200, 2300] {
        assert_eq!(r.packet(ms, leg0, "127.0.0.66:7000"), Action::Drop);
    }
    assert_eq!(
        r.events.0,
        vec![(EventKind::MediaForeignSource, a("127.0.0.66:7000").ip())]
    );
    assert_eq!(r.stats.get(Counter::DropMediaForeignSource), 3);
    // Leg 1's traffic still goes to the latched source.
    assert_eq!(
        r.packet(2400, leg1, "127.0.0.2:6000"),
        Action::Send {
            offset: 80,
            len: 172,
            socket: leg0,
            to: a("127.0.0.1:5556")
        }
    );
    r.tick(2500);
    let (_, legs) = r.control.published.last().copied().unwrap();
    assert_eq!(legs[0].0, Some(a("127.0.0.1:5556")));
    assert_eq!(legs[0].1.foreign_dropped, 3);
    assert_eq!(legs[0].1.packets_in, 2);
    assert_eq!(legs[0].1.packets_out, 3);
    // Idle: ended, sockets closed.
    r.tick(2500 + 10_100);
    assert_eq!(r.control.ended, vec![7]);
    assert!(r.io.open.is_empty());
    assert_eq!(r.media.sessions(), 0);
}

#[test]
fn a_denied_address_or_no_free_pair_fails_the_request() {
    let mut r = Rig::new(MEDIA);
    r.control.queue.push(Command::Create(MediaRequest {
        index: 1,
        id: 1,
        addresses: [None, Some(a("10.0.0.1:4000"))],
        srtp: [None, None],
    }));
    r.tick(0);
    assert_eq!(r.control.failed, vec![(1, MediaFailure::Leg1Denied)]);
    // 40000-40009 holds 5 pairs: two sessions fit, the third does not.
    for i in 2..5 {
        r.control.queue.push(Command::Create(MediaRequest {
            index: i,
            id: i as u64,
            addresses: [None, None],
            srtp: [None, None],
        }));
    }
    r.tick(1);
    assert_eq!(r.control.created.len(), 2);
    assert_eq!(r.control.failed[1], (4, MediaFailure::NoPorts));
    assert!(r
        .io
        .open
        .iter()
        .all(|(_, x)| x.port() >= 40000 && x.port() <= 40009));
    // Without a remote for the other leg the packet is dropped, and a source the peer policy
    // refuses is never learned.
    let leg0 = r.socket_of(r.control.created[0].1[0]);
    assert_eq!(r.packet(5, leg0, "127.0.0.1:5000"), Action::Drop);
    assert_eq!(r.stats.get(Counter::DropMediaNoRemote), 1);
    let leg0b = r.socket_of(r.control.created[1].1[0]);
    assert_eq!(r.packet(5, leg0b, "10.9.9.9:5000"), Action::Drop);
    assert_eq!(r.stats.get(Counter::DropMediaPeerDenied), 1);
    r.control.queue.push(Command::Delete { record: 2 });
    r.tick(2);
    assert_eq!(r.control.ended, vec![2]);
    assert_eq!(r.io.open.len(), 4);
}

#[test]
fn a_nat_map_binds_per_source_and_replies_from_the_public_port() {
    let mut r = Rig::new(
        "[[nat.maps]]\npublic_ports = \"5004-5005\"\ninternal = \"127.0.0.9:6004\"\nmax_bindings = 2\nidle_timeout = \"5s\"\n",
    );
    r.tick(0);
    assert_eq!(r.media.nat.public_sockets(), 2);
    let p5005 = r.socket_of(a("127.0.0.1:5005"));
    let Action::Send { socket: bx, to, .. } = r.packet(1, p5005, "127.0.0.20:1000") else {
        panic!("not forwarded");
    };
    assert_eq!(to, a("127.0.0.9:6005"), "port offset kept");
    assert!(matches!(
        r.packet(2, p5005, "127.0.0.21:1000"),
        Action::Send { .. }
    ));
    assert_eq!(
        r.packet(3, p5005, "127.0.0.22:1000"),
        Action::Drop,
        "max_bindings"
    );
    assert_eq!(r.stats.get(Counter::DropNatBindingsFull), 1);
    // The internal host's reply to X's binding goes back to X from the public port.
    assert_eq!(
        r.packet(4, bx, "127.0.0.9:6005"),
        Action::Send {
            offset: 80,
            len: 172,
            socket: p5005,
            to: a("127.0.0.20:1000")
        }
    );
    assert_eq!(
        r.packet(5, bx, "127.0.0.50:6005"),
        Action::Drop,
        "only the internal host"
    );
    assert_eq!(r.media.nat.bindings(), 2);
    r.tick(6000);
    assert_eq!(r.media.nat.bindings(), 0, "idle bindings expire");
    // A settings change without the map closes its ports.
    r.settings = settings("");
    r.media.recheck = true;
    r.tick(6001);
    assert!(r.io.open.is_empty());
}

/// An SRTP packet (RTP header, 20 bytes of payload) with its tag for `master`, computed here
/// from the derived authentication key (the derivation itself is checked against RFC 3711
/// B.3 in `srtp::tests`).
fn srtp_packet(master: &[u8; 30], seq: u16, rtcp: bool) -> Vec<u8> {
    use aws_lc_rs::hmac;
    let mut auth = [0u8; 20];
    let label = if rtcp {
        srtp::LABEL_RTCP_AUTH
    } else {
        srtp::LABEL_RTP_AUTH
    };
    srtp::derive(master, label, &mut auth).unwrap();
    let k = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &auth);
    let mut p = if rtcp {
        // RR header, SSRC, E flag and SRTCP index 1.
        vec![0x80, 201, 0, 1, 0, 0, 0, 0xA, 0x80, 0, 0, 1]
    } else {
        let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xA];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p.extend([seq as u8; 20]);
        p
    };
    let mut signed = p.clone();
    if !rtcp {
        signed.extend([0, 0, 0, 0]);
    }
    p.extend(&hmac::sign(&k, &signed).as_ref()[..10]);
    p
}

#[test]
fn a_leg_with_an_srtp_key_learns_only_sources_whose_tag_verifies() {
    let mut r = Rig::new(MEDIA);
    let master = [5u8; 30];
    let mut other = master;
    other[29] ^= 0x80;
    r.control.queue.push(Command::Create(MediaRequest {
        index: 3,
        id: 3,
        addresses: [Some(a("127.0.0.1:5000")), Some(a("127.0.0.2:6000"))],
        srtp: [Some(master), None],
    }));
    r.tick(0);
    let (_, locals) = r.control.created[0];
    let leg0 = r.socket_of(locals[0]);
    let leg0_rtcp = r.socket_of(SocketAddr::new(locals[0].ip(), locals[0].port() + 1));
    let leg1 = r.socket_of(locals[1]);
    let good = srtp_packet(&master, 1, false);
    let forged = srtp_packet(&other, 1, false);
    // Plain RTP, a tag under another key, a cut packet: dropped, counted, nothing learned.
    for p in [&good[..good.len() - 10], &forged[..], &good[..5]] {
        assert_eq!(r.datagram(10, leg0, "127.0.0.66:7000", p), Action::Drop);
    }
    assert_eq!(r.stats.get(Counter::DropMediaSrtpAuth), 3);
    assert_eq!(r.stats.get(Counter::MediaLatched), 0);
    // The SRTCP key is not the SRTP one.
    let rtcp_good = srtp_packet(&master, 0, true);
    assert_eq!(
        r.datagram(10, leg0, "127.0.0.1:5555", &rtcp_good),
        Action::Drop
    );
    assert_eq!(r.stats.get(Counter::DropMediaSrtpAuth), 4);
    // A valid tag latches and is forwarded; so is a valid SRTCP packet on the RTCP port.
    assert!(matches!(
        r.datagram(20, leg0, "127.0.0.1:5555", &good),
        Action::Send { socket, .. } if socket == leg1
    ));
    assert!(matches!(
        r.datagram(20, leg0_rtcp, "127.0.0.1:5556", &rtcp_good),
        Action::Send { .. }
    ));
    assert_eq!(r.stats.get(Counter::MediaLatched), 2);
    // Once latched, the source's packets are not checked (any bytes pass).
    assert!(matches!(
        r.datagram(30, leg0, "127.0.0.1:5555", &[0x80; 40]),
        Action::Send { .. }
    ));
    // In the learn window a forged source is still refused; the latch stays.
    assert_eq!(
        r.datagram(40, leg0, "127.0.0.66:7000", &forged),
        Action::Drop
    );
    assert_eq!(r.stats.get(Counter::DropMediaSrtpAuth), 5);
    assert!(matches!(
        r.datagram(50, leg1, "127.0.0.2:6000", &[0x80; 40]),
        Action::Send { to, .. } if to == a("127.0.0.1:5555")
    ));
    // Leg 1 has no key: plain RTP from a new source is learned there as before.
    assert!(matches!(
        r.datagram(60, leg1, "127.0.0.2:6001", &[0x80; 40]),
        Action::Send { .. }
    ));
}

impl Rig {
    /// A rig recording kernel paths, with one session (record `index`) between
    /// 127.0.0.1:5000 and 127.0.0.2:6000; its legs' local addresses.
    fn offloaded_call(index: usize) -> (Rig, [SocketAddr; 2]) {
        let mut r = Rig::new(MEDIA);
        r.media.offload.enable();
        r.control.queue.push(Command::Create(MediaRequest {
            index,
            id: 1,
            addresses: [Some(a("127.0.0.1:5000")), Some(a("127.0.0.2:6000"))],
            srtp: [None, None],
        }));
        r.tick(0);
        let locals = r.control.created[0].1;
        (r, locals)
    }

    /// The paths now (`blocked` sources excluded) of the owners whose kernel paths changed
    /// since the last call, and whether the core asked for a full check.
    fn kernel(&mut self, blocked: &[&str]) -> (bool, Vec<offload::KernelFlow>) {
        let mut owners = Vec::new();
        let all = self.media.offload.drain(&mut owners);
        if all {
            owners.clear();
            self.media.owners(&mut owners);
        }
        owners.sort_unstable();
        owners.dedup();
        let blocked: Vec<IpAddr> = blocked.iter().map(|b| b.parse().unwrap()).collect();
        let mut flows = Vec::new();
        for o in owners {
            self.media
                .kernel_flows(o, &|ip| blocked.contains(&ip), &mut flows);
        }
        (all, flows)
    }
}

#[test]
fn kernel_paths_follow_latching_and_credited_counts_keep_a_session_alive() {
    use offload::{KernelFlow, Owner, Part};
    let (mut r, locals) = Rig::offloaded_call(7);
    let (leg0, leg1) = (r.socket_of(locals[0]), r.socket_of(locals[1]));
    // A full check first; nothing latched, nothing for the kernel.
    assert_eq!(r.kernel(&[]), (true, vec![]));
    assert!(matches!(
        r.packet(10, leg0, "127.0.0.1:5555"),
        Action::Send { .. }
    ));
    let (all, flows) = r.kernel(&[]);
    assert!(!all);
    let owner = Owner::Session {
        index: 0,
        serial: 1,
    };
    let up = KernelFlow {
        owner,
        part: Part::Leg {
            leg: 0,
            rtcp: false,
        },
        from: a("127.0.0.1:5555"),
        at: locals[0],
        out: locals[1],
        to: a("127.0.0.2:6000"),
    };
    assert_eq!(flows, vec![up]);
    // Leg 1 latches: its path back to leg 0's latched source; RTCP derived from RTP.
    assert!(matches!(
        r.packet(20, leg1, "127.0.0.2:6000"),
        Action::Send { .. }
    ));
    assert!(matches!(
        r.packet(30, leg0 + 1, "127.0.0.1:5556"),
        Action::Send { .. }
    ));
    let (_, flows) = r.kernel(&[]);
    let plus1 = |x: SocketAddr| SocketAddr::new(x.ip(), x.port() + 1);
    assert_eq!(flows.len(), 3, "{flows:?}");
    assert!(flows.contains(&KernelFlow {
        owner,
        part: Part::Leg {
            leg: 1,
            rtcp: false
        },
        from: a("127.0.0.2:6000"),
        at: locals[1],
        out: locals[0],
        to: a("127.0.0.1:5555"),
    }));
    assert!(flows.contains(&KernelFlow {
        owner,
        part: Part::Leg { leg: 0, rtcp: true },
        from: a("127.0.0.1:5556"),
        at: plus1(locals[0]),
        out: plus1(locals[1]),
        to: a("127.0.0.2:6001"),
    }));
    // A blacklisted source is not offered.
    r.media.offload.mark_all();
    let (_, flows) = r.kernel(&["127.0.0.1"]);
    assert_eq!(flows.len(), 1, "{flows:?}");
    // What the kernel relayed is credited to the legs and keeps the session from idling.
    r.media.credit(
        &up,
        40,
        40 * 160,
        r.t0 + Duration::from_secs(9),
        &mut r.stats,
    );
    assert_eq!(r.stats.get(Counter::MediaPackets), 43);
    r.tick(12_000);
    assert!(r.control.ended.is_empty(), "credited traffic is not idle");
    let (_, legs) = r.control.published.last().copied().unwrap();
    assert_eq!(legs[0].1.packets_in, 42);
    assert_eq!(legs[0].1.bytes_in, 2 * 172 + 40 * 160);
    assert_eq!(legs[1].1.packets_out, 42);
    // Re-latched within the window: the old path goes, the new one comes.
    r.media.offload.mark_all();
    r.kernel(&[]);
    let (mut r2, locals2) = Rig::offloaded_call(1);
    let l0 = r2.socket_of(locals2[0]);
    r2.packet(10, l0, "127.0.0.1:5555");
    r2.kernel(&[]);
    r2.packet(500, l0, "127.0.0.1:7777");
    let (_, flows) = r2.kernel(&[]);
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].from, a("127.0.0.1:7777"));
    // Ended: the owner is reported and has no path left; a credit after the end only
    // counts globally.
    r.tick(12_000 + 10_100);
    assert_eq!(r.control.ended, vec![7]);
    let (_, flows) = r.kernel(&[]);
    assert!(flows.is_empty());
    r.media
        .credit(&up, 1, 160, r.t0 + Duration::from_secs(23), &mut r.stats);
    assert_eq!(r.stats.get(Counter::MediaPackets), 44);
}

#[test]
fn kernel_paths_of_a_nat_binding_cover_the_offsets_it_carried() {
    use offload::{Owner, Part};
    let mut r = Rig::new(
        "[[nat.maps]]\npublic_ports = \"5004-5006\"\ninternal = \"127.0.0.9:6004\"\nidle_timeout = \"5s\"\n",
    );
    r.media.offload.enable();
    r.tick(0);
    assert_eq!(r.kernel(&[]), (true, vec![]));
    let p5005 = r.socket_of(a("127.0.0.1:5005"));
    let Action::Send { socket: bx, .. } = r.packet(1, p5005, "127.0.0.20:1000") else {
        panic!("not forwarded");
    };
    let port = r.io.local_addr(bx).unwrap().port();
    let wild = SocketAddr::new("0.0.0.0".parse().unwrap(), port);
    let (_, flows) = r.kernel(&[]);
    assert_eq!(flows.len(), 2, "{flows:?}");
    let inbound = flows[0];
    assert_eq!(inbound.part, Part::NatIn { offset: 1 });
    assert_eq!(
        (inbound.from, inbound.at, inbound.out, inbound.to),
        (
            a("127.0.0.20:1000"),
            a("127.0.0.1:5005"),
            wild,
            a("127.0.0.9:6005")
        )
    );
    let outbound = flows[1];
    assert_eq!(outbound.part, Part::NatOut { offset: 1 });
    assert_eq!(
        (outbound.from, outbound.at, outbound.out, outbound.to),
        (
            a("127.0.0.9:6005"),
            wild,
            a("127.0.0.1:5005"),
            a("127.0.0.20:1000")
        )
    );
    // A reply on another offset adds that offset's pair.
    assert!(matches!(
        r.packet(2, bx, "127.0.0.9:6006"),
        Action::Send { .. }
    ));
    let (_, flows) = r.kernel(&[]);
    assert_eq!(flows.len(), 4, "{flows:?}");
    // Credited kernel traffic keeps the binding; without it, it expires.
    r.media.credit(
        &outbound,
        10,
        1000,
        r.t0 + Duration::from_secs(4),
        &mut r.stats,
    );
    assert_eq!(r.stats.get(Counter::NatOutboundPackets), 11);
    r.tick(6000);
    assert_eq!(r.media.nat.bindings(), 1);
    r.tick(9500);
    assert_eq!(r.media.nat.bindings(), 0);
    let (_, flows) = r.kernel(&[]);
    assert!(flows.is_empty());
    assert!(matches!(
        inbound.owner,
        Owner::Binding {
            map: 0,
            binding: 0,
            serial: 1
        }
    ));
}
