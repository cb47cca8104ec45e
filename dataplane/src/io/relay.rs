//! Relay sockets: one UDP socket per allocation, bound to its own port (no `SO_REUSEPORT`, so
//! a port in use fails and the core tries another), the slot table both drivers use to name
//! them by socket index, and the process-wide table of reserved sockets the core names by
//! [`Reserved`] handle.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use socket2::{Domain, Protocol, Socket, Type};

use super::sockopt;
use super::steer::Steering;
use crate::turn::Reserved;

/// Binds a relay socket.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    let _ = s.set_recv_buffer_size(256 << 10);
    s.bind(&addr.into())?;
    Ok(s.into())
}

pub fn prepare(sock: &UdpSocket, dont_fragment: bool) -> io::Result<()> {
    sock.set_nonblocking(true)?;
    if dont_fragment {
        let v4 = sock.local_addr()?.is_ipv4();
        sockopt::set_dont_fragment(sock, v4)?;
    }
    Ok(())
}

/// Sockets bound for EVEN-PORT reservations and not yet adopted. Shared by all workers,
/// because a reservation made on one may be redeemed on another; touched only by Allocate
/// and by expiry, never per packet, so a lock is fine.
///
/// Also the process's one door to relay binds: with `turn.relay_mode = "shared"` it holds the
/// [`Steering`], and every bound relay ([`Reservations::bind`]) checks the steered ports
/// first.
#[derive(Default)]
pub struct Reservations {
    next: AtomicU64,
    sockets: Mutex<HashMap<u64, UdpSocket>>,
    steering: Option<Arc<Steering>>,
}

impl Reservations {
    /// Reservations for a process whose IPv4 relay ports are steered.
    pub fn with_steering(steering: Arc<Steering>) -> Reservations {
        Reservations {
            steering: Some(steering),
            ..Reservations::default()
        }
    }

    pub fn steering(&self) -> Option<&Arc<Steering>> {
        self.steering.as_ref()
    }

    /// Binds a relay socket ([`bind`]), never onto a steered port.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        match &self.steering {
            Some(s) => s.bind(addr),
            None => bind(addr),
        }
    }

    pub fn reserve(&self, addr: SocketAddr) -> io::Result<Reserved> {
        let s = self.bind(addr)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(id, s);
        Ok(Reserved(id))
    }

    /// The socket of a reservation, which leaves the table.
    pub fn take(&self, r: Reserved) -> Option<UdpSocket> {
        self.lock().remove(&r.0)
    }

    /// Closes a reserved socket.
    pub fn release(&self, r: Reserved) {
        drop(self.take(r));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, UdpSocket>> {
        // A panic while holding the lock leaves a usable map.
        self.sockets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Relay sockets of one worker by slot; socket index = `first + slot`. A generation per
/// slot tells completions of a closed socket from those of its successor in the same slot.
pub struct Slots<S> {
    first: usize,
    sockets: Vec<Option<S>>,
    generations: Vec<u16>,
    free: Vec<usize>,
}

impl<S> Slots<S> {
    pub fn new(first: usize) -> Slots<S> {
        Slots {
            first,
            sockets: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
        }
    }

    pub fn first(&self) -> usize {
        self.first
    }

    /// The socket index the next [`Slots::insert`] will use (for registering a socket under
    /// its index before storing it).
    pub fn next_index(&self) -> usize {
        self.first + self.free.last().copied().unwrap_or(self.sockets.len())
    }

    /// Stores a socket; returns its socket index and generation.
    pub fn insert(&mut self, s: S) -> (usize, u16) {
        let slot = match self.free.pop() {
            Some(i) => {
                self.sockets[i] = Some(s);
                self.generations[i] = self.generations[i].wrapping_add(1);
                i
            }
            None => {
                self.sockets.push(Some(s));
                self.generations.push(1);
                self.sockets.len() - 1
            }
        };
        (self.first + slot, self.generations[slot])
    }

    pub fn remove(&mut self, index: usize) -> Option<(S, u16)> {
        let slot = index.checked_sub(self.first)?;
        let s = self.sockets.get_mut(slot)?.take()?;
        self.free.push(slot);
        Some((s, self.generations[slot]))
    }

    pub fn get(&self, index: usize) -> Option<&S> {
        let slot = index.checked_sub(self.first)?;
        self.sockets.get(slot)?.as_ref()
    }

    pub fn get_mut(&mut self, index: usize) -> Option<&mut S> {
        let slot = index.checked_sub(self.first)?;
        self.sockets.get_mut(slot)?.as_mut()
    }

    /// Whether `index` is open with generation `generation`.
    pub fn is_current(&self, index: usize, generation: u16) -> bool {
        match index.checked_sub(self.first) {
            Some(slot) => {
                self.sockets.get(slot).is_some_and(|s| s.is_some())
                    && self.generations.get(slot) == Some(&generation)
            }
            None => false,
        }
    }

    pub fn generation(&self, index: usize) -> Option<u16> {
        let slot = index.checked_sub(self.first)?;
        self.generations.get(slot).copied()
    }

    pub fn len(&self) -> usize {
        self.sockets.len() - self.free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_holds_its_port_until_taken_or_released() {
        let r = Reservations::default();
        let a = r.reserve("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = r.reserve("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(a, b);
        assert_eq!(r.len(), 2);
        let sock = r.take(a).expect("reserved socket");
        let port = sock.local_addr().unwrap();
        // Bound without SO_REUSEPORT: nobody else gets the port while it is held.
        assert!(bind(port).is_err());
        assert!(r.take(a).is_none(), "a reservation is taken once");
        drop(sock);
        r.release(b);
        assert!(r.is_empty());
        r.release(b);
    }

    #[test]
    fn slots_reuse_with_new_generation() {
        let mut s: Slots<u32> = Slots::new(4);
        let (a, ga) = s.insert(10);
        assert_eq!(a, 4);
        assert!(s.is_current(a, ga));
        assert_eq!(s.remove(a), Some((10, ga)));
        assert!(!s.is_current(a, ga));
        let (b, gb) = s.insert(11);
        assert_eq!(b, a);
        assert_ne!(ga, gb);
        assert_eq!(s.get(b), Some(&11));
        assert_eq!(s.get(3), None);
        assert_eq!(s.len(), 1);
    }
}
