//! `portico-perf sk-lookup-probe`: does the descriptor-free relay design (docs/DESIGN.md,
//! "A million allocations") work on this kernel and with this process's privileges?
//!
//! It attaches an eBPF `sk_lookup` program to this network namespace that steers every UDP
//! datagram for the relay addresses and port range given to ONE socket; datagrams are sent
//! from a client socket to a spread of (address, port) pairs of that range, and the one
//! socket reads each with `IP_RECVORIGDSTADDR`, checking that the original destination is
//! the one sent to. Each is answered from its relayed address and port through a raw socket
//! (`IPPROTO_RAW`, i.e. `IP_HDRINCL`), and the client checks that the answer comes from the
//! address it sent to. Three descriptors (and the program's two) serve the whole range,
//! where a socket per relay would need one each. Loopback only; bounded in count and time;
//! the program is detached when the link descriptor closes (at exit at the latest).
//!
//! The program is assembled here (no compiler, no libbpf): 25 instructions.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use portico_dataplane::io::steer::{
    attach_sk_lookup, insn, load_sk_lookup, map_create, map_update, owned, setsockopt_int,
    BPF_MAP_TYPE_SOCKMAP,
};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(clap::Args, Debug, Clone)]
pub struct ProbeArgs {
    /// Relay addresses steered (loopback; the program applies to the whole network
    /// namespace while it runs, so the defaults are addresses nothing else here uses).
    #[arg(long, value_delimiter = ',', default_value = "127.77.0.2,127.77.0.3")]
    pub ips: Vec<Ipv4Addr>,
    #[arg(long, default_value_t = 16384)]
    pub low: u16,
    #[arg(long, default_value_t = 65535)]
    pub high: u16,
    /// Datagrams sent, spread over the range.
    #[arg(long, default_value_t = 20_000)]
    pub packets: u32,
    #[arg(long, default_value_t = 30)]
    pub time_limit: u64,
}

#[derive(Serialize, Debug, Default)]
pub struct ProbeReport {
    pub relay_addresses: u64,
    pub sent: u64,
    pub received: u64,
    pub orig_dst_ok: u64,
    pub answered_from_relay_ok: u64,
    pub descriptors: u64,
    pub slab_kib_delta: i64,
    pub elapsed_secs: f64,
}

/// The program: UDP, local port in [low, high], local address one of `ips` → the socket in
/// slot 0 of the sockmap; anything else → the normal lookup.
fn program(map_fd: RawFd, ips: &[Ipv4Addr], low: u16, high: u16) -> Vec<[u8; 8]> {
    // struct bpf_sk_lookup offsets.
    const PROTOCOL: i16 = 12;
    const LOCAL_IP4: i16 = 40;
    const LOCAL_PORT: i16 = 60;
    let mut p = vec![
        insn(0xbf, 6, 1, 0, 0),               // r6 = ctx
        insn(0x61, 2, 6, PROTOCOL, 0),        // r2 = ctx->protocol
        insn(0x55, 2, 0, 0, 17),              // if r2 != UDP goto pass (patched)
        insn(0x61, 2, 6, LOCAL_PORT, 0),      // r2 = ctx->local_port (host order)
        insn(0xa5, 2, 0, 0, i32::from(low)),  // if r2 < low goto pass
        insn(0x25, 2, 0, 0, i32::from(high)), // if r2 > high goto pass
        insn(0x61, 2, 6, LOCAL_IP4, 0),       // r2 = ctx->local_ip4 (network order)
    ];
    let jumps_to_pass = [2usize, 4, 5];
    let first_ip = p.len();
    for ip in ips {
        let v = u32::from_ne_bytes(ip.octets()) as i32;
        p.push(insn(0x16, 2, 0, 0, v)); // if w2 == ip goto match (patched)
    }
    let goto_pass = p.len();
    p.push(insn(0x05, 0, 0, 0, 0)); // goto pass (patched)
    let matched = p.len();
    p.extend([
        insn(0x62, 10, 0, -4, 0),    // *(u32 *)(r10 - 4) = 0
        insn(0xbf, 2, 10, 0, 0),     // r2 = r10
        insn(0x07, 2, 0, 0, -4),     // r2 += -4
        insn(0x18, 1, 1, 0, map_fd), // r1 = map (ld_imm64, pseudo map fd)
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
    ]);
    let null_check = matched + 6;
    let pass = p.len();
    p.extend([
        insn(0xb7, 0, 0, 0, 1), // r0 = SK_PASS
        insn(0x95, 0, 0, 0, 0), // exit
    ]);
    let rel = |from: usize, to: usize| (to as i64 - from as i64 - 1) as i16;
    let mut set_off = |i: usize, to: usize| {
        let off = rel(i, to);
        p[i][2..4].copy_from_slice(&off.to_ne_bytes());
    };
    for i in jumps_to_pass {
        set_off(i, pass);
    }
    for k in 0..ips.len() {
        set_off(first_ip + k, matched);
    }
    set_off(goto_pass, pass);
    set_off(null_check, pass);
    p
}

/// One datagram and its original destination (`IP_ORIGDSTADDR`).
fn recv_orig(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddrV4, Option<SocketAddrV4>)> {
    // SAFETY: plain C structs; all-zero is their empty value.
    let mut from: libc::sockaddr_in = unsafe { mem::zeroed() };
    let mut ctrl = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut h: libc::msghdr = unsafe { mem::zeroed() };
    h.msg_name = (&mut from as *mut libc::sockaddr_in).cast();
    h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as u32;
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    h.msg_control = ctrl.as_mut_ptr().cast();
    h.msg_controllen = mem::size_of_val(&ctrl);
    // SAFETY: every pointer in `h` refers to live buffers of the lengths given.
    let n = unsafe { libc::recvmsg(fd, &mut h, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let src = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr)),
        u16::from_be(from.sin_port),
    );
    let mut orig = None;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled, within
    // msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_IP && (*c).cmsg_type == libc::IP_ORIGDSTADDR {
                let sa = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::sockaddr_in>());
                orig = Some(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                    u16::from_be(sa.sin_port),
                ));
            }
            c = libc::CMSG_NXTHDR(&h, c);
        }
    }
    Ok((n as usize, src, orig))
}

/// An IPv4 + UDP datagram from `src` to `dst` (UDP checksum 0: optional over IPv4).
fn raw_datagram(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    // The kernel fills the IP header checksum (and the id) for IP_HDRINCL sockets.
    p[20..22].copy_from_slice(&src.port().to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

fn slab_kib() -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("Slab:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub fn run(args: &ProbeArgs) -> Result<ProbeReport, String> {
    if args.ips.is_empty() || args.ips.iter().any(|ip| !ip.is_loopback()) {
        return Err("--ips must be loopback addresses".into());
    }
    if args.low > args.high || args.low < 1024 {
        return Err("--low..--high must be a range of unprivileged ports".into());
    }
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(args.time_limit);
    let slab0 = slab_kib();
    // The one relay socket, bound anywhere: the program hands it the whole range.
    let relay = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    setsockopt_int(relay.as_raw_fd(), libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1)
        .map_err(|e| format!("IP_RECVORIGDSTADDR: {e}"))?;
    let map = map_create(BPF_MAP_TYPE_SOCKMAP, 4, 8, 1)
        .map_err(|e| format!("BPF_MAP_CREATE sockmap: {e}"))?;
    let value: u64 = relay.as_raw_fd() as u64;
    map_update(map.as_raw_fd(), &0u32.to_ne_bytes(), &value.to_ne_bytes())
        .map_err(|e| format!("sockmap update: {e}"))?;
    let insns = program(map.as_raw_fd(), &args.ips, args.low, args.high);
    let prog = load_sk_lookup(&insns)?;
    let link = attach_sk_lookup(&prog)?;
    // SAFETY: socket(2) with constant arguments.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if raw < 0 {
        return Err(format!("raw socket: {}", io::Error::last_os_error()));
    }
    let raw = owned(raw);
    // The client on 127.0.0.1, which the program leaves alone.
    let client = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("client bind: {e}"))?;
    client.set_nonblocking(true).map_err(|e| e.to_string())?;
    let client_addr = match client.local_addr().map_err(|e| e.to_string())? {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => return Err("client is not IPv4".into()),
    };
    let span = u32::from(args.high - args.low) + 1;
    let mut r = ProbeReport {
        relay_addresses: u64::from(span) * args.ips.len() as u64,
        ..Default::default()
    };
    let mut buf = [0u8; 2048];
    let mut x: u32 = 0x1234_5678;
    for i in 0..args.packets {
        if Instant::now() > deadline {
            break;
        }
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let ip = args.ips[(x as usize / span as usize) % args.ips.len()];
        let dst = SocketAddrV4::new(ip, (u32::from(args.low) + x % span) as u16);
        let payload = i.to_be_bytes();
        if client.send_to(&payload, dst).is_ok() {
            r.sent += 1;
        }
        // Read it on the one relay socket (bounded wait).
        let until = Instant::now() + Duration::from_millis(200);
        let got = loop {
            match recv_orig(relay.as_raw_fd(), &mut buf) {
                Ok(x) => break Some(x),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < until => {
                    std::hint::spin_loop();
                }
                Err(_) => break None,
            }
        };
        let Some((n, from, orig)) = got else {
            continue;
        };
        r.received += 1;
        if orig == Some(dst) && n == 4 && buf[..4] == payload && from == client_addr {
            r.orig_dst_ok += 1;
        }
        // Answer from the relayed address and port, through the raw socket.
        let d = raw_datagram(dst, client_addr, &payload);
        let to = SocketAddr::V4(client_addr);
        let sa = socket2::SockAddr::from(to);
        // SAFETY: `d` and `sa` are live for the call; lengths given.
        let sent = unsafe {
            libc::sendto(
                raw.as_raw_fd(),
                d.as_ptr().cast(),
                d.len(),
                0,
                sa.as_ptr().cast(),
                sa.len(),
            )
        };
        if sent < 0 {
            continue;
        }
        let until = Instant::now() + Duration::from_millis(200);
        loop {
            match client.recv_from(&mut buf) {
                Ok((n, SocketAddr::V4(src))) => {
                    if src == dst && n == 4 && buf[..4] == payload {
                        r.answered_from_relay_ok += 1;
                    }
                    break;
                }
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < until => {
                    std::hint::spin_loop();
                }
                Err(_) => break,
            }
        }
    }
    r.descriptors = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    r.slab_kib_delta = slab_kib() - slab0;
    r.elapsed_secs = t0.elapsed().as_secs_f64();
    drop(link);
    drop(prog);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_jumps_stay_inside_it() {
        let p = program(3, &[Ipv4Addr::new(127, 0, 0, 2)], 16384, 65535);
        for (i, ins) in p.iter().enumerate() {
            let code = ins[0];
            let is_jump = matches!(code & 0x07, 0x05 | 0x06) && code != 0x85 && code != 0x95;
            if is_jump {
                let off = i16::from_ne_bytes([ins[2], ins[3]]) as i64;
                let to = i as i64 + 1 + off;
                assert!(
                    to > i as i64 && (to as usize) < p.len(),
                    "insn {i} jumps to {to}"
                );
            }
        }
        assert_eq!(p.last().unwrap()[0], 0x95, "ends with exit");
    }

    /// The real thing, where this process may load BPF (CAP_BPF or CAP_SYS_ADMIN, with
    /// CAP_NET_ADMIN and CAP_NET_RAW): a thousand datagrams to random ports of the range
    /// reach the one socket with their original destination, and the answers leave from it.
    #[test]
    fn a_port_range_reaches_one_socket_and_answers_leave_from_the_relayed_port() {
        let args = ProbeArgs {
            ips: vec![Ipv4Addr::new(127, 77, 0, 2), Ipv4Addr::new(127, 77, 0, 3)],
            low: 40000,
            high: 49999,
            packets: 1000,
            time_limit: 20,
        };
        let r = match run(&args) {
            Ok(r) => r,
            Err(e) if e.contains("Operation not permitted") => {
                eprintln!("SKIPPED sk_lookup probe: this process may not load BPF: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(r.relay_addresses, 20_000);
        assert_eq!(r.sent, 1000);
        assert_eq!(r.orig_dst_ok, 1000, "{r:?}");
        assert_eq!(r.answered_from_relay_ok, 1000, "{r:?}");
    }
}
