//! `FUTEX_WAIT` and `FUTEX_WAKE` on a 32-bit word of the shared segment: the events doorbell
//! (see `Segment::ring_events_doorbell`). Not `FUTEX_PRIVATE`: the waker is another process.
//! With [`super::mapping`] the only `unsafe` code of the segment.
//!
//! # Safety
//!
//! Both calls take the word as `&AtomicU32`: a live, aligned 32-bit atomic for the duration
//! of the call, wherever it lives (inside the mapping, that is invariants 1 and 2 of
//! [`super::mapping`]). The kernel only reads the word (`FUTEX_WAIT` compares it with the
//! expected value atomically) or uses its address as a key (`FUTEX_WAKE`); it never writes
//! through the pointer.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `word` holds `expected`, until a [`wake`] on it or `timeout`. Spurious and
/// early returns are fine for the caller, which re-checks its rings.
pub(super) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `word` is a live, aligned 32-bit atomic (module invariants) and `ts` outlives
    // the call; FUTEX_WAIT only reads both. The kernel compares the word with `expected`
    // atomically, so a wake between the caller's store and this call is not lost.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every waiter on `word`.
pub(super) fn wake(word: &AtomicU32) {
    // SAFETY: as in `wait`; FUTEX_WAKE does not access memory through the pointer, it only
    // uses its address as the key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}
