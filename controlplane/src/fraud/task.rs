//! Drives the [`Engine`]: events in (dataplane rings, proxy reports), decisions out (the
//! shared-memory blacklist, the state file, logs and metrics).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use portico_shared::config::FraudConfig;
use portico_shared::shm::{EventKind, SharedMemory, BLACKLIST_SLOTS};

use super::{store, Change, Engine, Entry, Kind, Source};

/// A decision of this box for the rest of the fleet (see `crate::fleet`).
#[derive(Clone, Debug)]
pub enum FleetOp {
    Put(Entry),
    Delete(Source),
}

/// How often the driver task expires entries and writes the state file.
const TICK: Duration = Duration::from_millis(25);

/// The longest the event reader sleeps without a doorbell: a dataplane of an older build that
/// does not ring it is still drained this often.
const EVENTS_POLL: Duration = Duration::from_millis(100);

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
    /// The shared-memory blacklist has one writer at a time: the event reader thread, the
    /// proxy's reports and API calls all go through this.
    writer: Mutex<()>,
    /// `fraud.count_peer_refusals`.
    count_peer_refusals: AtomicBool,
    /// Where this box's own decisions go for the fleet, when there is one.
    fleet: Mutex<Option<tokio::sync::mpsc::Sender<FleetOp>>>,
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
        engine.restore(saved, now);
        let f = Arc::new(Fraud {
            engine: Mutex::new(engine),
            shm,
            path,
            stats: Mutex::new(FraudStats::default()),
            writer: Mutex::new(()),
            count_peer_refusals: AtomicBool::new(cfg.count_peer_refusals),
            fleet: Mutex::new(None),
        });
        // The segment may hold entries of an earlier run (the dataplane outlived us): replace
        // them with exactly our list, in one switch (the dataplane keeps enforcing the old
        // list until then).
        f.rebuild();
        let (black, white) = lock(&f.engine).count_by_kind();
        tracing::info!(black, white, file = %f.path.display(), "fraud lists loaded");
        let reader = Arc::clone(&f);
        std::thread::Builder::new()
            .name("fraud-events".into())
            .spawn(move || reader.read_events())
            .map_err(|e| format!("fraud: cannot start the event reader: {e}"))?;
        tokio::spawn(Arc::clone(&f).run());
        Ok(f)
    }

    /// New settings; the dataplane's table is rebuilt, since the whitelist may now cover
    /// entries it enforces.
    pub fn reconfigure(&self, cfg: &FraudConfig) {
        lock(&self.engine).reconfigure(cfg);
        self.count_peer_refusals
            .store(cfg.count_peer_refusals, Ordering::Relaxed);
        self.rebuild();
    }

    /// From now on this box's own decisions (automatic and manual) are sent to `tx`.
    pub fn set_fleet(&self, tx: tokio::sync::mpsc::Sender<FleetOp>) {
        *lock(&self.fleet) = Some(tx);
    }

    fn publish(&self, op: FleetOp) {
        if let Some(tx) = lock(&self.fleet).as_ref() {
            if tx.try_send(op).is_err() {
                // The fleet task resynchronises its whole list periodically.
                tracing::warn!("fleet: queue full, a decision waits for the next resync");
            }
        }
    }

    /// An entry another box of the fleet made: applied here, not sent back.
    pub fn apply_remote(&self, e: Entry) -> bool {
        let white = e.kind == Kind::White;
        let Some(changes) = lock(&self.engine).put(e, unix_now()) else {
            return false;
        };
        if white {
            self.rebuild();
        } else {
            self.mirror(changes);
        }
        self.persist();
        true
    }

    /// An entry another box of the fleet removed.
    pub fn remove_remote(&self, source: Source) -> bool {
        let Some((_, changes)) = lock(&self.engine).remove_source(source) else {
            return false;
        };
        self.mirror(changes);
        self.persist();
        true
    }

    /// Mirrors decisions into the dataplane's table; rebuilds the table when it is full of
    /// tombstones.
    fn mirror(&self, changes: Vec<Change>) {
        let _writer = lock(&self.writer);
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
                    self.rebuild_locked();
                } else {
                    tracing::error!(
                        "the dataplane blacklist is full; new blocks apply to the proxy only"
                    );
                }
            }
        }
    }

    /// Writes the dataplane's table anew from the lists: built aside and switched in one
    /// store, so the dataplane never sees an empty or partial list.
    fn rebuild(&self) {
        let _writer = lock(&self.writer);
        self.rebuild_locked();
    }

    fn rebuild_locked(&self) {
        let now = unix_now();
        let live: Vec<_> = {
            let engine = lock(&self.engine);
            engine
                .entries()
                .into_iter()
                .filter(|e| {
                    e.kind == Kind::Black
                        && e.expires_unix.is_none_or(|x| x > now)
                        && !engine.whitelists(e.source.ip)
                })
                .map(|e| {
                    let until = e.expires_unix.unwrap_or(u64::MAX >> 8);
                    (e.source.ip, e.source.shm_prefix(), until)
                })
                .collect()
        };
        let refused = self.shm.segment().blacklist.replace(live);
        if !refused.is_empty() {
            tracing::error!(
                "the dataplane blacklist is full; {} entries not enforced there",
                refused.len()
            );
        }
    }

    /// Counts a suspicious event from `origin` ("proxy", "turn", "stun") for `reason`.
    pub fn report(&self, ip: IpAddr, origin: &str, reason: &str) {
        *lock(&self.stats)
            .suspicious
            .entry((origin.to_string(), reason.to_string()))
            .or_insert(0) += 1;
        self.count(ip, origin, reason);
    }

    /// Counts an event toward blacklisting (the caller has counted it in the metrics).
    fn count(&self, ip: IpAddr, origin: &str, reason: &str) {
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
            let made = match &change {
                Change::Block(s, _) => lock(&self.engine).exact(s.ip, s.prefix).cloned(),
                Change::Unblock(_) => None,
            };
            self.mirror(vec![change]);
            if let Some(e) = made {
                self.publish(FleetOp::Put(e));
            }
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
        if kind == Kind::White {
            // A whitelist entry (a range too) lifts every blacklist entry it covers, in the
            // dataplane as well.
            self.rebuild();
        } else {
            self.mirror(changes);
        }
        self.persist();
        self.publish(FleetOp::Put(e.clone()));
        e
    }

    /// Whitelist range entries in use, and how many there may be.
    pub fn white_ranges(&self) -> (usize, usize) {
        (lock(&self.engine).white_ranges(), super::MAX_WHITE_RANGES)
    }

    /// The entry of exactly this block.
    pub fn exact(&self, ip: IpAddr, prefix: u8) -> Option<Entry> {
        lock(&self.engine).exact(ip, prefix).cloned()
    }

    /// Removes the entry of exactly this block (`ip/prefix` as the API names a range).
    pub fn remove_exact(&self, ip: IpAddr, prefix: u8) -> Option<Entry> {
        let key = super::Source::cidr(ip, prefix);
        let (e, changes) = lock(&self.engine).remove_source(key)?;
        tracing::info!(source = %e.source, kind = ?e.kind, "fraud list entry removed");
        self.mirror(changes);
        self.persist();
        self.publish(FleetOp::Delete(e.source));
        Some(e)
    }

    pub fn remove(&self, ip: IpAddr) -> Option<Entry> {
        let (e, changes) = lock(&self.engine).remove(ip)?;
        tracing::info!(source = %e.source, kind = ?e.kind, "fraud list entry removed");
        self.mirror(changes);
        self.persist();
        self.publish(FleetOp::Delete(e.source));
        Some(e)
    }

    pub fn whitelist(&self, ip: IpAddr) -> Option<Entry> {
        let (e, changes) = lock(&self.engine).make_white(ip, unix_now())?;
        tracing::info!(source = %e.source, "fraud list entry turned into a whitelist entry");
        self.mirror(changes);
        self.persist();
        self.publish(FleetOp::Put(e.clone()));
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

    /// The event reader (a thread of its own): sleeps on the segment's doorbell, which a
    /// dataplane worker rings when it pushes an event, and hands every event to the engine at
    /// once. A brute force over UDP is then cut within a few attempts of the threshold, not
    /// after a polling interval's worth of them.
    fn read_events(&self) {
        let seg = self.shm.segment();
        loop {
            seg.arm_events_doorbell();
            let mut events = Vec::new();
            seg.drain_events(|e| events.push(e));
            if events.is_empty() {
                seg.wait_events_doorbell(EVENTS_POLL);
                continue;
            }
            for e in events {
                self.dataplane_event(e.kind, e.ip);
            }
        }
    }

    fn dataplane_event(&self, kind: EventKind, ip: IpAddr) {
        let origin = match kind {
            EventKind::RateExceeded => "stun",
            EventKind::MediaForeignSource => "media",
            _ => "turn",
        };
        *lock(&self.stats)
            .suspicious
            .entry((origin.to_string(), kind.name().to_string()))
            .or_insert(0) += 1;
        // A peer refused by the policy is what a WebRTC client's private host candidates
        // get: counted toward blacklisting only where the operator asked for it.
        if kind == EventKind::PeerDenied && !self.count_peer_refusals.load(Ordering::Relaxed) {
            return;
        }
        self.count(ip, origin, kind.name());
    }

    async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TICK);
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            n += 1;
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
