//! Per-source budget for error responses, so spoofed requests cannot turn Portico into a
//! reflector: a 401 challenge is several times larger than the request that provokes it.
//!
//! A fixed table of token buckets indexed by a keyed hash of the source IP: memory is
//! constant whatever the number of sources. Two sources that collide share a bucket, which
//! can only make the limit stricter, never looser.

use std::net::IpAddr;
use std::time::Instant;

const SLOTS: usize = 4096;

#[derive(Clone, Copy)]
struct Slot {
    ip: Option<IpAddr>,
    tokens: f32,
    last: Option<Instant>,
}

pub struct ErrorLimiter {
    slots: Box<[Slot]>,
    seed: u64,
}

impl ErrorLimiter {
    pub fn new(seed: u64) -> ErrorLimiter {
        ErrorLimiter {
            slots: vec![
                Slot {
                    ip: None,
                    tokens: 0.0,
                    last: None
                };
                SLOTS
            ]
            .into_boxed_slice(),
            seed,
        }
    }

    fn index(&self, ip: IpAddr) -> usize {
        Self::hash(self.seed, ip) % SLOTS
    }

    fn hash(seed: u64, ip: IpAddr) -> usize {
        let bits: u128 = match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        };
        let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
        for part in [bits as u64, (bits >> 64) as u64] {
            h = (h ^ part).wrapping_mul(0xff51_afd7_ed55_8ccd);
            h ^= h >> 33;
        }
        h as usize
    }

    /// Whether one more error response to `ip` is within `rate` per second (burst of
    /// twice the rate).
    pub fn allow(&mut self, ip: IpAddr, now: Instant, rate: u32) -> bool {
        let burst = (rate as f32) * 2.0;
        let i = self.index(ip);
        let s = &mut self.slots[i];
        if s.ip != Some(ip) {
            // A new source takes over the slot with a full budget; an attacker cycling
            // through many addresses still cannot exceed `burst` replies per address.
            *s = Slot {
                ip: Some(ip),
                tokens: burst,
                last: Some(now),
            };
        }
        let dt = s
            .last
            .map(|l| now.saturating_duration_since(l).as_secs_f32())
            .unwrap_or(0.0);
        s.last = Some(now);
        s.tokens = (s.tokens + dt * rate as f32).min(burst);
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Requests per source within the current second, shared by all workers: a fixed table of
/// atomic (second, count) words indexed by a keyed hash of the source. Constant memory under
/// a flood; two sources that collide share a count, which can only report early.
pub struct SharedMeter {
    slots: Box<[std::sync::atomic::AtomicU64]>,
    seed: u64,
}

const METER_SLOTS: usize = 1 << 16;

impl SharedMeter {
    /// `seed` keys the hash; the driver draws it.
    pub fn new(seed: u64) -> SharedMeter {
        SharedMeter {
            slots: (0..METER_SLOTS)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            seed,
        }
    }

    /// Counts one request; true exactly once per second in which `ip` goes above `rate`.
    pub fn over(&self, ip: IpAddr, unix: u64, rate: u32) -> bool {
        use std::sync::atomic::Ordering;
        if rate == 0 {
            return false;
        }
        let slot = &self.slots[ErrorLimiter::hash(self.seed, ip) % METER_SLOTS];
        let sec = unix & 0xffff_ffff;
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let count = if cur >> 32 == sec {
                (cur & 0xffff_ffff) + 1
            } else {
                1
            };
            let new = sec << 32 | count.min(0xffff_ffff);
            match slot.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return count == u64::from(rate) + 1,
                Err(v) => cur = v,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn limits_a_source_and_refills() {
        let mut l = ErrorLimiter::new(1);
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        let t0 = Instant::now();
        let allowed = (0..100).filter(|_| l.allow(ip, t0, 10)).count();
        assert_eq!(allowed, 20);
        assert!(!l.allow(ip, t0, 10));
        assert!(l.allow(ip, t0 + Duration::from_millis(150), 10));
        let other: IpAddr = "198.51.100.2".parse().unwrap();
        assert!(l.allow(other, t0, 10));
    }

    #[test]
    fn meter_fires_once_per_second_above_the_rate() {
        let m = SharedMeter::new(7);
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let fired: Vec<bool> = (0..12).map(|_| m.over(ip, 100, 10)).collect();
        assert_eq!(fired.iter().filter(|f| **f).count(), 1);
        assert!(fired[10]);
        assert!(!m.over(ip, 101, 10));
        assert!(!m.over(ip, 101, 0));
    }
}
