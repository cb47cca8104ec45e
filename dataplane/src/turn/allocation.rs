//! One TURN allocation and the per-worker table of them.
//!
//! Allocations are owned by the worker whose listen socket received the Allocate: the kernel
//! spreads `SO_REUSEPORT` traffic by the 4-tuple, so every later packet of that client 5-tuple
//! reaches the same worker, and the relay socket is that worker's too. The table is therefore
//! private to its worker: lookups on the packet path take no lock and share no cache line.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::auth::{Integrity, Key};

pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug)]
pub struct Permission {
    pub ip: IpAddr,
    pub expires: Instant,
}

#[derive(Clone, Copy, Debug)]
pub struct Channel {
    pub number: u16,
    pub peer: SocketAddr,
    pub expires: Instant,
}

/// A byte budget refilled continuously: the optional per-allocation bandwidth cap.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(now: Instant, rate: u64) -> Bucket {
        Bucket {
            tokens: rate as f64,
            last: now,
        }
    }

    /// Takes `n` bytes if the budget allows; `rate` 0 means unlimited.
    pub fn take(&mut self, now: Instant, rate: u64, n: usize) -> bool {
        if rate == 0 {
            return true;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * rate as f64).min(rate as f64);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Traffic {
    pub packets_to_peer: u64,
    pub bytes_to_peer: u64,
    pub packets_to_client: u64,
    pub bytes_to_client: u64,
}

/// One relayed transport address of an allocation and the relay socket behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relay {
    /// The driver's socket index.
    pub socket: usize,
    /// Address the relay socket is bound to.
    pub local: SocketAddr,
    /// Address told to the client (external_ip when behind a static NAT map).
    pub public: SocketAddr,
}

#[derive(Debug)]
pub struct Allocation {
    pub id: u64,
    pub client: SocketAddr,
    /// Listen socket the client talks to; replies and relayed data leave from it.
    pub listen_socket: usize,
    /// The relayed address of the family the Allocate asked for (IPv4 unless
    /// REQUESTED-ADDRESS-FAMILY said IPv6).
    pub relay: Relay,
    /// The other family's relayed address of a dual allocation (ADDITIONAL-ADDRESS-FAMILY,
    /// RFC 8656 §7.2). Permissions and channels are per IP address, so per family: each
    /// peer is reached from the relay of its own family.
    pub second: Option<Relay>,
    /// An RFC 6062 TCP allocation: `relay` is a listening TCP socket.
    pub tcp: bool,
    /// The ADDRESS-ERROR-CODE of the Allocate's answer (the additional family could not be
    /// served: 440 or 508), repeated to a retransmission.
    pub family_error: Option<u16>,
    pub created: Instant,
    pub expires: Instant,
    /// Transaction of the Allocate that made it: a retransmission gets the same answer.
    pub tid: [u8; 12],
    pub username: Box<str>,
    pub key: Key,
    pub integrity: Integrity,
    pub reservation_token: Option<[u8; 8]>,
    pub permissions: Vec<Permission>,
    pub channels: Vec<Channel>,
    pub traffic: Traffic,
    pub up: Bucket,
    pub down: Bucket,
}

impl Allocation {
    /// The relayed addresses, the requested family's first.
    pub fn relays(&self) -> impl Iterator<Item = &Relay> {
        std::iter::once(&self.relay).chain(self.second.as_ref())
    }

    /// The relay of a family, if the allocation has one.
    pub fn relay_for(&self, v4: bool) -> Option<&Relay> {
        self.relays().find(|r| r.local.is_ipv4() == v4)
    }

    pub fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .iter()
            .any(|p| p.ip == ip && p.expires > now)
    }

    pub fn channel_by_number(&self, number: u16, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
    }

    pub fn channel_by_peer(&self, peer: SocketAddr, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
    }

    /// When something of this allocation next expires: itself, a permission or a channel
    /// (bounded by the per-allocation quotas, so this is not a scan of the table).
    pub fn deadline(&self) -> Instant {
        let p = self.permissions.iter().map(|p| p.expires);
        let c = self.channels.iter().map(|c| c.expires);
        p.chain(c).fold(self.expires, Instant::min)
    }
}

/// Buckets of the [`Wheel`]: one per second, so a deadline up to 68 minutes ahead is in its
/// own bucket; later ones (`turn.max_lifetime` allows a day) share a bucket with earlier
/// rotations and are passed over, in O(1) each, once per rotation.
const WHEEL_BUCKETS: usize = 4096;
const NO_POS: (u32, u32) = (u32::MAX, u32::MAX);

/// The next deadline of every slot on a hashed timing wheel of one-second ticks: scheduling,
/// rescheduling and cancelling are O(1) (an entry knows its place; removal swaps the last
/// entry of the bucket into it), and a tick looks only at the buckets of the seconds that
/// passed, so expiry costs per expiring allocation, not per allocation held. A deadline is
/// rounded up to its tick: it fires at the first drain at or after it, never before.
pub struct Wheel {
    /// Tick 0: the time of the first [`Wheel::start`] (or of the first deadline, if earlier
    /// than any start). Deadlines before it are due at the first drain.
    base: Option<Instant>,
    buckets: Vec<Vec<(u32, u64)>>,
    /// Per slot: its bucket and index there, or [`NO_POS`].
    pos: Vec<(u32, u32)>,
    /// The first tick not yet drained.
    next: u64,
    len: usize,
    /// Entries looked at by [`Wheel::due`] (due or not), for the tests' cost checks.
    examined: u64,
}

impl Default for Wheel {
    fn default() -> Wheel {
        Wheel::new()
    }
}

impl Wheel {
    pub fn new() -> Wheel {
        Wheel {
            base: None,
            buckets: (0..WHEEL_BUCKETS).map(|_| Vec::new()).collect(),
            pos: Vec::new(),
            next: 0,
            len: 0,
            examined: 0,
        }
    }

    /// Sets tick 0 to `now` unless already set: the caller's present, so that deadlines
    /// scheduled later (never before their own present) all fall at or after it.
    pub fn start(&mut self, now: Instant) {
        self.base.get_or_insert(now);
    }

    /// Slots with a deadline.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn tick_of(&mut self, at: Instant) -> u64 {
        let base = *self.base.get_or_insert(at);
        let d = at.saturating_duration_since(base);
        let t = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        // Nothing goes into a tick already drained: it would wait a whole rotation.
        t.max(self.next)
    }

    /// The tick a slot is scheduled at.
    fn scheduled(&self, slot: usize) -> Option<u64> {
        let &(b, i) = self.pos.get(slot)?;
        if (b, i) == NO_POS {
            return None;
        }
        self.buckets[b as usize].get(i as usize).map(|e| e.1)
    }

    /// Sets the deadline of `slot` (replacing any).
    pub fn schedule(&mut self, slot: usize, at: Instant) {
        self.cancel(slot);
        let tick = self.tick_of(at);
        let b = (tick % WHEEL_BUCKETS as u64) as usize;
        if slot >= self.pos.len() {
            self.pos.resize(slot + 1, NO_POS);
        }
        self.pos[slot] = (b as u32, self.buckets[b].len() as u32);
        self.buckets[b].push((slot as u32, tick));
        self.len += 1;
    }

    /// Moves the deadline of `slot` to `at` if that is earlier (or it had none).
    pub fn schedule_earlier(&mut self, slot: usize, at: Instant) {
        let tick = self.tick_of(at);
        if self.scheduled(slot).is_none_or(|t| tick < t) {
            self.schedule(slot, at);
        }
    }

    pub fn cancel(&mut self, slot: usize) {
        let Some(&(b, i)) = self.pos.get(slot) else {
            return;
        };
        if (b, i) == NO_POS {
            return;
        }
        let bucket = &mut self.buckets[b as usize];
        bucket.swap_remove(i as usize);
        if let Some(&(moved, _)) = bucket.get(i as usize) {
            self.pos[moved as usize] = (b, i);
        }
        self.pos[slot] = NO_POS;
        self.len -= 1;
    }

    /// Takes out the slots whose deadline is at or before `now`, appending them to `out`.
    pub fn due(&mut self, now: Instant, out: &mut Vec<usize>) {
        let Some(base) = self.base else {
            return;
        };
        if now < base {
            return;
        }
        let now_tick = now.duration_since(base).as_secs();
        if now_tick < self.next {
            return;
        }
        // After a long stall every bucket is looked at once, not once per missed second.
        let ticks = (now_tick - self.next + 1).min(WHEEL_BUCKETS as u64);
        for k in 0..ticks {
            let b = ((self.next + k) % WHEEL_BUCKETS as u64) as usize;
            let mut i = 0;
            while i < self.buckets[b].len() {
                let (slot, tick) = self.buckets[b][i];
                self.examined += 1;
                if tick <= now_tick {
                    // cancel() swaps the last entry into `i`: look at `i` again.
                    self.cancel(slot as usize);
                    out.push(slot as usize);
                } else {
                    i += 1;
                }
            }
        }
        self.next = now_tick + 1;
    }
}

/// A keyed multiply-xorshift hash for the client lookup on the packet path: several times
/// cheaper than SipHash, and the random key (drawn by the core from its driver's seed) keeps
/// collisions unpredictable (the table only ever holds authenticated allocations, bounded by
/// quota).
#[derive(Clone)]
pub struct FastState(u64);

impl FastState {
    pub fn new(key: u64) -> FastState {
        FastState(key | 1)
    }
}

pub struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        let h = self.0;
        (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (h >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(23) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }

    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

impl std::hash::BuildHasher for FastState {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(self.0)
    }
}

/// The allocations of one worker, found by client 5-tuple or by relay socket.
pub struct Table {
    slots: Vec<Option<Allocation>>,
    free: Vec<usize>,
    by_client: HashMap<(SocketAddr, usize), usize, FastState>,
    /// Relay socket index -> slot + 1 (0: none); socket indices are small and dense.
    by_relay: Vec<u32>,
    /// Allocation id -> slot, for the control plane's delete requests.
    by_id: HashMap<u64, usize, FastState>,
    /// Each slot's next deadline ([`Allocation::deadline`] or earlier).
    timers: Wheel,
    /// Slots whose traffic moved since [`Table::take_touched`] (listed once each).
    touched: Vec<u32>,
    is_touched: Vec<bool>,
}

impl Table {
    /// `key` keys the client-lookup hash.
    pub fn new(key: u64) -> Table {
        Table {
            slots: Vec::new(),
            free: Vec::new(),
            by_client: HashMap::with_hasher(FastState::new(key)),
            by_relay: Vec::new(),
            by_id: HashMap::with_hasher(FastState::new(key.rotate_left(32))),
            timers: Wheel::new(),
            touched: Vec::new(),
            is_touched: Vec::new(),
        }
    }

    pub fn by_id(&self, id: u64) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    /// Sets a slot's timer to the allocation's next deadline (after a refresh or a prune;
    /// a later deadline may also just wait for the earlier timer to fire).
    pub fn reschedule(&mut self, slot: usize) {
        if let Some(at) = self.get(slot).map(Allocation::deadline) {
            self.timers.schedule(slot, at);
        }
    }

    /// Brings a slot's timer forward to `at` if that is earlier (a new permission or
    /// channel expiring before everything else of the allocation).
    pub fn schedule_earlier(&mut self, slot: usize, at: Instant) {
        if self.get(slot).is_some() {
            self.timers.schedule_earlier(slot, at);
        }
    }

    /// The slots whose timer is due at `now` (their deadline passed: expire or prune them,
    /// then [`Table::reschedule`] the ones that stay).
    pub fn due(&mut self, now: Instant, out: &mut Vec<usize>) {
        self.timers.due(now, out);
    }

    /// Notes that a slot's traffic figures changed (once per slot until taken).
    pub fn touch(&mut self, slot: usize) {
        if slot >= self.is_touched.len() {
            self.is_touched.resize(slot + 1, false);
        }
        if !self.is_touched[slot] {
            self.is_touched[slot] = true;
            self.touched.push(slot as u32);
        }
    }

    /// The slots touched since the last call, appended to `out`.
    pub fn take_touched(&mut self, out: &mut Vec<usize>) {
        for s in self.touched.drain(..) {
            self.is_touched[s as usize] = false;
            out.push(s as usize);
        }
    }

    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }

    pub fn by_client(&self, client: SocketAddr, listen_socket: usize) -> Option<usize> {
        self.by_client.get(&(client, listen_socket)).copied()
    }

    pub fn by_relay(&self, socket: usize) -> Option<usize> {
        match self.by_relay.get(socket) {
            Some(&v) if v > 0 => Some(v as usize - 1),
            _ => None,
        }
    }

    pub fn get(&self, slot: usize) -> Option<&Allocation> {
        self.slots.get(slot).and_then(|s| s.as_ref())
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Allocation> {
        self.slots.get_mut(slot).and_then(|s| s.as_mut())
    }

    pub fn insert(&mut self, a: Allocation) -> usize {
        let key = (a.client, a.listen_socket);
        let (id, deadline, created) = (a.id, a.deadline(), a.created);
        let sockets: Vec<usize> = a.relays().map(|r| r.socket).collect();
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s] = Some(a);
                s
            }
            None => {
                self.slots.push(Some(a));
                self.slots.len() - 1
            }
        };
        self.by_client.insert(key, slot);
        self.by_id.insert(id, slot);
        self.timers.start(created);
        self.timers.schedule(slot, deadline);
        for relay in sockets {
            if relay >= self.by_relay.len() {
                self.by_relay.resize(relay + 1, 0);
            }
            self.by_relay[relay] = slot as u32 + 1;
        }
        slot
    }

    pub fn remove(&mut self, slot: usize) -> Option<Allocation> {
        let a = self.slots.get_mut(slot)?.take()?;
        self.by_client.remove(&(a.client, a.listen_socket));
        self.by_id.remove(&a.id);
        self.timers.cancel(slot);
        for r in a.relays() {
            if let Some(v) = self.by_relay.get_mut(r.socket) {
                *v = 0;
            }
        }
        self.free.push(slot);
        Some(a)
    }

    /// Takes one family's relay out of a dual allocation (the other stays, and becomes
    /// [`Allocation::relay`] if it was the second), with the permissions and channels of
    /// that family. Returns the relay and how many permissions and channels went; `None`
    /// when the allocation has no second relay or none of that family.
    pub fn remove_relay(&mut self, slot: usize, v4: bool) -> Option<(Relay, usize, usize)> {
        let a = self.slots.get_mut(slot)?.as_mut()?;
        let second = a.second?;
        let gone = if a.relay.local.is_ipv4() == v4 {
            std::mem::replace(&mut a.relay, second)
        } else if second.local.is_ipv4() == v4 {
            second
        } else {
            return None;
        };
        a.second = None;
        let (p, c) = (a.permissions.len(), a.channels.len());
        a.permissions.retain(|p| p.ip.is_ipv4() != v4);
        a.channels.retain(|c| c.peer.is_ipv4() != v4);
        let (p, c) = (p - a.permissions.len(), c - a.channels.len());
        if let Some(v) = self.by_relay.get_mut(gone.socket) {
            *v = 0;
        }
        Some((gone, p, c))
    }

    pub fn slots(&self) -> impl Iterator<Item = (usize, &Allocation)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|a| (i, a)))
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod wheel_tests {
    use super::*;
    use std::collections::BTreeMap;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn wheel(t0: Instant) -> Wheel {
        let mut w = Wheel::new();
        w.start(t0);
        w
    }

    fn due(w: &mut Wheel, at: Instant) -> Vec<usize> {
        let mut out = Vec::new();
        w.due(at, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn a_deadline_fires_at_its_second_never_before() {
        let t0 = Instant::now();
        let mut w = wheel(t0);
        w.schedule(7, t0 + secs(10.5));
        w.schedule(3, t0 + secs(2.0));
        assert!(due(&mut w, t0 + secs(1.9)).is_empty());
        assert_eq!(due(&mut w, t0 + secs(2.0)), vec![3]);
        assert!(due(&mut w, t0 + secs(10.4)).is_empty());
        assert_eq!(due(&mut w, t0 + secs(11.0)), vec![7]);
        assert!(w.is_empty());
    }

    #[test]
    fn reschedule_cancel_and_earlier_keep_one_deadline_per_slot() {
        let t0 = Instant::now();
        let mut w = wheel(t0);
        for slot in 0..5 {
            w.schedule(slot, t0 + secs(100.0));
        }
        // Same bucket: cancelling one swaps another into its place.
        w.cancel(1);
        w.schedule(2, t0 + secs(50.0));
        w.schedule_earlier(3, t0 + secs(200.0)); // later: ignored
        w.schedule_earlier(4, t0 + secs(20.0));
        assert_eq!(w.len(), 4);
        assert_eq!(due(&mut w, t0 + secs(20.0)), vec![4]);
        assert_eq!(due(&mut w, t0 + secs(50.0)), vec![2]);
        assert_eq!(due(&mut w, t0 + secs(100.0)), vec![0, 3]);
        assert!(w.is_empty());
    }

    /// Deadlines past one rotation of the wheel (a day-long lifetime), and a stall of the
    /// caller longer than a rotation, still fire once, at or after their second.
    #[test]
    fn far_deadlines_and_long_stalls() {
        let t0 = Instant::now();
        let mut w = wheel(t0);
        w.schedule(0, t0);
        w.schedule(1, t0 + secs(86_400.0));
        w.schedule(2, t0 + secs(5.0));
        assert_eq!(due(&mut w, t0 + secs(3.0)), vec![0]);
        assert_eq!(due(&mut w, t0 + secs(5000.0)), vec![2]);
        assert!(due(&mut w, t0 + secs(86_399.0)).is_empty());
        assert_eq!(due(&mut w, t0 + secs(86_400.0)), vec![1]);
        // A deadline already in the past is due at the next drain.
        w.schedule(9, t0 + secs(10.0));
        assert_eq!(due(&mut w, t0 + secs(86_401.0)), vec![9]);
    }

    /// Against a plain map of deadlines, under random schedules, cancels and drains: the
    /// wheel returns exactly the slots whose deadline passed.
    #[test]
    fn matches_a_model_under_random_operations() {
        let t0 = Instant::now();
        let mut w = wheel(t0);
        let mut model: BTreeMap<usize, Instant> = BTreeMap::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut now = t0;
        for _ in 0..20_000 {
            let slot = rnd(300) as usize;
            match rnd(10) {
                0..=4 => {
                    let at = now + Duration::from_millis(rnd(10_000_000));
                    w.schedule(slot, at);
                    model.insert(slot, at);
                }
                5 => {
                    let at = now + Duration::from_millis(rnd(600_000));
                    w.schedule_earlier(slot, at);
                    let e = model.entry(slot).or_insert(at);
                    // Earlier only when the rounded-up second is earlier.
                    let tick = |i: Instant| i.saturating_duration_since(t0).as_secs_f64().ceil();
                    if tick(at) < tick(*e) {
                        *e = at;
                    }
                }
                6 => {
                    w.cancel(slot);
                    model.remove(&slot);
                }
                _ => {
                    now += Duration::from_millis(rnd(200_000));
                    let got = due(&mut w, now);
                    let want: Vec<usize> = model
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(s, _)| *s)
                        .collect();
                    // Rounding up to the second may hold a deadline of this second back.
                    for s in &got {
                        assert!(model[s] <= now, "slot {s} fired early");
                    }
                    for s in &want {
                        let late = now.duration_since(model[s]) >= Duration::from_secs(1);
                        assert!(got.contains(s) || !late, "slot {s} missed");
                    }
                    for s in &got {
                        model.remove(s);
                    }
                    assert_eq!(w.len(), model.len());
                }
            }
        }
    }

    /// The point of the wheel: with 100,000 deadlines ten minutes away, a minute of
    /// once-a-second ticks looks at none of them, and each expiry looks at its own entry.
    #[test]
    fn ticks_cost_nothing_per_allocation_held() {
        let t0 = Instant::now();
        let mut w = wheel(t0);
        w.schedule(0, t0);
        for slot in 1..=100_000 {
            w.schedule(slot, t0 + secs(600.0 + (slot % 60) as f64));
        }
        for s in 1..=60 {
            due(&mut w, t0 + secs(f64::from(s)));
        }
        assert_eq!(w.examined, 1, "only the entry due at t0 was looked at");
        let mut out = Vec::new();
        for s in 600..=660 {
            w.due(t0 + secs(f64::from(s)), &mut out);
        }
        assert_eq!(out.len(), 100_000);
        assert_eq!(w.examined, 100_001);
    }
}
