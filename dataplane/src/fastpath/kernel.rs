//! The kernel side of the fast path, owned by the driver: loads the program clang compiled
//! in the build (`bpf/relay.bpf.c`) with aya, attaches it to the ingress of the interfaces
//! holding the TURN listen and relay addresses, and writes, deletes and reads the entries of
//! its two maps.
//!
//! The program is attached with TCX links (Linux 6.6+), never with a netlink filter: a link
//! dies with the process that holds it, so a crashed dataplane cannot leave a program behind
//! that keeps relaying for allocations nobody manages any more.
//!
//! Map entries are written with plain `bpf(2)` calls on the maps' descriptors, so every
//! worker updates its own entries without a lock (the kernel's hash map is safe for that).

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::RawFd;
use std::sync::Mutex;

use super::Flow;

/// Attaches the program to one more interface's ingress (by name).
type Attach = Box<dyn FnMut(&str) -> Result<(), String> + Send>;

/// Per-entry counters read back from a map value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub packets: u64,
    pub bytes: u64,
}

const CHAN_KEY: usize = 16;
const PEER_KEY: usize = 12;
const VALUE: usize = 40;
/// `struct fwd`'s flags: the destination is an address of this host.
const FLAG_LOCAL_PEER: u16 = 1;
/// `struct fwd`'s flags: a plain UDP forward (media leg, NAT map), no ChannelData.
const FLAG_PLAIN: u16 = 2;
/// The loopback interface's index in every network namespace (Linux 3.18+).
#[cfg_attr(not(portico_fastpath), allow(dead_code))]
const LOOPBACK_IFINDEX: u32 = 1;

/// The loaded and attached program and its maps.
pub struct FastPath {
    /// The program, its links and the maps' owners: dropping them detaches the program.
    #[allow(dead_code)]
    keep: Mutex<Box<dyn Send>>,
    /// Attaches the program to more interfaces, and the names it is attached to.
    attach: Mutex<(Attach, Vec<String>)>,
    channels: RawFd,
    peers: RawFd,
    /// Interface index of each local IPv4 address on an attached interface.
    ifindex: HashMap<Ipv4Addr, u32>,
    /// Every IPv4 address of this namespace when the program was loaded (127.0.0.0/8 is
    /// local without being listed), and the loopback interface's index: a peer that is a
    /// local address (another relayed address of this Portico, say) is reached through
    /// loopback, as the kernel's own routing would, never out of the relay's interface.
    local: Vec<Ipv4Addr>,
    loopback: u32,
    /// Names of the interfaces the program is attached to.
    pub interfaces: Vec<String>,
    pub max_entries: u32,
}

impl FastPath {
    /// Loads the program and attaches it to the interfaces holding `addrs`.
    #[cfg(portico_fastpath)]
    pub fn load(addrs: &[Ipv4Addr], max_entries: u32) -> Result<FastPath, String> {
        use aya::programs::links::LinkOrder;
        use aya::programs::tc::{SchedClassifier, TcAttachOptions, TcAttachType};
        use aya::EbpfLoader;
        use std::os::fd::{AsFd, AsRawFd};

        let (interfaces, ifindex, local) = interfaces_of(addrs)?;
        let loopback = nix::net::if_::if_nametoindex("lo").unwrap_or(LOOPBACK_IFINDEX);
        let mut loader = EbpfLoader::new();
        loader
            .set_max_entries("CHANNELS", max_entries)
            .set_max_entries("PEERS", max_entries);
        // An operator (or a test) may point at another build of the object.
        let mut ebpf = match std::env::var_os("PORTICO_FASTPATH_OBJECT") {
            Some(path) => loader.load_file(&path).map_err(|e| {
                format!(
                    "loading {} (PORTICO_FASTPATH_OBJECT): {e}",
                    std::path::Path::new(&path).display()
                )
            })?,
            None => loader
                .load(aya::include_bytes_aligned!(env!("PORTICO_FASTPATH_OBJ")))
                .map_err(|e| format!("loading the program: {e}"))?,
        };
        let prog: &mut SchedClassifier = ebpf
            .program_mut("portico_relay")
            .ok_or("the object has no program portico_relay")?
            .try_into()
            .map_err(|e| format!("portico_relay: {e}"))?;
        prog.load()
            .map_err(|e| format!("the kernel refused the program: {e}"))?;
        for name in &interfaces {
            prog.attach_with_options(
                name,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| format!("attaching to {name} (TCX, Linux 6.6+): {e}"))?;
        }
        let channels = take_hash(&mut ebpf, "CHANNELS")?;
        let peers = take_hash(&mut ebpf, "PEERS")?;
        let (cfd, pfd) = (
            channels.fd().as_fd().as_raw_fd(),
            peers.fd().as_fd().as_raw_fd(),
        );
        // Media legs and NAT maps may face interfaces without a TURN address (a NAT map's
        // internal side): the program is attached there when a path first needs it.
        let attach: Attach = Box::new(move |name: &str| {
            let prog: &mut SchedClassifier = ebpf
                .program_mut("portico_relay")
                .ok_or("the object has no program portico_relay")?
                .try_into()
                .map_err(|e| format!("portico_relay: {e}"))?;
            prog.attach_with_options(
                name,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map(|_| ())
            .map_err(|e| format!("attaching to {name} (TCX, Linux 6.6+): {e}"))
        });
        Ok(FastPath {
            keep: Mutex::new(Box::new((channels, peers))),
            attach: Mutex::new((attach, interfaces.clone())),
            channels: cfd,
            peers: pfd,
            ifindex,
            local,
            loopback,
            interfaces,
            max_entries,
        })
    }

    /// Built without the program: says why.
    #[cfg(not(portico_fastpath))]
    pub fn load(_: &[Ipv4Addr], _: u32) -> Result<FastPath, String> {
        Err(format!(
            "this build has no fast path: {}",
            env!("PORTICO_FASTPATH_MISSING")
        ))
    }

    /// Interface index of a local address on an attached interface.
    pub fn ifindex(&self, ip: Ipv4Addr) -> Option<u32> {
        self.ifindex.get(&ip).copied()
    }

    /// Whether `ip` is an address of this namespace (as of loading).
    pub fn is_local(&self, ip: Ipv4Addr) -> bool {
        ip.is_loopback() || self.local.contains(&ip)
    }

    /// Installs both directions of a channel, counters at zero.
    pub fn install(&self, f: &Flow) -> io::Result<()> {
        let (Some(relay_if), Some(to_client_if)) =
            (self.ifindex(*f.relay.ip()), self.ifindex(*f.listen.ip()))
        else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no attached interface holds the relay or listen address",
            ));
        };
        // A local peer (typically another relayed address of this server: two WebRTC
        // clients relay-only through it) is reached through loopback; sent out of the
        // relay's interface the packet would leave the host and be lost. The program first
        // tries to hand such a packet straight to the other allocation's client.
        let (to_peer_if, flags) = if self.is_local(*f.peer.ip()) {
            (self.loopback, FLAG_LOCAL_PEER)
        } else {
            (relay_if, 0)
        };
        let up = value(f.relay, f.peer, 0, to_peer_if, flags);
        let down = value(f.listen, f.client, f.channel, to_client_if, 0);
        update(self.channels, &chan_key(f), &up)?;
        if let Err(e) = update(self.peers, &peer_key(f), &down) {
            let _ = delete(self.channels, &chan_key(f));
            return Err(e);
        }
        Ok(())
    }

    /// Installs one plain direction (a media leg's or a NAT binding's), counters at zero.
    pub fn install_plain(&self, p: &Plain) -> io::Result<()> {
        let v = value(p.out, p.to, 0, p.ifindex, FLAG_PLAIN);
        update(self.peers, &plain_key(p), &v)
    }

    /// Removes a plain direction; returns its last counters (read and deleted in one step).
    pub fn remove_plain(&self, p: &Plain) -> Counts {
        take(self.peers, &plain_key(p)).unwrap_or_default()
    }

    /// The counters of a plain direction.
    pub fn counts_plain(&self, p: &Plain) -> Counts {
        lookup(self.peers, &plain_key(p)).unwrap_or_default()
    }

    /// Makes sure the program sees the ingress of interface `name`.
    pub fn attach(&self, name: &str) -> Result<(), String> {
        let mut g = self.attach.lock().unwrap_or_else(|p| p.into_inner());
        let (attach, names) = &mut *g;
        if names.iter().any(|n| n == name) {
            return Ok(());
        }
        attach(name)?;
        names.push(name.to_string());
        tracing::info!(
            interface = name,
            "kernel fast path: attached for a media or NAT map path"
        );
        Ok(())
    }

    /// The loopback interface's index.
    pub fn loopback(&self) -> u32 {
        self.loopback
    }

    /// Removes both directions of a channel; returns their last counters (read and deleted
    /// in one step, so no packet counted in between is lost).
    pub fn remove(&self, f: &Flow) -> (Counts, Counts) {
        (
            take(self.channels, &chan_key(f)).unwrap_or_default(),
            take(self.peers, &peer_key(f)).unwrap_or_default(),
        )
    }

    /// The counters of a channel: client to peer, peer to client.
    pub fn counts(&self, f: &Flow) -> (Counts, Counts) {
        (
            lookup(self.channels, &chan_key(f)).unwrap_or_default(),
            lookup(self.peers, &peer_key(f)).unwrap_or_default(),
        )
    }
}

/// One plain direction as the kernel sees it: a datagram from `from` to `at` leaves from
/// `out` to `to` on interface `ifindex`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plain {
    pub from: SocketAddrV4,
    pub at: SocketAddrV4,
    pub out: SocketAddrV4,
    pub to: SocketAddrV4,
    pub ifindex: u32,
}

fn plain_key(p: &Plain) -> [u8; PEER_KEY] {
    tuple_key(p.from, p.at)
}

/// The source address this host's routing picks towards `dst` (a connected UDP socket's
/// local address; nothing is sent).
pub fn route_source(dst: Ipv4Addr) -> Option<Ipv4Addr> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    s.connect((dst, 9)).ok()?;
    match s.local_addr().ok()? {
        std::net::SocketAddr::V4(a) if !a.ip().is_unspecified() => Some(*a.ip()),
        _ => None,
    }
}

/// The interface holding local address `ip`: its name and index.
pub fn interface_of(ip: Ipv4Addr) -> Option<(String, u32)> {
    let all = nix::ifaddrs::getifaddrs().ok()?;
    for i in all {
        if i.address
            .as_ref()
            .and_then(|a| a.as_sockaddr_in())
            .is_some_and(|sin| sin.ip() == ip)
        {
            let idx = nix::net::if_::if_nametoindex(i.interface_name.as_str()).ok()?;
            return Some((i.interface_name, idx));
        }
    }
    None
}

#[cfg(portico_fastpath)]
fn take_hash(ebpf: &mut aya::Ebpf, name: &str) -> Result<aya::maps::MapData, String> {
    match ebpf.take_map(name) {
        Some(aya::maps::Map::HashMap(m)) => Ok(m),
        _ => Err(format!("the object has no hash map {name}")),
    }
}

/// The interfaces holding `addrs`, the index of every IPv4 address on them, and all IPv4
/// addresses of the namespace.
#[cfg_attr(not(portico_fastpath), allow(dead_code))]
#[allow(clippy::type_complexity)]
fn interfaces_of(
    addrs: &[Ipv4Addr],
) -> Result<(Vec<String>, HashMap<Ipv4Addr, u32>, Vec<Ipv4Addr>), String> {
    let mut names: Vec<String> = Vec::new();
    let mut by_ip: Vec<(String, Ipv4Addr)> = Vec::new();
    let all = nix::ifaddrs::getifaddrs().map_err(|e| format!("listing interfaces: {e}"))?;
    for i in all {
        if let Some(sin) = i.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            by_ip.push((i.interface_name.clone(), sin.ip()));
        }
    }
    for a in addrs {
        match by_ip.iter().find(|(_, ip)| ip == a) {
            Some((n, _)) => {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
            None => return Err(format!("no interface holds {a}")),
        }
    }
    let mut ifindex = HashMap::new();
    for (n, ip) in &by_ip {
        if names.contains(n) {
            let idx = nix::net::if_::if_nametoindex(n.as_str())
                .map_err(|e| format!("interface {n}: {e}"))?;
            ifindex.insert(*ip, idx);
        }
    }
    let local = by_ip.iter().map(|(_, ip)| *ip).collect();
    Ok((names, ifindex, local))
}

fn chan_key(f: &Flow) -> [u8; CHAN_KEY] {
    let mut k = [0u8; CHAN_KEY];
    k[0..4].copy_from_slice(&f.client.ip().octets());
    k[4..8].copy_from_slice(&f.listen.ip().octets());
    k[8..10].copy_from_slice(&f.client.port().to_be_bytes());
    k[10..12].copy_from_slice(&f.listen.port().to_be_bytes());
    k[12..14].copy_from_slice(&f.channel.to_be_bytes());
    k
}

fn peer_key(f: &Flow) -> [u8; PEER_KEY] {
    tuple_key(f.peer, f.relay)
}

/// A `PEERS` key: a datagram from `from` to local address `to`.
fn tuple_key(from: SocketAddrV4, to: SocketAddrV4) -> [u8; PEER_KEY] {
    let mut k = [0u8; PEER_KEY];
    k[0..4].copy_from_slice(&from.ip().octets());
    k[4..8].copy_from_slice(&to.ip().octets());
    k[8..10].copy_from_slice(&from.port().to_be_bytes());
    k[10..12].copy_from_slice(&to.port().to_be_bytes());
    k
}

/// A map value: the packet leaves from `from` to `to` on interface `ifindex`.
fn value(
    from: std::net::SocketAddrV4,
    to: std::net::SocketAddrV4,
    channel: u16,
    ifindex: u32,
    flags: u16,
) -> [u8; VALUE] {
    let mut v = [0u8; VALUE];
    v[0..4].copy_from_slice(&from.ip().octets());
    v[4..8].copy_from_slice(&to.ip().octets());
    v[8..10].copy_from_slice(&from.port().to_be_bytes());
    v[10..12].copy_from_slice(&to.port().to_be_bytes());
    v[12..14].copy_from_slice(&channel.to_be_bytes());
    v[14..16].copy_from_slice(&flags.to_ne_bytes());
    v[16..20].copy_from_slice(&ifindex.to_ne_bytes());
    v
}

/// `union bpf_attr` as the map element commands read it.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

fn bpf(cmd: libc::c_long, attr: &ElemAttr) -> io::Result<()> {
    // SAFETY: the attribute block is valid for the call, and the key and value pointers in
    // it point at buffers of the map's key and value sizes that outlive it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn update(fd: RawFd, key: &[u8], value: &[u8; VALUE]) -> io::Result<()> {
    bpf(
        BPF_MAP_UPDATE_ELEM,
        &ElemAttr {
            map_fd: fd as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            flags: 0, // BPF_ANY
        },
    )
}

fn delete(fd: RawFd, key: &[u8]) -> io::Result<()> {
    bpf(
        BPF_MAP_DELETE_ELEM,
        &ElemAttr {
            map_fd: fd as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: 0,
            flags: 0,
        },
    )
}

/// Reads and deletes an entry (Linux 5.14+ for hash maps; the fast path needs 6.6), or at
/// worst reads then deletes it.
fn take(fd: RawFd, key: &[u8]) -> Option<Counts> {
    match read(BPF_MAP_LOOKUP_AND_DELETE_ELEM, fd, key) {
        Some(c) => Some(c),
        None => {
            let c = lookup(fd, key);
            let _ = delete(fd, key);
            c
        }
    }
}

fn lookup(fd: RawFd, key: &[u8]) -> Option<Counts> {
    read(BPF_MAP_LOOKUP_ELEM, fd, key)
}

fn read(cmd: libc::c_long, fd: RawFd, key: &[u8]) -> Option<Counts> {
    let mut v = [0u8; VALUE];
    bpf(
        cmd,
        &ElemAttr {
            map_fd: fd as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: v.as_mut_ptr() as u64,
            flags: 0,
        },
    )
    .ok()?;
    let u = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&v[r]);
        u64::from_ne_bytes(b)
    };
    Some(Counts {
        packets: u(24..32),
        bytes: u(32..40),
    })
}
