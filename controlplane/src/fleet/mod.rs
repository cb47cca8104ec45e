//! Fleet sharing through Redis (`[fleet] redis = "redis://HOST:PORT"`): the blacklist and
//! whitelist entries (automatic and manual) and the TURN users of every box.
//!
//! Redis holds the current state in two hashes, `portico:fleet:entries` (field: the source
//! block, value: the entry and the box that made it) and `portico:fleet:users` (field: the
//! user name), and every change is also published on the channel `portico:fleet:events`, which
//! every box subscribes to: a box enforces another's decision as soon as the message arrives.
//! Messages carry the name of the box that made them; a box ignores its own, and what it
//! applies from others it does not send again, so nothing echoes.
//!
//! When Redis is unreachable every box goes on with its local copy; its own decisions wait in
//! a queue (bounded). At every (re)connection, and every minute, a box replays that queue,
//! then reads both hashes: it applies what others made or removed (a removal stays in the
//! hash as a tombstone for a day), and writes what it holds that Redis lacks (Redis restarted
//! without its data, or the entry was made while Redis was away). A box that starts or comes back is thus in step within a round
//! trip.
//!
//! TURN users received from the fleet go through the same configuration change path as the
//! API (`Control::change`, source `fleet`): they are written into this box's configuration
//! file, and a box keeps serving them if Redis goes away for good.

pub mod resp;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use portico_shared::config::{FleetConfig, TurnUser};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::control::Control;
use crate::fraud::task::FleetOp;
use crate::fraud::{Entry, Source};
use resp::{Conn, Value};

const ENTRIES: &[u8] = b"portico:fleet:entries";
const USERS: &[u8] = b"portico:fleet:users";
const CHANNEL: &[u8] = b"portico:fleet:events";
/// Decisions kept while Redis is away; beyond this the oldest are dropped (the box's own
/// entries are written again at the next resynchronisation anyway).
const MAX_PENDING: usize = 100_000;
const RECONNECT: Duration = Duration::from_millis(500);
const RESYNC: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Msg {
    Put {
        from: String,
        entry: Entry,
    },
    /// Kept in the hash as a tombstone, so a box that was away learns of the removal.
    Delete {
        from: String,
        source: Source,
        #[serde(default)]
        at: u64,
    },
    UserPut {
        from: String,
        user: TurnUser,
    },
    UserDelete {
        from: String,
        name: String,
        #[serde(default)]
        at: u64,
    },
}

impl Msg {
    fn from(&self) -> &str {
        match self {
            Msg::Put { from, .. }
            | Msg::Delete { from, .. }
            | Msg::UserPut { from, .. }
            | Msg::UserDelete { from, .. } => from,
        }
    }
}

/// A TURN user change made through this box's API.
pub enum UserOp {
    Put(TurnUser),
    Delete(String),
}

static USER_OPS: OnceLock<mpsc::Sender<UserOp>> = OnceLock::new();

/// Tells the fleet about a TURN user change made through the API (no-op without a fleet).
pub fn user_changed(op: UserOp) {
    if let Some(tx) = USER_OPS.get() {
        if tx.try_send(op).is_err() {
            tracing::warn!("fleet: queue full, a user change waits for the next resync");
        }
    }
}

/// This box's name: `fleet.name`, else the host name.
pub fn box_name(cfg: &FleetConfig) -> String {
    if !cfg.name.is_empty() {
        return cfg.name.clone();
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "portico".into())
}

/// Starts the fleet task when `fleet.redis` is set.
pub fn start(cfg: &FleetConfig, control: Arc<Control>) {
    let Some((host, port)) = cfg.redis_addr() else {
        return;
    };
    let (fraud_tx, fraud_rx) = mpsc::channel(65_536);
    let (user_tx, user_rx) = mpsc::channel(4096);
    control.fraud.set_fleet(fraud_tx);
    let _ = USER_OPS.set(user_tx);
    let me = box_name(cfg);
    tracing::info!(redis = %format!("{host}:{port}"), name = %me, "fleet sharing through Redis");
    let task = Task {
        me,
        host,
        port,
        control,
        pending: VecDeque::new(),
    };
    tokio::spawn(task.run(fraud_rx, user_rx));
}

struct Task {
    me: String,
    host: String,
    port: u16,
    control: Arc<Control>,
    pending: VecDeque<Msg>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn to_json(m: &Msg) -> Vec<u8> {
    serde_json::to_vec(m).unwrap_or_default()
}

impl Task {
    fn queue(&mut self, m: Msg) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(m);
    }

    fn fraud_msg(&self, op: FleetOp) -> Msg {
        match op {
            FleetOp::Put(entry) => Msg::Put {
                from: self.me.clone(),
                entry,
            },
            FleetOp::Delete(source) => Msg::Delete {
                from: self.me.clone(),
                source,
                at: unix_now(),
            },
        }
    }

    fn user_msg(&self, op: UserOp) -> Msg {
        match op {
            UserOp::Put(user) => Msg::UserPut {
                from: self.me.clone(),
                user,
            },
            UserOp::Delete(name) => Msg::UserDelete {
                from: self.me.clone(),
                name,
                at: unix_now(),
            },
        }
    }

    async fn run(
        mut self,
        mut fraud_rx: mpsc::Receiver<FleetOp>,
        mut user_rx: mpsc::Receiver<UserOp>,
    ) {
        let mut was_up = true;
        loop {
            match self.session(&mut fraud_rx, &mut user_rx).await {
                Ok(()) => return,
                Err(e) => {
                    if was_up {
                        tracing::warn!(
                            "fleet: Redis unreachable ({e}); going on with the local lists"
                        );
                    }
                    was_up = false;
                }
            }
            // Keep taking decisions while Redis is away.
            let pause = tokio::time::sleep(RECONNECT);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    Some(op) = fraud_rx.recv() => { let m = self.fraud_msg(op); self.queue(m); }
                    Some(op) = user_rx.recv() => { let m = self.user_msg(op); self.queue(m); }
                }
            }
            if let Ok(c) = Conn::connect(&self.host, self.port).await {
                drop(c);
                if !was_up {
                    tracing::info!("fleet: Redis is back; resynchronising");
                }
                was_up = true;
            }
        }
    }

    /// One connected period; returns the error that ended it.
    async fn session(
        &mut self,
        fraud_rx: &mut mpsc::Receiver<FleetOp>,
        user_rx: &mut mpsc::Receiver<UserOp>,
    ) -> Result<(), std::io::Error> {
        let mut conn = Conn::connect(&self.host, self.port).await?;
        let mut sub = Conn::connect(&self.host, self.port).await?;
        sub.send(&[b"SUBSCRIBE", CHANNEL]).await?;
        let confirm = tokio::time::timeout(resp::COMMAND_TIMEOUT, sub.read())
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "SUBSCRIBE"))??;
        if !matches!(&confirm, Value::Array(Some(v)) if v.first().and_then(Value::bytes) == Some(b"subscribe"))
        {
            return Err(std::io::Error::other(format!(
                "unexpected SUBSCRIBE answer {confirm:?}"
            )));
        }
        let (msg_tx, mut msg_rx) = mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4096);
        let reader = tokio::spawn(async move {
            loop {
                let r = sub.read().await.and_then(|v| match v {
                    Value::Array(Some(mut parts)) if parts.len() == 3 => {
                        match parts.pop().and_then(|p| p.bytes().map(<[u8]>::to_vec)) {
                            Some(b) => Ok(b),
                            None => Err(std::io::Error::other("a message without payload")),
                        }
                    }
                    other => Err(std::io::Error::other(format!("unexpected push {other:?}"))),
                });
                let end = r.is_err();
                if msg_tx.send(r).await.is_err() || end {
                    return;
                }
            }
        });
        let _reader = AbortOnDrop(reader);
        self.resync(&mut conn).await?;
        let mut tick = tokio::time::interval(RESYNC);
        tick.tick().await;
        loop {
            tokio::select! {
                op = fraud_rx.recv() => {
                    let Some(op) = op else { return Ok(()) };
                    let m = self.fraud_msg(op);
                    self.write(&mut conn, m).await?;
                }
                op = user_rx.recv() => {
                    let Some(op) = op else { return Ok(()) };
                    let m = self.user_msg(op);
                    self.write(&mut conn, m).await?;
                }
                r = msg_rx.recv() => {
                    let payload = r.unwrap_or_else(|| Err(std::io::Error::other("subscriber ended")))?;
                    match serde_json::from_slice::<Msg>(&payload) {
                        Ok(m) => self.apply(m).await,
                        Err(e) => tracing::warn!("fleet: ignored a message that is not ours: {e}"),
                    }
                }
                _ = tick.tick() => self.resync(&mut conn).await?,
            }
        }
    }

    /// Writes one of this box's decisions to Redis (state, then the message); queued for
    /// later when Redis fails.
    async fn write(&mut self, conn: &mut Conn, m: Msg) -> Result<(), std::io::Error> {
        match send(conn, &m).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.queue(m);
                Err(e)
            }
        }
    }

    async fn apply(&mut self, m: Msg) {
        if m.from() == self.me {
            return;
        }
        match m {
            Msg::Put { from, entry } => {
                let source = entry.source;
                if self.control.fraud.apply_remote(entry) {
                    tracing::info!(source = %source, from = %from, "fleet: entry applied");
                }
            }
            Msg::Delete { from, source, .. } => {
                if self.control.fraud.remove_remote(source) {
                    tracing::info!(source = %source, from = %from, "fleet: entry removed");
                }
            }
            Msg::UserPut { from, user } => {
                let name = user.name.clone();
                let r = self
                    .control
                    .change("fleet", move |c| {
                        if c.turn.users.contains(&user) {
                            return Err(crate::control::ChangeError::Conflict(String::new()));
                        }
                        c.turn.users.retain(|u| u.name != user.name);
                        c.turn.users.push(user);
                        Ok(())
                    })
                    .await;
                match r {
                    Ok(_) => tracing::info!(user = %name, from = %from, "fleet: TURN user added"),
                    Err(crate::control::ChangeError::Conflict(_)) => {}
                    Err(e) => tracing::warn!(user = %name, "fleet: TURN user not applied: {e}"),
                }
            }
            Msg::UserDelete { from, name, .. } => {
                let n = name.clone();
                let r = self
                    .control
                    .change("fleet", move |c| {
                        let before = c.turn.users.len();
                        c.turn.users.retain(|u| u.name != n);
                        if c.turn.users.len() == before {
                            return Err(crate::control::ChangeError::NotFound(String::new()));
                        }
                        Ok(())
                    })
                    .await;
                if r.is_ok() {
                    tracing::info!(user = %name, from = %from, "fleet: TURN user deleted");
                }
            }
        }
    }

    /// Replays what waited, then brings this box and Redis in step (see the module doc).
    async fn resync(&mut self, conn: &mut Conn) -> Result<(), std::io::Error> {
        while let Some(m) = self.pending.pop_front() {
            if let Err(e) = send(conn, &m).await {
                self.pending.push_front(m);
                return Err(e);
            }
        }
        let now = unix_now();
        // Entries: what others made or removed is applied here; what this box holds and
        // Redis lacks (Redis lost its data, or the box made it while Redis was away) is
        // written back.
        let mut remote: HashMap<Source, Msg> = HashMap::new();
        for (field, value) in conn.cmd(&[b"HGETALL", ENTRIES]).await?.pairs() {
            let m = match serde_json::from_slice::<Msg>(&value) {
                Ok(m @ (Msg::Put { .. } | Msg::Delete { .. })) => m,
                _ => {
                    tracing::warn!("fleet: ignored an entry in Redis that is not ours");
                    continue;
                }
            };
            let (source, stale) = match &m {
                Msg::Put { entry, .. } => {
                    (entry.source, entry.expires_unix.is_some_and(|x| x <= now))
                }
                // Tombstones are kept a day: long enough for a box that was away.
                Msg::Delete { source, at, .. } => (*source, at.saturating_add(86_400) <= now),
                _ => continue,
            };
            if stale {
                conn.cmd(&[b"HDEL", ENTRIES, &field]).await?;
                continue;
            }
            remote.insert(source, m);
        }
        let local: HashMap<Source, Entry> = self
            .control
            .fraud
            .entries()
            .into_iter()
            .filter(|e| e.expires_unix.is_none_or(|x| x > now))
            .map(|e| (e.source, e))
            .collect();
        for (source, m) in &remote {
            if m.from() == self.me {
                continue;
            }
            // A removal older than this box's own entry does not remove it.
            if let (Msg::Delete { at, .. }, Some(e)) = (m, local.get(source)) {
                if e.created_unix > *at {
                    continue;
                }
            }
            self.apply(m.clone()).await;
        }
        for (source, e) in local {
            let newer = match remote.get(&source) {
                None => true,
                Some(Msg::Delete { at, .. }) => e.created_unix > *at,
                Some(_) => false,
            };
            if newer {
                let m = Msg::Put {
                    from: self.me.clone(),
                    entry: e,
                };
                send(conn, &m).await?;
            }
        }
        // TURN users, the same way (a user has no creation time: a tombstone of another box
        // removes it).
        let mut users: HashMap<String, Msg> = HashMap::new();
        for (field, value) in conn.cmd(&[b"HGETALL", USERS]).await?.pairs() {
            if let Ok(m @ (Msg::UserPut { .. } | Msg::UserDelete { .. })) =
                serde_json::from_slice::<Msg>(&value)
            {
                users.insert(String::from_utf8_lossy(&field).into_owned(), m);
            }
        }
        for m in users.values() {
            if m.from() != self.me {
                self.apply(m.clone()).await;
            }
        }
        for u in self.control.config().turn.users {
            if !users.contains_key(&u.name) {
                let m = Msg::UserPut {
                    from: self.me.clone(),
                    user: u,
                };
                send(conn, &m).await?;
            }
        }
        Ok(())
    }
}

/// State first (HSET; a removal as a tombstone), then the message: a box that subscribes between the two still
/// finds the change when it reads the hash.
async fn send(conn: &mut Conn, m: &Msg) -> Result<(), std::io::Error> {
    let json = to_json(m);
    match m {
        Msg::Put { entry, .. } => {
            let field = entry.source.to_string();
            conn.cmd(&[b"HSET", ENTRIES, field.as_bytes(), &json])
                .await?;
        }
        Msg::Delete { source, .. } => {
            let field = source.to_string();
            conn.cmd(&[b"HSET", ENTRIES, field.as_bytes(), &json])
                .await?;
        }
        Msg::UserPut { user, .. } => {
            conn.cmd(&[b"HSET", USERS, user.name.as_bytes(), &json])
                .await?;
        }
        Msg::UserDelete { name, .. } => {
            conn.cmd(&[b"HSET", USERS, name.as_bytes(), &json]).await?;
        }
    }
    conn.cmd(&[b"PUBLISH", CHANNEL, &json]).await?;
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
