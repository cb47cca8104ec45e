//! A well-behaved client that keeps asking while a test attacks and counts what goes
//! unanswered: STUN Binding requests, or HTTP requests through the proxy.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::http::{get_from, Answer};
use crate::net::answered_from;

pub struct Bystander {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(u64, Vec<String>)>>,
}

impl Bystander {
    /// Binding requests from `src` every 20 ms (three tries of 300 ms each before one counts
    /// as unanswered).
    pub fn stun(src: IpAddr, server: SocketAddr) -> Bystander {
        Bystander::spawn(move || {
            if answered_from(src, server, Duration::from_millis(300)) {
                Ok(())
            } else {
                Err(format!("Binding from {src} unanswered"))
            }
        })
    }

    /// `GET /` through the proxy from `src` every 20 ms; each must be answered 200.
    pub fn http(src: IpAddr, proxy: SocketAddr) -> Bystander {
        Bystander::spawn(move || match get_from(src, proxy, "/") {
            Answer::Status(200) => Ok(()),
            other => Err(format!("GET / from {src}: {other:?}")),
        })
    }

    fn spawn(f: impl Fn() -> Result<(), String> + Send + 'static) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut ok = 0;
            let mut failures = Vec::new();
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                match f() {
                    Ok(()) => ok += 1,
                    Err(e) => failures.push(e),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failures)
        });
        Bystander {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops it and asserts that it was answered every time (and at least `min_ok` times).
    #[track_caller]
    pub fn finish(mut self, min_ok: u64) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let (ok, failures) = self
            .thread
            .take()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| panic!("bystander thread panicked"))
            })
            .unwrap_or_default();
        assert!(
            failures.is_empty(),
            "a legitimate client from another source was refused {} times (answered {ok}): {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        assert!(ok >= min_ok, "the bystander got only {ok} answers");
        ok
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
