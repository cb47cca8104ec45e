//! The core's randomness, from a seed its driver draws: the core never asks the operating
//! system (nor std's `RandomState`, which does).
//!
//! Relay ports and reservation tokens must be hard for other clients to guess, so they come
//! from HMAC-SHA256 in counter mode keyed by the seed: a deterministic generator whose outputs
//! tell nothing of the key or of each other. The same seed gives the same choices, which the
//! tests rely on. Values that only need variety (Data-indication transaction ids, hash keys)
//! are drawn from it once and then stretched with cheap generators.

use aws_lc_rs::hmac;

pub struct Random {
    key: hmac::Key,
    counter: u64,
    block: [u8; 32],
    used: usize,
}

impl Random {
    pub fn new(seed: &[u8; 32]) -> Random {
        Random {
            key: hmac::Key::new(hmac::HMAC_SHA256, seed),
            counter: 0,
            block: [0; 32],
            used: 32,
        }
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.used == self.block.len() {
                self.counter += 1;
                let tag = hmac::sign(&self.key, &self.counter.to_be_bytes());
                self.block.copy_from_slice(&tag.as_ref()[..32]);
                self.used = 0;
            }
            *b = self.block[self.used];
            self.used += 1;
        }
    }

    pub fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill(&mut b);
        u32::from_le_bytes(b)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        u64::from_le_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_other_seed_other_stream() {
        let (mut a, mut b, mut c) = (
            Random::new(&[1; 32]),
            Random::new(&[1; 32]),
            Random::new(&[2; 32]),
        );
        let xs: Vec<u64> = (0..10).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..10).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..10).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        // Blocks are not repeated: 10 draws of 8 bytes span three HMAC blocks.
        let distinct: std::collections::BTreeSet<u64> = xs.iter().copied().collect();
        assert_eq!(distinct.len(), 10);
    }
}
