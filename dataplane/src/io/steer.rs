//! Relays without a descriptor each (`turn.relay_mode = "shared"`).
//!
//! With a socket per allocation the box stops where `RLIMIT_NOFILE` does, and every
//! allocation pays a socket's kernel memory whether it carries media or not. Here an IPv4 UDP
//! relay is a row in two tables instead:
//!
//! * **Steering.** An eBPF `sk_lookup` program, attached to the network namespace, runs on
//!   every UDP socket lookup; when (destination address, port) is in its hash map it hands the
//!   datagram to the socket of the worker the map names (a `SOCKMAP` of one socket per
//!   worker). Anything else goes on to the normal lookup, untouched.
//! * **Receiving.** Each worker's steered socket has `IP_RECVORIGDSTADDR`: the multishot
//!   `recvmsg` delivers the destination the peer sent to in a control message, and the worker
//!   finds the allocation by that address.
//! * **Sending.** A socket cannot send from a port it is not bound to, so relayed packets
//!   leave through a raw socket (`IPPROTO_RAW`, i.e. `IP_HDRINCL`): the worker writes the IPv4
//!   and UDP headers into the headroom in front of the payload. Netfilter and conntrack see
//!   the real ports.
//!
//! Ports are the process's to hand out: a steered port is taken only when no socket is bound
//! to it (checked with a short-lived bind) and while it is held every other relay bind of
//! this process (TCP clients' relays, EVEN-PORT reservations, IPv6 relays) checks the same
//! table under the same lock, so a steered port and a bound one never coincide.
//!
//! The program (20 instructions) is assembled here: no compiler, no libbpf, so the mode does
//! not depend on the build machine. It is detached when the link descriptor closes, at exit at
//! the latest, also after a crash.

use std::collections::HashSet;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use socket2::{Domain, Protocol, Socket, Type};

/// IPv4 and UDP headers written in front of a steered relay's payload.
pub const HEADERS: usize = 28;

/// Receive queue of a worker's steered socket (the kernel doubles it for bookkeeping).
const STEERED_RCVBUF: libc::c_int = 16 << 20;

/// Room in the receive buffer for the peer's address (`sockaddr_in`, padded).
pub const NAME_LEN: usize = 32;
/// Room for the `IP_ORIGDSTADDR` control message: `CMSG_SPACE(sizeof(sockaddr_in))`.
pub const CONTROL_LEN: usize = 32;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
const BPF_SK_LOOKUP: u32 = 36;

/// `bpf(2)` with a 128-byte attribute block.
pub fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<RawFd> {
    // SAFETY: the bpf syscall reads (and for some commands writes) at most `size` bytes of
    // the attribute buffer we own; pointers inside it refer to live buffers of the caller.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as RawFd)
}

pub fn put32(a: &mut [u8; 128], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

pub fn put64(a: &mut [u8; 128], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

pub fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful syscall and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// One eBPF instruction.
pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0x0f);
    b[2..4].copy_from_slice(&off.to_ne_bytes());
    b[4..8].copy_from_slice(&imm.to_ne_bytes());
    b
}

pub fn map_create(kind: u32, key: u32, value: u32, entries: u32) -> io::Result<OwnedFd> {
    let mut a = [0u8; 128];
    put32(&mut a, 0, kind);
    put32(&mut a, 4, key);
    put32(&mut a, 8, value);
    put32(&mut a, 12, entries);
    bpf(BPF_MAP_CREATE, &mut a).map(owned)
}

pub fn map_update(map: RawFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut a = [0u8; 128];
    put32(&mut a, 0, map as u32);
    put64(&mut a, 8, key.as_ptr() as u64);
    put64(&mut a, 16, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
}

fn map_delete(map: RawFd, key: &[u8]) -> io::Result<()> {
    let mut a = [0u8; 128];
    put32(&mut a, 0, map as u32);
    put64(&mut a, 8, key.as_ptr() as u64);
    bpf(BPF_MAP_DELETE_ELEM, &mut a).map(|_| ())
}

/// Loads an `sk_lookup` program; the verifier's log is in the error.
pub fn load_sk_lookup(insns: &[[u8; 8]]) -> Result<OwnedFd, String> {
    let license = b"GPL\0";
    let mut log = vec![0u8; 16384];
    let mut a = [0u8; 128];
    put32(&mut a, 0, BPF_PROG_TYPE_SK_LOOKUP);
    put32(&mut a, 4, insns.len() as u32);
    put64(&mut a, 8, insns.as_ptr() as u64);
    put64(&mut a, 16, license.as_ptr() as u64);
    put32(&mut a, 24, 1);
    put32(&mut a, 28, log.len() as u32);
    put64(&mut a, 32, log.as_mut_ptr() as u64);
    put32(&mut a, 68, BPF_SK_LOOKUP);
    bpf(BPF_PROG_LOAD, &mut a).map(owned).map_err(|e| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(0);
        format!(
            "BPF_PROG_LOAD sk_lookup: {e} {}",
            String::from_utf8_lossy(&log[..end]).trim()
        )
    })
}

/// Attaches an `sk_lookup` program to this process's network namespace; it stays attached
/// while the returned link is open.
pub fn attach_sk_lookup(prog: &OwnedFd) -> Result<OwnedFd, String> {
    let netns =
        std::fs::File::open("/proc/self/ns/net").map_err(|e| format!("/proc/self/ns/net: {e}"))?;
    let mut a = [0u8; 128];
    put32(&mut a, 0, prog.as_raw_fd() as u32);
    put32(&mut a, 4, netns.as_raw_fd() as u32);
    put32(&mut a, 8, BPF_SK_LOOKUP);
    bpf(BPF_LINK_CREATE, &mut a)
        .map(owned)
        .map_err(|e| format!("BPF_LINK_CREATE sk_lookup: {e}"))
}

/// The hash map's key: the local address as the program reads it (network order) and the
/// port (host order, as `bpf_sk_lookup.local_port` has it).
fn key(addr: SocketAddrV4) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&addr.ip().octets());
    k[4..].copy_from_slice(&u32::from(addr.port()).to_ne_bytes());
    k
}

/// The program: IPv4 UDP whose (local address, port) is in `ports` → the socket in slot
/// `ports[...]` of `sockets`; anything else → the normal lookup.
pub fn program(ports: RawFd, sockets: RawFd) -> Vec<[u8; 8]> {
    // struct bpf_sk_lookup offsets.
    const FAMILY: i16 = 8;
    const PROTOCOL: i16 = 12;
    const LOCAL_IP4: i16 = 40;
    const LOCAL_PORT: i16 = 60;
    let mut p = vec![
        insn(0xbf, 6, 1, 0, 0),          // r6 = ctx
        insn(0x61, 2, 6, FAMILY, 0),     // r2 = ctx->family
        insn(0x55, 2, 0, 0, 2),          // if r2 != AF_INET goto pass (patched)
        insn(0x61, 2, 6, PROTOCOL, 0),   // r2 = ctx->protocol
        insn(0x55, 2, 0, 0, 17),         // if r2 != UDP goto pass (patched)
        insn(0x61, 2, 6, LOCAL_IP4, 0),  // r2 = ctx->local_ip4
        insn(0x63, 10, 2, -8, 0),        // *(u32 *)(r10 - 8) = r2
        insn(0x61, 2, 6, LOCAL_PORT, 0), // r2 = ctx->local_port
        insn(0x63, 10, 2, -4, 0),        // *(u32 *)(r10 - 4) = r2
        insn(0xbf, 2, 10, 0, 0),         // r2 = r10
        insn(0x07, 2, 0, 0, -8),         // r2 += -8
        insn(0x18, 1, 1, 0, ports),      // r1 = ports (ld_imm64, pseudo map fd)
        insn(0x00, 0, 0, 0, 0),
        insn(0x85, 0, 0, 0, 1),       // call map_lookup_elem
        insn(0x15, 0, 0, 0, 0),       // if r0 == 0 goto pass (patched)
        insn(0x61, 2, 0, 0, 0),       // r2 = *(u32 *)r0 (the worker)
        insn(0x63, 10, 2, -12, 0),    // *(u32 *)(r10 - 12) = r2
        insn(0xbf, 2, 10, 0, 0),      // r2 = r10
        insn(0x07, 2, 0, 0, -12),     // r2 += -12
        insn(0x18, 1, 1, 0, sockets), // r1 = sockets
        insn(0x00, 0, 0, 0, 0),
        insn(0x85, 0, 0, 0, 1),   // call map_lookup_elem
        insn(0x15, 0, 0, 0, 0),   // if r0 == 0 goto pass (patched)
        insn(0xbf, 7, 0, 0, 0),   // r7 = sk
        insn(0xbf, 1, 6, 0, 0),   // r1 = ctx
        insn(0xbf, 2, 7, 0, 0),   // r2 = sk
        insn(0xb7, 3, 0, 0, 0),   // r3 = 0
        insn(0x85, 0, 0, 0, 124), // call sk_assign
        insn(0xbf, 1, 7, 0, 0),   // r1 = sk
        insn(0x85, 0, 0, 0, 86),  // call sk_release
    ];
    let pass = p.len();
    p.extend([
        insn(0xb7, 0, 0, 0, 1), // r0 = SK_PASS
        insn(0x95, 0, 0, 0, 0), // exit
    ]);
    for i in [2usize, 4, 14, 22] {
        let off = (pass as i64 - i as i64 - 1) as i16;
        p[i][2..4].copy_from_slice(&off.to_ne_bytes());
    }
    p
}

pub fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid fd and a pointer to an int of the length given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One worker's pair: the socket the program steers its relay ports to, and the raw socket
/// its relayed packets leave through.
pub struct WorkerSockets {
    pub recv: UdpSocket,
    pub raw: OwnedFd,
}

/// The process's steering: program, maps, the workers' sockets and the table of steered
/// ports.
pub struct Steering {
    ports: OwnedFd,
    _sockets: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
    workers: Mutex<Vec<Option<WorkerSockets>>>,
    /// Steered relay addresses; also the lock every relay bind of the process takes.
    held: Mutex<HashSet<SocketAddrV4>>,
    capacity: usize,
}

impl Steering {
    /// Loads and attaches the program for `workers` workers and up to `capacity` steered
    /// ports, with each worker's steered socket bound to `bind_ip` (a relay address).
    pub fn start(workers: usize, capacity: usize, bind_ip: Ipv4Addr) -> Result<Steering, String> {
        let entries = u32::try_from(capacity.max(1)).unwrap_or(u32::MAX);
        let ports = map_create(BPF_MAP_TYPE_HASH, 8, 4, entries)
            .map_err(|e| format!("BPF_MAP_CREATE hash of {entries} relay ports: {e}"))?;
        let n = u32::try_from(workers.max(1)).unwrap_or(1);
        let sockets = map_create(BPF_MAP_TYPE_SOCKMAP, 4, 8, n)
            .map_err(|e| format!("BPF_MAP_CREATE sockmap: {e}"))?;
        let mut pairs = Vec::with_capacity(workers);
        for w in 0..workers {
            let recv = steered_socket(bind_ip).map_err(|e| format!("steered socket: {e}"))?;
            let value = recv.as_raw_fd() as u64;
            map_update(
                sockets.as_raw_fd(),
                &(w as u32).to_ne_bytes(),
                &value.to_ne_bytes(),
            )
            .map_err(|e| format!("sockmap update: {e}"))?;
            let raw = raw_socket().map_err(|e| format!("raw socket (CAP_NET_RAW): {e}"))?;
            pairs.push(Some(WorkerSockets { recv, raw }));
        }
        let insns = program(ports.as_raw_fd(), sockets.as_raw_fd());
        let prog = load_sk_lookup(&insns)?;
        let link = attach_sk_lookup(&prog)?;
        // The workers' own sockets hold ports too: no allocation may be steered onto them.
        let mut held = HashSet::new();
        for p in pairs.iter().flatten() {
            if let Ok(SocketAddr::V4(a)) = p.recv.local_addr() {
                held.insert(a);
            }
        }
        Ok(Steering {
            ports,
            _sockets: sockets,
            _prog: prog,
            _link: link,
            workers: Mutex::new(pairs),
            held: Mutex::new(held),
            capacity,
        })
    }

    /// Worker `w`'s sockets (taken once, by that worker).
    pub fn take_worker(&self, w: usize) -> Option<WorkerSockets> {
        let mut g = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        g.get_mut(w).and_then(Option::take)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<SocketAddrV4>> {
        // A panic while holding the lock leaves a usable set.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `addr` for worker `w`: fails with `AddrInUse` when it is steered already or a
    /// socket is bound to it, `OutOfMemory`-like `Other` when the table is full.
    pub fn open(&self, addr: SocketAddrV4, w: usize) -> io::Result<()> {
        let mut held = self.lock();
        if held.contains(&addr) {
            return Err(io::Error::from(io::ErrorKind::AddrInUse));
        }
        if held.len() >= self.capacity {
            return Err(io::Error::other("steered relay table full"));
        }
        // Nobody bound there (this process's bound relays take the same lock to bind).
        drop(UdpSocket::bind(addr)?);
        map_update(
            self.ports.as_raw_fd(),
            &key(addr),
            &(w as u32).to_ne_bytes(),
        )?;
        held.insert(addr);
        Ok(())
    }

    /// Gives `addr` back: datagrams to it meet the normal lookup again (no socket: ICMP).
    pub fn close(&self, addr: SocketAddrV4) {
        let mut held = self.lock();
        if held.remove(&addr) {
            let _ = map_delete(self.ports.as_raw_fd(), &key(addr));
        }
    }

    /// Binds a relay socket unless its address is steered; the bind happens under the lock
    /// [`Steering::open`] takes, so the two never hand out the same port.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        let held = self.lock();
        if let SocketAddr::V4(a) = addr {
            if held.contains(&a) {
                return Err(io::Error::from(io::ErrorKind::AddrInUse));
            }
        }
        super::relay::bind(addr)
    }

    /// Steered ports held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn steered_socket(ip: Ipv4Addr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_nonblocking(true)?;
    // Every relay of the worker arrives here, where a socket per relay had a queue each: a
    // deep queue absorbs bursts. Past net.core.rmem_max with CAP_NET_ADMIN (which loading
    // the program needs anyway), else up to it.
    if setsockopt_int(
        s.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        STEERED_RCVBUF,
    )
    .is_err()
    {
        let _ = s.set_recv_buffer_size(STEERED_RCVBUF as usize);
    }
    s.bind(&SocketAddr::from((ip, 0)).into())?;
    setsockopt_int(s.as_raw_fd(), libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1)?;
    Ok(s.into())
}

fn raw_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = owned(fd);
    let _ = setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20);
    Ok(fd)
}

/// The original destination in a received control area (`IP_ORIGDSTADDR`), if there.
pub fn orig_dst(control: &[u8]) -> Option<SocketAddrV4> {
    // struct cmsghdr on 64-bit Linux: len (8), level (4), type (4), then the data.
    let mut at = 0usize;
    while at + 16 <= control.len() {
        let len = u64::from_ne_bytes(control[at..at + 8].try_into().ok()?) as usize;
        let level = i32::from_ne_bytes(control[at + 8..at + 12].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[at + 12..at + 16].try_into().ok()?);
        if len < 16 || at + len > control.len() {
            return None;
        }
        if level == libc::SOL_IP && kind == libc::IP_ORIGDSTADDR && len >= 16 + 8 {
            let d = &control[at + 16..];
            let port = u16::from_be_bytes([d[2], d[3]]);
            let ip = Ipv4Addr::new(d[4], d[5], d[6], d[7]);
            return Some(SocketAddrV4::new(ip, port));
        }
        at += (len + 7) & !7;
    }
    None
}

/// Writes the IPv4 and UDP headers of a datagram from `src` to `dst` into `out`
/// ([`HEADERS`] bytes), for `payload`. The kernel fills the IP checksum and id; the UDP
/// checksum is computed here.
pub fn write_headers(
    out: &mut [u8],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
    dont_fragment: bool,
) {
    let udp_len = (8 + payload.len()) as u16;
    let total = HEADERS as u16 + payload.len() as u16;
    out[0] = 0x45;
    out[1] = 0;
    out[2..4].copy_from_slice(&total.to_be_bytes());
    out[4..6].copy_from_slice(&[0, 0]);
    out[6..8].copy_from_slice(&(if dont_fragment { 0x4000u16 } else { 0 }).to_be_bytes());
    out[8] = 64;
    out[9] = 17;
    out[10..12].copy_from_slice(&[0, 0]);
    out[12..16].copy_from_slice(&src.ip().octets());
    out[16..20].copy_from_slice(&dst.ip().octets());
    out[20..22].copy_from_slice(&src.port().to_be_bytes());
    out[22..24].copy_from_slice(&dst.port().to_be_bytes());
    out[24..26].copy_from_slice(&udp_len.to_be_bytes());
    out[26..28].copy_from_slice(&[0, 0]);
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        let mut chunks = b.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    };
    add(&src.ip().octets());
    add(&dst.ip().octets());
    add(&[0, 17]);
    add(&udp_len.to_be_bytes());
    add(&out[20..28]);
    add(payload);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut c = !(sum as u16);
    if c == 0 {
        // RFC 768: a computed zero is sent as all ones (zero means "no checksum").
        c = 0xffff;
    }
    out[26..28].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_jumps_stay_inside_it_and_it_ends_with_exit() {
        let p = program(3, 4);
        for (i, ins) in p.iter().enumerate() {
            let code = ins[0];
            let is_jump = matches!(code & 0x07, 0x05) && code != 0x85 && code != 0x95;
            if is_jump {
                let off = i16::from_ne_bytes([ins[2], ins[3]]) as i64;
                let to = i as i64 + 1 + off;
                assert!(
                    to > i as i64 && (to as usize) < p.len(),
                    "insn {i} jumps to {to}"
                );
                assert_eq!(to as usize, p.len() - 2, "every early exit goes to pass");
            }
        }
        assert_eq!(p.last().map(|i| i[0]), Some(0x95));
    }

    #[test]
    fn the_udp_checksum_verifies_and_headers_carry_the_ports() {
        let src = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 9), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 5000);
        for payload in [&b"odd"[..], &b"even"[..], &[0u8; 0][..]] {
            let mut h = [0u8; HEADERS];
            write_headers(&mut h, src, dst, payload, true);
            assert_eq!(u16::from_be_bytes([h[20], h[21]]), 40000);
            assert_eq!(u16::from_be_bytes([h[22], h[23]]), 5000);
            assert_eq!(h[6] & 0x40, 0x40, "DF set");
            // The one's-complement sum over pseudo-header, header and payload is 0xffff.
            let mut all = Vec::new();
            all.extend_from_slice(&h[12..20]);
            all.extend_from_slice(&[0, 17]);
            all.extend_from_slice(&h[24..26]);
            all.extend_from_slice(&h[20..28]);
            all.extend_from_slice(payload);
            if all.len() % 2 == 1 {
                all.push(0);
            }
            let mut s: u32 = all
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .sum();
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            assert_eq!(s, 0xffff);
        }
    }

    #[test]
    fn orig_dst_reads_the_control_message_and_refuses_garbage() {
        let mut c = [0u8; CONTROL_LEN];
        c[..8].copy_from_slice(&(16u64 + 16).to_ne_bytes());
        c[8..12].copy_from_slice(&libc::SOL_IP.to_ne_bytes());
        c[12..16].copy_from_slice(&libc::IP_ORIGDSTADDR.to_ne_bytes());
        c[16..18].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        c[18..20].copy_from_slice(&40001u16.to_be_bytes());
        c[20..24].copy_from_slice(&[127, 0, 0, 7]);
        assert_eq!(
            orig_dst(&c),
            Some(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 7), 40001))
        );
        let mut bad = c;
        bad[..8].copy_from_slice(&1000u64.to_ne_bytes());
        assert_eq!(orig_dst(&bad), None);
        assert_eq!(orig_dst(&[0u8; 8]), None);
        assert_eq!(orig_dst(&[0u8; CONTROL_LEN]), None);
    }
}
