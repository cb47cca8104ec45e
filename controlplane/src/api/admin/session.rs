//! The admin page's sessions: a random id in a cookie, a CSRF token per session, a bounded
//! table with an idle and an absolute expiry.
//!
//! The table is keyed by the SHA-256 of the id, so looking a cookie up takes no time that
//! depends on how much of a guessed id was right. Ids and CSRF tokens are 256 random bits from
//! the system's generator.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use aws_lc_rs::digest::{digest, SHA256};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// Sessions open at once. A login when the table is full first drops expired sessions, then
/// the one used least recently: an operator who logs in again is never refused.
pub const MAX_SESSIONS: usize = 32;
/// A session unused this long is over (the page polls every few seconds while open).
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// A session is over this long after the login, used or not.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);

struct Session {
    csrf: String,
    created: Instant,
    used: Instant,
}

impl Session {
    fn live(&self, now: Instant) -> bool {
        now < self.created + LIFETIME && now < self.used + IDLE
    }
}

#[derive(Default)]
pub struct Sessions {
    table: Mutex<HashMap<[u8; 32], Session>>,
}

/// A new session: the id for the cookie and the CSRF token for the page.
pub struct NewSession {
    pub id: String,
    pub csrf: String,
}

fn key(id: &str) -> [u8; 32] {
    let mut k = [0u8; 32];
    k.copy_from_slice(digest(&SHA256, id.as_bytes()).as_ref());
    k
}

/// 256 random bits as 64 hex digits; `None` when the system's generator fails.
fn random_hex() -> Option<String> {
    let mut b = [0u8; 32];
    SystemRandom::new().fill(&mut b).ok()?;
    Some(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Sessions {
    /// Opens a session; `None` only when no random numbers could be had.
    pub fn create(&self, now: Instant) -> Option<NewSession> {
        let id = random_hex()?;
        let csrf = random_hex()?;
        let mut t = self.lock();
        if t.len() >= MAX_SESSIONS {
            t.retain(|_, s| s.live(now));
        }
        if t.len() >= MAX_SESSIONS {
            if let Some(oldest) = t.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| *k) {
                t.remove(&oldest);
            }
        }
        t.insert(
            key(&id),
            Session {
                csrf: csrf.clone(),
                created: now,
                used: now,
            },
        );
        Some(NewSession { id, csrf })
    }

    /// The CSRF token of the live session `id`, which counts as used now; `None` for an
    /// unknown or expired session (an expired one is dropped).
    pub fn check(&self, id: &str, now: Instant) -> Option<String> {
        let mut t = self.lock();
        let k = key(id);
        let s = t.get_mut(&k)?;
        if !s.live(now) {
            t.remove(&k);
            return None;
        }
        s.used = now;
        Some(s.csrf.clone())
    }

    /// Ends session `id`; whether it existed.
    pub fn remove(&self, id: &str) -> bool {
        self.lock().remove(&key(id)).is_some()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_tokens_are_random_and_distinct() {
        let s = Sessions::default();
        let now = Instant::now();
        let a = s.create(now).unwrap();
        let b = s.create(now).unwrap();
        assert_eq!(a.id.len(), 64);
        assert!(a.id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.id, b.id);
        assert_ne!(a.csrf, b.csrf);
        assert_ne!(a.id, a.csrf);
        assert_eq!(s.check(&a.id, now), Some(a.csrf.clone()));
        assert_eq!(s.check(&b.id, now), Some(b.csrf));
        assert_eq!(s.check("not-a-session", now), None);
    }

    #[test]
    fn idle_sessions_expire_and_use_keeps_them() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let a = s.create(t0).unwrap();
        let b = s.create(t0).unwrap();
        // `a` is used just before the idle limit, `b` is not.
        let t1 = t0 + IDLE - Duration::from_secs(1);
        assert!(s.check(&a.id, t1).is_some());
        let t2 = t0 + IDLE;
        assert_eq!(s.check(&b.id, t2), None, "idle for IDLE: over");
        assert!(s.check(&a.id, t2).is_some(), "used a second ago");
        assert_eq!(s.len(), 1, "the expired session was dropped");
    }

    #[test]
    fn sessions_end_after_their_lifetime_even_when_used() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let a = s.create(t0).unwrap();
        let mut t = t0;
        while t + IDLE / 2 < t0 + LIFETIME {
            t += IDLE / 2;
            assert!(s.check(&a.id, t).is_some());
        }
        assert_eq!(s.check(&a.id, t0 + LIFETIME), None);
    }

    #[test]
    fn logout_ends_the_session() {
        let s = Sessions::default();
        let now = Instant::now();
        let a = s.create(now).unwrap();
        assert!(s.remove(&a.id));
        assert!(!s.remove(&a.id));
        assert_eq!(s.check(&a.id, now), None);
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_least_recently_used() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let first = s.create(t0).unwrap();
        let second = s.create(t0 + Duration::from_secs(1)).unwrap();
        for i in 2..MAX_SESSIONS as u64 {
            s.create(t0 + Duration::from_secs(i)).unwrap();
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        // The first is used again, so the second is now the least recently used.
        let t = t0 + Duration::from_secs(100);
        assert!(s.check(&first.id, t).is_some());
        let newest = s.create(t).unwrap();
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(s.check(&second.id, t).is_none(), "evicted");
        assert!(s.check(&first.id, t).is_some());
        assert!(s.check(&newest.id, t).is_some());
        // Expired sessions all go before any live one: at `later` only `first` and `newest`
        // (used at `t`) are still live.
        let later = t + IDLE - Duration::from_secs(1);
        let kept = s.create(later).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.check(&kept.id, later).is_some());
        assert!(s.check(&newest.id, later).is_some());
    }
}
