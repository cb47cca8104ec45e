//! What the running control plane holds, and the one path every configuration change takes.
//!
//! The TOML file is the source of truth. A change (from the API or a `SIGHUP`) is validated
//! whole, written to the file atomically, and only then published to the dataplane through
//! shared memory. If the process dies between the two steps, the next start finds the file
//! ahead of shared memory and publishes it, so the file never describes something that was
//! not, or will not be, applied. Changes are serialised by one lock so two API calls cannot
//! interleave their read-modify-write.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use portico_shared::config::Config;
use portico_shared::shm::{SharedMemory, CONFIG_CAPACITY};

use crate::config::store;
use crate::fraud::task::Fraud;
use crate::metrics::Metrics;
use crate::supervisor;

/// Applies a new log filter to the control plane's own logging; `None` when `RUST_LOG` is set,
/// which then wins over the configuration.
pub type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// How long an API change waits for the dataplane to report the new generation applied.
const APPLY_WAIT: Duration = Duration::from_secs(2);

pub const FILE_HEADER: &str =
    "# Portico configuration. Written by portico when changed through its API;\n\
     # every key is documented in portico.example.toml.\n";

/// Keys whose new value the running processes cannot take over live.
const DATAPLANE_RESTART_KEYS: [&str; 7] = [
    "turn.listen",
    "turn.workers",
    "turn.pin_workers",
    "turn.io",
    "stun.alternate_ip",
    "stun.alternate_port",
    "turn.fast_path",
];

#[derive(Debug)]
pub enum ChangeError {
    /// The new configuration breaks a rule; the message names the key.
    Invalid(String),
    /// The request does not fit the current configuration (e.g. a user that already exists).
    Conflict(String),
    NotFound(String),
    /// Writing or publishing failed; nothing was applied.
    Internal(String),
}

impl std::fmt::Display for ChangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChangeError::Invalid(m)
            | ChangeError::Conflict(m)
            | ChangeError::NotFound(m)
            | ChangeError::Internal(m) => f.write_str(m),
        }
    }
}

/// The outcome of an applied change.
pub struct Applied {
    pub config: Config,
    pub generation: u64,
    /// Keys that changed but take effect only at the next start of the process that uses them.
    pub restart_required: Vec<&'static str>,
    /// Whether the dataplane reported the generation applied within [`APPLY_WAIT`].
    pub dataplane_applied: bool,
}

pub struct Control {
    pub shm: Arc<SharedMemory>,
    pub config_path: PathBuf,
    pub token: String,
    pub started: Instant,
    pub metrics: Metrics,
    /// The blacklist/whitelist engine shared by the proxy, the dataplane and the API.
    pub fraud: Arc<Fraud>,
    running: Mutex<Config>,
    changes: tokio::sync::Mutex<()>,
    log_reload: Option<LogReload>,
}

impl Control {
    pub fn new(
        shm: Arc<SharedMemory>,
        config: Config,
        config_path: PathBuf,
        token: String,
        log_reload: Option<LogReload>,
        fraud: Arc<Fraud>,
        proxy_metrics: &crate::proxy::metrics::ProxyMetrics,
    ) -> Control {
        let mut metrics = Metrics::new(Arc::clone(&shm));
        // Restarts counted by an earlier control plane of a dataplane we adopted.
        metrics.dataplane_restarts.inc_by(
            shm.segment()
                .header
                .dataplane_restarts
                .load(Ordering::Relaxed),
        );
        metrics.register_fraud(Arc::clone(&fraud));
        metrics.register_proxy(proxy_metrics);
        Control {
            metrics,
            fraud,
            shm,
            config_path,
            token,
            started: Instant::now(),
            running: Mutex::new(config),
            changes: tokio::sync::Mutex::new(()),
            log_reload,
        }
    }

    /// The configuration now in force.
    pub fn config(&self) -> Config {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn log_level(&self) -> String {
        self.config().log_level
    }

    /// Applies `edit` to a copy of the running configuration, then validates, stores and
    /// publishes the result. Nothing changes anywhere unless every step before it succeeded.
    pub async fn change<F>(&self, source: &'static str, edit: F) -> Result<Applied, ChangeError>
    where
        F: FnOnce(&mut Config) -> Result<(), ChangeError>,
    {
        let _serial = self.changes.lock().await;
        let old = self.config();
        let mut new = old.clone();
        let result = async {
            edit(&mut new)?;
            self.check(&old, &new)?;
            let text = new.to_toml();
            let before = old.to_toml();
            let path = self.config_path.clone();
            let after = text.clone();
            tokio::task::spawn_blocking(move || {
                // The operator's file keeps its comments and order: only the keys that
                // changed are edited in place. A file that cannot be read or parsed any more
                // (removed, or broken by hand since it was loaded) is written anew.
                let file = match std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|f| crate::config::edit::apply_change(&f, &before, &after))
                {
                    Ok(edited) => edited,
                    Err(e) => {
                        tracing::warn!(
                            file = %path.display(),
                            "{e}; writing the whole configuration (comments in it are lost)"
                        );
                        format!("{FILE_HEADER}{after}")
                    }
                };
                store::write_atomic(&path, file.as_bytes(), 0o600)
            })
            .await
            .map_err(|e| ChangeError::Internal(format!("writing the configuration: {e}")))?
            .map_err(|e| ChangeError::Internal(format!("{}: {e}", self.config_path.display())))?;
            self.publish(&old, new, &text).await
        }
        .await;
        self.metrics.reload(source, result.is_ok());
        match &result {
            Ok(a) => tracing::info!(
                source,
                generation = a.generation,
                file = %self.config_path.display(),
                restart_required = ?a.restart_required,
                dataplane_applied = a.dataplane_applied,
                "configuration applied"
            ),
            Err(e) => tracing::warn!(source, "configuration change rejected: {e}"),
        }
        result
    }

    /// `SIGHUP`: re-reads the file and applies it as it is (the file is not rewritten).
    pub async fn reload_file(&self) -> Result<Applied, String> {
        let _serial = self.changes.lock().await;
        let old = self.config();
        let result = async {
            let new = crate::config::load_file(&self.config_path)?;
            self.check(&old, &new).map_err(|e| e.to_string())?;
            let text = new.to_toml();
            self.publish(&old, new, &text)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        self.metrics.reload("sighup", result.is_ok());
        match &result {
            Ok(a) => tracing::info!(
                source = "sighup",
                generation = a.generation,
                file = %self.config_path.display(),
                restart_required = ?a.restart_required,
                "configuration applied"
            ),
            Err(e) => {
                tracing::error!("configuration not reloaded, keeping the running one: {e}")
            }
        }
        result
    }

    /// Rules beyond [`Config::validate`] that come from running: the state dir holds this
    /// process's shared-memory name and token, and the configuration must fit shared memory.
    fn check(&self, old: &Config, new: &Config) -> Result<(), ChangeError> {
        new.validate()
            .map_err(|e| ChangeError::Invalid(e.to_string()))?;
        if new.state_dir != old.state_dir {
            return Err(ChangeError::Invalid(format!(
                "state_dir: \"{}\" differs from the running \"{}\"; the state dir cannot change while Portico runs",
                new.state_dir.display(),
                old.state_dir.display()
            )));
        }
        crate::config::check_files(new).map_err(|e| ChangeError::Invalid(e.to_string()))?;
        let len = new.to_toml().len();
        if len > CONFIG_CAPACITY {
            return Err(ChangeError::Invalid(format!(
                "configuration is {len} bytes; shared memory holds at most {CONFIG_CAPACITY}"
            )));
        }
        Ok(())
    }

    async fn publish(&self, old: &Config, new: Config, text: &str) -> Result<Applied, ChangeError> {
        let generation = self
            .shm
            .segment()
            .write_config(text.as_bytes())
            .map_err(|e| ChangeError::Internal(e.to_string()))?;
        if new.log_level != old.log_level {
            if let Some(reload) = &self.log_reload {
                if let Err(e) = reload(&new.log_level) {
                    tracing::warn!("log_level not applied to the control plane: {e}");
                }
            }
        }
        let restart_required = restart_required(old, &new);
        self.fraud.reconfigure(&new.fraud);
        *self.running.lock().unwrap_or_else(PoisonError::into_inner) = new.clone();
        let dataplane_applied = self.wait_applied(generation).await;
        Ok(Applied {
            config: new,
            generation,
            restart_required,
            dataplane_applied,
        })
    }

    async fn wait_applied(&self, generation: u64) -> bool {
        let deadline = Instant::now() + APPLY_WAIT;
        let header = &self.shm.segment().header;
        loop {
            if header.config_applied.load(Ordering::Acquire) >= generation {
                return true;
            }
            if Instant::now() > deadline || supervisor::live_dataplane(&self.shm).is_none() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn restart_required(old: &Config, new: &Config) -> Vec<&'static str> {
    let changed = [
        old.turn.listen != new.turn.listen,
        old.turn.workers != new.turn.workers,
        old.turn.pin_workers != new.turn.pin_workers,
        old.turn.io != new.turn.io,
        old.stun.alternate_ip != new.stun.alternate_ip,
        old.stun.alternate_port != new.stun.alternate_port,
        old.turn.fast_path != new.turn.fast_path,
    ];
    let mut keys: Vec<&'static str> = DATAPLANE_RESTART_KEYS
        .iter()
        .zip(changed)
        .filter_map(|(k, c)| c.then_some(*k))
        .collect();
    if old.api.listen != new.api.listen {
        keys.push("api.listen");
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_required_names_changed_keys() {
        let old = Config::default();
        let mut new = old.clone();
        assert!(restart_required(&old, &new).is_empty());
        new.turn.realm = "other".into();
        assert!(restart_required(&old, &new).is_empty());
        new.turn.workers = 3;
        new.api.listen = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            restart_required(&old, &new),
            vec!["turn.workers", "api.listen"]
        );
    }
}
