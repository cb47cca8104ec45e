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
        let bits: u128 = match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        };
        let mut h = self.seed ^ 0x9e37_79b9_7f4a_7c15;
        for part in [bits as u64, (bits >> 64) as u64] {
            h = (h ^ part).wrapping_mul(0xff51_afd7_ed55_8ccd);
            h ^= h >> 33;
        }
        (h as usize) % SLOTS
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
}
