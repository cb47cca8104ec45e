//! `portico-perf echo-server`: the cheapest server the generator can be pointed at.
//!
//! It answers a STUN Binding request with a Binding success response carrying
//! XOR-MAPPED-ADDRESS and FINGERPRINT (the least a response must hold to pass the
//! generator's checks) and echoes any other datagram back unchanged, using batched
//! `recvmmsg`/`sendmmsg`. Whatever rate the generator reaches against it is the ceiling
//! of the generator plus the loopback path on this machine: a real server measured at that
//! rate is limited by the box, not by itself.
//!
//! With `--turn` it is instead the cheapest possible TURN relay ([`crate::turn_stub`]), the
//! reference for the TURN generator's ceiling.
//!
//! Bounded like every load loop here: it exits after `--duration`.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use portico_dataplane::stun::{attr, method, Class, Message, MessageWriter};
use socket2::Socket;

use crate::udp::{self, MsgBatch, BATCH};

#[derive(clap::Args, Debug, Clone)]
pub struct EchoArgs {
    /// Address to answer on; port 0 picks a free one (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Threads, each with its own SO_REUSEPORT socket.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Exit after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub duration: f64,
    /// Be a minimal TURN relay (no authentication; one relay socket per thread) for the TURN
    /// generator's ceiling, instead of an echo.
    #[arg(long)]
    pub turn: bool,
}

/// A running echo server.
pub struct EchoServer {
    pub local: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<std::io::Result<u64>>>,
}

/// How often a blocked thread wakes to look at the stop flag and the deadline.
const POLL: Duration = Duration::from_millis(100);

/// Writes the answer to `req` (received from `from`) into `out`; `None` means echo `req`.
pub fn answer(req: &[u8], from: SocketAddr, out: &mut [u8]) -> Option<usize> {
    let m = Message::parse(req).ok()?;
    if m.class() != Class::Request || m.method() != method::BINDING || !m.has_magic_cookie() {
        return None;
    }
    let mut w = MessageWriter::new(
        out,
        Class::SuccessResponse,
        method::BINDING,
        &m.transaction_id(),
    )
    .ok()?;
    w.add_xor_address(attr::XOR_MAPPED_ADDRESS, from).ok()?;
    w.add_fingerprint().ok()?;
    Some(w.finish())
}

fn serve(sock: Socket, stop: Arc<AtomicBool>, deadline: Instant) -> std::io::Result<u64> {
    let fd = sock.as_raw_fd();
    let mut batch = MsgBatch::new(BATCH, 2048, true);
    let mut out = [0u8; 64];
    let mut answered = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let n = match batch.recv(fd, libc::MSG_WAITFORONE) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        for i in 0..n {
            let Some(from) = batch.peer(i) else { continue };
            if let Some(len) = answer(batch.datagram(i), from, &mut out) {
                batch.slot_mut(i)[..len].copy_from_slice(&out[..len]);
                batch.set_len(i, len);
            }
        }
        let mut at = 0;
        while at < n {
            match batch.send(fd, at, n) {
                Ok(k) => at += k.max(1),
                // A client that went away (ICMP) or a full buffer: drop that one datagram.
                Err(_) => at += 1,
            }
        }
        answered += n as u64;
    }
    Ok(answered)
}

impl EchoServer {
    pub fn start(args: &EchoArgs) -> Result<EchoServer, String> {
        if !(1..=64).contains(&args.threads) {
            return Err("--threads must be 1..=64".into());
        }
        if !(args.duration > 0.0 && args.duration <= 24.0 * 3600.0) {
            return Err("--duration must be in (0, 86400] seconds".into());
        }
        let (socks, local) = udp::reuseport_sockets(args.listen, args.threads, POLL)
            .map_err(|e| format!("binding {}: {e}", args.listen))?;
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
        let mut threads = Vec::with_capacity(socks.len());
        for s in socks {
            let stop = stop.clone();
            if args.turn {
                let relay = udp::reuseport_sockets(SocketAddr::new(local.ip(), 0), 1, POLL)
                    .map_err(|e| format!("relay socket: {e}"))?
                    .0
                    .pop()
                    .ok_or("no relay socket")?;
                threads.push(std::thread::spawn(move || {
                    crate::turn_stub::serve(s, relay, &stop, deadline)
                }));
            } else {
                threads.push(std::thread::spawn(move || serve(s, stop, deadline)));
            }
        }
        Ok(EchoServer {
            local,
            stop,
            threads,
        })
    }

    /// Waits until the deadline (or a stop); returns the datagrams answered.
    pub fn wait(self) -> Result<u64, String> {
        let mut total = 0;
        for t in self.threads {
            total += t
                .join()
                .map_err(|_| "echo thread panicked".to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok(total)
    }

    pub fn stop(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_binding_and_echoes_the_rest() {
        let from: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let tid = [7u8; 12];
        let mut req = [0u8; 64];
        let n = crate::stun_load::write_request(&mut req, &tid).unwrap();
        let mut out = [0u8; 64];
        let len = answer(&req[..n], from, &mut out).unwrap();
        assert_eq!(crate::stun_load::check_response(&out[..len], from), Ok(()));
        assert_eq!(answer(b"not stun at all, just bytes", from, &mut out), None);
    }
}
