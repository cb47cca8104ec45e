//! The configuration block: the canonical TOML of the running configuration under a
//! sequence lock. The control plane is the only writer; the dataplane polls the generation
//! (one atomic load) and re-reads the text when it changes, so a new configuration needs no
//! restart.

#![deny(unsafe_code)]

use std::fmt;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use super::{Segment, CONFIG_CAPACITY};

#[repr(C, align(64))]
pub struct ConfigBlock {
    /// Sequence lock: odd while the writer is inside; the generation is `seq / 2`.
    seq: AtomicU64,
    len: AtomicU64,
    words: [AtomicU64; CONFIG_CAPACITY / 8],
}

#[derive(Debug)]
pub enum ConfigWriteError {
    TooLarge(usize),
}

impl fmt::Display for ConfigWriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigWriteError::TooLarge(n) => write!(
                f,
                "configuration is {n} bytes, shared memory holds at most {CONFIG_CAPACITY}"
            ),
        }
    }
}

impl Segment {
    /// The generation of the configuration now in the block (0: none written yet).
    pub fn config_generation(&self) -> u64 {
        self.config.seq.load(Ordering::Acquire) / 2
    }

    /// Publishes new configuration text; returns its generation. Single writer: the control
    /// plane.
    pub fn write_config(&self, text: &[u8]) -> Result<u64, ConfigWriteError> {
        if text.len() > CONFIG_CAPACITY {
            return Err(ConfigWriteError::TooLarge(text.len()));
        }
        let c = &self.config;
        let seq = c.seq.load(Ordering::Relaxed) & !1;
        c.seq.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        for (i, chunk) in text.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            c.words[i].store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        c.len.store(text.len() as u64, Ordering::Relaxed);
        c.seq.store(seq + 2, Ordering::Release);
        Ok((seq + 2) / 2)
    }

    /// Copies out a consistent configuration text and its generation, or `None` when none
    /// was written yet. Retries while the writer is inside (it never stays long).
    pub fn read_config(&self) -> Option<(u64, Vec<u8>)> {
        let c = &self.config;
        for _ in 0..10_000 {
            let s1 = c.seq.load(Ordering::Acquire);
            if s1 == 0 {
                return None;
            }
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let len = (c.len.load(Ordering::Relaxed) as usize).min(CONFIG_CAPACITY);
            let mut out = Vec::with_capacity(len + 8);
            for w in &c.words[..len.div_ceil(8)] {
                out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
            }
            out.truncate(len);
            fence(Ordering::Acquire);
            if c.seq.load(Ordering::Relaxed) == s1 {
                return Some((s1 / 2, out));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::{test_name, SharedMemory};
    use super::*;

    #[test]
    fn config_round_trips_and_generation_advances() {
        let name = test_name("cfg");
        let a = SharedMemory::create(&name).unwrap();
        let b = SharedMemory::attach(&name).unwrap();
        assert_eq!(b.segment().read_config(), None);
        let g1 = a.segment().write_config(b"state_dir = \"x\"\n").unwrap();
        assert_eq!(g1, 1);
        assert_eq!(
            b.segment().read_config(),
            Some((1, b"state_dir = \"x\"\n".to_vec()))
        );
        let long = vec![b'#'; 1001];
        let g2 = a.segment().write_config(&long).unwrap();
        assert_eq!(g2, 2);
        assert_eq!(b.segment().config_generation(), 2);
        assert_eq!(b.segment().read_config().unwrap().1, long);
        assert!(a
            .segment()
            .write_config(&vec![0; CONFIG_CAPACITY + 1])
            .is_err());
        SharedMemory::unlink(&name);
    }

    #[test]
    fn readers_never_see_a_torn_config() {
        let name = test_name("torn");
        let a = SharedMemory::create(&name).unwrap();
        let b = SharedMemory::attach(&name).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..2000u32 {
                    let byte = b'a' + (i % 26) as u8;
                    let text = vec![byte; 100 + (i as usize % 3000)];
                    a.segment().write_config(&text).unwrap();
                }
            });
            s.spawn(|| {
                for _ in 0..2000 {
                    if let Some((_, text)) = b.segment().read_config() {
                        assert!(text.iter().all(|c| *c == text[0]));
                    }
                }
            });
        });
        SharedMemory::unlink(&name);
    }
}
