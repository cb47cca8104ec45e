//! Drives the [`Engine`]: events in (dataplane rings, proxy reports), decisions out (the
//! shared-memory blacklist, the state file, logs and metrics).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use portico_shared::config::FraudConfig;
use portico_shared::shm::{SharedMemory, BLACKLIST_SLOTS};

use super::{store, Change, Engine, Entry, Kind};

/// How often the dataplane's event rings are drained: well inside the 100 ms in which a
/// decision must take effect.
const DRAIN_EVERY: Duration = Duration::from_millis(25);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Counters for `/metrics`.
#[derive(Default, Clone)]
pub struct FraudStats {
    /// (origin, reason) -> events.
    pub suspicious: BTreeMap<(String, String), u64>,
    /// Connections the proxy refused at accept time.
    pub blocked_connections: u64,
    /// Blacklist entries added automatically.
    pub auto_blacklisted: u64,
}

pub struct Fraud {
    engine: Mutex<Engine>,
    shm: Arc<SharedMemory>,
    path: PathBuf,
    stats: Mutex<FraudStats>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Fraud {
    /// Loads the persisted lists, mirrors them into shared memory and starts the driver task
    /// (on the current tokio runtime).
    pub fn start(
        shm: Arc<SharedMemory>,
        state_dir: &std::path::Path,
        cfg: &FraudConfig,
    ) -> Result<Arc<Fraud>, String> {
        let path = state_dir.join(store::FILE);
        let saved = store::load(&path)?;
        let mut engine = Engine::new(cfg, unix_now() ^ u64::from(std::process::id()));
        let now = unix_now();
        let restored = engine.restore(saved, now);
        // The segment may hold entries of an earlier run (the dataplane outlived us): start
        // the table from exactly our list.
        shm.segment().blacklist.clear();
        let f = Arc::new(Fraud {
            engine: Mutex::new(engine),
            shm,
            path,
            stats: Mutex::new(FraudStats::default()),
        });
        f.mirror(restored);
        let (black, white) = lock(&f.engine).count_by_kind();
        tracing::info!(black, white, file = %f.path.display(), "fraud lists loaded");
        tokio::spawn(Arc::clone(&f).run());
        Ok(f)
    }

    /// New settings; the dataplane's table is rebuilt, since the whitelist may now cover
    /// entries it enforces.
    pub fn reconfigure(&self, cfg: &FraudConfig) {
        lock(&self.engine).reconfigure(cfg);
        self.rebuild();
    }

    /// Mirrors decisions into the dataplane's table; rebuilds the table when it is full of
    /// tombstones.
    fn mirror(&self, changes: Vec<Change>) {
        let bl = &self.shm.segment().blacklist;
        for c in changes {
            let ok = match c {
                // The whitelist wins everywhere: an entry it covers is not enforced by the
                // dataplane either.
                Change::Block(s, _) if lock(&self.engine).whitelists(s.ip) => true,
                Change::Block(s, exp) => bl.insert(s.ip, s.shm_prefix(), exp),
                Change::Unblock(s) => {
                    bl.remove(s.ip, s.shm_prefix());
                    true
                }
            };
            if !ok {
                // Only tombstones can be reclaimed: when live entries alone fill the table,
                // rebuilding would not help and would briefly unblock everyone.
                if (bl.live() as usize) < BLACKLIST_SLOTS / 2 - 1 {
                    self.rebuild();
                } else {
                    tracing::error!(
                        "the dataplane blacklist is full; new blocks apply to the proxy only"
                    );
                }
            }
        }
    }

    fn rebuild(&self) {
        let bl = &self.shm.segment().blacklist;
        bl.clear();
        let now = unix_now();
        // Copied out first: the loop takes the engine's lock itself.
        let entries = lock(&self.engine).entries();
        for e in entries {
            let live = e.kind == Kind::Black
                && e.expires_unix.is_none_or(|x| x > now)
                && !lock(&self.engine).whitelists(e.source.ip);
            let until = e.expires_unix.unwrap_or(u64::MAX >> 8);
            if live && !bl.insert(e.source.ip, e.source.shm_prefix(), until) {
                tracing::error!(
                    "the dataplane blacklist is full; {} not enforced there",
                    e.source
                );
            }
        }
    }

    /// Counts a suspicious event from `origin` ("proxy", "turn", "stun") for `reason`.
    pub fn report(&self, ip: IpAddr, origin: &str, reason: &str) {
        *lock(&self.stats)
            .suspicious
            .entry((origin.to_string(), reason.to_string()))
            .or_insert(0) += 1;
        let change = lock(&self.engine).suspicious(ip, unix_now());
        if let Some(change) = change {
            if let Change::Block(s, exp) = &change {
                tracing::warn!(
                    source = %s,
                    origin,
                    reason,
                    until = exp,
                    "blacklisted: too many suspicious events"
                );
            }
            lock(&self.stats).auto_blacklisted += 1;
            self.mirror(vec![change]);
        }
    }

    /// The proxy asks this at accept time, before any TLS work.
    pub fn is_blocked(&self, ip: IpAddr) -> bool {
        let blocked = lock(&self.engine).is_blocked(ip, unix_now());
        if blocked {
            lock(&self.stats).blocked_connections += 1;
        }
        blocked
    }

    pub fn entries(&self) -> Vec<Entry> {
        lock(&self.engine).entries()
    }

    pub fn add(
        &self,
        ip: IpAddr,
        prefix: Option<u8>,
        kind: Kind,
        expires_unix: Option<u64>,
        note: String,
    ) -> Entry {
        let (e, changes) = lock(&self.engine).add(ip, prefix, kind, expires_unix, note, unix_now());
        tracing::info!(source = %e.source, kind = ?e.kind, "fraud list entry added by hand");
        self.mirror(changes);
        self.persist();
        e
    }

    pub fn remove(&self, ip: IpAddr) -> Option<Entry> {
        let (e, changes) = lock(&self.engine).remove(ip)?;
        tracing::info!(source = %e.source, kind = ?e.kind, "fraud list entry removed");
        self.mirror(changes);
        self.persist();
        Some(e)
    }

    pub fn whitelist(&self, ip: IpAddr) -> Option<Entry> {
        let (e, changes) = lock(&self.engine).make_white(ip, unix_now())?;
        tracing::info!(source = %e.source, "fraud list entry turned into a whitelist entry");
        self.mirror(changes);
        self.persist();
        Some(e)
    }

    /// Suspicious events the dataplane could not hand over (its ring was full).
    pub fn events_dropped(&self) -> u64 {
        self.shm.segment().events_dropped()
    }

    pub fn stats(&self) -> FraudStats {
        lock(&self.stats).clone()
    }

    /// (blacklist entries, whitelist entries, tracked sources)
    pub fn sizes(&self) -> (usize, usize, usize) {
        let e = lock(&self.engine);
        let (b, w) = e.count_by_kind();
        (b, w, e.tracked())
    }

    fn persist(&self) {
        let entries = {
            let mut e = lock(&self.engine);
            if !e.dirty {
                return;
            }
            e.dirty = false;
            e.entries()
        };
        if let Err(err) = store::save(&self.path, entries) {
            tracing::error!("{err}");
            lock(&self.engine).dirty = true;
        }
    }

    async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(DRAIN_EVERY);
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            n += 1;
            let mut events = Vec::new();
            self.shm.segment().drain_events(|e| events.push(e));
            for e in events {
                let origin = match e.kind {
                    portico_shared::shm::EventKind::RateExceeded => "stun",
                    _ => "turn",
                };
                self.report(e.ip, origin, e.kind.name());
            }
            if n.is_multiple_of(40) {
                let changes = lock(&self.engine).expire(unix_now());
                self.mirror(changes);
            }
            // Decisions reach the state file within one tick, so a control plane killed
            // right after blacklisting a source still has the entry when it comes back;
            // at most one write per tick however many decisions there were.
            self.persist();
        }
    }
}
