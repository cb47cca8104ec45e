//! `portico`: the control plane. It loads and validates the configuration, prepares the
//! state directory, creates the shared memory, and starts and supervises the dataplane.

mod config;
mod state;
mod supervisor;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Parser, Subcommand};
use portico_shared::shm::{Driver, SharedMemory};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

use supervisor::{Backoff, Dataplane};

#[derive(Parser)]
#[command(
    name = "portico",
    version,
    about = "Public-access edge for IP telephony: STUN/TURN and media relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run Portico (the default): without --config, on the configuration kept in
    /// ./portico-state/portico.toml, created from the embedded defaults on first start.
    Run {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
    /// Run the packet engine (normally started by `portico run` itself).
    Dataplane {
        #[arg(long)]
        shm: String,
        #[arg(long, default_value = "info")]
        log_level: String,
    },
}

fn init_logging(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(None),
        Some(Cmd::Run { config }) => run(config.as_deref()),
        Some(Cmd::Check { config }) => config::load_file(&config).map(|_| {
            println!("{}: ok", config.display());
        }),
        Some(Cmd::Dataplane { shm, log_level }) => {
            init_logging(&log_level);
            portico_dataplane::runtime::run(&shm)
        }
    };
    if let Err(e) = result {
        eprintln!("portico: {e}");
        std::process::exit(1);
    }
}

fn run(config_file: Option<&Path>) -> Result<(), String> {
    let loaded = config::load(config_file)?;
    init_logging(&loaded.config.log_level);
    let state = state::prepare(&loaded.config.state_dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    rt.block_on(serve(loaded, state))
}

async fn serve(loaded: config::Loaded, state: state::State) -> Result<(), String> {
    let mut config = loaded.config;
    let shm_name = SharedMemory::name_for_state_dir(&state.dir);
    let (shm, adopted) = match SharedMemory::attach(&shm_name) {
        Ok(shm) => match supervisor::live_dataplane(&shm) {
            Some(pid) => (shm, Some(pid)),
            None => (
                SharedMemory::create(&shm_name).map_err(|e| e.to_string())?,
                None,
            ),
        },
        Err(_) => (
            SharedMemory::create(&shm_name).map_err(|e| e.to_string())?,
            None,
        ),
    };
    shm.segment()
        .header
        .controlplane_pid
        .store(std::process::id(), Ordering::Relaxed);
    shm.segment()
        .write_config(config.to_toml().as_bytes())
        .map_err(|e| e.to_string())?;

    let mut dataplane = match adopted {
        Some(pid) => {
            tracing::info!(pid, "re-attached to the running dataplane");
            Dataplane::adopt(pid)
        }
        None => Dataplane::start(&shm, &config.log_level).await?,
    };
    let driver = Driver::from_u32(shm.segment().header.driver.load(Ordering::Relaxed));
    tracing::info!(
        config = %loaded.path.display(),
        state_dir = %state.dir.display(),
        admin_token = %state.token_path.display(),
        dataplane_pid = dataplane.pid(),
        driver = driver.name(),
        "portico is running: STUN/TURN on {:?}",
        config.turn.listen
    );

    let sig = |k: SignalKind| signal(k).map_err(|e| format!("installing signal handler: {e}"));
    let mut sigint = sig(SignalKind::interrupt())?;
    let mut sigterm = sig(SignalKind::terminate())?;
    let mut sighup = sig(SignalKind::hangup())?;
    let mut backoff = Backoff::new();
    let mut restarts = 0u64;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                match config::load_file(&loaded.path) {
                    Ok(c) => match shm.segment().write_config(c.to_toml().as_bytes()) {
                        Ok(g) => {
                            tracing::info!(generation = g, file = %loaded.path.display(), "configuration reloaded");
                            config = c;
                        }
                        Err(e) => tracing::error!("configuration not applied: {e}"),
                    },
                    Err(e) => tracing::error!("configuration not reloaded, keeping the running one: {e}"),
                }
            }
            how = dataplane.exited() => {
                let ran = dataplane.started.elapsed();
                let delay = backoff.delay(ran);
                restarts += 1;
                tracing::error!(restarts, "dataplane exited ({how}); restarting in {delay:?}");
                tokio::time::sleep(delay).await;
                dataplane = loop {
                    match Dataplane::start(&shm, &config.log_level).await {
                        Ok(d) => break d,
                        Err(e) => {
                            let delay = backoff.delay(Duration::ZERO);
                            tracing::error!("dataplane restart failed: {e}; retrying in {delay:?}");
                            tokio::time::sleep(delay).await;
                        }
                    }
                };
            }
        }
    }
    tracing::info!("stopping");
    dataplane.stop().await;
    SharedMemory::unlink(&shm_name);
    tracing::info!("stopped");
    Ok(())
}
